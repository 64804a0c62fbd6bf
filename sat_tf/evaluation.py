"""Robustness evaluation: accuracy under a list of attacks and epsilons, with masking checks.

    results = evaluate(model, (images, labels), attacks=["clean", "pgd-10", "pgd-50x3", "apgd-ce",
                       "apgd-t", "square", "autoattack"], epsilons=[2, 4, 8])
    results.save("eval/")  # results.json, results.md, accuracy_vs_{epsilon,steps}.png

Attack specs are strings `name[-budget][xrestarts]` or `AttackSpec`s:
    "clean"                  no attack.
    "fgsm"                   one signed-gradient step of size epsilon.
    "pgd-K", "pgd-KxR"       PGD, K steps of 2.5 * epsilon / K (Madry et al. 2018), random start;
                             R restarts, an example counts as robust only if it survives all R.
    "apgd-ce[-K]"            APGD on cross-entropy, K steps (default 100).
    "apgd-t[-K]"             APGD on the targeted DLR loss, 9 target classes, K steps (default 100).
    "square[-Q]"             Square Attack, Q queries (default 5000).
    "autoattack[-fast]"      the AutoAttack ensemble, "standard" (default) or "fast".
Epsilons are L-inf radii in pixel units (0-255 images: 8 means 8/255). Besides the table, the
evaluation runs "pgd-20" at `large_epsilon` and, when a `surrogate` model is given, a transfer
PGD from it, for the checks in `sat_tf.masking`. An attack runs only on the examples still
standing (correct clean, and for restart r, having survived restarts 1..r-1): the accuracy is
that of attacking every example, at a fraction of the cost when accuracy is low.
`tools/eval.py` is the command-line front end.
"""

import dataclasses
import re
import time
import weakref

import numpy as np
import tensorflow as tf

from sat_tf import autoattack, masking, reporting

_PATTERN = re.compile(
    r"^(clean|fgsm|pgd|apgd-ce|apgd-t|square|autoattack)(?:-(\d+|fast|standard))?(?:x(\d+))?$"
)
_DEFAULT_BUDGET = {"pgd": 10, "apgd-ce": 100, "apgd-t": 100, "square": 5000}


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack of the table.

    Attributes:
        kind: "clean", "fgsm", "pgd", "apgd-ce", "apgd-t", "square", "autoattack" or "transfer".
        num_steps: Steps (PGD, APGD) or queries (Square); None where it does not apply.
        num_restarts: Random restarts (PGD, APGD).
        version: AutoAttack version, "standard" or "fast".
        step_size: PGD step in pixels; None for Madry's 2.5 * epsilon / num_steps.
    """

    kind: str
    num_steps: int | None = None
    num_restarts: int = 1
    version: str = "standard"
    step_size: float | None = None

    @property
    def label(self):
        if self.kind == "autoattack":
            return "autoattack" if self.version == "standard" else f"autoattack-{self.version}"
        budget = f"-{self.num_steps}" if self.num_steps is not None else ""
        restarts = f"x{self.num_restarts}" if self.num_restarts > 1 else ""
        return f"{self.kind}{budget}{restarts}"


def parse_attack(spec):
    """An `AttackSpec` from a string such as "pgd-50x3" (or an `AttackSpec`, returned as is)."""
    if isinstance(spec, AttackSpec):
        return spec
    match = _PATTERN.match(str(spec).strip().lower())
    if not match:
        raise ValueError(
            f"Unknown attack spec. Received: {spec!r}; see sat_tf.evaluation's docstring."
        )
    kind, budget, restarts = match.groups()
    if kind == "autoattack":
        return AttackSpec("autoattack", version=budget or "standard")
    if budget is not None and not budget.isdigit():
        raise ValueError(f"Only autoattack takes a version. Received: {spec!r}")
    steps = int(budget) if budget else _DEFAULT_BUDGET.get(kind)
    return AttackSpec(kind, steps, int(restarts or 1))


_COMPILED = weakref.WeakKeyDictionary()  # model -> {(kind, epsilon, steps): tf.function}


def _gradient_attack(source, kind, images, labels, *, epsilon, num_steps, seed, step_size=None):
    """`sat_tf.attacks` FGSM or PGD (default step 2.5 * epsilon / K, Madry et al. 2018), compiled
    once per (model, kind, epsilon, steps, step)."""
    from sat_tf import attacks  # Imported here: attacks.py is the training-time module.

    per_model = _COMPILED.setdefault(source, {})
    if step_size is None and kind == "pgd":
        step_size = 2.5 * epsilon / num_steps
    key = (kind, float(epsilon), num_steps, step_size)
    ref = weakref.ref(source)  # The cache is keyed weakly on the model: do not keep it alive.
    if key not in per_model:
        if kind == "fgsm":
            fn = lambda x, y, s: attacks.fgsm(ref(), x, y, epsilon=epsilon)  # noqa: E731
        else:
            fn = lambda x, y, s: attacks.pgd(  # noqa: E731
                ref(), x, y, epsilon=epsilon, step_size=step_size, num_steps=num_steps, seed=s
            )
        per_model[key] = tf.function(fn, reduce_retracing=True)
    return per_model[key](images, labels, tf.constant([seed, 0], tf.int64))


def _correct(model, images, labels):
    return np.argmax(np.asarray(model(images, training=False)), axis=1) == labels


def attack_batch(model, spec, images, labels, *, epsilon, seed=0, source=None):
    """Per-example robustness of one batch: [B] bool, True where the model stays correct.

    Args:
        model: The model evaluated.
        spec: An `AttackSpec`.
        images: [B, H, W, C] pixels.
        labels: [B] int classes.
        epsilon: L-inf radius in pixel units.
        seed: Seed of the attack (restart r of PGD uses seed + r).
        source: The model the attack computes gradients on, for kind="transfer" (else `model`).
    """
    x, y = tf.constant(images, tf.float32), tf.constant(labels, tf.int32)
    if spec.kind == "autoattack":
        return autoattack.auto_attack(
            model, images, labels, epsilon=epsilon, version=spec.version, seed=seed
        ).robust
    robust = _correct(model, x, labels)
    if spec.kind == "clean":
        return robust
    for restart in range(spec.num_restarts if spec.kind in ("pgd", "transfer") else 1):
        if spec.kind in ("fgsm", "pgd", "transfer"):
            kind = "fgsm" if spec.kind == "fgsm" else "pgd"
            adv = _gradient_attack(
                source or model,
                kind,
                x,
                y,
                epsilon=epsilon,
                num_steps=spec.num_steps,
                seed=seed + restart,
                step_size=spec.step_size,
            )
        elif spec.kind == "square":
            adv = autoattack.square(
                model, x, y, epsilon=epsilon, num_queries=spec.num_steps, seed=seed
            )
        else:
            adv = autoattack.apgd(
                model,
                x,
                y,
                epsilon=epsilon,
                num_steps=spec.num_steps,
                seed=seed,
                loss="ce" if spec.kind == "apgd-ce" else "dlr",
                targeted=spec.kind == "apgd-t",
                num_restarts=spec.num_restarts,
            )
        robust &= _correct(model, adv, labels)  # An example is robust only if it survives all.
    return robust


def collect(dataset, num_examples=None):
    """(images float32 [N, H, W, C], labels int32 [N]) from arrays or a tf.data (batched or not)."""
    if isinstance(dataset, tuple | list):
        images, labels = (np.asarray(a) for a in dataset)
    else:
        parts = [(np.asarray(x), np.asarray(y)) for x, y in dataset.as_numpy_iterator()]
        if parts and parts[0][1].ndim == 0:  # An unbatched dataset.
            parts = [(x[None], y[None]) for x, y in parts]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
    if labels.ndim > 1:  # One-hot.
        labels = np.argmax(labels, axis=-1)
    n = len(labels) if num_examples is None else min(num_examples, len(labels))
    return images[:n].astype(np.float32), labels[:n].astype(np.int32)


def _run(model, spec, images, labels, *, epsilon, seed, batch_size, source=None):
    """One attack on every example: (row, [N] bool robust).

    Only the examples still standing are attacked: first the correctly classified ones, then, for
    each further PGD restart, those that survived the earlier restarts (as AutoAttack does). The
    accuracy is the same as attacking everything (an example counts as robust only if it is
    correct and survives every restart), at a fraction of the cost on a model with low accuracy.
    """
    start = time.perf_counter()
    clean = AttackSpec("clean")
    robust = np.zeros(len(labels), bool)
    for i in range(0, len(labels), batch_size):
        robust[i : i + batch_size] = attack_batch(
            model, clean, images[i : i + batch_size], labels[i : i + batch_size], epsilon=0.0
        )
    restarts = spec.num_restarts if spec.kind in ("pgd", "transfer") else 1
    single = dataclasses.replace(spec, num_restarts=1) if restarts > 1 else spec
    for restart in range(restarts if spec.kind != "clean" else 0):
        standing = np.flatnonzero(robust)
        for i in range(0, len(standing), batch_size):
            chunk = standing[i : i + batch_size]
            robust[chunk] = attack_batch(
                model,
                single,
                images[chunk],
                labels[chunk],
                epsilon=epsilon,
                seed=seed + restart,
                source=source,
            )
    row = dict(
        attack=spec.label,
        kind=spec.kind,
        epsilon=float(epsilon),
        num_steps=spec.num_steps,
        num_restarts=spec.num_restarts,
        step_size=spec.step_size,
        accuracy=float(robust.mean()),
        seconds=round(time.perf_counter() - start, 3),
    )
    return row, robust


def evaluate(
    model,
    dataset,
    *,
    attacks,
    epsilons,
    num_examples=None,
    batch_size=128,
    seed=0,
    surrogate=None,
    pgd_step_size=None,
    large_epsilon=128.0,
    checks=True,
    verbose=True,
):
    """Accuracy of `model` under every attack at every epsilon, plus the masking checks.

    Args:
        model: Keras model mapping [0, 255] pixels to logits.
        dataset: (images, labels) arrays, or a tf.data.Dataset of (images, labels).
        attacks: Attack specs, strings or `AttackSpec`s (see the module docstring).
        epsilons: L-inf radii, pixel units.
        num_examples: Evaluate on the first N examples (all when None).
        batch_size: Examples per attack call.
        seed: Seed of every attack.
        surrogate: Optional model (e.g. the ReLU twin) for the transfer check: PGD-20 computed
            on it, evaluated on `model`, at every epsilon.
        pgd_step_size: Step in pixels of the listed PGD attacks (e.g. 1, as in the official SAT
            evaluation); None uses 2.5 * epsilon / K. The masking probes keep 2.5 * epsilon / K.
        large_epsilon: Radius at which PGD-20 should bring accuracy to ~0; None skips it.
        checks: Run the gradient-masking checks of `sat_tf.masking`.
        verbose: Print one line per row and per check.

    Returns:
        A `reporting.EvaluationResults` (rows, per-epsilon worst case over attacks, checks).
    """
    images, labels = collect(dataset, num_examples)
    specs = [parse_attack(a) for a in attacks]
    if pgd_step_size is not None:
        specs = [
            dataclasses.replace(a, step_size=float(pgd_step_size)) if a.kind == "pgd" else a
            for a in specs
        ]
    rows, worst = [], {}
    jobs = [(spec, eps, None) for eps in epsilons for spec in specs if spec.kind != "clean"]
    jobs = [(AttackSpec("clean"), 0.0, None)] + jobs
    if surrogate is not None:
        jobs += [(AttackSpec("transfer", 20), eps, surrogate) for eps in epsilons]
    if large_epsilon is not None and checks:
        jobs.append((AttackSpec("pgd", 20), float(large_epsilon), None))
    for spec, eps, source in jobs:
        row, robust = _run(
            model,
            spec,
            images,
            labels,
            epsilon=eps,
            seed=seed,
            batch_size=batch_size,
            source=source,
        )
        rows.append(row)
        if spec.kind != "transfer" and eps in epsilons:
            worst[eps] = worst.get(eps, robust) & robust
        if verbose:
            accuracy, seconds = row["accuracy"], row["seconds"]
            print(f"{spec.label:>16s}  eps={eps:<7g} accuracy={accuracy:.4f}  ({seconds:.1f} s)")
    tolerance = max(0.01, 1.0 / max(len(labels), 1))
    found = (
        masking.run_checks(
            model, images, rows, large_epsilon=large_epsilon, tolerance=tolerance, verbose=verbose
        )
        if checks
        else []
    )
    return reporting.EvaluationResults(
        rows=rows,
        worst_case={float(e): float(r.mean()) for e, r in worst.items()},
        checks=found,
        num_examples=len(labels),
    )
