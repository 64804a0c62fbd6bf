"""The one configuration object of a training run: `TrainConfig`, a frozen dataclass.

`tools/train.py` defines one absl flag per field, with the same name (`define_flags`), and builds a
`TrainConfig` at the top of `main()` (`from_flags`); nothing in sat_tf reads the global FLAGS.
Units are stated once, here: `epsilon` and `step_size` are in pixels of the [0, 255] input (4 means
4/255), learning rates are per 256 images. A run's settings are read back with
`TrainConfig.from_json(model_dir / "config.json")`; its data and evaluation attack are resolved by
`data_spec`, `resolved_eval_split` and `resolved_eval_epsilon`, for training and tools/eval.py.
"""

import dataclasses
import typing

from sat_tf import rundir
from sat_tf.adversarial import SMOOTH_PHASES
from sat_tf.distribute import STRATEGIES
from sat_tf.schedules import SCHEDULES

OPTIMIZERS = ("sgd", "rmsprop")  # training.build_optimizer
MIXED_PRECISION = ("", "float16", "bfloat16")


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
    # Evaluation attack (pixels); eval_epsilon None means "same as epsilon".
    eval_epsilon: float | None = None
    eval_step_size: float = 1.0
    eval_num_steps: int = 10
    smooth_gradients: tuple = SMOOTH_PHASES
    # Machinery.
    strategy: str = "default"
    tpu: str = ""
    mixed_precision: str = ""
    seed: int = 0
    deterministic: bool = False  # op determinism: same seed, bit-identical weights
    jit_compile: bool = False  # XLA for the train step (attack included); else Keras's "auto"
    checkpoint_every_steps: int = 200
    overwrite: bool = False

    @classmethod
    def from_dict(cls, values):
        """A config from `dataclasses.asdict` output, e.g. a run's config.json.

        Lists become tuples, unknown keys are ignored, missing ones take their defaults, and an
        `eval_epsilon` < 0 (how runs before the None sentinel wrote "same as epsilon") is None.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        values = {
            key: tuple(value) if isinstance(value, list) else value
            for key, value in values.items()
            if key in names
        }
        if values.get("eval_epsilon") is not None and values["eval_epsilon"] < 0:
            values["eval_epsilon"] = None
        return cls(**values)

    @classmethod
    def from_json(cls, path):
        """The config a run wrote to `<model_dir>/config.json`."""
        return cls.from_dict(rundir.read_json_object(path))

    def data_spec(self, *, training):
        """The `sat_tf.data.load` spec of a split: `--train_files`/`--eval_files` override the
        pattern of `--dataset`."""
        files = self.train_files if training else self.eval_files
        return f"tfrecord:{files}" if files else self.dataset

    @property
    def resolved_eval_split(self):
        return self.eval_split or default_eval_split(self.dataset)

    @property
    def resolved_eval_epsilon(self):
        return self.epsilon if self.eval_epsilon is None else self.eval_epsilon

    def validate(self):
        """Raises ValueError naming the first bad flag and how to fix it."""
        for name, ok, hint in _checks(self):
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"--{name}={_show(value)} is invalid: {hint}")
        return self


def default_eval_split(spec):
    """The evaluation split of a data spec: "test" for demo and tfds:cifar*, else "validation"."""
    return "test" if spec == "demo" or spec.startswith("tfds:cifar") else "validation"


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
    "eval_epsilon": "Evaluation attack budget in pixels; unset or negative means --epsilon.",
    "eval_step_size": "Evaluation attack step in pixels.",
    "eval_num_steps": "Evaluation attack PGD steps.",
    "smooth_gradients": "Phases where SmoothGradReLU uses its smooth backward: attack,update.",
    "strategy": "default | mirrored | multi_worker | tpu.",
    "tpu": "TPU name or address (with --strategy=tpu).",
    "mixed_precision": "float16 | bfloat16 | empty for float32.",
    "seed": "Random seed.",
    "deterministic": "Deterministic ops (tf.config.experimental.enable_op_determinism) and "
    "seeded everything: the same command gives bit-identical weights, at some speed cost.",
    "jit_compile": "Compile the train step, attack included, with XLA (for GPU/TPU; on a CPU "
    "oneDNN's convolutions are faster). Off: Keras's default (XLA only on one accelerator).",
    "checkpoint_every_steps": "Checkpoint every N steps (and at each epoch end); 0: epochs only.",
    "overwrite": "Allow replacing a finished run in --model_dir.",
}


def define_flags(flag_values):
    """Defines one absl flag per `TrainConfig` field in `flag_values` (same name, default, type).

    `tools/train.py` passes `absl.flags.FLAGS`; the study passes a fresh `flags.FlagValues()`.
    """
    from absl import flags

    for field in dataclasses.fields(TrainConfig):
        default = None if field.default is dataclasses.MISSING else field.default
        kind = type(default) if default is not None else typing.get_args(field.type)[:1]
        define = {
            bool: flags.DEFINE_bool,
            int: flags.DEFINE_integer,
            float: flags.DEFINE_float,
            (float,): flags.DEFINE_float,
            tuple: flags.DEFINE_list,
        }.get(kind, flags.DEFINE_string)
        if isinstance(default, tuple):
            default = list(default)
        define(field.name, default, HELP[field.name], flag_values=flag_values)


def from_flags(flag_values):
    """The `TrainConfig` of parsed flags (not yet validated); a negative --eval_epsilon is None."""
    values = {}
    for field in dataclasses.fields(TrainConfig):
        value = flag_values[field.name].value
        values[field.name] = tuple(v for v in value if v) if isinstance(value, list) else value
    values["decay_epochs"] = tuple(float(e) for e in values["decay_epochs"])
    if values["eval_epsilon"] is not None and values["eval_epsilon"] < 0:
        values["eval_epsilon"] = None
    return TrainConfig(**values)


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
    yield (
        "eval_epsilon",
        c.eval_epsilon is None or c.eval_epsilon >= 0,
        "must be >= 0 pixels, or unset for --epsilon",
    )
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
