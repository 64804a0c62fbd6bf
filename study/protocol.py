"""What the study runs: its rows, seeds and arms, and the fixed evaluation protocol.

The protocol (`EVAL`, pixels of [0, 255]) is the same for every row and is recorded in each result
file; results of another `version` are re-evaluated from the saved model. Sized by the probe in
docs/study.md: PGD-20 and PGD-50 x 2 on all 10,000 test images are the headline (attacking only the
examples still standing keeps them affordable); the epsilon curve and AutoAttack run on a fixed
subset. The digits arm (`ARMS`) adds configs/study/_digits.cfg after each row's flagfile and
writes under `digits/` subfolders.
"""

import dataclasses
import time

# Queue order inside a seed: the paper's comparison first, then the ablation, then the rest.
ROWS = (
    "relu",
    "silu",
    "clean_relu",
    "smoothgrad_attack",
    "smoothgrad_update",
    "smoothgrad_both",
    "softplus",
    "parametric_softplus",
    "gelu",
    "elu",
    "smooth_relu",
)
SEEDS = (0, 1, 2)
SUMMARY = ("clean", "pgd20", "pgd50x2", "autoattack")  # the metrics a finished run prints
STANDARD_AA = "autoattack_standard"  # subfolder of the standard-AutoAttack pass's results

EVAL = dict(
    version=2,  # results of another version are re-evaluated (the trained model is reused)
    epsilon=4.0,  # the SAT paper's threat model
    step_size=1.0,  # the official SAT evaluation's PGD step at epsilon 4
    full_examples=10_000,  # clean, PGD-20, PGD-50 x 2 restarts
    subset_examples=1_000,  # the epsilon curve, masking checks, AutoAttack
    subset_seed=0,  # permutation of the test set that picks the subset (the listing is by class)
    curve_epsilons=(2.0, 4.0, 8.0),  # PGD-20 with step epsilon / 4 (1 at epsilon 4)
    large_epsilon=128.0,  # PGD-20 here must reach ~0% (masking check)
    autoattack_version="fast",  # "standard" costs ~1M gradients per run: see docs/study.md
    batch_size=128,
)
# The digits arm: all 360 test digits for everything, at `make demo`'s epsilon of 16/255.
EVAL_DIGITS = dict(
    EVAL,
    version=1,
    epsilon=16.0,
    step_size=4.0,  # epsilon / 4, as in the CIFAR-10 arm and configs/demo.cfg
    full_examples=360,
    subset_examples=360,
    curve_epsilons=(8.0, 16.0, 32.0),
)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One dataset of the study: the same rows, another recipe scale and evaluation.

    Attributes:
        name: "cifar10" or "digits" (`--arm`).
        data: The dataset's name in the report.
        flagfile: Given after each row's flagfile (its data and recipe), or "" for none.
        folder: Subfolder of results/study/, of `<cache>/runs/` and of the claims ("" for none).
        protocol: The evaluation protocol (`EVAL`).
    """

    name: str
    data: str
    flagfile: str
    folder: str
    protocol: dict


ARMS = {
    "cifar10": Arm("cifar10", "CIFAR-10", "", "", EVAL),
    "digits": Arm("digits", "digits", "configs/study/_digits.cfg", "digits", EVAL_DIGITS),
}
CIFAR10 = ARMS["cifar10"]


def _accuracy(rows, attack, epsilon):
    return next(r.accuracy for r in rows if r.attack == attack and r.epsilon == epsilon)


def evaluate_model(model, images, labels, protocol=EVAL):
    """An `EVAL`-shaped protocol on one model; every attack uses the model's exact gradient.

    Returns:
        The record's "metrics": clean, pgd20, pgd50x2 (all images), subset_clean, subset_pgd20,
        autoattack (the subset), the epsilon curve, every row and the masking checks.
    """
    from sat_tf import activations, autoattack, evaluation, masking

    eps, step, n = protocol["epsilon"], protocol["step_size"], protocol["subset_examples"]
    kw = dict(batch_size=protocol["batch_size"], checks=False, large_epsilon=None, verbose=2)
    # SmoothGradReLU defaults to its smooth backward; the evaluation attacks the ReLU network.
    with activations.smooth_gradients(False):
        full = evaluation.evaluate(
            model,
            (images, labels),
            attacks=["clean", "pgd-20", "pgd-50x2"],
            epsilons=[eps],
            pgd_step_size=step,
            num_examples=protocol["full_examples"],
            **kw,
        )
        sub = images[:n], labels[:n]
        rows = []
        for e in protocol["curve_epsilons"]:
            part = evaluation.evaluate(
                model, sub, attacks=["clean", "pgd-20"], epsilons=[e], pgd_step_size=e / 4, **kw
            )
            rows += [r for r in part.rows if r.kind != "clean" or not rows]
        large = evaluation.evaluate(
            model, sub, attacks=["pgd-20"], epsilons=[protocol["large_epsilon"]], **kw
        )
        rows += [r for r in large.rows if r.kind != "clean"]
        large_epsilon, tolerance = protocol["large_epsilon"], max(0.01, 1 / n)
        checks = masking.run_checks(
            model, sub[0], rows, large_epsilon=large_epsilon, tolerance=tolerance, verbose=False
        )
        more = masking.check_more_iterations(full.rows, tolerance=0.01)  # on all images
        checks = [more if c.name == more.name else c for c in checks]
        print("\n".join(c.line() for c in checks))
        start = time.perf_counter()
        aa = autoattack.auto_attack(
            model, *sub, epsilon=eps, version=protocol["autoattack_version"]
        )
        aa_seconds = time.perf_counter() - start
    return dict(
        clean=full.clean_accuracy,
        pgd20=_accuracy(full.rows, "pgd-20", eps),
        subset_clean=rows[0].accuracy,
        subset_pgd20=_accuracy(rows, "pgd-20", eps),
        pgd50x2=_accuracy(full.rows, "pgd-50x2", eps),
        autoattack=aa.robust_accuracy,
        autoattack_stages=aa.stages,
        autoattack_seconds=round(aa_seconds, 1),
        curve={str(e): _accuracy(rows, "pgd-20", e) for e in protocol["curve_epsilons"]},
        rows=[r.to_dict() for r in full.rows + rows],
        checks=[dict(name=c.name, status=c.status, message=c.message) for c in checks],
    )
