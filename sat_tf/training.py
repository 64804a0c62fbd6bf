"""One training run from a `TrainConfig`: data, model, optimizer, callbacks, fit, final model.

`tools/train.py` is the command-line face of `run`; the demo and the study call `run` directly.
What a run leaves in `model_dir`:

    config.json      the resolved configuration (a resumed run must match it)
    checkpoints/     model + optimizer state, every `checkpoint_every_steps` and each epoch
    logs/            TensorBoard: loss, clean and adversarial accuracy, learning rate, images
    robustness_card.json  threat model, recipe, data, seed, results (tools/eval.py appends)
    model.keras      the trained classifier (written last, atomically: its presence = finished)
    results.json     final clean and adversarial evaluation, wall time, command
"""

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import keras
import tensorflow as tf

from sat_tf import activations, attacks, card, data, distribute, models, saving, schedules
from sat_tf import callbacks as callbacks_lib
from sat_tf.adversarial import AdversarialModel
from sat_tf.config import TrainConfig
from sat_tf.models import cifar, efficientnet, resnet

FINAL_MODEL = "model.keras"
MIN_FREE_BYTES = 200 * 2**20


class RunError(Exception):
    """A problem with the run's inputs, found before any training work."""


def run(config: TrainConfig, *, command=""):
    """Trains (or resumes) the run described by `config`; returns the final results dict.

    Every input is checked before anything in `model_dir` changes: flags, names, the strategy's
    replicas, the directory (writable, free space, finished run, same config), and the first
    batch of each data split. Only then does `--overwrite` clear a finished run.

    Returns:
        The summary written to `results.json`, or `{"stopped": True, "signal": ..., "step": ...}`
        when SIGTERM / Ctrl-C stopped training (a checkpoint was saved; re-run to resume).

    Raises:
        RunError: a bad input or a checkpoint of another model, before training.
        FloatingPointError: the loss became NaN or Inf (the last good checkpoint is kept).
    """
    started = time.time()
    strategy, model_dir, train, evaluation, steps_per_epoch = check_inputs(config)
    if config.overwrite:
        clear_finished_run(model_dir)
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        keras.config.set_dtype_policy(f"mixed_{config.mixed_precision}")
    with strategy.scope():
        model = build_model(config, steps_per_epoch)
    checkpointer = callbacks_lib.Checkpointer(
        model_dir / "checkpoints", every_steps=config.checkpoint_every_steps
    )
    try:
        with strategy.scope():  # restoring builds optimizer slots: they belong to the strategy
            start_step = checkpointer.restore(model)
    except ValueError as error:
        raise RunError(f"--model_dir={model_dir}: {error}") from None
    _write_json(model_dir / "config.json", dataclasses.asdict(config))  # inputs are good
    if start_step:
        print(f"Resuming {model_dir} from step {start_step}.", flush=True)
    callbacks = _callbacks(config, model_dir, checkpointer, evaluation, command)
    stop = next(c for c in callbacks if isinstance(c, callbacks_lib.GracefulStop))
    try:
        fit_resumable(
            _fit_function(config, model, strategy, train, evaluation),
            model,
            callbacks=callbacks,
            start_step=start_step,
            steps_per_epoch=steps_per_epoch,
            epochs=config.epochs,
        )
    except tf.errors.InvalidArgumentError as error:
        raise _data_error(config, error, resumable=True) from None
    finally:
        stop.on_train_end()  # the previous signal handlers again, also after an error
    if model.stop_training:  # SIGTERM / Ctrl-C: checkpoint saved, no final model yet
        return {"stopped": True, "signal": stop.requested, "step": callbacks_lib.global_step(model)}
    results = model.evaluate(evaluation.dataset, return_dict=True, verbose=0)
    results = {k: float(v) for k, v in results.items()}
    config_dict = dataclasses.asdict(config)
    card.write(model_dir, card.training_card(config_dict, results=results, command=command))
    save_model_atomically(model.classifier, model_dir / FINAL_MODEL)  # last: marks "finished"
    summary = {
        "results": results,
        "steps": callbacks_lib.global_step(model),
        "wall_time_s": round(time.time() - started, 1),
        "command": command,
        "config": config_dict,
    }
    _write_json(model_dir / "results.json", summary)
    print(f"Finished: {json.dumps(results)}\nModel: {model_dir / FINAL_MODEL}", flush=True)
    return summary


def check_inputs(config):
    """Every check that needs no model, in order; changes nothing in `model_dir`.

    Returns:
        `(strategy, model_dir, train, evaluation, steps_per_epoch)`.
    """
    config.validate()
    check_names(config)
    strategy = distribute.get_strategy(config.strategy, tpu=config.tpu or None)
    if config.global_batch_size % strategy.num_replicas_in_sync:
        raise RunError(
            f"--global_batch_size={config.global_batch_size} is not divisible by the "
            f"{strategy.num_replicas_in_sync} replicas of --strategy={config.strategy}; use a "
            f"multiple of {strategy.num_replicas_in_sync}."
        )
    model_dir = check_model_dir(config)
    train, evaluation = load_data(config)
    steps_per_epoch = config.steps_per_epoch or train.steps_per_epoch
    if not steps_per_epoch:
        raise RunError(
            f"The size of --dataset={config.dataset} is unknown; give --steps_per_epoch."
        )
    check_first_batches(config, train, evaluation)
    return strategy, model_dir, train, evaluation, steps_per_epoch


def check_model_dir(config):
    """Checks `model_dir` up front, changing nothing in it: writable, enough free space, not a
    finished run (unless `overwrite`), and the same config as an unfinished run there."""
    model_dir = Path(config.model_dir)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        probe = model_dir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
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
    finished = (model_dir / FINAL_MODEL).exists()
    if finished and not config.overwrite:
        raise RunError(
            f"--model_dir={model_dir} holds a finished run ({FINAL_MODEL}). Use a new "
            "--model_dir, or pass --overwrite to train again from scratch."
        )
    if not finished:
        _check_same_config(model_dir / "config.json", config)
    return model_dir


def clear_finished_run(model_dir):
    """`--overwrite`: removes a finished run's outputs (called once every input is checked)."""
    if not (model_dir / FINAL_MODEL).exists():
        return
    for stale in ("checkpoints", FINAL_MODEL, "results.json", "config.json", card.CARD_NAME):
        path = model_dir / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def prepare_model_dir(config):
    """`check_model_dir`, then clears a finished run if `overwrite`; returns the directory."""
    model_dir = check_model_dir(config)
    if config.overwrite:
        clear_finished_run(model_dir)
    return model_dir


def _check_same_config(path, config):
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps(dataclasses.asdict(config)))
    changed = sorted(k for k in current if k != "overwrite" and saved.get(k) != current[k])
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
            saving.load_model(config.init_from)
        except saving.ModelFileError as error:
            raise RunError(f"--init_from={config.init_from}: {error}") from None
    smallest = min_image_size(config.model)
    if not config.init_from and config.image_size < smallest:
        raise RunError(
            f"--image_size={config.image_size} is too small for --model={config.model}: it "
            f"downsamples {smallest}x, so its last stages would see 1x1 maps of padding. Use "
            f"--image_size={smallest} or more, or a CIFAR-size model "
            f"({', '.join(sorted(cifar.CONFIGS))}, small_cnn)."
        )


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
        except tf.errors.InvalidArgumentError as error:
            raise _data_error(config, error, resumable=False) from None
        except StopIteration:
            raise RunError(
                f"--dataset={config.dataset}: the {'training' if split.is_training else 'eval'} "
                "split yields no batch; check the files and --global_batch_size."
            ) from None


def _data_error(config, error, *, resumable):
    """A `RunError` from the message `sat_tf.data` puts in its tf.data assertion, else `error`.

    The pipeline names the file and record ("x.tfrecord (record 7) is not a JPEG or PNG
    image"); TensorFlow wraps it in an op trace that does not help the user.
    """
    found = re.search(r"assertion failed: \[(.*?)\]", error.message, re.S)
    if not found:
        return error
    then = " The last checkpoint is kept; re-run the same command to resume." if resumable else ""
    return RunError(
        f"--dataset={config.dataset}: {found.group(1)}. Fix or remove that file (tools/"
        f"build_tfrecords.py writes checked ones).{then}"
    )


def load_split(config, *, training, input_context=None):
    """One input split as `sat_tf.data.Data`, with one-hot labels (needed by label smoothing).

    Args:
        config: The run's `TrainConfig`.
        training: The training split (else the evaluation split, cut to `eval_examples`).
        input_context: Given by `distribute_datasets_from_function` (multi-worker runs).
    """
    files = config.train_files if training else config.eval_files
    try:
        split = data.load(
            f"tfrecord:{files}" if files else config.dataset,
            split="train" if training else config.resolved_eval_split,
            input_context=input_context,
            global_batch_size=config.global_batch_size,
            image_size=config.image_size,
            num_classes=config.num_classes,
            data_dir=config.data_dir or None,
            augmentation=None if config.augmentation == "none" else config.augmentation,
        )
    except (ValueError, FileNotFoundError, tf.errors.NotFoundError) as error:
        raise RunError(f"--dataset={config.dataset}: {error}") from None
    if config.eval_examples and not training:  # whole batches: rounded up to a batch multiple
        batches = math.ceil(config.eval_examples / config.global_batch_size)
        split = dataclasses.replace(split, dataset=split.dataset.take(batches))
    return _one_hot(split, config.num_classes)


def load_data(config):
    """The training and evaluation splits."""
    return load_split(config, training=True), load_split(config, training=False)


def _one_hot(split, num_classes):
    """Label smoothing needs one-hot labels; a padding weight (third element) is kept."""

    def convert(images, labels, *weights):
        return (images, tf.one_hot(labels, num_classes), *weights)

    dataset = split.dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)
    return dataclasses.replace(split, dataset=dataset)


def build_classifier(config):
    """The classifier: from the zoo, or converted from `init_from` (ReLUs -> `activation`)."""
    shape = (config.image_size, config.image_size, 3)
    if config.init_from:
        from sat_tf.convert import convert_activations

        path = Path(config.init_from)
        try:
            base = saving.load_model(path)
        except saving.ModelFileError as error:
            raise RunError(f"--init_from={path}: {error}") from None
        if tuple(base.input_shape[1:3]) not in ((None, None), (config.image_size,) * 2):
            raise RunError(
                f"--init_from={path} takes {base.input_shape[1]}x{base.input_shape[2]} images, "
                f"not --image_size={config.image_size}; set --image_size to match."
            )
        return convert_activations(base, config.activation)
    return models.build(
        config.model,
        num_classes=config.num_classes,
        activation=config.activation,
        input_shape=shape,
    )


def build_optimizer(config, steps_per_epoch):
    """SGD + Nesterov (ResNet recipe) or RMSProp (EfficientNet recipe) on a warm-up schedule."""
    peak = config.base_learning_rate * config.global_batch_size / 256
    schedule = schedules.WarmupDecay(
        peak,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        kind=config.lr_schedule,
        boundaries=[round(e * steps_per_epoch) for e in config.decay_epochs],
        decay_rate=config.decay_rate,
        decay_steps=round(config.decay_every_epochs * steps_per_epoch),
        total_steps=config.epochs * steps_per_epoch,
    )
    ema = dict(use_ema=config.ema_decay > 0, ema_momentum=config.ema_decay or 0.99)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=config.momentum, nesterov=True, **ema)
    # RMSProp as in the official EfficientNet code: decay 0.9, momentum 0.9, epsilon 1e-3.
    return keras.optimizers.RMSprop(
        schedule, rho=0.9, momentum=config.momentum, epsilon=1e-3, **ema
    )


def build_model(config, steps_per_epoch):
    """The compiled `AdversarialModel` around the classifier (call inside the strategy scope)."""
    model = AdversarialModel(
        build_classifier(config),
        epsilon=config.epsilon,
        step_size=config.step_size,
        num_steps=config.num_steps,
        random_start=config.random_start,
        prob_start_from_clean=config.prob_start_from_clean,
        eval_epsilon=config.resolved_eval_epsilon,
        eval_step_size=config.eval_step_size,
        eval_num_steps=config.eval_num_steps,
        smooth_gradients=config.smooth_gradients,
        weight_decay=config.weight_decay,
    )
    model.compile(
        optimizer=build_optimizer(config, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing
        ),
        metrics=["accuracy"],
    )
    model.build((None, config.image_size, config.image_size, 3))
    return model


def _callbacks(config, model_dir, checkpointer, evaluation, command):
    hint = f"Re-run the same command to resume: {command}" if command else "Re-run to resume."
    images, labels = next(iter(evaluation.dataset.take(1)))[:2]

    def attack(model, x, y):
        return attacks.pgd(
            model.classifier,
            x,
            y,
            epsilon=config.resolved_eval_epsilon,
            step_size=config.eval_step_size,
            num_steps=config.eval_num_steps,
        )

    return [
        callbacks_lib.StopOnNonFinite(),  # before the checkpointer: never save a NaN state
        checkpointer,
        callbacks_lib.GracefulStop(checkpointer, resume_hint=hint),
        keras.callbacks.TensorBoard(model_dir / "logs", update_freq="epoch"),
        callbacks_lib.AdversarialImages(
            model_dir / "logs" / "images", images[:4], labels[:4], attack
        ),
    ]


def _fit_function(config, model, strategy, train, evaluation):
    """`fit(epochs, initial_epoch, steps_per_epoch, callbacks)`: Keras `fit`, or the custom loop
    of `sat_tf.distribute` under MultiWorkerMirroredStrategy (where Keras 3.15's fit fails)."""
    verbose = 1 if sys.stdout.isatty() else 2
    if config.strategy != "multi_worker":
        return functools.partial(
            model.fit,
            train.dataset,
            validation_data=evaluation.dataset,
            verbose=verbose,
            shuffle=False,  # the pipeline shuffles; Keras cannot shuffle a tf.data.Dataset
        )

    def dataset_fn(training):
        return lambda context: load_split(config, training=training, input_context=context).dataset

    return functools.partial(
        distribute.train,
        model,
        dataset_fn(True),
        strategy=strategy,
        verbose=int(verbose == 1),
        validation_fn=dataset_fn(False),
        validation_steps=sum(1 for _ in evaluation.dataset),
    )


def fit_resumable(fit, model, *, callbacks, start_step, steps_per_epoch, epochs):
    """Runs `fit` from a global step: finishes a partial epoch first, then the remaining ones."""
    epoch, done_in_epoch = divmod(start_step, steps_per_epoch)
    if epoch >= epochs:
        return
    if done_in_epoch:
        fit(
            epochs=epoch + 1,
            initial_epoch=epoch,
            steps_per_epoch=steps_per_epoch - done_in_epoch,
            callbacks=callbacks,
        )
        epoch += 1
        if model.stop_training or epoch >= epochs:
            return
    fit(epochs=epochs, initial_epoch=epoch, steps_per_epoch=steps_per_epoch, callbacks=callbacks)


def save_model_atomically(model, path):
    """Saves to a temporary name in the same directory, then renames: never a half file."""
    path = Path(path)
    partial = path.with_name(f".partial-{path.name}")
    model.save(partial)
    os.replace(partial, path)


def _write_json(path, payload):
    partial = Path(path).with_name(f".partial-{Path(path).name}")
    partial.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(partial, path)
