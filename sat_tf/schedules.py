"""Learning-rate schedules for the two recipes SAT trains with.

ResNet (official SAT / ImageNet-Adversarial-Training code): linear warm-up, then step decay by 10x
at fixed epochs. EfficientNet (official TPU code): warm-up, then exponential decay 0.97 every 2.4
epochs. Both are step-based, so a run resumed from a checkpoint (which restores the optimizer's
iteration counter) continues on the same curve.
"""

import keras
from keras import ops

from sat_tf.options import SCHEDULES


@keras.saving.register_keras_serializable(package="sat_tf")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak_lr`, then step, exponential or cosine decay.

    lr(step) = peak_lr * (step + 1) / warmup_steps                     while step < warmup_steps
             = peak_lr * decay_rate ** (number of boundaries passed)  for kind="step"
             = peak_lr * decay_rate ** floor(step / decay_steps)      for kind="exponential"
             = peak_lr * 0.5 * (1 + cos(pi * t))                      for kind="cosine", t in [0, 1]

    `step` is the optimizer's iteration count before the update (0 for the first), so the
    first update already uses peak_lr / warmup_steps and the last warm-up step reaches peak_lr.

    Args:
        peak_lr: Learning rate after warm-up.
        warmup_steps: Steps of linear warm-up (0 for none).
        kind: "step", "exponential" or "cosine".
        boundaries: Steps at which a "step" schedule multiplies by `decay_rate`.
        decay_rate: Factor per boundary ("step") or per `decay_steps` ("exponential").
        decay_steps: Period of an "exponential" schedule.
        total_steps: Length of a "cosine" schedule.
    """

    KINDS = SCHEDULES

    def __init__(
        self,
        peak_lr,
        *,
        warmup_steps=0,
        kind="step",
        boundaries=(),
        decay_rate=0.1,
        decay_steps=1,
        total_steps=1,
    ):
        if kind not in self.KINDS:
            raise ValueError(f"`kind` must be one of {self.KINDS}. Received: kind={kind!r}")
        if peak_lr <= 0:
            raise ValueError(f"`peak_lr` must be > 0. Received: peak_lr={peak_lr}")
        self.peak_lr = float(peak_lr)
        self.warmup_steps = int(warmup_steps)
        self.kind = kind
        self.boundaries = [int(b) for b in boundaries]
        self.decay_rate = float(decay_rate)
        self.decay_steps = max(int(decay_steps), 1)
        self.total_steps = max(int(total_steps), 1)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if self.kind == "step":
            passed = (
                sum(ops.cast(step >= b, "float32") for b in self.boundaries)
                if self.boundaries
                else 0.0
            )
            decayed = self.peak_lr * ops.power(self.decay_rate, passed)
        elif self.kind == "exponential":
            decayed = self.peak_lr * ops.power(self.decay_rate, ops.floor(step / self.decay_steps))
        else:
            t = ops.clip(
                (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0, 1
            )
            decayed = self.peak_lr * 0.5 * (1.0 + ops.cos(3.141592653589793 * t))
        if self.warmup_steps == 0:
            return decayed
        warm = self.peak_lr * (step + 1.0) / self.warmup_steps
        return ops.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
            "boundaries": self.boundaries,
            "decay_rate": self.decay_rate,
            "decay_steps": self.decay_steps,
            "total_steps": self.total_steps,
        }
