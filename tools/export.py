"""Export a trained classifier as a SavedModel for TF Serving.

    python tools/export.py --model_dir=runs/demo/silu [--version=1]

Writes `<model_dir>/export/<version>/` with the `serving_default` (float pixels) and
`serving_bytes` (encoded JPEG/PNG) signatures; see `sat_tf.export`. The robustness card of the run
(if `tools/eval.py` wrote one) goes into the export's `assets.extra/`. Under KERAS_BACKEND=jax the
model's forward pass is converted with jax2tf; either way TensorFlow must be installed.
"""

import contextlib
import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sat_tf import card as card_lib  # noqa: E402
from sat_tf import rundir  # noqa: E402
from sat_tf.config import TrainConfig  # noqa: E402

flags.DEFINE_string("model_dir", None, "A finished training run (holds model.keras, config.json).")
flags.DEFINE_string("model_path", None, "Or: a .keras classifier file (needs --image_size).")
flags.DEFINE_integer("image_size", 0, "Serving resolution; default: the run's --image_size.")
flags.DEFINE_bool(
    "central_crop", None, "Central 224/256 crop in serving_bytes; default: as the run."
)
flags.DEFINE_integer("version", 1, "Version sub-directory TF Serving will serve (>= 1).")
flags.DEFINE_string("export_dir", None, "Base export directory; default: <model_dir>/export.")
flags.DEFINE_integer("top_k", 5, "Classes in the top-k outputs.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if bool(FLAGS.model_dir) == bool(FLAGS.model_path):
        sys.exit("error: give exactly one of --model_dir or --model_path.")
    problem = flag_problem(FLAGS.image_size, FLAGS.version, FLAGS.top_k)
    if problem:
        sys.exit(f"error: {problem}")
    model_dir = Path(FLAGS.model_dir) if FLAGS.model_dir else None
    model_path = model_dir / rundir.FINAL_MODEL if model_dir else Path(FLAGS.model_path)
    if not model_path.is_file():
        sys.exit(f"error: {model_path} not found; train first (tools/train.py) or fix the path.")
    image_size, central_crop = FLAGS.image_size, FLAGS.central_crop
    try:
        run = run_settings(model_dir, image_size, central_crop) if model_dir else {}
        card = card_lib.read(model_path.parent)  # checked before any work, copied as it is
    except (rundir.RunDirError, card_lib.CardError, ValueError) as error:
        sys.exit(f"error: {error}")
    if run:
        image_size = image_size or run["image_size"]
        if central_crop is None:  # as the run's evaluation pipeline (sat_tf.data.load, "auto")
            central_crop = run["augmentation"] == "inception" or (
                run["augmentation"] == "auto" and run["dataset"] != "demo" and image_size > 64
            )
    if not image_size:
        where = f"{model_dir / rundir.CONFIG} is missing" if model_dir else "with --model_path"
        sys.exit(f"error: --image_size is needed ({where}).")
    if central_crop is None:
        central_crop = image_size > 64
    export_dir = Path(FLAGS.export_dir) if FLAGS.export_dir else model_path.parent / rundir.EXPORT

    from sat_tf import saving

    try:  # a SavedModel is TensorFlow's format, under any Keras backend
        from sat_tf import export
    except ImportError as error:
        sys.exit(f"error: {error}")
    try:
        model = saving.load_model(model_path)  # safe_mode=True, with checks of the file
    except saving.ModelFileError as error:
        sys.exit(f"error: {error}")
    # Inside the run when its parent is the run folder: export_dir itself is not resolved, so a
    # link planted there is refused under the lock (rundir.check_no_links), never written through.
    inside = model_dir is not None and export_dir.parent.resolve() == model_dir.resolve()
    try:  # writing into a run: hold its lock, and list export/ as the run's
        with rundir.locked(model_dir, "export") if inside else contextlib.nullcontext():
            if inside and rundir.listed(model_dir):
                rundir.record(model_dir, export_dir.name)
            path = export.export_saved_model(
                model,
                export_dir,
                image_size=image_size,
                central_crop=bool(central_crop),
                version=FLAGS.version,
                top_k=FLAGS.top_k,
                card=card,
            )
    except (ValueError, FileExistsError, rundir.RunDirError, rundir.RunWriteError) as error:
        sys.exit(f"error: {error}")
    print(f"Exported {model_path} to {path}")


def flag_problem(image_size, version, top_k):
    """The first bad flag as one line, or None; checked before anything is read."""
    low, high = TrainConfig.MIN_IMAGE_SIZE, TrainConfig.MAX_IMAGE_SIZE
    if image_size and not low <= image_size <= high:
        return f"--image_size={image_size} is invalid: must be in [{low}, {high}] (0: the run's)"
    if version < 1:
        return f"--version={version} is invalid: must be >= 1 (TF Serving serves the highest)"
    if top_k < 1:
        return f"--top_k={top_k} is invalid: must be >= 1"
    return None


def run_settings(model_dir, image_size, central_crop):
    """The run's config.json, checked for the keys the export reads (those its flags leave
    unset); {} when there is none. ValueError naming the file and the missing or bad keys."""
    run = rundir.read_config(model_dir)
    path = model_dir / rundir.CONFIG
    if not run:
        return run
    needed = ([] if image_size else ["image_size"]) + (
        ["augmentation", "dataset"] if central_crop is None else []
    )
    missing = sorted(key for key in needed if key not in run)
    if missing:
        raise ValueError(
            f"{path} lacks the run keys {', '.join(missing)} (tools/train.py writes them): it "
            "is not a training run's config. Restore it from a copy, or give --image_size and "
            "--central_crop / --nocentral_crop."
        )
    low, high = TrainConfig.MIN_IMAGE_SIZE, TrainConfig.MAX_IMAGE_SIZE
    size = run.get("image_size")
    if "image_size" in needed and not (type(size) is int and low <= size <= high):
        raise ValueError(
            f"{path} has image_size={size!r}, not a number of pixels in [{low}, {high}]. Restore "
            "it from a copy, or give --image_size."
        )
    for key in ("augmentation", "dataset"):
        if key in needed and not isinstance(run[key], str):
            raise ValueError(
                f"{path} has {key}={run[key]!r}, not a name. Restore it from a copy, or give "
                "--central_crop / --nocentral_crop."
            )
    return run


if __name__ == "__main__":
    app.run(main)
