"""Smooth adversarial training from a flagfile.

    python tools/train.py --flagfile=configs/demo.cfg --model_dir=runs/demo [--flag=override ...]

Every flag is a field of `sat_tf.config.TrainConfig` (same name, same meaning); the command line
after `--flagfile` overrides it. Re-running the same command after an interruption resumes from the
last checkpoint in `--model_dir`; a finished run is never overwritten unless `--overwrite` is given.

Exit status (docs/reliability.md):
    0    finished: model.keras, results.json written.
    1    an error, as one line "error: ...": a bad flag or input (before any work), a checkpoint
         of another model, data that cannot be decoded, a NaN/Inf loss (the last good checkpoint
         is kept). absl's own flag errors (unknown flag, missing flagfile) also exit 1.
    143  stopped by SIGTERM (130: Ctrl-C) at a step boundary after saving a checkpoint: re-run
         the same command to resume. A second signal aborts at once (130), keeping the previous
         checkpoint.
"""

import shlex
import signal
import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sat_tf import config as config_lib  # noqa: E402


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:  # checked by training.run, before any work; a list flag that is not numbers here
        config = config_lib.from_flags(flags.FLAGS)
    except ValueError as error:
        sys.exit(f"error: {error}")
    logging.set_verbosity(logging.WARNING)
    from sat_tf import training

    try:
        summary = training.run(config, command=shlex.join(["python", *sys.argv]))
    except (training.RunError, FloatingPointError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM: no checkpoint of the current step
        print("Aborted; re-run the same command to resume from the last checkpoint.")
        sys.exit(128 + signal.SIGINT)
    if summary.get("stopped"):  # a checkpoint was saved; the run is resumable
        sys.exit(128 + signal.Signals[summary["signal"]])


if __name__ == "__main__":
    config_lib.define_flags(flags.FLAGS)
    flags.mark_flag_as_required("model_dir")
    app.run(main)
