"""AutoAttack, L-inf: APGD-CE, then APGD-T, then Square, each on the examples still robust.

Croce & Hein, ICML 2020; the stage order and the "standard" budgets follow fra31/auto-attack
(`autoattack.py`, version="standard"), without FAB-T, which the paper reports never changed the
robust accuracy by more than 0.1 pp after APGD-T. The attacks themselves live in `sat_tf.apgd`
and `sat_tf.square` and are re-exported here.

Versions:
    "standard": APGD-CE 100 steps, 1 restart; APGD-T (targeted DLR) 100 steps, 9 target classes,
        1 restart each; Square 5,000 queries, p_init 0.8. The number to report.
    "fast": APGD-CE 20 steps; APGD-T 20 steps, 3 target classes; Square 300 queries. 12x fewer
        gradients, 17x fewer queries: for CPU smoke runs and tests, not for a reported number.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from sat_tf.apgd import apgd, checkpoints, dlr_loss, margin, targeted_dlr_loss
from sat_tf.square import p_schedule, square

__all__ = [
    "VERSIONS",
    "AutoAttackResult",
    "apgd",
    "auto_attack",
    "checkpoints",
    "dlr_loss",
    "margin",
    "p_schedule",
    "square",
    "targeted_dlr_loss",
]

VERSIONS = {
    "standard": dict(apgd_steps=100, num_restarts=1, target_classes=9, square_queries=5000),
    "fast": dict(apgd_steps=20, num_restarts=1, target_classes=3, square_queries=300),
}


@dataclasses.dataclass(frozen=True)
class AutoAttackResult:
    """What `auto_attack` found.

    Attributes:
        clean_accuracy: Accuracy on the clean images.
        robust_accuracy: Accuracy after all stages (examples robust to every attack).
        stages: Stage name ("clean", "apgd-ce", "apgd-t", "square") -> robust accuracy after that
            stage, cumulative, so non-increasing in insertion order.
        adversarial_images: [N, H, W, C] float32; the successful adversarial image where one was
            found, the clean image elsewhere.
        robust: [N] bool, True where no stage fooled the model.
    """

    clean_accuracy: float
    robust_accuracy: float
    stages: dict
    adversarial_images: np.ndarray
    robust: np.ndarray


def predict_labels(model, images, batch_size=256):
    """Arg-max predictions, in batches, with `training=False`."""
    out = [
        np.argmax(model(tf.constant(images[i : i + batch_size]), training=False), axis=1)
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros([0], np.int64)


def _stages(model, *, epsilon, version, seed, clip_min, clip_max):
    if version not in VERSIONS:
        raise ValueError(
            f"version must be one of {sorted(VERSIONS)}. Received: version={version!r}"
        )
    v = VERSIONS[version]
    common = dict(epsilon=epsilon, seed=seed, clip_min=clip_min, clip_max=clip_max)
    steps = dict(num_steps=v["apgd_steps"], num_restarts=v["num_restarts"])
    return [
        ("apgd-ce", lambda x, y: apgd(model, x, y, loss="ce", **steps, **common)),
        (
            "apgd-t",
            lambda x, y: apgd(
                model,
                x,
                y,
                loss="dlr",
                targeted=True,
                target_classes=v["target_classes"],
                **steps,
                **common,
            ),
        ),
        ("square", lambda x, y: square(model, x, y, num_queries=v["square_queries"], **common)),
    ]


def auto_attack(
    model,
    images,
    labels,
    *,
    epsilon,
    version="standard",
    seed=0,
    batch_size=256,
    clip_min=0.0,
    clip_max=255.0,
):
    """Runs AutoAttack's stages in order, each only on the examples no earlier stage fooled.

    Every adversarial image is re-checked with a fresh forward pass before it counts.

    Args:
        model: Keras model mapping images to logits (>= 4 classes, for the targeted DLR loss).
        images: [N, H, W, C] pixels in [clip_min, clip_max] (NumPy array or tensor).
        labels: [N] int true classes.
        epsilon: L-inf radius, in pixel units.
        version: "standard" or "fast" (see the module docstring).
        seed: Seed of every stage.
        batch_size: Examples per attack call.
        clip_min: Lowest valid pixel value.
        clip_max: Highest valid pixel value.

    Returns:
        An `AutoAttackResult`.
    """
    x = np.asarray(images, np.float32)
    y = np.asarray(labels).astype(np.int32)
    robust = predict_labels(model, x, batch_size) == y
    adv = x.copy()
    stages = {"clean": float(robust.mean()) if len(y) else 0.0}
    stage_list = _stages(
        model, epsilon=epsilon, version=version, seed=seed, clip_min=clip_min, clip_max=clip_max
    )
    for name, attack in stage_list:
        todo = np.flatnonzero(robust)
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            x_adv = attack(x[rows], y[rows]).numpy()
            fooled = predict_labels(model, x_adv, batch_size) != y[rows]
            adv[rows[fooled]] = x_adv[fooled]
            robust[rows[fooled]] = False
        stages[name] = float(robust.mean()) if len(y) else 0.0
    return AutoAttackResult(
        clean_accuracy=stages["clean"],
        robust_accuracy=stages["square"],
        stages=stages,
        adversarial_images=adv,
        robust=robust,
    )
