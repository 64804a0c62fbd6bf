"""The robustness card: a small JSON file that travels with every model this project writes.

It states the threat model, the input convention, how the model was trained, and every evaluation
with the exact attacks, number of examples, gradient-masking checks and the command that produced
it, so a reader can check a robustness claim without asking. `training.run` writes it beside
`model.keras`; `tools/eval.py` appends evaluations; `tools/export.py` copies it into the
SavedModel's `assets.extra/`.
"""

import json
from pathlib import Path

from sat_tf.atomic import write_json
from sat_tf.rundir import CARD

INPUT_CONVENTION = (
    "float32 RGB pixels in [0, 255], NHWC; normalisation is the model's first layer, so epsilons "
    "are in pixel units (epsilon 4 = 4/255 of the [0, 1] range)"
)


def _epsilon(pixels):
    return {"pixels": float(pixels), "fraction_of_255": f"{float(pixels):g}/255"}


def training_card(config, *, results=None, command=""):
    """The card of a finished training run, from its `TrainConfig` as a dict."""
    return {
        "format": "sat_tf.robustness_card/1",
        "model": {
            "architecture": config["model"],
            "activation": config["activation"],
            "num_classes": config["num_classes"],
            "image_size": config["image_size"],
            "init_from": config.get("init_from") or None,
        },
        "input_convention": INPUT_CONVENTION,
        "threat_model": {"norm": "Linf", "epsilon": _epsilon(config["epsilon"])},
        "training": {
            "attack": {
                "kind": "pgd" if config["num_steps"] else "none (clean training)",
                "epsilon": _epsilon(config["epsilon"]),
                "step_size": _epsilon(config["step_size"]),
                "num_steps": config["num_steps"],
                "random_start": config["random_start"],
                "prob_start_from_clean": config["prob_start_from_clean"],
                "smooth_gradients": list(config["smooth_gradients"]),
            },
            "recipe": {
                key: config[key]
                for key in (
                    "optimizer",
                    "base_learning_rate",
                    "lr_schedule",
                    "warmup_epochs",
                    "decay_epochs",
                    "epochs",
                    "global_batch_size",
                    "weight_decay",
                    "label_smoothing",
                    "ema_decay",
                    "mixed_precision",
                )
            },
            "data": {"dataset": config["dataset"], "augmentation": config["augmentation"]},
            "seed": config["seed"],
            "final_metrics": results or {},
            "command": command,
        },
        "evaluations": [],
    }


def evaluation_entry(results, *, protocol, command, dataset, step_size=None):
    """One evaluation: the exact attacks (rows), checks and provenance."""
    payload = results.to_dict()
    return {
        "protocol": protocol,
        "dataset": dataset,
        "num_examples": payload["num_examples"],
        "pgd_step_size_pixels": step_size,
        "clean_accuracy": payload["clean_accuracy"],
        "rows": payload["rows"],
        "worst_case": payload["worst_case"],
        "gradient_masking_checks": payload["checks"],
        "command": command,
    }


def read(directory):
    """The card in `directory`, or None."""
    path = Path(directory) / CARD
    return json.loads(path.read_text()) if path.exists() else None


def write(directory, card):
    """Writes the card atomically (temporary name, then rename)."""
    return write_json(Path(directory) / CARD, card)


class CardWriteError(Exception):
    """The card could not be updated; the message says what was saved instead."""


def add_evaluation(directory, entry, *, saved=None):
    """Appends an evaluation to the card in `directory` (creating a minimal card if none).

    Args:
        directory: The folder of the model (and its card).
        entry: From `evaluation_entry`.
        saved: The folder where the evaluation's reports were already written, named in the
            error so that a failed card write never hides them.

    Raises:
        CardWriteError: one line naming the card, the cause and what is saved.
    """
    card = read(directory) or {"format": "sat_tf.robustness_card/1", "evaluations": []}
    card.setdefault("evaluations", []).append(entry)
    try:
        return write(directory, card)
    except OSError as error:
        kept = f"its reports are saved in {saved}" if saved else "nothing else was written"
        raise CardWriteError(
            f"The evaluation finished and {kept}, but the card {Path(directory) / CARD} "
            f"could not be updated ({error.strerror or error}). Make {directory} writable and "
            "re-run the evaluation to record it there."
        ) from None
