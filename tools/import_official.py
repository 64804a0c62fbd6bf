"""Import a checkpoint released with the SAT paper into a sat_tf model_dir.

    python tools/import_official.py --checkpoint=Res50-silu/Res50-silu \
        --model_dir=runs/official/r50_silu
    python tools/import_official.py --download=Res50-silu --model_dir=runs/official/r50_silu

Writes model.keras (the zoo's own model with the official weights, [0, 255] RGB input),
config.json (the official evaluation protocol: epsilon 4, step 1, PGD-10/20/50) and a robustness
card with the official README's numbers, marked as reported by the official repository. Then
`tools/eval.py --model_dir=... --dataset=...`, `tools/export.py --model_dir=...` and
`tools/train.py --init_from=<model_dir>/model.keras` work on it. The released checkpoints and the
conventions converted: docs/pretrained.md. --download needs `pip install 'sat_tf[pretrained]'`.
"""

import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

flags.DEFINE_string("checkpoint", None, "TF1 checkpoint prefix (<dir>/<name> of <name>.index).")
flags.DEFINE_string("download", None, "Or: a released name (e.g. Res50-silu) to fetch with gdown.")
flags.DEFINE_string("cache_dir", None, "Where --download puts files; default ~/.cache/sat_tf.")
flags.DEFINE_string("model_dir", None, "Output folder (model.keras, config.json, card).")
flags.DEFINE_string("arch", None, "Zoo model name; default: inferred from the checkpoint.")
flags.DEFINE_string("activation", None, "Activation; default: inferred (SmoothReLU) or by name.")
flags.DEFINE_integer("image_size", 0, "Input resolution; default: the released checkpoint's.")
flags.DEFINE_enum(
    "weights", "auto", ["auto", "raw", "moving_average"], "EfficientNet: which weights to load."
)
flags.DEFINE_string("ignore", None, "Regex of extra checkpoint variables to leave unused.")
flags.DEFINE_bool(
    "overwrite", False, "Replace the model_dir/model.keras of an earlier run or import."
)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if bool(FLAGS.checkpoint) == bool(FLAGS.download):
        sys.exit("error: give exactly one of --checkpoint=PREFIX or --download=NAME.")
    if not FLAGS.model_dir:
        sys.exit("error: --model_dir is needed (e.g. runs/official/r50_silu).")
    from sat_tf import pretrained

    prefix = FLAGS.checkpoint
    if FLAGS.download:
        try:
            prefix = pretrained.download(FLAGS.download, FLAGS.cache_dir)
        except (ValueError, ImportError, RuntimeError, OSError) as error:
            sys.exit(f"error: --download={FLAGS.download}: {error}")
    moving_average = {"auto": None, "raw": False, "moving_average": True}[FLAGS.weights]
    try:
        imported = pretrained.import_official(
            prefix,
            arch=FLAGS.arch,
            activation=FLAGS.activation,
            image_size=FLAGS.image_size or None,
            moving_average=moving_average,
            ignore=FLAGS.ignore,
        )
    except (ValueError, ImportError) as error:  # OfficialCheckpointError, unknown names, no TF
        sys.exit(f"error: {error}")
    from sat_tf import rundir
    from sat_tf.pretrained import model_dir

    try:
        path = model_dir.write(
            imported, FLAGS.model_dir, command=" ".join(sys.argv), overwrite=FLAGS.overwrite
        )
    except (
        pretrained.OfficialCheckpointError,
        FileExistsError,
        rundir.RunDirError,
        rundir.RunWriteError,
    ) as error:
        sys.exit(f"error: {error}")
    print(
        f"Imported {imported.prefix} as {imported.arch} ({imported.activation}, "
        f"{imported.image_size} px) to {path}; {len(imported.skipped)} training-only variables "
        "(optimizer slots, step counters) left out."
    )


if __name__ == "__main__":
    app.run(main)
