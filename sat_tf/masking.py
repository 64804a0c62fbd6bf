"""Sanity checks for gradient masking, reported next to every robustness number.

A robust accuracy is only as good as the attack behind it. These checks cover the warning signs
listed by Athalye, Carlini & Wagner (ICML 2018, Sec. 3.1), Carlini et al. ("On Evaluating
Adversarial Robustness", 2019, Sec. 5) and AutoAttack's `flags_doc.md` (fra31/auto-attack):
outputs that are probabilities, randomness, accuracy that does not fall with epsilon or does not
reach ~0 at a large one, more iterations or restarts that help the model, a black-box or transfer
attack stronger than the white-box one. A check that fails says "warn": it is evidence to look at,
not proof of masking.

The model-probing checks call the model; the others read evaluation rows (`sat_tf.rows.Row`), as
`sat_tf.evaluation` writes them.
"""

import dataclasses

import numpy as np

from sat_tf import backend

WHITE_BOX = ("fgsm", "pgd", "apgd-ce", "apgd-t", "autoattack")


@dataclasses.dataclass(frozen=True)
class Check:
    """One check: `passed` is True (pass), False (warn) or None (skipped: nothing to compare)."""

    name: str
    passed: bool | None
    message: str
    values: dict = dataclasses.field(default_factory=dict)

    @property
    def status(self):
        return {True: "pass", False: "warn", None: "skip"}[self.passed]

    def line(self):
        return f"[{self.status.upper()}] {self.name}: {self.message}"


def check_logits(model, images):
    """Warns when every output row is non-negative and sums to 1: probabilities, not logits.

    Gradients of a saturated softmax vanish, so attacks on probabilities look weaker than they
    are (Carlini & Wagner 2017, "Defensive distillation is not robust").
    """
    out = backend.to_numpy(model(images, training=False)).astype(np.float64)
    sums = out.sum(axis=1)
    probabilities = bool(np.all(out >= 0) and np.allclose(sums, 1.0, atol=1e-3))
    values = {
        "min_output": float(out.min()),
        "max_abs_row_sum_minus_1": float(np.max(abs(sums - 1))),
    }
    message = (
        "outputs look like probabilities (rows >= 0, sum to 1); attack the logits instead"
        if probabilities
        else f"outputs are logits (min {values['min_output']:.3g}, rows do not sum to 1)"
    )
    return Check("outputs are logits", not probabilities, message, values)


def check_deterministic(model, images):
    """Warns when two calls on the same input differ: a randomized model needs EOT attacks."""
    first = backend.to_numpy(model(images, training=False))
    second = backend.to_numpy(model(images, training=False))
    diff = float(np.max(np.abs(first - second)))
    ok = diff <= 1e-5 * max(1.0, float(np.max(np.abs(first))))
    message = f"max |f(x) - f(x)| over two calls = {diff:.3g}"
    if not ok:
        message += (
            "; randomized outputs: evaluate with auto_attack(..., version='rand') (APGD with "
            "expectation over transformation, Athalye 2018)"
        )
    return Check("deterministic", ok, message, {"max_abs_diff": diff})


def _series(rows, kind=None, attack=None):
    return [
        r
        for r in rows
        if (kind is None or r.kind == kind) and (attack is None or r.attack == attack)
    ]


def check_epsilon_monotone(rows, *, tolerance):
    """Warns when an attack's accuracy rises with epsilon by more than `tolerance`."""
    worst = {}
    for attack in sorted({r.attack for r in rows if r.kind != "clean"}):
        series = sorted(_series(rows, attack=attack), key=lambda r: r.epsilon)
        for low, high in zip(series[:-1], series[1:], strict=True):
            rise = high.accuracy - low.accuracy
            if rise > worst.get("rise", -np.inf):
                worst = {
                    "attack": attack,
                    "rise": rise,
                    "from": low.epsilon,
                    "to": high.epsilon,
                }
    if not worst:
        return Check("accuracy falls as epsilon grows", None, "fewer than two epsilons per attack")
    ok = worst["rise"] <= tolerance
    message = (
        f"largest rise {worst['rise']:+.3f} ({worst['attack']}, eps {worst['from']:g} -> "
        f"{worst['to']:g}); tolerance {tolerance:.3f}"
    )
    return Check("accuracy falls as epsilon grows", ok, message, worst)


def check_large_epsilon(rows, *, epsilon, threshold=0.05):
    """Warns unless the white-box accuracy at a large `epsilon` is at most `threshold` (~0)."""
    found = [r for r in rows if r.epsilon == epsilon and r.kind in WHITE_BOX]
    if not found:
        return Check("accuracy ~0 at a large epsilon", None, f"no white-box row at eps={epsilon:g}")
    best = min(found, key=lambda r: r.accuracy)
    ok = best.accuracy <= threshold
    accuracy = best.accuracy
    message = f"{best.attack} at eps={epsilon:g}: accuracy {accuracy:.3f} (want <= {threshold})"
    return Check(
        "accuracy ~0 at a large epsilon",
        ok,
        message,
        {"accuracy": best.accuracy, "epsilon": epsilon},
    )


def check_more_iterations(rows, *, tolerance):
    """Warns when a PGD with at least as many steps and restarts is weaker by > `tolerance`."""
    worst = None
    for a in _series(rows, kind="pgd"):
        for b in _series(rows, kind="pgd"):
            stronger = b.num_steps >= a.num_steps and b.num_restarts >= a.num_restarts
            if a is b or a.epsilon != b.epsilon or not stronger:
                continue
            rise = b.accuracy - a.accuracy
            if worst is None or rise > worst["rise"]:
                worst = {
                    "rise": rise,
                    "weaker": a.attack,
                    "stronger": b.attack,
                    "epsilon": a.epsilon,
                }
    if worst is None:
        return Check("more steps/restarts never help", None, "need two PGD budgets at one epsilon")
    ok = worst["rise"] <= tolerance
    message = (
        f"largest rise {worst['rise']:+.3f} from {worst['weaker']} to {worst['stronger']} "
        f"at eps={worst['epsilon']:g}; tolerance {tolerance:.3f}"
    )
    return Check("more steps/restarts never help", ok, message, worst)


def _weaker_than_white_box(rows, kind, name, *, tolerance):
    worst = None
    for row in _series(rows, kind=kind):
        white = [r for r in rows if r.epsilon == row.epsilon and r.kind in WHITE_BOX]
        if not white:
            continue
        best = min(white, key=lambda r: r.accuracy)
        gap = best.accuracy - row.accuracy  # > 0: the weaker attack found more.
        if worst is None or gap > worst["gap"]:
            worst = {
                "gap": gap,
                "attack": row.attack,
                "accuracy": row.accuracy,
                "white_box": best.attack,
                "white_box_accuracy": best.accuracy,
                "epsilon": row.epsilon,
            }
    if worst is None:
        return Check(name, None, f"no {kind} row with a white-box row at the same epsilon")
    ok = worst["gap"] <= tolerance
    message = (
        f"eps={worst['epsilon']:g}: {worst['attack']} {worst['accuracy']:.3f} vs "
        f"{worst['white_box']} {worst['white_box_accuracy']:.3f}; tolerance {tolerance:.3f}"
    )
    return Check(name, ok, message, worst)


def check_black_box_weaker(rows, *, tolerance):
    """Warns when Square (black-box) beats the best white-box attack at some epsilon."""
    return _weaker_than_white_box(
        rows, "square", "black-box not stronger than white-box", tolerance=tolerance
    )


def check_transfer_weaker(rows, *, tolerance):
    """Warns when a transfer attack from a surrogate beats the best white-box attack."""
    return _weaker_than_white_box(
        rows, "transfer", "transfer not stronger than white-box", tolerance=tolerance
    )


def run_checks(model, images, rows, *, large_epsilon, tolerance, verbose=True):
    """All checks; prints one pass/warn/skip line each when `verbose`."""
    probe = images[: min(len(images), 64)]
    checks = [
        check_logits(model, probe),
        check_deterministic(model, probe),
        check_epsilon_monotone(rows, tolerance=tolerance),
        check_large_epsilon(rows, epsilon=large_epsilon)
        if large_epsilon is not None
        else Check("accuracy ~0 at a large epsilon", None, "large_epsilon=None"),
        check_more_iterations(rows, tolerance=tolerance),
        check_black_box_weaker(rows, tolerance=tolerance),
        check_transfer_weaker(rows, tolerance=tolerance),
    ]
    if verbose:
        for check in checks:
            print(check.line())
    return checks
