"""AutoAttack, L-inf: an ensemble of attacks, each run on the examples no earlier one fooled.

Croce & Hein, ICML 2020. The versions, their stage order and budgets follow fra31/auto-attack
(`autoattack.py`, `set_version`) and live in `sat_tf.jobs.VERSIONS`, beside the registry that
builds every stage; the attacks live in `sat_tf.apgd`, `sat_tf.fab` and `sat_tf.square` and are
re-exported here.

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

import numpy as np

from sat_tf import jobs, passes
from sat_tf.apgd import apgd, checkpoints, dlr_loss, margin, targeted_dlr_loss
from sat_tf.fab import fab_targeted
from sat_tf.jobs import STAGES, VERSIONS
from sat_tf.rows import AttackSpec
from sat_tf.square import p_schedule, square

__all__ = [
    "STAGES",
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


def spec(version="standard", attacks=None):
    """The `AttackSpec` of AutoAttack `version` (its own stages, or `attacks` with its budgets)."""
    return AttackSpec(
        "autoattack", version=version, stages=None if attacks is None else tuple(attacks)
    )


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
        attacks: None for the version's stages, or a list of names from `STAGES` run in that
            order with the version's budgets (e.g. ["apgd-ce", "fab-t", "square"] for a
            2-class model, where the DLR losses cannot run).
        seed: Seed of every stage.
        batch_size: Examples per attack call.
        clip_min: Lowest valid pixel value.
        clip_max: Highest valid pixel value.
        jit_compile: Compile the attacks with XLA.
        verbose: 0 silent; 1 the work ahead, an estimate and each stage's progress
            (`sat_tf.progress`); 2 nothing but what a resumed run would print (as `evaluate`).

    Returns:
        An `AutoAttackResult`.
    """
    x = np.asarray(images, np.float32)
    adv = x.copy()
    ran, record = jobs.run(
        model,
        (x, labels),
        [(spec(version, attacks), float(epsilon))],
        where="auto_attack",
        seed=seed,
        batch_size=batch_size,
        clip_min=clip_min,
        clip_max=clip_max,
        jit_compile=jit_compile,
        adversarial=adv,
        verbose=verbose,
    )
    fooled_by = record.fooled_by[0]
    accuracy = stage_accuracies(fooled_by, [p.name for p in ran[0].passes])
    return AutoAttackResult(
        clean_accuracy=accuracy["clean"],
        robust_accuracy=accuracy[ran[0].passes[-1].name],
        stages=accuracy,
        adversarial_images=adv,
        robust=fooled_by == passes.ROBUST,
        fooled_by=fooled_by,
    )


def stage_accuracies(fooled_by, names):
    """Stage name -> accuracy after it (cumulative), from a job's `fooled_by` record."""
    if not len(fooled_by):
        return {name: 0.0 for name in names}
    return {name: float(passes.robust_after(fooled_by, i).mean()) for i, name in enumerate(names)}
