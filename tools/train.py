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

import dataclasses
import shlex
import signal
import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sat_tf.config import TrainConfig  # noqa: E402

HELP = {
    "model_dir": "Directory for checkpoints, TensorBoard logs, config.json and model.keras.",
    "model": "Model name from sat_tf.models.names().",
    "activation": "Activation name from sat_tf.activations.names() (relu, silu, gelu, ...).",
    "num_classes": "Number of classes.",
    "image_size": "Training and evaluation resolution in pixels.",
    "init_from": "A .keras classifier to fine-tune; its ReLUs are replaced by --activation.",
    "dataset": "demo | tfrecord:<pattern> | tfds:<name> | folder:<dir>.",
    "train_files": "TFRecord pattern for training (overrides the pattern in --dataset).",
    "eval_files": "TFRecord pattern for evaluation.",
    "eval_split": "Evaluation split; empty: test for demo and tfds:cifar*, else validation.",
    "data_dir": "TFDS data_dir (and manual_dir for imagenet2012).",
    "augmentation": "auto | inception | cifar | none.",
    "global_batch_size": "Batch size summed over all replicas.",
    "epochs": "Training epochs.",
    "steps_per_epoch": "Steps per epoch; 0 means one pass over the training set.",
    "eval_examples": "Evaluation examples; 0 means the whole evaluation set.",
    "optimizer": "sgd (Nesterov) | rmsprop.",
    "base_learning_rate": "Learning rate per 256 images (lr = base * global_batch_size / 256).",
    "lr_schedule": "step | exponential | cosine (after linear warm-up).",
    "warmup_epochs": "Epochs of linear learning-rate warm-up.",
    "decay_epochs": "Epochs at which a step schedule multiplies the rate by --decay_rate.",
    "decay_rate": "Decay factor of the step and exponential schedules.",
    "decay_every_epochs": "Period of the exponential schedule, in epochs.",
    "momentum": "Momentum (SGD Nesterov, RMSProp).",
    "ema_decay": "Exponential moving average of the weights (0: off; EfficientNet uses 0.9999).",
    "weight_decay": "L2 weight decay on conv and dense kernels.",
    "label_smoothing": "Label smoothing of the training loss.",
    "epsilon": "Training attack L-inf budget in pixels of [0, 255] (4 means 4/255).",
    "step_size": "Training attack step in pixels.",
    "num_steps": "Training attack PGD steps (0 with --norandom_start trains on clean images).",
    "random_start": "Start the attack from a random point in the epsilon ball.",
    "prob_start_from_clean": "Per-example chance that the attack starts from the clean image.",
    "eval_epsilon": "Evaluation attack budget in pixels; negative means --epsilon.",
    "eval_step_size": "Evaluation attack step in pixels.",
    "eval_num_steps": "Evaluation attack PGD steps.",
    "smooth_gradients": "Phases where SmoothGradReLU uses its smooth backward: attack,update.",
    "strategy": "default | mirrored | multi_worker | tpu.",
    "tpu": "TPU name or address (with --strategy=tpu).",
    "mixed_precision": "float16 | bfloat16 | empty for float32.",
    "seed": "Random seed.",
    "checkpoint_every_steps": "Checkpoint every N steps (and at each epoch end); 0: epochs only.",
    "overwrite": "Allow replacing a finished run in --model_dir.",
}


def define_flags():
    """One flag per TrainConfig field, same name, default and type."""
    for field in dataclasses.fields(TrainConfig):
        default = None if field.default is dataclasses.MISSING else field.default
        define = {
            bool: flags.DEFINE_bool,
            int: flags.DEFINE_integer,
            float: flags.DEFINE_float,
            tuple: flags.DEFINE_list,
        }.get(type(default), flags.DEFINE_string)
        if isinstance(default, tuple):
            default = list(default)
        define(field.name, default, HELP[field.name])
    flags.mark_flag_as_required("model_dir")


def config_from_flags(flag_values):
    values = {}
    for field in dataclasses.fields(TrainConfig):
        value = flag_values[field.name].value
        values[field.name] = tuple(v for v in value if v) if isinstance(value, list) else value
    values["decay_epochs"] = tuple(float(e) for e in values["decay_epochs"])
    return TrainConfig(**values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_from_flags(flags.FLAGS).validate()
    except ValueError as error:
        sys.exit(f"error: {error}")
    logging.set_verbosity(logging.WARNING)
    from sat_tf import training  # heavy import after the flags are checked

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
    define_flags()
    app.run(main)
