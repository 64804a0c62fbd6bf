"""Export a trained classifier as a SavedModel for TF Serving.

    python tools/export.py --model_dir=runs/demo/silu [--version=1]

Writes `<model_dir>/export/<version>/` with the `serving_default` (float pixels) and
`serving_bytes` (encoded JPEG/PNG) signatures; see `sat_tf.export`. The robustness card of the run
(if `tools/eval.py` wrote one) goes into the export's `assets.extra/`.
"""

import contextlib
import json
import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sat_tf import rundir  # noqa: E402

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
    model_dir = Path(FLAGS.model_dir) if FLAGS.model_dir else None
    model_path = model_dir / rundir.FINAL_MODEL if model_dir else Path(FLAGS.model_path)
    if not model_path.is_file():
        sys.exit(f"error: {model_path} not found; train first (tools/train.py) or fix the path.")
    image_size, central_crop = FLAGS.image_size, FLAGS.central_crop
    try:
        run = rundir.read_config(model_dir) if model_dir else {}
    except rundir.RunDirError as error:
        sys.exit(f"error: {error}")
    if run:
        image_size = image_size or run["image_size"]
        if central_crop is None:  # as the run's evaluation pipeline (sat_tf.data.load, "auto")
            central_crop = run["augmentation"] == "inception" or (
                run["augmentation"] == "auto" and run["dataset"] != "demo" and image_size > 64
            )
    if not image_size:
        sys.exit("error: --image_size is needed with --model_path.")
    if central_crop is None:
        central_crop = image_size > 64
    export_dir = Path(FLAGS.export_dir) if FLAGS.export_dir else model_path.parent / rundir.EXPORT
    card_path = model_path.parent / rundir.CARD
    card = json.loads(card_path.read_text()) if card_path.exists() else None

    from sat_tf import export, saving

    try:
        model = saving.load_model(model_path)  # safe_mode=True, with checks of the file
    except saving.ModelFileError as error:
        sys.exit(f"error: {error}")
    inside = model_dir is not None and export_dir.resolve().parent == model_dir.resolve()
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


if __name__ == "__main__":
    app.run(main)
