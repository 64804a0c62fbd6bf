"""One training run from a `TrainConfig`: data, model, optimizer, callbacks, fit, final model.

`tools/train.py` is the command-line face of `run`; the demo and the study call `run` directly.
What a run leaves in `model_dir`:

    config.json      the resolved configuration (a resumed run must match it)
    checkpoints/     model + optimizer state, every `checkpoint_every_steps` and each epoch
    logs/            TensorBoard: loss, clean and adversarial accuracy, learning rate, images
    robustness_card.json  threat model, recipe, data, seed, results (tools/eval.py appends)
    model.keras      the trained classifier (written last, atomically: its presence = finished)
    results.json     final clean and adversarial evaluation, wall time, command

plus `.sat_tf_run.json`, the manifest that marks the folder as a run and lists these names, and,
while a process works on the run, its lock `.sat_tf_run.lock` (`sat_tf.rundir`).
"""

import contextlib
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import keras

from sat_tf import backend, card, data, distribute, models, rundir, saving, schedules
from sat_tf import callbacks as callbacks_lib
from sat_tf.adversarial import AdversarialModel
from sat_tf.atomic import atomic_path, write_json
from sat_tf.config import TrainConfig
from sat_tf.preflight import (
    RunError,  # what `run` raises, named here for its callers
    bad_record_errors,
    check_batch_fits,
    check_first_batches,
    check_model_dir,
    check_names,
    clear_finished_run,
    data_error,
)


def run(config: TrainConfig, *, command=""):
    """Trains (or resumes) the run described by `config`; returns the final results dict.

    Every input is checked before anything in `model_dir` changes: flags, names, the strategy's
    replicas, the directory (writable, free space, finished run, same config), the batch against
    the training split's size, and the first batch of each data split; under the lock, that no
    run folder is a link. Only then does `--overwrite` clear a finished run.

    Returns:
        The summary written to `results.json`, or `{"stopped": True, "signal": ..., "step": ...}`
        when SIGTERM / Ctrl-C stopped training (a checkpoint was saved; re-run to resume).

    Raises:
        RunError: a bad input or a checkpoint of another model, before training.
        FloatingPointError: the loss became NaN or Inf (the last good checkpoint is kept).
    """
    started = time.time()
    strategy, model_dir, train, evaluation, steps_per_epoch = check_inputs(config)
    try:
        with rundir.locked(model_dir, "training"):
            check_model_dir(config)  # again under the lock: another run may have finished
            rundir.record(model_dir, *rundir.TRAINING_FILES)
            return _run_locked(
                config, command, started, strategy, model_dir, train, evaluation, steps_per_epoch
            )
    except (rundir.RunDirError, rundir.RunWriteError) as error:
        raise RunError(str(error)) from None


def _run_locked(config, command, started, strategy, model_dir, train, evaluation, steps_per_epoch):
    if config.overwrite:
        clear_finished_run(model_dir)
    if config.mixed_precision:
        keras.config.set_dtype_policy(f"mixed_{config.mixed_precision}")
    with strategy.scope():
        model = build_model(config, steps_per_epoch)
    checkpointer = callbacks_lib.Checkpointer(
        model_dir / rundir.CHECKPOINTS, every_steps=config.checkpoint_every_steps
    )
    try:
        with strategy.scope():  # restoring builds optimizer slots: they belong to the strategy
            start_step = checkpointer.restore(model)
    except ValueError as error:
        raise RunError(f"--model_dir={model_dir}: {error}") from None
    resume = f"re-run the same command to resume ({command})" if command else "re-run to resume"
    try:
        write_json(model_dir / rundir.CONFIG, dataclasses.asdict(config))  # inputs are good
    except OSError as error:
        raise rundir.write_failure(
            rundir.CONFIG, model_dir, "nothing changed in the run", resume, error
        ) from None
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
    except bad_record_errors() as error:
        raise data_error(config, error, resumable=True) from None
    except callbacks_lib.CheckpointWriteError as error:
        raise rundir.write_failure(
            f"checkpoint {error.step}", error.directory, error.kept, resume, error.cause
        ) from None
    finally:
        stop.on_train_end()  # the previous signal handlers again, also after an error
    if model.stop_training:  # SIGTERM / Ctrl-C: checkpoint saved, no final model yet
        return {"stopped": True, "signal": stop.requested, "step": callbacks_lib.global_step(model)}
    with _fit_scope(strategy):
        results = model.evaluate(evaluation.dataset, return_dict=True, verbose=0)
    results = {k: float(v) for k, v in results.items()}
    config_dict = dataclasses.asdict(config)
    summary = {
        "results": results,
        "steps": callbacks_lib.global_step(model),
        "wall_time_s": round(time.time() - started, 1),
        "command": command,
        "config": config_dict,
    }
    try:
        card.write(model_dir, card.training_card(config_dict, results=results, command=command))
        write_json(model_dir / rundir.RESULTS, summary)
        save_model_atomically(model.classifier, model_dir / rundir.FINAL_MODEL)  # last: "finished"
    except OSError as error:
        kept = f"the checkpoints in {checkpointer.directory} (step {summary['steps']})"
        raise rundir.write_failure(
            f"the final {rundir.FINAL_MODEL}/results", model_dir, kept, resume, error
        ) from None
    print(f"Finished: {json.dumps(results)}\nModel: {model_dir / rundir.FINAL_MODEL}", flush=True)
    return summary


def seed_everything(seed, *, deterministic=False):
    """Seeds Python, NumPy and the backend; with `deterministic`, also makes every op
    deterministic.

    Op determinism (`tf.config.experimental.enable_op_determinism`) stays on for the process:
    kernels with nondeterministic reductions pick deterministic ones or raise, and tf.data runs
    its random transformations in order (also under JAX, whose input is still tf.data; JAX's
    own CPU ops are deterministic). Same seed, same data, same machine and versions:
    bit-identical weights.
    """
    keras.utils.set_random_seed(seed)
    if deterministic:
        backend.tensorflow("--deterministic").config.experimental.enable_op_determinism()


def check_inputs(config):
    """Every check that needs no model, in order; changes nothing in `model_dir`. Seeds
    everything once the flags are valid, before the data's shuffle.

    Returns:
        `(strategy, model_dir, train, evaluation, steps_per_epoch)`.
    """
    try:
        config.validate()
    except ValueError as error:
        raise RunError(str(error)) from None
    seed_everything(config.seed, deterministic=config.deterministic)
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
    check_batch_fits(config, train)
    steps_per_epoch = config.steps_per_epoch or train.steps_per_epoch
    if not steps_per_epoch:
        raise RunError(
            f"The size of --dataset={config.dataset} is unknown; give --steps_per_epoch."
        )
    check_first_batches(config, train, evaluation)
    return strategy, model_dir, train, evaluation, steps_per_epoch


def load_split(config, *, training, input_context=None):
    """One input split as `sat_tf.data.Data`, with one-hot labels (needed by label smoothing).

    Args:
        config: The run's `TrainConfig`.
        training: The training split (else the evaluation split, cut to `eval_examples`).
        input_context: Given by `distribute_datasets_from_function` (multi-worker runs).
    """
    try:
        split = data.load(
            config.data_spec(training=training),
            split="train" if training else config.resolved_eval_split,
            input_context=input_context,
            global_batch_size=config.global_batch_size,
            image_size=config.image_size,
            num_classes=config.num_classes,
            data_dir=config.data_dir or None,
            augmentation=None if config.augmentation == "none" else config.augmentation,
        )
    except (ValueError, FileNotFoundError, *_not_found_errors()) as error:
        raise RunError(f"--dataset={config.dataset}: {error}") from None
    if config.eval_examples and not training:  # whole batches: rounded up to a batch multiple
        batches = math.ceil(config.eval_examples / config.global_batch_size)
        split = dataclasses.replace(split, dataset=split.dataset.take(batches))
    return _one_hot(split, config.num_classes)


def _not_found_errors():
    tf = sys.modules.get("tensorflow")  # loaded by sat_tf.data before it can raise
    return (tf.errors.NotFoundError,) if tf is not None else ()


def load_data(config):
    """The training and evaluation splits."""
    return load_split(config, training=True), load_split(config, training=False)


def _one_hot(split, num_classes):
    """Label smoothing needs one-hot labels; a padding weight (third element) is kept."""

    tf = backend.tensorflow("tf.data input")

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
        eval_epsilon=config.eval_epsilon,
        eval_step_size=config.eval_step_size,
        eval_num_steps=config.eval_num_steps,
        smooth_gradients=config.smooth_gradients,
        weight_decay=config.weight_decay,
        # JAX draws keyed random starts (no random state in a jitted step): the run's seed.
        # TensorFlow keeps its stateful draws, seeded by seed_everything.
        seed=config.seed if backend.NAME == "jax" else None,
    )
    model.compile(
        optimizer=build_optimizer(config, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing
        ),
        metrics=["accuracy"],
        jit_compile=True if config.jit_compile else "auto",
    )
    model.build((None, config.image_size, config.image_size, 3))
    return model


def _callbacks(config, model_dir, checkpointer, evaluation, command):
    hint = f"Re-run the same command to resume: {command}" if command else "Re-run to resume."
    images, labels = next(iter(evaluation.dataset.take(1)))[:2]
    return [
        callbacks_lib.StopOnNonFinite(),  # before the checkpointer: never save a NaN state
        checkpointer,
        callbacks_lib.GracefulStop(checkpointer, resume_hint=hint),
        keras.callbacks.TensorBoard(model_dir / rundir.LOGS, update_freq="epoch"),
        callbacks_lib.AdversarialImages(model_dir / rundir.LOGS / "images", images[:4], labels[:4]),
    ]


def _fit_function(config, model, strategy, train, evaluation):
    """`fit(epochs, initial_epoch, steps_per_epoch, callbacks)`: Keras `fit` (under JAX inside the
    `keras.distribution` scope), or the custom loop of `sat_tf.distribute` under TensorFlow's
    MultiWorkerMirroredStrategy (where Keras 3.15's fit fails)."""
    verbose = 1 if sys.stdout.isatty() else 2
    if config.strategy != "multi_worker" or backend.NAME != "tensorflow":
        return functools.partial(
            _fit_in_scope,
            strategy,
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


def _fit_scope(strategy):
    """Under JAX, `keras.distribution` lays out `fit`'s and `evaluate`'s batches only inside its
    scope; TensorFlow's strategies need none there (nothing changes for them)."""
    return strategy.scope() if backend.NAME != "tensorflow" else contextlib.nullcontext()


def _fit_in_scope(strategy, fit, *args, **kwargs):
    with _fit_scope(strategy):
        return fit(*args, **kwargs)


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
    with atomic_path(path) as partial:
        model.save(partial)
