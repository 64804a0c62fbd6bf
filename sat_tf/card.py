"""The robustness card: a small JSON file that travels with every model this project writes.

It states the threat model, the input convention, how the model was trained, and every evaluation
with the exact attacks, number of examples, gradient-masking checks and the command that produced
it, so a reader can check a robustness claim without asking. `training.run` writes it beside
`model.keras`; `tools/eval.py` appends evaluations; `tools/export.py` copies it into the
SavedModel's `assets.extra/`.
"""

from pathlib import Path

from sat_tf import rundir
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
        "evaluation_id": results.evaluation_id,
    }


class CardError(ValueError):
    """A card that cannot be read: damaged, not a card, or forged (too large, not a file).

    Attributes:
        path: The card file.
        reason: What is wrong, a phrase that follows the path ("is not valid JSON (...)").
    """

    def __init__(self, path, reason):
        super().__init__(
            f"{path} {reason}; it is the model's robustness card (sat_tf.card). Restore it from "
            "a copy, or remove it to start a new one."
        )
        self.path, self.reason = path, reason


def read(directory):
    """The card in `directory`, or None when there is none.

    Read as `sat_tf.rundir.read_json` reads: at most `rundir.MAX_JSON_BYTES`, regular files only.

    Raises:
        CardError: one line naming the file, what is wrong and the fix.
    """
    path = Path(directory) / CARD
    if not path.exists():
        return None
    try:
        card = rundir.read_json(path)
    except ValueError as error:
        raise CardError(path, str(error)) from None
    if not isinstance(card, dict):
        raise CardError(path, "is not a JSON object")
    if not isinstance(card.get("evaluations", []), list):
        raise CardError(path, "has evaluations that are not a list")
    return card


def write(directory, card):
    """Writes the card atomically (temporary name, then rename)."""
    return write_json(Path(directory) / CARD, card)


class CardWriteError(Exception):
    """The card could not be updated; the message says what was saved instead."""


def add_evaluation(directory, entry, *, saved=None):
    """Appends an evaluation to the card in `directory` (creating a minimal card if none).

    An entry with the `evaluation_id` of one already there replaces it: recording the same
    finished evaluation twice (a kill between the card write and the removal of its state,
    then the same command again) leaves one entry.

    Args:
        directory: The folder of the model (and its card).
        entry: From `evaluation_entry`.
        saved: The folder where the evaluation's reports were already written, named in the
            error so that a failed card write never hides them.

    Raises:
        CardWriteError: one line naming the card, the cause and what is saved (also when the
            card on disk cannot be read: it is then left as it is).
    """
    kept = f"its reports are saved in {saved}" if saved else "nothing else was written"
    try:
        card = read(directory) or {"format": "sat_tf.robustness_card/1", "evaluations": []}
    except CardError as error:  # never replaced: what it holds may be restored
        raise CardWriteError(
            f"The evaluation finished and {kept}, but the card {error.path} {error.reason}, so "
            "it was left as it is. Restore it from a copy (or remove it), then re-run the "
            "evaluation to record it there."
        ) from None
    same = entry.get("evaluation_id")
    entries = [e for e in card.get("evaluations", []) if not same or e.get("evaluation_id") != same]
    card["evaluations"] = [*entries, entry]
    try:
        return write(directory, card)
    except OSError as error:
        raise CardWriteError(
            f"The evaluation finished and {kept}, but the card {Path(directory) / CARD} "
            f"could not be updated ({error.strerror or error}). Make {directory} writable and "
            "re-run the evaluation to record it there."
        ) from None
