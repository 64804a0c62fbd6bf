"""Pre-flight checks of a training run: everything that can be wrong is found before any work.

Each check raises `RunError` with one line that names the flag or file and the fix, and none of
them changes `model_dir` (a finished run is cleared by `clear_finished_run` only after every
input has been checked), so a bad command never damages what an earlier run wrote. A folder that
is not a run of ours (`sat_tf.rundir`) is never written into, nor anything through a link.
"""

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import keras

from sat_tf import activations, models, rundir, saving
from sat_tf.models import cifar, efficientnet, resnet

MIN_FREE_BYTES = 200 * 2**20
# The demo pipeline holds every digit at --image_size (1,797 x 256 x 256 x 3 float32: 1.4 GiB).
DEMO_MAX_IMAGE_SIZE = 256


class RunError(Exception):
    """A problem with the run's inputs, found before any training work."""


def check_model_dir(config):
    """Checks `model_dir` up front, changing nothing in it: writable, enough free space, not a
    finished run (unless `overwrite`), and the same config as an unfinished run there."""
    model_dir = Path(config.model_dir)
    try:
        rundir.check_ours(model_dir)
    except rundir.RunDirError as error:
        raise RunError(str(error)) from None
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        rundir.probe(model_dir)  # a fresh name: never through a link planted in the folder
    except OSError as error:
        raise RunError(
            f"--model_dir={model_dir} is not writable ({error}). Fix its permissions or choose "
            "another --model_dir."
        ) from error
    free = shutil.disk_usage(model_dir).free
    if free < MIN_FREE_BYTES:
        raise RunError(
            f"--model_dir={model_dir} has only {free // 2**20} MiB free; checkpoints need at "
            f"least {MIN_FREE_BYTES // 2**20} MiB. Free some space or choose another --model_dir."
        )
    finished = (model_dir / rundir.FINAL_MODEL).exists()
    if finished and not config.overwrite:
        raise RunError(
            f"--model_dir={model_dir} holds a finished run ({rundir.FINAL_MODEL}). Use a new "
            "--model_dir, or pass --overwrite to train again from scratch."
        )
    if not finished:
        _check_same_config(model_dir / rundir.CONFIG, config)
    return model_dir


def clear_finished_run(model_dir):
    """`--overwrite`: removes a finished run's outputs (called once every input is checked).

    Only what the run's manifest lists is removed (inside `checkpoints/`, only checkpoint files),
    and nothing when one of them is a symbolic link (`rundir.RunDirError`).
    """
    if not (model_dir / rundir.FINAL_MODEL).exists():
        return
    rundir.remove_listed(model_dir, rundir.REPLACED_FILES)


def _check_same_config(path, config):
    try:
        saved = rundir.read_config(path.parent)
    except rundir.RunDirError as error:
        raise RunError(f"--model_dir={config.model_dir}: {error}") from None
    if not saved:
        return
    # A field missing from the saved config.json has its default value.
    fields = dataclasses.fields(config)
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    saved = json.loads(json.dumps(defaults | saved))
    current = json.loads(json.dumps(dataclasses.asdict(config)))
    # How the step is compiled (jit_compile) does not change the run; everything else does.
    same = ("overwrite", "jit_compile")
    changed = sorted(k for k in current if k not in same and saved.get(k) != current[k])
    if changed:
        raise RunError(
            f"--model_dir={config.model_dir} holds an unfinished run with other settings "
            f"({', '.join(f'--{k}' for k in changed)}). Re-run with the same flags to resume, "
            "or use a new --model_dir."
        )


def check_names(config):
    """Unknown model or activation names fail here, before any directory or data work."""
    if config.model not in models.names() and not config.init_from:
        raise RunError(
            f"--model={config.model}: Unknown model {config.model!r}. "
            f"Valid names: {', '.join(models.names())}."
        )
    try:
        activations.get(config.activation)
    except ValueError as error:
        raise RunError(f"--activation={config.activation}: {error}") from None
    if config.init_from:  # loaded once here too: a bad file must fail before --overwrite acts
        try:
            base = saving.load_model(config.init_from)
        except saving.ModelFileError as error:
            raise RunError(f"--init_from={config.init_from}: {error}") from None
        check_init_from(config, base)
    smallest = min_image_size(config.model)
    if not config.init_from and config.image_size < smallest:
        raise RunError(
            f"--image_size={config.image_size} is too small for --model={config.model}: it "
            f"downsamples {smallest}x, so its last stages would see 1x1 maps of padding. Use "
            f"--image_size={smallest} or more, or a CIFAR-size model "
            f"({', '.join(sorted(cifar.CONFIGS))}, small_cnn)."
        )
    specs = {config.data_spec(training=True), config.data_spec(training=False)}
    if "demo" in specs and config.image_size > DEMO_MAX_IMAGE_SIZE:
        from sat_tf.data import demo  # tf.data: only when the demo data is used

        held = demo.NUM_EXAMPLES * config.image_size**2 * 3 * 4 / 2**30
        raise RunError(
            f"--image_size={config.image_size} is too large for --dataset=demo: the demo holds "
            f"all {demo.NUM_EXAMPLES} digits in memory at that size ({held:.1f} GiB of 8x8 "
            f"digits scaled up). Use --image_size={DEMO_MAX_IMAGE_SIZE} or less."
        )


def check_batch_fits(config, train):
    """A training batch larger than the training split (when its size is known) would repeat
    the split inside every batch and hold that many images in memory: refused."""
    if train.num_examples is not None and config.global_batch_size > train.num_examples:
        raise RunError(
            f"--global_batch_size={config.global_batch_size} is larger than the "
            f"{train.num_examples} examples of the training split of "
            f"--dataset={config.data_spec(training=True)}: every batch would repeat them and "
            f"hold {config.global_batch_size} images in memory. Use {train.num_examples} or less."
        )


def check_init_from(config, base):
    """`--init_from` must be an image classifier this run can fine-tune: [N, H, W, 3] inputs at
    --image_size, --num_classes outputs, and convolutions (the layers SAT's activations follow)."""
    prefix = f"--init_from={config.init_from}"
    shape = tuple(base.input_shape) if not isinstance(base.input_shape, list) else (None,)
    if len(shape) != 4 or shape[-1] != 3:
        raise RunError(
            f"{prefix} takes inputs of shape {shape[1:]}, not RGB images [H, W, 3]; give an "
            "image classifier."
        )
    if tuple(shape[1:3]) not in ((None, None), (config.image_size,) * 2):
        raise RunError(
            f"{prefix} takes {shape[1]}x{shape[2]} images, not --image_size={config.image_size}; "
            "set --image_size to match."
        )
    outputs = tuple(base.output_shape) if not isinstance(base.output_shape, list) else ()
    if len(outputs) != 2 or outputs[-1] != config.num_classes:
        raise RunError(
            f"{prefix} outputs shape {outputs[1:]}, not --num_classes={config.num_classes} "
            f"logits; set --num_classes={outputs[-1] if len(outputs) == 2 else '...'} to match "
            "(or give a classifier with that many classes)."
        )
    convolutions = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
    if not any(isinstance(layer, convolutions) for layer in _all_layers(base)):
        raise RunError(
            f"{prefix} has no convolution layers; SAT fine-tunes a convolutional image "
            "classifier (e.g. one of --model's zoo saved as .keras)."
        )


def _all_layers(model):
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from _all_layers(layer)


def min_image_size(model):
    """The smallest input side `model` makes sense at: its total downsampling factor.

    The ImageNet stems (ResNet: stride-2 conv and max-pool, then three stride-2 stages;
    EfficientNet: five stride-2 stages) reduce 32x; the CIFAR nets and small_cnn reduce 4x,
    which `TrainConfig`'s own minimum of 8 pixels already covers.
    """
    return 32 if model in resnet.CONFIGS or model in efficientnet.CONFIGS else 8


def check_first_batches(config, train, evaluation):
    """Reads one batch of each split, so unreadable data fails before the model is built."""
    for split in (train, evaluation):
        try:
            next(iter(split.dataset.take(1)))
        except bad_record_errors() as error:
            raise data_error(config, error, resumable=False) from None
        except StopIteration:
            raise RunError(
                f"--dataset={config.dataset}: the {'training' if split.training else 'eval'} "
                "split yields no batch; check the files and --global_batch_size."
            ) from None


def bad_record_errors():
    """The exceptions a tf.data pipeline raises for a bad record, for an `except` clause:
    TensorFlow's InvalidArgumentError once TensorFlow is loaded, else none (no pipeline ran, and
    TensorFlow is not imported for nothing: it is optional under JAX)."""
    tf = sys.modules.get("tensorflow")
    return (tf.errors.InvalidArgumentError,) if tf is not None else ()


def data_problem(error):
    """The record-naming message `sat_tf.data` put in a tf.data assertion, or None."""
    found = re.search(r"assertion failed: \[(.*?)\]", error.message, re.S)
    return found.group(1) if found else None


def data_error(config, error, *, resumable):
    """A `RunError` from the message `sat_tf.data` puts in its tf.data assertion, else `error`.

    The pipeline names the file and record ("x.tfrecord (record 7) is not a JPEG or PNG
    image"); TensorFlow wraps it in an op trace that does not help the user.
    """
    found = data_problem(error)
    if not found:
        return error
    then = " The last checkpoint is kept; re-run the same command to resume." if resumable else ""
    return RunError(
        f"--dataset={config.dataset}: {found}. Fix or remove that file (tools/"
        f"build_tfrecords.py writes checked ones).{then}"
    )
