"""A `model_dir` for an imported checkpoint, shaped like a finished training run.

`model.keras`, `config.json` and `robustness_card.json`, so `tools/eval.py --model_dir`,
`tools/export.py` and `tools/train.py --init_from` read it unchanged. The config carries the
official evaluation protocol (epsilon 4, step 1, PGD-10/20/50); the card carries the official
README's numbers, marked as reported by the official repository, not measured here.
"""

import dataclasses
from pathlib import Path

import keras

from sat_tf import atomic, card, config, preflight, pretrained, rundir
from sat_tf.pretrained import released

# Conventions of the official evaluation that no layer of the imported model can hold.
NOT_FOLDED = {
    "resnet": (
        "image loading: the official ResNet evaluation reads JPEGs with OpenCV, resizes the "
        "shorter side to size + 32 with bicubic interpolation and crops the centre; sat_tf's "
        "evaluation pipeline resizes with TensorFlow (bilinear), so pixels, and accuracies, "
        "differ slightly",
    ),
    "efficientnet": (
        "image loading: the official EfficientNet evaluation crops the centre (size / (size + "
        "32)) and resizes with bicubic interpolation; sat_tf's evaluation pipeline crops the same "
        "fraction and resizes bilinearly, so pixels, and accuracies, differ slightly",
    ),
}
FOLDED = {
    "resnet": (
        "BGR input of the official code (OpenCV) -> RGB: the stem kernel's input channels reversed",
        "x * 2 / 255 - 1 scaling: the zoo ResNet's first layer",
        "NCHW -> NHWC: kernels are [kh, kw, in, out] in both, no weight changes",
        "fixed_padding before strided convs, stride on the 3x3, BN epsilon 1e-5: the zoo's own",
        "SmoothReLU raw beta (beta = raw^2): copied to each layer's b (beta = b^2)",
    ),
    "efficientnet": (
        "--sat_preprocessing (x * 2 / 255 - 1): the zoo EfficientNet, normalization='symmetric'",
        "--batch_norm_epsilon=1e-5 of the official evaluation: the zoo EfficientNet's bn_epsilon",
        "ExponentialMovingAverage shadows or raw weights, as the README's --moving_average_decay "
        "for this checkpoint (recorded in config.json's official.moving_average_weights)",
        "tf-keras [1, 1, 1, 1, C] or TF1 [C] BatchNorm vectors: reshaped to [C]",
    ),
}


def official_config(imported, model_dir):
    """The run config: the imported architecture and the official evaluation protocol."""
    run = config.TrainConfig(
        model_dir=str(model_dir),
        model=imported.arch,
        activation=imported.activation,
        num_classes=imported.num_classes,
        image_size=imported.image_size,
        dataset="",  # give --dataset to tools/eval.py (e.g. tfrecord:/data/imagenet/validation-*)
        augmentation="inception",  # evaluation and serving crop the centre, as the official loader
        epsilon=released.OFFICIAL_EPSILON,
        step_size=released.OFFICIAL_STEP_SIZE,
        eval_epsilon=released.OFFICIAL_EPSILON,
        eval_step_size=released.OFFICIAL_STEP_SIZE,
        eval_num_steps=released.OFFICIAL_NUM_STEPS[0],
    )
    return {**dataclasses.asdict(run), "official": _official(imported)}


def _official(imported):
    entry = imported.released
    return {
        "checkpoint": imported.prefix,
        "released_name": entry.name if entry else None,
        "family": imported.family,
        "moving_average_weights": imported.moving_average,
        "evaluation_protocol": {
            "norm": "Linf",
            "epsilon_pixels": released.OFFICIAL_EPSILON,
            "step_size_pixels": released.OFFICIAL_STEP_SIZE,
            "pgd_steps": list(released.OFFICIAL_NUM_STEPS),
            "targeted": False,
        },
        "official_flags": entry.official_flags if entry else None,
        "unused_training_variables": len(imported.skipped),
    }


def official_card(imported, *, command=""):
    """The robustness card of an imported model."""
    entry = imported.released
    reported = None
    if entry:
        reported = {
            "source": released.SOURCE,
            "note": "reported by the official repository with its own image loader and the full "
            "ImageNet validation set; not measured by sat_tf",
            "accuracy_percent": entry.reported_accuracy,
            "official_flags": entry.official_flags,
        }
    return {
        "format": "sat_tf.robustness_card/1",
        "model": {
            "architecture": imported.arch,
            "activation": imported.activation,
            "num_classes": imported.num_classes,
            "image_size": imported.image_size,
            "init_from": None,
            "imported_from": _official(imported),
        },
        "input_convention": card.INPUT_CONVENTION,
        "threat_model": {
            "norm": "Linf",
            "epsilon": {
                "pixels": released.OFFICIAL_EPSILON,
                "fraction_of_255": f"{released.OFFICIAL_EPSILON:g}/255",
            },
        },
        "training": {"by": "the SAT paper's authors (official code); not trained here"},
        "reported_by_official_repository": reported,
        "conventions_converted": list(FOLDED.get(imported.family, ())),
        "conventions_not_folded": list(NOT_FOLDED.get(imported.family, ())),
        "command": command,
        "evaluations": [],
    }


def write(imported, model_dir, *, command="", overwrite=False):
    """Writes config.json, the card and model.keras (last) into `model_dir`, each atomically.

    The folder must be new, empty or a sat_tf run (`rundir.check_ours`); the run's lock is held
    while writing, and the manifest lists every file before the first is written, so
    `tools/train.py`, `tools/eval.py` and `tools/export.py` treat the folder as a run of ours.

    Raises:
        sat_tf.pretrained.OfficialCheckpointError: a weight holds NaN or Inf (the card would
            carry the official numbers for weights that are not the official ones).
        FileExistsError: model.keras exists and `overwrite` is False.
        sat_tf.rundir.RunDirError: the folder is not ours, is in use, or holds an unfinished
            training run.
        sat_tf.rundir.RunWriteError: a file could not be written (what is kept, how to resume).
    """
    model_dir = Path(model_dir)
    weights = imported.model.weights  # the card carries the README's numbers: checked weights only
    pretrained.check_finite(
        imported.prefix, ((w.path, keras.ops.convert_to_numpy(w)) for w in weights)
    )
    rundir.check_ours(model_dir)  # before the lock: nothing is created in a foreign folder
    with rundir.locked(model_dir, "import"):
        rundir.check_ours(model_dir)  # again under the lock: another process may have written
        target = model_dir / rundir.FINAL_MODEL
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
        if not target.exists() and (model_dir / rundir.CHECKPOINTS).is_dir():
            raise rundir.RunDirError(
                f"--model_dir={model_dir} holds an unfinished training run (checkpoints/); "
                "importing would mix the two. Use a new or empty --model_dir."
            )
        if overwrite:
            preflight.clear_finished_run(model_dir)  # only what the manifest lists
        rundir.record(model_dir, *rundir.IMPORTED_FILES)
        try:
            payload = official_config(imported, model_dir)
            atomic.write_json(model_dir / rundir.CONFIG, payload)
            card.write(model_dir, official_card(imported, command=command))
            # training imports sat_tf.data (TensorFlow): only when a folder is written.
            from sat_tf import training

            training.save_model_atomically(imported.model, target)
        except OSError as error:
            raise rundir.write_failure(
                "the imported model",
                model_dir,
                "the folder's other files; no model.keras was written",
                "re-run the import",
                error,
            ) from None
    return target
