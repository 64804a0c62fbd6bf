"""The one configuration object of a training run: `TrainConfig`, a frozen dataclass.

`tools/train.py` defines one absl flag per field, with the same name, and builds a `TrainConfig` at
the top of `main()`; nothing else reads flags. Units are stated once, here: `epsilon` and
`step_size` are in pixels of the [0, 255] input (4 means 4/255), learning rates are per 256 images.
"""

import dataclasses

SMOOTH_PHASES = ("attack", "update")
OPTIMIZERS = ("sgd", "rmsprop")
SCHEDULES = ("step", "exponential", "cosine")
MIXED_PRECISION = ("", "float16", "bfloat16")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every knob of `sat_tf.training.run`; each field is also a flag of `tools/train.py`."""

    model_dir: str
    # Model.
    model: str = "small_cnn"
    activation: str = "silu"
    num_classes: int = 10
    image_size: int = 16
    init_from: str = ""  # a .keras classifier to fine-tune (its ReLUs become `activation`)
    # Data: demo | tfrecord:<pattern> | tfds:<name> | folder:<dir>.
    dataset: str = "demo"
    train_files: str = ""  # overrides the train pattern of a tfrecord dataset
    eval_files: str = ""
    eval_split: str = ""  # empty: "test" for demo and tfds:cifar*, else "validation"
    data_dir: str = ""
    augmentation: str = "auto"  # auto | inception | cifar | none
    # Schedule.
    global_batch_size: int = 64
    epochs: int = 1
    steps_per_epoch: int = 0  # 0: one pass over the training set
    eval_examples: int = 0  # 0: the whole evaluation set
    optimizer: str = "sgd"
    base_learning_rate: float = 0.1  # per 256 images: lr = base * global_batch_size / 256
    lr_schedule: str = "step"
    warmup_epochs: float = 0.0
    decay_epochs: tuple = ()  # "step" schedule boundaries, in epochs
    decay_rate: float = 0.1
    decay_every_epochs: float = 2.4  # "exponential" schedule period
    momentum: float = 0.9
    ema_decay: float = 0.0  # 0: no moving average of the weights
    weight_decay: float = 1e-4  # L2 on conv/dense kernels, as in the official code
    label_smoothing: float = 0.1
    # Training attack (pixels).
    epsilon: float = 4.0
    step_size: float = 4.0
    num_steps: int = 1  # 0 with random_start=False trains on clean images
    random_start: bool = True
    prob_start_from_clean: float = 0.2
    # Evaluation attack (pixels); eval_epsilon < 0 means "same as epsilon".
    eval_epsilon: float = -1.0
    eval_step_size: float = 1.0
    eval_num_steps: int = 10
    smooth_gradients: tuple = SMOOTH_PHASES
    # Machinery.
    strategy: str = "default"
    tpu: str = ""
    mixed_precision: str = ""
    seed: int = 0
    checkpoint_every_steps: int = 200
    overwrite: bool = False

    @property
    def resolved_eval_split(self):
        if self.eval_split:
            return self.eval_split
        test_split = self.dataset == "demo" or self.dataset.startswith("tfds:cifar")
        return "test" if test_split else "validation"

    @property
    def resolved_eval_epsilon(self):
        return self.epsilon if self.eval_epsilon < 0 else self.eval_epsilon

    def validate(self):
        """Raises ValueError naming the first bad flag and how to fix it."""
        for name, ok, hint in _checks(self):
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"--{name}={_show(value)} is invalid: {hint}")
        return self


def _show(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def _checks(c):
    yield "model_dir", bool(c.model_dir), "give a directory for checkpoints, logs and the model"
    yield "num_classes", c.num_classes >= 2, "needs at least 2 classes"
    yield "image_size", c.image_size >= 8, "use at least 8 pixels"
    yield "global_batch_size", c.global_batch_size >= 1, "must be >= 1"
    yield "epochs", c.epochs >= 1, "must be >= 1"
    yield "steps_per_epoch", c.steps_per_epoch >= 0, "must be >= 0 (0: one pass over the data)"
    yield "eval_examples", c.eval_examples >= 0, "must be >= 0 (0: all)"
    yield "optimizer", c.optimizer in OPTIMIZERS, f"choose one of {', '.join(OPTIMIZERS)}"
    yield "base_learning_rate", c.base_learning_rate > 0, "must be > 0"
    yield "lr_schedule", c.lr_schedule in SCHEDULES, f"choose one of {', '.join(SCHEDULES)}"
    yield "warmup_epochs", c.warmup_epochs >= 0, "must be >= 0"
    yield "decay_rate", 0 < c.decay_rate <= 1, "must be in (0, 1]"
    yield "decay_every_epochs", c.decay_every_epochs > 0, "must be > 0"
    yield "momentum", 0 <= c.momentum < 1, "must be in [0, 1)"
    yield "ema_decay", 0 <= c.ema_decay < 1, "must be in [0, 1) (0 turns it off)"
    yield "weight_decay", c.weight_decay >= 0, "must be >= 0"
    yield "label_smoothing", 0 <= c.label_smoothing < 1, "must be in [0, 1)"
    yield "epsilon", c.epsilon >= 0, "the L-inf budget in pixels must be >= 0 (e.g. 4 for 4/255)"
    yield "step_size", c.step_size > 0, "the attack step in pixels must be > 0 (e.g. 4)"
    yield "num_steps", c.num_steps >= 0, "must be >= 0 (0 with --norandom_start: clean training)"
    yield "prob_start_from_clean", 0 <= c.prob_start_from_clean <= 1, "must be in [0, 1]"
    yield "eval_step_size", c.eval_step_size > 0, "must be > 0 (e.g. 1)"
    yield "eval_num_steps", c.eval_num_steps >= 0, "must be >= 0"
    yield (
        "smooth_gradients",
        set(c.smooth_gradients) <= set(SMOOTH_PHASES),
        "a comma list of 'attack' and/or 'update', or empty",
    )
    yield "strategy", c.strategy in STRATEGIES, f"choose one of {', '.join(STRATEGIES)}"
    yield "tpu", c.strategy == "tpu" or not c.tpu, "--tpu needs --strategy=tpu"
    yield (
        "mixed_precision",
        c.mixed_precision in MIXED_PRECISION,
        "choose float16, bfloat16, or leave it empty for float32",
    )
    yield "checkpoint_every_steps", c.checkpoint_every_steps >= 0, "must be >= 0"
