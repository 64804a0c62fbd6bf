"""Training callbacks: resumable checkpoints, loud numeric faults, clean stops, adversarial images.

Checkpoints hold the model and optimizer (weights, slots and the iteration counter, so
learning-rate schedules resume on the same curve). Under TensorFlow they are TensorFlow object
checkpoints, whose CheckpointManager writes the data files first and the `checkpoint` index last,
by rename; under JAX they are Keras weights files (`ckpt-<step>.weights.h5`, model and optimizer
variables), each written under a temporary name and renamed, then named in the same `checkpoint`
index. Either way a run killed while writing leaves the previous checkpoint as the latest one,
never a half-written file that looks whole. A run resumes on the backend that wrote it.
"""

import contextlib
import glob
import math
import os
import re
import signal

import keras
import numpy as np

from sat_tf import backend, rundir
from sat_tf.atomic import atomic_path, atomic_write, write_json

SIGNATURE = "model_signature.json"  # beside the checkpoints: what they fit (model_signature)
INDEX = "checkpoint"  # TensorFlow's index of the checkpoints: names the latest one
MAX_INDEX_BYTES = 2**20  # a real index is a few hundred bytes; TensorFlow reads it whole


def global_step(model):
    """The optimizer's iteration count as an int (also for distributed variables)."""
    return int(backend.to_numpy(model.optimizer.iterations.value))


def model_signature(model):
    """What a checkpoint must fit: the classifier's name and each saved variable's path and shape.

    TensorFlow matches checkpoint values to variables by position in the object graph, so a
    checkpoint of another architecture can restore silently in part (a deeper ResNet into a
    shallower one). The signature is written beside the checkpoints and compared before restoring.
    """

    def entries(variables, strip_first):  # optimizer paths start with its per-process name
        return [
            [v.path.split("/", 1)[-1] if strip_first else v.path, list(v.shape)] for v in variables
        ]

    return {
        "model": getattr(model, "classifier", model).name,
        "weights": entries(model.weights, False),
        "optimizer": entries(model.optimizer.variables, True),
    }


def _signature_difference(saved, current):
    """A sentence naming the first difference that matters for restoring, or ""."""
    for part in ("weights", "optimizer"):
        old, new = saved.get(part, []), current[part]
        for index, (a, b) in enumerate(zip(old, new, strict=False)):
            if a[1] != b[1]:  # names may differ between processes; shapes may not
                return (
                    f"{part} variable {index} is {a[0]} {a[1]} in the checkpoint "
                    f"({saved.get('model')}) but {b[0]} {b[1]} in this model ({current['model']})"
                )
        if len(old) != len(new):
            return (
                f"the checkpoint ({saved.get('model')}) has {len(old)} {part} variables, "
                f"this model ({current['model']}) has {len(new)}"
            )
    return ""


def _is_signature(saved):
    """Whether `saved` has the shape `model_signature` writes: lists of [path, shape] pairs."""

    def pairs(entries):
        return isinstance(entries, list) and all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[1], list) for e in entries
        )

    return isinstance(saved, dict) and all(
        pairs(saved.get(k, [])) for k in ("weights", "optimizer")
    )


def _read_small(path, fix, *, limit=rundir.MAX_JSON_BYTES, parse=True):
    """The JSON in `path` (or its bytes), None when absent; ValueError naming the file and `fix`
    when it is forged or damaged (over `limit`, not a regular file, not JSON)."""
    try:
        return rundir.read_json(path, limit) if parse else rundir.read_small(path, limit)
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise ValueError(f"{path} {error}. {fix}") from None


def _numbered(directory, suffix):
    """The names (`ckpt-<step>` + `suffix` without ".index") of the checkpoints in
    `directory`, newest first."""
    steps = []
    for path in glob.glob(os.path.join(glob.escape(directory), f"ckpt-*{suffix}")):
        found = re.fullmatch(rf"ckpt-(\d+){re.escape(suffix)}", os.path.basename(path))
        steps += [int(found.group(1))] if found else []
    name = suffix if suffix != ".index" else ""
    return [f"ckpt-{step}{name}" for step in sorted(steps, reverse=True)]


class _TensorFlowStore:
    """TensorFlow object checkpoints of the model and optimizer (TensorFlow backend)."""

    SUFFIX = ".index"

    def __init__(self, model, directory, max_to_keep):
        tf = backend.tensorflow("TensorFlow checkpoints")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        self._manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=max_to_keep)
        self.errors = (OSError, tf.errors.OpError)

    @property
    def latest(self):
        return self._manager.latest_checkpoint

    def restore(self, path):
        self._manager.checkpoint.restore(path).assert_existing_objects_matched()

    def save(self, step):
        self._manager.save(checkpoint_number=step)


class _KerasStore:
    """Keras weights files of the model and optimizer (`model.save_weights`), with the same
    `checkpoint` index as TensorFlow's, for backends whose variables TensorFlow cannot track."""

    SUFFIX = ".weights.h5"

    def __init__(self, model, directory, max_to_keep):
        self._keras_model, self._directory, self._max_to_keep = model, directory, max_to_keep
        self.errors = (OSError,)

    @property
    def latest(self):
        try:
            text = rundir.read_small(os.path.join(self._directory, INDEX), MAX_INDEX_BYTES)
        except FileNotFoundError:
            return None
        found = re.search(
            r'^model_checkpoint_path: "([^"/]+)"$', text.decode(errors="replace"), re.M
        )
        path = found and os.path.join(self._directory, found.group(1))
        return path if path and os.path.isfile(path) else None

    def restore(self, path):
        self._keras_model.load_weights(path)

    def save(self, step):
        name = f"ckpt-{step}{self.SUFFIX}"
        with atomic_path(os.path.join(self._directory, name)) as partial:
            self._keras_model.save_weights(partial)
        atomic_write(os.path.join(self._directory, INDEX), f'model_checkpoint_path: "{name}"\n')
        for old in _numbered(self._directory, self.SUFFIX)[self._max_to_keep :]:
            os.remove(os.path.join(self._directory, old))


class CheckpointWriteError(Exception):
    """A checkpoint that could not be written (disk full, read-only folder).

    Attributes:
        step: The step whose checkpoint failed.
        directory: The checkpoint folder.
        kept: The latest complete checkpoint still on disk (what a re-run resumes from).
        cause: The `OSError` or TensorFlow error.
    """

    def __init__(self, step, directory, kept, cause):
        super().__init__(f"checkpoint of step {step} in {directory} failed: {cause}")
        self.step, self.directory, self.kept, self.cause = step, directory, kept, cause


class Checkpointer(keras.callbacks.Callback):
    """Saves model + optimizer every `every_steps` steps and at each epoch end; restores on demand.

    Args:
        directory: Where checkpoints go (e.g. `model_dir/checkpoints`).
        every_steps: Save every this many optimizer steps (0: only at epoch ends).
        max_to_keep: Checkpoints kept on disk.
    """

    def __init__(self, directory, *, every_steps=0, max_to_keep=2):
        super().__init__()
        self.directory = str(directory)
        self.every_steps = int(every_steps)
        self.max_to_keep = max_to_keep
        self._manager = None
        self._last_saved = -1
        self._signed = False

    def _get_manager(self):
        if self._manager is None:
            self.model.optimizer.build(self.model.trainable_variables)
            store = _TensorFlowStore if backend.NAME == "tensorflow" else _KerasStore
            self._manager = store(self.model, self.directory, self.max_to_keep)
        return self._manager

    def restore(self, model):
        """Restores the latest checkpoint into `model`; returns its step, or 0 if there is none.

        Raises:
            ValueError: when the checkpoints were written by another architecture (naming the
                first variable that differs), instead of restoring part of the weights.
        """
        self.set_model(model)
        fix = f"Use a new --model_dir, or delete {self.directory} to train this model from scratch."
        index = os.path.join(self.directory, INDEX)
        _read_small(index, fix, limit=MAX_INDEX_BYTES, parse=False)  # before TensorFlow reads it
        manager = self._get_manager()
        latest = manager.latest
        found = _numbered(self.directory, manager.SUFFIX)
        if latest is None and found:  # TensorFlow would start from step 0 and save over them
            raise ValueError(
                f"{index} is missing or damaged, but {self.directory} holds {found[0]} (the "
                f"newest of {len(found)} checkpoints): training would start again from step 0 "
                f'and replace them. Write the line model_checkpoint_path: "{found[0]}" into '
                f"{index} to resume from it, or use a new --model_dir."
            )
        if latest is None:
            return 0
        saved = _read_small(os.path.join(self.directory, SIGNATURE), fix)
        if saved is not None and not _is_signature(saved):
            path = os.path.join(self.directory, SIGNATURE)
            raise ValueError(f"{path} is not a model signature (damaged or not ours). {fix}")
        if saved is not None:
            difference = _signature_difference(saved, model_signature(model))
            if difference:
                raise ValueError(f"{latest} was written by another model: {difference}. {fix}")
        # TensorFlow's (or Keras's) own checks, which stop at the first error: the only check
        # of checkpoints written without a signature file.
        try:
            manager.restore(latest)
        except (ValueError, AssertionError) as error:
            raise ValueError(
                f"{latest} does not fit this model ({str(error).splitlines()[0]}). {fix}"
            ) from None
        self._last_saved = global_step(model)
        self._signed = saved is not None
        return self._last_saved

    def save(self):
        """Saves now, unless this step is already saved. Returns the checkpoint path."""
        step = global_step(self.model)
        manager = self._get_manager()
        if step != self._last_saved:
            try:
                if not self._signed:  # first save of a fresh run; replaces a stale signature
                    os.makedirs(self.directory, exist_ok=True)
                    signature = model_signature(self.model)
                    write_json(os.path.join(self.directory, SIGNATURE), signature)
                    self._signed = True
                manager.save(step)
            except manager.errors as error:
                kept = manager.latest or "no checkpoint yet"
                raise CheckpointWriteError(step, self.directory, kept, error) from None
            self._last_saved = step
        return manager.latest

    def on_train_batch_end(self, batch, logs=None):
        step = global_step(self.model)
        if self.every_steps and step % self.every_steps == 0:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        self.save()


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops at once when the loss becomes NaN or Inf, naming the step and what to try.

    The checkpoints on disk are never written from the bad state (this callback must run before
    `Checkpointer`), so the last good one stays the latest.
    """

    def __init__(self):
        super().__init__()
        self.bad_step = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        self.bad_step = global_step(self.model)
        self.model.stop_training = True
        raise FloatingPointError(
            f"Training loss became {float(loss)} at step {self.bad_step}. The last good checkpoint "
            "is kept. Try a lower --base_learning_rate or a longer --warmup_epochs (in a new "
            "--model_dir: a run resumes only with its own flags); with --mixed_precision=float16, "
            "check the loss scale (or use bfloat16)."
        )


class GracefulStop(keras.callbacks.Callback):
    """On SIGTERM or Ctrl-C, finishes the current step, saves a checkpoint and stops.

    A second signal before that step ends aborts at once (KeyboardInterrupt); the previous
    checkpoint is then the one a re-run resumes from.

    Args:
        checkpointer: The run's `Checkpointer`.
        resume_hint: Text printed after saving, e.g. the command that resumes the run.
    """

    def __init__(self, checkpointer, resume_hint=""):
        super().__init__()
        self.checkpointer = checkpointer
        self.resume_hint = resume_hint
        self.requested = None  # the name of the signal that asked to stop, e.g. "SIGTERM"
        self._previous = {}

    def _request(self, signum, frame):
        if self.requested:
            self.on_train_end()  # the previous handlers again, also for an in-process caller
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting")
        self.requested = signal.Signals(signum).name

    def on_train_begin(self, logs=None):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._request)

    def on_train_batch_end(self, batch, logs=None):
        if self.requested and not self.model.stop_training:
            path = self.checkpointer.save()
            self.model.stop_training = True
            step = global_step(self.model)
            print(
                f"\nStopped on {self.requested} at step {step}; saved {path}. {self.resume_hint}",
                flush=True,
            )

    def on_train_end(self, logs=None):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class AdversarialImages(keras.callbacks.Callback):
    """Writes a few clean images, their adversarial versions and the perturbation to TensorBoard.

    The adversarial images are the model's own evaluation attack
    (`AdversarialModel.adversarial_examples(..., training=False)`: its epsilon, step, steps,
    random start and smooth-gradient phase), so they show what the logged `val_adv_` metrics
    measure.

    Args:
        log_dir: TensorBoard directory.
        images: A small batch of [0, 255] pixels.
        labels: Their labels (ids or one-hot).
    """

    def __init__(self, log_dir, images, labels):
        super().__init__()
        self.log_dir = str(log_dir)
        self.writer = None  # tf.summary's, made at the first epoch end (TensorFlow needed there)
        self.images, self.labels = images, labels

    def adversarial(self):
        """The adversarial versions of the images under the model's evaluation attack."""
        return self.model.adversarial_examples(self.images, self.labels, training=False)

    def on_epoch_end(self, epoch, logs=None):
        summary = backend.tensorflow("TensorBoard images").summary
        if self.writer is None:
            self.writer = summary.create_file_writer(self.log_dir)
        adv = backend.to_numpy(self.adversarial())
        delta = np.asarray(adv) - np.asarray(self.images)
        scale = max(float(np.abs(delta).max()), 1e-6)
        with self.writer.as_default(step=epoch):
            summary.image("clean", np.asarray(self.images) / 255.0, max_outputs=4)
            summary.image("adversarial", np.asarray(adv) / 255.0, max_outputs=4)
            summary.image("perturbation", 0.5 + 0.5 * delta / scale, max_outputs=4)
        self.writer.flush()
