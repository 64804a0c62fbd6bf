"""The one configuration object of a training run: `TrainConfig`, a frozen dataclass.

`tools/train.py` defines one absl flag per field, with the same name (`define_flags`), and builds a
`TrainConfig` at the top of `main()` (`from_flags`); nothing in sat_tf reads the global FLAGS.
Units are stated once, here: `epsilon` and `step_size` are in pixels of the [0, 255] input (4 means
4/255), learning rates are per 256 images. A run's settings are read back with
`TrainConfig.from_json(model_dir / "config.json")`; its data and evaluation attack are resolved by
`data_spec`, `resolved_eval_split` and `resolved_eval_epsilon`, for training and the evaluation.
Each field's help text (the flag's help) is its `metadata["help"]`; the allowed values of the
choice fields are in `sat_tf.options`.
"""

import dataclasses
import math
import typing

from sat_tf import options, rundir
from sat_tf.examples import Shard
from sat_tf.options import MIXED_PRECISION, OPTIMIZERS, SCHEDULES, SMOOTH_PHASES, STRATEGIES


def _field(default=dataclasses.MISSING, text=""):
    """A dataclass field whose `metadata["help"]` is its flag's help text."""
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every knob of `sat_tf.training.run`; each field is also a flag of `tools/train.py`."""

    # What a training run can hold, whatever the flags ask (`validate`); every recipe is far inside.
    MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; a 2048-wide head of 100,000 is 800 MB
    MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096  # one 4096x4096 RGB image is 200 MB of float32
    MAX_GLOBAL_BATCH_SIZE = 65_536  # the largest published ImageNet batch (64k)
    MAX_PIXELS = 255.0  # epsilons are pixels of the [0, 255] input: 255 is the whole range
    MAX_SEED = 2**32 - 1  # NumPy's seed range

    model_dir: str = _field(
        text="Directory for checkpoints, TensorBoard logs, config.json and model.keras."
    )
    # Model.
    model: str = _field("small_cnn", "Model name from sat_tf.models.names().")
    activation: str = _field(
        "silu", "Activation name from sat_tf.activations.names() (relu, silu, gelu, ...)."
    )
    num_classes: int = _field(10, "Number of classes.")
    image_size: int = _field(16, "Training and evaluation resolution in pixels.")
    init_from: str = _field(
        "", "A .keras classifier to fine-tune; its ReLUs are replaced by --activation."
    )
    # Data: demo | tfrecord:<pattern> | tfds:<name> | folder:<dir>.
    dataset: str = _field("demo", "demo | tfrecord:<pattern> | tfds:<name> | folder:<dir>.")
    train_files: str = _field(
        "", "TFRecord pattern for training (overrides the pattern in --dataset)."
    )
    eval_files: str = _field("", "TFRecord pattern for evaluation.")
    eval_split: str = _field(
        "", "Evaluation split; empty: test for demo and tfds:cifar*, else validation."
    )
    data_dir: str = _field("", "TFDS data_dir (and manual_dir for imagenet2012).")
    augmentation: str = _field("auto", "auto | inception | cifar | none.")
    # Schedule.
    global_batch_size: int = _field(64, "Batch size summed over all replicas.")
    epochs: int = _field(1, "Training epochs.")
    steps_per_epoch: int = _field(0, "Steps per epoch; 0 means one pass over the training set.")
    eval_examples: int = _field(0, "Evaluation examples; 0 means the whole evaluation set.")
    optimizer: str = _field("sgd", "sgd (Nesterov) | rmsprop.")
    base_learning_rate: float = _field(
        0.1, "Learning rate per 256 images (lr = base * global_batch_size / 256)."
    )
    lr_schedule: str = _field("step", "step | exponential | cosine (after linear warm-up).")
    warmup_epochs: float = _field(0.0, "Epochs of linear learning-rate warm-up.")
    decay_epochs: tuple = _field(
        (), "Epochs at which a step schedule multiplies the rate by --decay_rate."
    )
    decay_rate: float = _field(0.1, "Decay factor of the step and exponential schedules.")
    decay_every_epochs: float = _field(2.4, "Period of the exponential schedule, in epochs.")
    momentum: float = _field(0.9, "Momentum (SGD Nesterov, RMSProp).")
    ema_decay: float = _field(
        0.0, "Exponential moving average of the weights (0: off; EfficientNet uses 0.9999)."
    )
    weight_decay: float = _field(
        1e-4, "L2 weight decay on conv and dense kernels (coupled, as in the official code)."
    )
    label_smoothing: float = _field(0.1, "Label smoothing of the training loss.")
    # Training attack (pixels).
    epsilon: float = _field(
        4.0, "Training attack L-inf budget in pixels of [0, 255] (4 means 4/255)."
    )
    step_size: float = _field(4.0, "Training attack step in pixels.")
    num_steps: int = _field(
        1, "Training attack PGD steps (0 with --norandom_start trains on clean images)."
    )
    random_start: bool = _field(True, "Start the attack from a random point in the epsilon ball.")
    prob_start_from_clean: float = _field(
        0.2, "Per-example chance that the attack starts from the clean image."
    )
    # Evaluation attack (pixels); eval_epsilon None means "same as epsilon".
    eval_epsilon: float | None = _field(
        None, "Evaluation attack budget in pixels; unset or negative means --epsilon."
    )
    eval_step_size: float = _field(1.0, "Evaluation attack step in pixels.")
    eval_num_steps: int = _field(10, "Evaluation attack PGD steps.")
    smooth_gradients: tuple = _field(
        SMOOTH_PHASES, "Phases where SmoothGradReLU uses its smooth backward: attack,update."
    )
    # Machinery.
    strategy: str = _field("default", "default | mirrored | multi_worker | tpu.")
    tpu: str = _field("", "TPU name or address (with --strategy=tpu).")
    mixed_precision: str = _field("", "float16 | bfloat16 | empty for float32.")
    seed: int = _field(0, "Random seed.")
    deterministic: bool = _field(
        False,
        "Deterministic ops (tf.config.experimental.enable_op_determinism) and seeded everything: "
        "the same command gives bit-identical weights, at some speed cost.",
    )
    jit_compile: bool = _field(
        False,
        "Compile the train step, attack included, with XLA (for GPU/TPU; on a CPU oneDNN's "
        "convolutions are faster). Off: Keras's default (XLA only on one accelerator).",
    )
    checkpoint_every_steps: int = _field(
        200, "Checkpoint every N steps (and at each epoch end); 0: epochs only."
    )
    overwrite: bool = _field(False, "Allow replacing a finished run in --model_dir.")

    @classmethod
    def from_dict(cls, values):
        """A config from `dataclasses.asdict` output, e.g. a run's config.json.

        Lists become tuples (empty items dropped), unknown keys are ignored, missing ones take
        their defaults, and a negative `eval_epsilon` means "same as epsilon" (None), as the flag's
        help says; config.json files of sat_tf 0.1.0 also write it so.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        values = {
            key: tuple(v for v in value if v != "") if isinstance(value, list | tuple) else value
            for key, value in values.items()
            if key in names
        }
        if "decay_epochs" in values:
            try:
                values["decay_epochs"] = tuple(float(e) for e in values["decay_epochs"])
            except (TypeError, ValueError):
                shown = ",".join(map(str, values["decay_epochs"]))
                raise ValueError(
                    f"--decay_epochs={shown} is invalid: give epochs as numbers, e.g. 30,60,80"
                ) from None
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
        return self.eval_split or options.default_eval_split(self.dataset)

    @property
    def resolved_eval_epsilon(self):
        return options.eval_epsilon(self.epsilon, self.eval_epsilon)

    def validate(self):
        """Raises ValueError naming the first bad flag and how to fix it."""
        for name, ok, hint in _checks(self):
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"--{name}={_show(value)} is invalid: {hint}")
        return self


def define_flags(flag_values, cls=None):
    """Defines one absl flag per field of `cls` (`TrainConfig` or `EvalConfig`) in
    `flag_values`: same name, default, type and help (the field's metadata).

    `tools/train.py` and `tools/eval.py` pass `absl.flags.FLAGS`; the study passes a fresh
    `flags.FlagValues()`.
    """
    from absl import flags

    for field in dataclasses.fields(cls or TrainConfig):
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
            default = [str(v) for v in default]
        define(field.name, default, field.metadata["help"], flag_values=flag_values)


def from_flags(flag_values, cls=None):
    """The config (`TrainConfig` by default) of parsed flags, not yet validated: read by the
    class's `from_dict`."""
    cls = cls or TrainConfig
    return cls.from_dict({f.name: flag_values[f.name].value for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Every knob of `sat_tf.evalrun.run`; each field is also a flag of `tools/eval.py`.

    Settings left unset (empty, 0, None) come from the run's config.json (`TrainConfig`) when
    `model_dir` is given: its evaluation data, split, resolution, epsilon and PGD step.
    """

    model_dir: str = _field("", "A finished training run (model.keras + config.json).")
    model_path: str = _field("", "Or: a .keras classifier file.")
    # Data.
    dataset: str = _field("", "Data spec (demo | tfrecord:<p> | tfds:<n> | folder:<d>).")
    eval_files: str = _field("", "TFRecord pattern for evaluation (overrides --dataset).")
    eval_split: str = _field("", "Split; default: the run's evaluation split.")
    data_dir: str = _field("", "TFDS data_dir.")
    image_size: int = _field(0, "Resolution; default: the run's.")
    num_examples: int = _field(0, "Evaluate the first N examples; 0: all.")
    # Attacks (pixels).
    epsilons: tuple = _field((), "L-inf radii in pixels; default: the run's evaluation epsilon.")
    step_size: float | None = _field(
        None, "PGD step in pixels; default: the run's --eval_step_size, else 1 (official)."
    )
    num_steps: tuple = _field((10, 20, 50), "PGD steps K (official: 10,20,50,200).")
    restarts: int = _field(1, "PGD random restarts (worst case over restarts).")
    attacks: tuple = _field(
        (), "Extra attacks (sat_tf.jobs): apgd-ce, apgd-t, fab-t, square, autoattack[-fast]."
    )
    protocol: str = _field("sat", "Evaluation protocol: sat | robustbench.")
    surrogate: str = _field("", "A .keras model for the transfer-attack masking check.")
    # Machinery.
    output_dir: str = _field("", "Where reports go; default: <model_dir>/eval.")
    batch_size: int = _field(128, "Examples per attack call.")
    seed: int = _field(0, "Seed of every attack.")
    deterministic: bool = _field(
        False, "Deterministic ops and seeded everything: the same table every run."
    )
    jit_compile: bool = _field(
        False, "Compile the attacks with XLA (GPU/TPU; on a CPU oneDNN is faster)."
    )
    progress: bool = _field(
        True, "Progress bars (log lines when not a terminal) and the up-front estimate."
    )
    discard_state: bool = _field(
        False, "Start afresh, discarding an unfinished evaluation's state in --output_dir."
    )
    chunk_size: int = _field(
        0, "Examples read and attacked at a time (memory grows with it); 0: 8 batches."
    )
    # Sharded evaluations (sat_tf.shards, docs/evaluation.md).
    shard: str = _field(
        "", "Evaluate shard I/N (the examples whose index is I mod N) into <output>/shard-I-of-N."
    )
    merge: bool = _field(
        False, "Merge the finished shards (same flags, no --shard) into the one result and card."
    )
    shard_dirs: tuple = _field(
        (), "--merge/--status: the shards' folders; default: <output>/shard-*."
    )
    status: bool = _field(
        False, "Say which shards are done, running, stopped or missing, and the work left."
    )
    # --protocol=robustbench.
    autoattack_version: str = _field(
        "standard", "robustbench: AutoAttack budget, standard | fast (smoke runs, not reportable)."
    )
    leaderboard: str = _field(
        "", "robustbench: cifar10 | imagenet; default: from the model's classes (10 or 1000)."
    )
    robustbench_ids: str = _field(
        "",
        "robustbench, imagenet: RobustBench's imagenet_test_image_ids.txt (docs/robustbench.md).",
    )

    # Fields that only one protocol reads: set for the other one, they are an error.
    SAT_ONLY = (
        "epsilons",
        "step_size",
        "num_steps",
        "restarts",
        "attacks",
        "surrogate",
        "chunk_size",  # robustbench: 8 batches at a time of its fixed list
    )
    ROBUSTBENCH_ONLY = ("autoattack_version", "leaderboard", "robustbench_ids")

    @classmethod
    def from_dict(cls, values):
        """A config from flag values or a dict: lists become tuples (empty items dropped),
        epsilons floats and num_steps ints; ValueError naming the flag when they are not."""
        values = dict(values)
        for name, kind, what in (("epsilons", float, "numbers"), ("num_steps", int, "integers")):
            if name in values:
                items = [v for v in values[name] if str(v).strip() != ""]
                try:
                    values[name] = tuple(kind(v) for v in items)
                except ValueError:
                    shown = ",".join(map(str, items))
                    raise ValueError(f"--{name}={shown} is invalid: give {what}") from None
        for name, value in values.items():
            if isinstance(value, list):
                values[name] = tuple(v for v in value if v != "")
        return cls(**values)

    def defaulted(self, name):
        """Whether field `name` has its default value (was not set)."""
        field = next(f for f in dataclasses.fields(self) if f.name == name)
        return getattr(self, name) == field.default

    def validate(self):
        """Raises ValueError naming the first bad flag and how to fix it."""
        if bool(self.model_dir) == bool(self.model_path):
            raise ValueError("give exactly one of --model_dir or --model_path.")
        for name, ok, hint in _eval_checks(self):
            if not ok:
                raise ValueError(f"--{name}={_show(getattr(self, name))} is invalid: {hint}")
        other = self.SAT_ONLY if self.protocol == "robustbench" else self.ROBUSTBENCH_ONLY
        given = [f"--{name}" for name in other if not self.defaulted(name)]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be used with --protocol={self.protocol}.")
        modes = [f"--{name}" for name in ("shard", "merge", "status") if getattr(self, name)]
        if len(modes) > 1:
            raise ValueError(f"{' and '.join(modes)}: give one (a shard runs, then --merge).")
        if self.shard_dirs and not (self.merge or self.status):
            raise ValueError("--shard_dirs is read by --merge and --status only.")
        return self


def _finite(value, low, high=math.inf):
    """`low <= value <= high`, where NaN and the infinities fail."""
    return math.isfinite(value) and low <= value <= high


def _eval_checks(c):
    yield "protocol", c.protocol in ("sat", "robustbench"), "choose sat or robustbench"
    yield "num_examples", c.num_examples >= 0, "must be >= 0 (0: all)"
    yield "image_size", c.image_size >= 0, "must be >= 0 (0: the run's)"
    yield "epsilons", all(_finite(e, 0) for e in c.epsilons), "radii must be finite, >= 0"
    yield (
        "step_size",
        c.step_size is None or _finite(c.step_size, 0) and c.step_size > 0,
        ("must be finite, > 0"),
    )
    yield "num_steps", all(k >= 1 for k in c.num_steps), "steps must be >= 1"
    yield (
        "restarts",
        1 <= c.restarts <= options.MAX_RESTARTS,
        (f"must be in [1, {options.MAX_RESTARTS}]"),
    )
    yield "batch_size", c.batch_size >= 1, "must be >= 1"
    yield "chunk_size", c.chunk_size >= 0, "must be >= 0 (0: 8 batches)"
    yield "shard", _parses(Shard.parse, c.shard), "give I/N with 0 <= I < N (e.g. 0/4 .. 3/4)"


def _parses(parse, text):
    try:
        parse(text)
    except ValueError:
        return False
    return True


def _show(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def _checks(c):
    positive = "must be a finite number > 0"
    pixels = f"must be in [0, {c.MAX_PIXELS:g}]"
    yield "model_dir", bool(c.model_dir), "give a directory for checkpoints, logs and the model"
    yield (
        "num_classes",
        2 <= c.num_classes <= c.MAX_CLASSES,
        f"must be in [2, {c.MAX_CLASSES}] (the classifier's head grows with it)",
    )
    yield (
        "image_size",
        c.MIN_IMAGE_SIZE <= c.image_size <= c.MAX_IMAGE_SIZE,
        f"must be in [{c.MIN_IMAGE_SIZE}, {c.MAX_IMAGE_SIZE}] pixels (at least "
        f"{c.MIN_IMAGE_SIZE}; one {c.MAX_IMAGE_SIZE}-pixel image is 200 MB of float32)",
    )
    yield (
        "global_batch_size",
        1 <= c.global_batch_size <= c.MAX_GLOBAL_BATCH_SIZE,
        f"must be in [1, {c.MAX_GLOBAL_BATCH_SIZE}] (the largest published ImageNet batch)",
    )
    yield "epochs", c.epochs >= 1, "must be >= 1"
    yield "steps_per_epoch", c.steps_per_epoch >= 0, "must be >= 0 (0: one pass over the data)"
    yield "eval_examples", c.eval_examples >= 0, "must be >= 0 (0: all)"
    yield "optimizer", c.optimizer in OPTIMIZERS, f"choose one of {', '.join(OPTIMIZERS)}"
    yield (
        "base_learning_rate",
        _finite(c.base_learning_rate, 0) and c.base_learning_rate > 0,
        positive,
    )
    yield "lr_schedule", c.lr_schedule in SCHEDULES, f"choose one of {', '.join(SCHEDULES)}"
    yield "warmup_epochs", _finite(c.warmup_epochs, 0), "must be a finite number >= 0"
    yield (
        "decay_epochs",
        all(_finite(e, 0) for e in c.decay_epochs),
        "epochs must be finite numbers >= 0, e.g. 30,60,80",
    )
    yield "decay_rate", 0 < c.decay_rate <= 1, "must be in (0, 1]"
    yield (
        "decay_every_epochs",
        _finite(c.decay_every_epochs, 0) and c.decay_every_epochs > 0,
        positive,
    )
    yield "momentum", 0 <= c.momentum < 1, "must be in [0, 1)"
    yield "ema_decay", 0 <= c.ema_decay < 1, "must be in [0, 1) (0 turns it off)"
    yield "weight_decay", _finite(c.weight_decay, 0), "must be a finite number >= 0"
    yield "label_smoothing", 0 <= c.label_smoothing < 1, "must be in [0, 1)"
    yield (
        "epsilon",
        _finite(c.epsilon, 0, c.MAX_PIXELS),
        f"{pixels}: the L-inf budget in pixels of the [0, 255] input (e.g. 4 for 4/255)",
    )
    yield "step_size", _finite(c.step_size, 0) and c.step_size > 0, f"{positive} (pixels, e.g. 4)"
    yield "num_steps", c.num_steps >= 0, "must be >= 0 (0 with --norandom_start: clean training)"
    yield "prob_start_from_clean", 0 <= c.prob_start_from_clean <= 1, "must be in [0, 1]"
    yield (
        "eval_epsilon",
        c.eval_epsilon is None or _finite(c.eval_epsilon, 0, c.MAX_PIXELS),
        f"{pixels} pixels, or unset (or negative) for --epsilon",
    )
    yield (
        "eval_step_size",
        _finite(c.eval_step_size, 0) and c.eval_step_size > 0,
        f"{positive} (e.g. 1)",
    )
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
    yield "seed", 0 <= c.seed <= c.MAX_SEED, f"must be in [0, {c.MAX_SEED}]"
    yield "checkpoint_every_steps", c.checkpoint_every_steps >= 0, "must be >= 0"
