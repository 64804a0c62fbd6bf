"""Training callbacks: resumable checkpoints, loud numeric faults, clean stops, adversarial images.

Checkpoints are TensorFlow object checkpoints of the model and optimizer (weights, slots and the
iteration counter, so learning-rate schedules resume on the same curve). Its CheckpointManager
writes the data files first and the `checkpoint` index last, by rename: a run killed while writing
leaves the previous checkpoint as the latest one, never a half-written file that looks whole.
"""

import contextlib
import math
import signal

import keras
import numpy as np
import tensorflow as tf


def global_step(model):
    """The optimizer's iteration count as an int (also for distributed variables)."""
    return int(model.optimizer.iterations.value.numpy())


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

    def _get_manager(self):
        if self._manager is None:
            optimizer = self.model.optimizer
            optimizer.build(self.model.trainable_variables)
            checkpoint = tf.train.Checkpoint(model=self.model, optimizer=optimizer)
            self._manager = tf.train.CheckpointManager(
                checkpoint, self.directory, max_to_keep=self.max_to_keep
            )
        return self._manager

    def restore(self, model):
        """Restores the latest checkpoint into `model`; returns its step, or 0 if there is none."""
        self.set_model(model)
        manager = self._get_manager()
        if manager.latest_checkpoint is None:
            return 0
        manager.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        self._last_saved = global_step(model)
        return self._last_saved

    def save(self):
        """Saves now, unless this step is already saved. Returns the checkpoint path."""
        step = global_step(self.model)
        manager = self._get_manager()
        if step != self._last_saved:
            manager.save(checkpoint_number=step)
            self._last_saved = step
        return manager.latest_checkpoint

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
            "is kept. Try a lower --base_learning_rate or a longer --warmup_epochs; with "
            "--mixed_precision=float16, check the loss scale (or use bfloat16)."
        )


class GracefulStop(keras.callbacks.Callback):
    """On SIGTERM or Ctrl-C, finishes the current step, saves a checkpoint and stops.

    Args:
        checkpointer: The run's `Checkpointer`.
        resume_hint: Text printed after saving, e.g. the command that resumes the run.
    """

    def __init__(self, checkpointer, resume_hint=""):
        super().__init__()
        self.checkpointer = checkpointer
        self.resume_hint = resume_hint
        self.requested = None
        self._previous = {}

    def _request(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def on_train_begin(self, logs=None):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._request)

    def on_train_batch_end(self, batch, logs=None):
        if self.requested and not self.model.stop_training:
            path = self.checkpointer.save()
            self.model.stop_training = True
            print(f"\nStopped on {self.requested}; saved {path}. {self.resume_hint}", flush=True)

    def on_train_end(self, logs=None):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class AdversarialImages(keras.callbacks.Callback):
    """Writes a few clean images, their adversarial versions and the perturbation to TensorBoard.

    Args:
        log_dir: TensorBoard directory.
        images: A small batch of [0, 255] pixels.
        labels: Their labels (ids or one-hot).
        attack: `attack(model, images, labels) -> adversarial images`.
    """

    def __init__(self, log_dir, images, labels, attack):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(log_dir))
        self.images, self.labels, self.attack = images, labels, attack

    def on_epoch_end(self, epoch, logs=None):
        adv = self.attack(self.model, self.images, self.labels)
        delta = np.asarray(adv) - np.asarray(self.images)
        scale = max(float(np.abs(delta).max()), 1e-6)
        with self.writer.as_default(step=epoch):
            tf.summary.image("clean", np.asarray(self.images) / 255.0, max_outputs=4)
            tf.summary.image("adversarial", np.asarray(adv) / 255.0, max_outputs=4)
            tf.summary.image("perturbation", 0.5 + 0.5 * delta / scale, max_outputs=4)
        self.writer.flush()
