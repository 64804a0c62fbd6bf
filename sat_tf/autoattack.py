"""AutoAttack, L-inf: an ensemble of attacks, each run on the examples no earlier one fooled.

Croce & Hein, ICML 2020. The versions, their stage order and budgets follow fra31/auto-attack
(`autoattack.py`, `set_version`); the attacks live in `sat_tf.apgd`, `sat_tf.fab` and
`sat_tf.square` and are re-exported here.

Versions:
    "standard": APGD-CE (100 steps, 1 restart), APGD-T (targeted DLR, 100 steps, 9 target
        classes, 1 restart each), FAB-T (100 steps, 9 target classes, 1 restart), Square (5,000
        queries, p_init 0.8, AutoAttack's unrescaled p schedule). The number to report, as
        RobustBench does.
    "rand": for randomized models: APGD-CE and APGD-DLR, 100 steps, 1 restart, each step
        averaging 20 gradients (expectation over transformation).
    "fast": APGD-CE 20 steps; APGD-T 20 steps, 3 target classes; Square 300 queries (no FAB-T).
        For CPU smoke runs and tests, not for a reported number.
"""

import dataclasses
import warnings

import numpy as np
import tensorflow as tf

from sat_tf import attacks as attacks_module
from sat_tf import passes
from sat_tf.apgd import apgd, check_num_classes, checkpoints, dlr_loss, margin, targeted_dlr_loss
from sat_tf.fab import fab_targeted
from sat_tf.square import p_schedule, square

__all__ = [
    "VERSIONS",
    "AutoAttackResult",
    "apgd",
    "auto_attack",
    "checkpoints",
    "dlr_loss",
    "fab_targeted",
    "margin",
    "p_schedule",
    "square",
    "targeted_dlr_loss",
]

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")

VERSIONS = {
    "standard": dict(
        attacks=("apgd-ce", "apgd-t", "fab-t", "square"),
        apgd_steps=100,
        num_restarts=1,
        target_classes=9,
        fab_steps=100,
        square_queries=5000,
        eot_iter=1,
    ),
    "rand": dict(
        attacks=("apgd-ce", "apgd-dlr"),
        apgd_steps=100,
        num_restarts=1,
        target_classes=9,
        fab_steps=100,
        square_queries=5000,
        eot_iter=20,
    ),
    "fast": dict(
        attacks=("apgd-ce", "apgd-t", "square"),
        apgd_steps=20,
        num_restarts=1,
        target_classes=3,
        fab_steps=20,
        square_queries=300,
        eot_iter=1,
    ),
}


@dataclasses.dataclass(frozen=True)
class AutoAttackResult:
    """What `auto_attack` found.

    Attributes:
        clean_accuracy: Accuracy on the clean images.
        robust_accuracy: Accuracy after all stages (examples robust to every attack).
        stages: Stage name ("clean", "apgd-ce", "apgd-t", "fab-t", "square", ...) -> robust
            accuracy after that stage, cumulative, so non-increasing in insertion order.
        adversarial_images: [N, H, W, C] float32; the successful adversarial image where one was
            found, the clean image elsewhere.
        robust: [N] bool, True where no stage fooled the model.
        fooled_by: [N] int, per example the index in `stages` of the stage that fooled it (0:
            misclassified clean), -1 where none did.
    """

    clean_accuracy: float
    robust_accuracy: float
    stages: dict
    adversarial_images: np.ndarray
    robust: np.ndarray
    fooled_by: np.ndarray = None


def describe(version):
    """One line naming a version's stages and budgets, e.g. for a result file."""
    v = VERSIONS[version]
    words = {
        "apgd-ce": f"APGD-CE {v['apgd_steps']} steps",
        "apgd-dlr": f"APGD-DLR {v['apgd_steps']} steps",
        "apgd-t": f"APGD-T (DLR) {v['apgd_steps']} steps x {v['target_classes']} target classes",
        "fab-t": f"FAB-T {v['fab_steps']} steps x {v['target_classes']} target classes",
        "square": f"Square {v['square_queries']} queries",
    }
    eot = f", EOT {v['eot_iter']} gradients per step" if v["eot_iter"] > 1 else ""
    stages = ", then ".join(words[name] for name in v["attacks"])
    return f"sat_tf.autoattack.auto_attack(version={version!r}): {stages}{eot}"


def stage_passes(
    model, names, *, num_classes, epsilon, version, seed, clip_min, clip_max, jit_compile=False
):
    """`sat_tf.passes.Pass`es of the stages `names`, with their worst-case work per example."""
    v = VERSIONS[version]
    bounds = dict(epsilon=epsilon, clip_min=clip_min, clip_max=clip_max)
    steps = dict(num_steps=v["apgd_steps"], num_restarts=v["num_restarts"], seed=seed)
    steps.update(eot_iter=v["eot_iter"], jit_compile=jit_compile, **bounds)
    targets = min(v["target_classes"], num_classes - 1)  # `check_attacks` warned once.
    # APGD: a gradient at the start, then one per step (as fra31/auto-attack's apgd counts).
    apgd_gradients = (v["apgd_steps"] + 1) * v["num_restarts"] * v["eot_iter"]

    # Pass(name, attack, gradients, queries) per stage, worst case per example. Every stage is
    # described (nothing runs here); `names` picks those to run.
    build = {
        "apgd-ce": passes.Pass(
            "apgd-ce", lambda x, y: apgd(model, x, y, loss="ce", **steps), apgd_gradients
        ),
        "apgd-dlr": passes.Pass(
            "apgd-dlr", lambda x, y: apgd(model, x, y, loss="dlr", **steps), apgd_gradients
        ),
        "apgd-t": passes.Pass(
            "apgd-t",
            lambda x, y: apgd(
                model, x, y, loss="dlr", targeted=True, target_classes=targets, **steps
            ),
            apgd_gradients * targets,
        ),
        "fab-t": passes.Pass(  # per step: one gradient and two forward passes
            "fab-t",
            lambda x, y: fab_targeted(
                model,
                x,
                y,
                num_steps=v["fab_steps"],
                target_classes=targets,
                jit_compile=jit_compile,
                **bounds,
            ),
            v["fab_steps"] * targets,
            2 * v["fab_steps"] * targets + 1,
        ),
        "square": passes.Pass(
            "square",
            lambda x, y: square(
                model,
                x,
                y,
                num_queries=v["square_queries"],
                seed=seed,
                jit_compile=jit_compile,
                **bounds,
            ),
            0,
            v["square_queries"] + 2,
        ),
    }
    return [build[name] for name in names]


def check_attacks(attacks, version, num_classes):
    """The stage list to run, after checking names and the model's class count."""
    if version not in VERSIONS:
        raise ValueError(
            f"version must be one of {sorted(VERSIONS)}. Received: version={version!r}"
        )
    names = tuple(VERSIONS[version]["attacks"] if attacks is None else attacks)
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names:
        raise ValueError(
            f"attacks must be names from {list(ATTACKS)}. Received: attacks={attacks!r}"
        )
    if num_classes < 2:
        raise ValueError(f"The model has {num_classes} output; a classifier needs >= 2 logits.")
    for name in names:
        if name in ("apgd-dlr", "apgd-t"):
            check_num_classes(num_classes, loss="dlr", targeted=name == "apgd-t")
    targets = VERSIONS[version]["target_classes"]
    targeted = [name for name in names if name in ("apgd-t", "fab-t")]
    if targeted and targets > num_classes - 1:
        warnings.warn(
            f"{', '.join(targeted)}: a {num_classes}-class model has {num_classes - 1} target "
            f"classes, not {targets}; using {num_classes - 1}.",
            stacklevel=3,
        )
    return names


def auto_attack(
    model,
    images,
    labels,
    *,
    epsilon,
    version="standard",
    attacks=None,
    seed=0,
    batch_size=256,
    clip_min=0.0,
    clip_max=255.0,
    jit_compile=False,
    verbose=0,
):
    """Runs AutoAttack's stages in order, each only on the examples no earlier stage fooled.

    Every adversarial image is re-checked with a fresh forward pass before it counts, so an
    example is robust only if every stage failed on it (worst case per example).

    Args:
        model: Keras model mapping images to logits (not probabilities). APGD-T needs >= 4
            classes, APGD-DLR >= 3; with fewer than 10, the targeted stages use K - 1 targets.
        images: [N, H, W, C] pixels in [clip_min, clip_max] (NumPy array or tensor).
        labels: [N] int true classes.
        epsilon: L-inf radius, in pixel units.
        version: "standard", "rand" or "fast" (see the module docstring).
        attacks: None for the version's stages, or a list of names from `ATTACKS` run in that
            order with the version's budgets (e.g. ["apgd-ce", "fab-t", "square"] for a
            2-class model, where the DLR losses cannot run).
        seed: Seed of every stage.
        batch_size: Examples per attack call.
        clip_min: Lowest valid pixel value.
        clip_max: Highest valid pixel value.
        jit_compile: Compile the attacks with XLA.
        verbose: 1 shows each stage's progress (`sat_tf.progress`); 0 is silent.

    Returns:
        An `AutoAttackResult`.
    """
    x = np.asarray(images, np.float32)
    y = np.asarray(labels).astype(np.int32)
    attacks_module.require_logits(model, where="auto_attack")
    num_classes = int(model(tf.constant(x[:1]), training=False).shape[-1])
    job = attack_job(
        model,
        epsilon=epsilon,
        version=version,
        attacks=attacks,
        num_classes=num_classes,
        seed=seed,
        clip_min=clip_min,
        clip_max=clip_max,
        jit_compile=jit_compile,
    )
    fooled_by = np.full(len(y), passes.ROBUST, np.int16)
    adv = x.copy()
    if len(y):
        passes.run_job(
            model,
            job,
            x,
            y,
            fooled_by=fooled_by,
            batch_size=max(1, min(batch_size, len(y))),
            adversarial=adv,
            pad=jit_compile,
            verbose=verbose,
        )
    accuracy = stage_accuracies(fooled_by, [p.name for p in job.passes])
    return AutoAttackResult(
        clean_accuracy=accuracy["clean"],
        robust_accuracy=accuracy[job.passes[-1].name],
        stages=accuracy,
        adversarial_images=adv,
        robust=fooled_by == passes.ROBUST,
        fooled_by=fooled_by,
    )


def attack_job(
    model,
    *,
    epsilon,
    num_classes,
    version="standard",
    attacks=None,
    seed=0,
    clip_min=0.0,
    clip_max=255.0,
    jit_compile=False,
):
    """AutoAttack at one epsilon as a `sat_tf.passes.Job`: the clean pass, then the stages
    (checked against the version and the model's `num_classes`), labelled "autoattack eps=8"."""
    names = check_attacks(attacks, version, num_classes)
    stages = stage_passes(
        model,
        names,
        num_classes=num_classes,
        epsilon=epsilon,
        version=version,
        seed=seed,
        clip_min=clip_min,
        clip_max=clip_max,
        jit_compile=jit_compile,
    )
    label = "autoattack" if version == "standard" else f"autoattack-{version}"
    return passes.Job(f"{label} eps={epsilon:g}", (passes.CLEAN, *stages))


def stage_accuracies(fooled_by, names):
    """Stage name -> accuracy after it (cumulative), from a job's `fooled_by` record."""
    if not len(fooled_by):
        return {name: 0.0 for name in names}
    return {name: float(passes.robust_after(fooled_by, i).mean()) for i, name in enumerate(names)}
