"""Robustness evaluation of a trained classifier: clean, PGD-K over epsilons, optional AutoAttack.

    python tools/eval.py --model_dir=runs/demo/silu                  # the run's data and epsilon
    python tools/eval.py --model_path=m.keras --dataset=tfrecord:/data/validation-* \
        --image_size=224 --epsilons=4 --num_steps=10,20,50,200 --step_size=1
    python tools/eval.py --model_dir=runs/cifar10/wrn --protocol=robustbench --dataset=tfds:cifar10
    python tools/eval.py --model_dir=runs/imagenet/r50 --protocol=robustbench \
        --robustbench_ids=imagenet_test_image_ids.txt --dataset=tfrecord:/data/imagenet

The default protocol is the official SAT one: untargeted L-inf PGD, random start, K in
--num_steps, at each epsilon in pixels, with the run's evaluation step (--eval_step_size of its
config.json; 1 pixel for the paper's ImageNet rows, and 1 for a bare .keras file). Writes
results.json, results.md, summary.json and plots to --output_dir, and appends the evaluation to the
run's robustness card.

--protocol=robustbench (sat_tf.robustbench, docs/robustbench.md) fixes the attack (AutoAttack,
--autoattack_version), the epsilon (cifar10 8/255 = 8 pixels, imagenet 4/255 = 4 pixels) and the
examples (CIFAR-10: the first 10,000 test images; ImageNet: the 5,000 validation images named in
--robustbench_ids, from a tfrecord: or folder: copy of the validation set); --num_examples=N takes
the first N. Writes robustbench_<dataset>_Linf.json (a RobustBench model_info entry) to
--output_dir and appends the evaluation to the card.

Long runs: a first line gives the work ahead (examples, attacks, worst-case gradients and forward
passes) and a time estimate from one timed batch; then each attack pass shows the examples done,
the accuracy so far and an ETA (a Keras progress bar on a terminal, a line every ~5%
otherwise; --noprogress prints the results only). Every finished batch is recorded in --output_dir
(eval_state.npz; robustbench_<dataset>_Linf_state.npz): after a kill, the same command continues
from the first unfinished batch and ends with the numbers of an uninterrupted run. A changed
model, data, attack, seed or batch size refuses, naming what changed (--restart starts afresh).
The record is removed once the reports are written.
"""

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sat_tf.autoattack import VERSIONS  # noqa: E402
from sat_tf.config import TrainConfig, default_eval_split  # noqa: E402
from sat_tf.robustbench import PROTOCOLS  # noqa: E402

flags.DEFINE_string("model_dir", None, "A finished training run (model.keras + config.json).")
flags.DEFINE_string("model_path", None, "Or: a .keras classifier file.")
flags.DEFINE_string("dataset", "", "Data spec (demo | tfrecord:<p> | tfds:<n> | folder:<d>).")
flags.DEFINE_string("eval_files", "", "TFRecord pattern for evaluation (overrides --dataset).")
flags.DEFINE_string("eval_split", "", "Split; default: the run's evaluation split.")
flags.DEFINE_string("data_dir", "", "TFDS data_dir.")
flags.DEFINE_integer("image_size", 0, "Resolution; default: the run's.")
flags.DEFINE_integer("num_examples", 0, "Evaluate the first N examples; 0: all.")
flags.DEFINE_list("epsilons", [], "L-inf radii in pixels; default: the run's evaluation epsilon.")
flags.DEFINE_float(
    "step_size", None, "PGD step in pixels; default: the run's --eval_step_size, else 1 (official)."
)
flags.DEFINE_list("num_steps", ["10", "20", "50"], "PGD steps K (official: 10,20,50,200).")
flags.DEFINE_integer("restarts", 1, "PGD random restarts (worst case over restarts).")
flags.DEFINE_list("attacks", [], "Extra attacks: apgd-ce, apgd-t, square, autoattack[-fast].")
flags.DEFINE_enum("protocol", "sat", ["sat", "robustbench"], "Evaluation protocol.")
flags.DEFINE_string("surrogate", "", "A .keras model for the transfer-attack masking check.")
flags.DEFINE_string("output_dir", "", "Where reports go; default: <model_dir>/eval.")
flags.DEFINE_integer("batch_size", 128, "Examples per attack call.")
flags.DEFINE_integer("seed", 0, "Seed of every attack.")
flags.DEFINE_bool(
    "deterministic", False, "Deterministic ops and seeded everything: the same table every run."
)
flags.DEFINE_bool(
    "jit_compile", False, "Compile the attacks with XLA (GPU/TPU; on a CPU oneDNN is faster)."
)
flags.DEFINE_bool(
    "progress", True, "Progress bars (log lines when not a terminal) and the up-front estimate."
)
flags.DEFINE_bool(
    "restart", False, "Start afresh, discarding an unfinished evaluation's state in --output_dir."
)
flags.DEFINE_enum(
    "autoattack_version",
    "standard",
    list(VERSIONS),
    "robustbench: AutoAttack budget (fast: smoke runs, not a reportable number).",
)
flags.DEFINE_enum(
    "robustbench_dataset",
    None,
    list(PROTOCOLS),
    "robustbench: the leaderboard; default: from the run's classes (10: cifar10, 1000: imagenet).",
)
flags.DEFINE_string(
    "robustbench_ids",
    "",
    "robustbench, imagenet: RobustBench's imagenet_test_image_ids.txt (see docs/robustbench.md).",
)
# The record of an unfinished --protocol=sat evaluation in --output_dir (sat_tf.evalstate);
# --protocol=robustbench keeps robustbench_<dataset>_Linf_state.npz beside its entry.
STATE_NAME = "eval_state.npz"
# Flags that only one protocol reads: giving one to the other protocol is an error, not a no-op.
SAT_ONLY = ("epsilons", "step_size", "num_steps", "restarts", "attacks", "surrogate", "jit_compile")
ROBUSTBENCH_ONLY = ("autoattack_version", "robustbench_dataset", "robustbench_ids")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The flags of one evaluation, one field per flag (same name), plus those given explicitly."""

    model_dir: str | None
    model_path: str | None
    dataset: str
    eval_files: str
    eval_split: str
    data_dir: str
    image_size: int
    num_examples: int
    epsilons: tuple
    step_size: float | None
    num_steps: tuple
    restarts: int
    attacks: tuple
    protocol: str
    surrogate: str
    output_dir: str
    batch_size: int
    seed: int
    deterministic: bool
    jit_compile: bool
    progress: bool
    restart: bool
    autoattack_version: str
    robustbench_dataset: str | None
    robustbench_ids: str
    given: frozenset = frozenset()  # the flags present on the command line

    @classmethod
    def from_flags(cls, flag_values):
        names = [f.name for f in dataclasses.fields(cls) if f.name != "given"]
        values = {name: flag_values[name].value for name in names}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values, given=frozenset(n for n in names if flag_values[n].present))


@dataclasses.dataclass(frozen=True)
class Target:
    """What is evaluated, resolved from the flags and the run's config.json (`TrainConfig`)."""

    path: Path  # the .keras file
    run: TrainConfig | None  # the run's settings; None for a bare .keras file
    output: Path

    def data_spec(self, config):
        """--eval_files, else --dataset, else the run's evaluation data (its --eval_files too)."""
        if config.eval_files:
            return f"tfrecord:{config.eval_files}"
        spec = config.dataset or (self.run.data_spec(training=False) if self.run else "")
        if not spec:
            _fail("--dataset (or --eval_files) is needed with a model that has no config.json.")
        return spec

    def split(self, config, default):
        return config.eval_split or (self.run.eval_split if self.run else "") or default

    def data_dir(self, config):
        return config.data_dir or (self.run.data_dir if self.run else "") or None

    def value(self, name, default=None):
        """A field of the run's config, or `default` without one."""
        return getattr(self.run, name) if self.run else default


def _fail(message):
    sys.exit(f"error: {message}")


def _verbose(config):
    """Keras-style verbosity: 1 progress and the estimate, 2 (--noprogress) the results only."""
    return 1 if config.progress else 2


def _resolve(config):
    """The `Target` of the flags; checks them first."""
    if bool(config.model_dir) == bool(config.model_path):
        _fail("give exactly one of --model_dir or --model_path.")
    model_dir = Path(config.model_dir) if config.model_dir else None
    path = model_dir / "model.keras" if model_dir else Path(config.model_path)
    if not path.is_file():
        _fail(f"{path} not found; train first (tools/train.py) or fix --model_dir/--model_path.")
    from sat_tf import rundir

    try:
        saved = rundir.read_config(path.parent)  # one clear line when not a JSON object
    except rundir.RunDirError as error:
        _fail(str(error))
    run = TrainConfig.from_dict(saved) if saved else None
    output = Path(config.output_dir) if config.output_dir else path.parent / "eval"
    if config.step_size is not None and config.step_size <= 0:
        _fail(f"--step_size={config.step_size} must be > 0 (pixels).")
    if config.restarts < 1:
        _fail(f"--restarts={config.restarts} must be >= 1.")
    other = SAT_ONLY if config.protocol == "robustbench" else ROBUSTBENCH_ONLY
    given = [f"--{name}" for name in other if name in config.given]
    if given:
        _fail(f"{', '.join(given)} cannot be used with --protocol={config.protocol}.")
    try:  # before any attack runs: an evaluation must be able to save what it finds
        rundir.check_writable(output, "the reports (--output_dir)")
        rundir.check_writable(path.parent, f"the robustness card ({path.parent.name or '.'})")
    except rundir.RunWriteError as error:
        _fail(str(error))
    return Target(path, run, output)


def _epsilons(config, target):
    try:
        values = [float(e) for e in config.epsilons]
    except ValueError:
        _fail(f"--epsilons={','.join(config.epsilons)} must be numbers (pixels).")
    if not values:
        values = [target.run.resolved_eval_epsilon if target.run else 4.0]
    if any(e < 0 for e in values):
        _fail("--epsilons must be >= 0.")
    return values


def _data(config, target, num_classes):
    from sat_tf import data

    spec = target.data_spec(config)
    image_size = config.image_size or target.value("image_size")
    if not image_size:
        _fail("--image_size is needed with a model that has no config.json.")
    try:
        return spec, data.load(
            spec,
            split=target.split(config, default_eval_split(spec)),
            global_batch_size=config.batch_size,
            image_size=image_size,
            data_dir=target.data_dir(config),
            num_classes=num_classes,  # labels outside the model's outputs are errors
        ).dataset
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))


def _robustbench_imagenet(config, target, spec, n, image_size):
    """RobustBench's ImageNet subset (the first n of --robustbench_ids) from tfrecord:/folder:."""
    from sat_tf.data import robustbench_data

    if not config.robustbench_ids:
        _fail(
            f"--robustbench_ids=<file> is needed for imagenet; download {robustbench_data.IDS_URL}"
        )
    ids, sha256 = robustbench_data.read_image_ids(config.robustbench_ids)
    split = target.split(config, "validation")
    known = "" if sha256 == robustbench_data.IDS_SHA256 else ", not RobustBench's published list"
    source = f"{spec} split {split}: the first {min(n, len(ids))} of RobustBench's ids"
    source += f" (sha256 {sha256[:12]}{known})"
    scheme, _, location = spec.partition(":")
    if scheme == "folder":
        images, labels = robustbench_data.imagenet_from_folder(
            location, ids[:n], split=split, image_size=image_size
        )
    elif scheme == "tfrecord":
        pattern = location.replace("{split}", split)
        pattern = os.path.join(pattern, f"{split}-*") if os.path.isdir(pattern) else pattern
        images, labels = robustbench_data.imagenet_from_tfrecord(
            pattern, ids[:n], image_size=image_size
        )
    else:
        _fail(f"imagenet needs tfrecord:<pattern> or folder:<dir> data. Received: {spec}")
    return images, labels, source


def _robustbench_data(config, target, protocol, num_classes):
    """`(images, labels, source)`: the protocol's first --num_examples examples, in its order."""
    from sat_tf import data, evaluation
    from sat_tf.data import robustbench_data

    spec = target.data_spec(config)
    n = config.num_examples or protocol.num_examples
    image_size = config.image_size or target.value("image_size") or protocol.image_size
    if protocol.dataset == "imagenet":
        return _robustbench_imagenet(config, target, spec, n, image_size)
    if spec == "tfds:cifar10":
        images, labels = robustbench_data.cifar10_from_tfds(
            num_examples=n, data_dir=target.data_dir(config)
        )
        return images, labels, "tfds:cifar10 test, original order (TFDS id)"
    split = target.split(config, "test")
    loaded = data.load(
        spec,
        split=split,
        global_batch_size=config.batch_size,
        image_size=image_size,
        data_dir=target.data_dir(config),
        num_classes=num_classes,
        training=False,
    )
    images, labels = evaluation.collect(loaded.dataset.take(-(-n // config.batch_size)), n)
    return images, labels, f"{spec} split {split}: the first {len(labels)} in the pipeline's order"


def _robustbench(config, target, model, command):
    from sat_tf import atomic, card, robustbench

    run = target.run
    by_classes = {p.num_classes: name for name, p in robustbench.PROTOCOLS.items()}
    num_classes = (run.num_classes if run else None) or model.output_shape[-1]
    name = config.robustbench_dataset or by_classes.get(num_classes)
    if name is None:
        _fail(
            "--robustbench_dataset=cifar10|imagenet is needed: the model has neither 10 nor "
            "1000 classes."
        )
    protocol = robustbench.PROTOCOLS[name]
    if config.num_examples > protocol.num_examples:
        _fail(f"--num_examples={config.num_examples}: {name} has {protocol.num_examples}.")
    state = target.output / f"robustbench_{name}_Linf_state.npz"
    try:
        images, labels, source = _robustbench_data(
            config, target, protocol, int(model.output_shape[-1])
        )
        architecture = f"{run.model} ({run.activation})" if run else model.name
        result = robustbench.benchmark(
            model,
            images,
            labels,
            dataset=name,
            num_examples=min(config.num_examples or protocol.num_examples, len(labels)),
            version=config.autoattack_version,
            batch_size=config.batch_size,
            seed=config.seed,
            model_info={"architecture": architecture},
            source=source,
            verbose=_verbose(config),
            state=state,
            restart=config.restart,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        _fail(str(error))
    target.output.mkdir(parents=True, exist_ok=True)
    entry_path = target.output / f"robustbench_{name}_Linf.json"
    atomic.write_json(entry_path, result.model_info_entry())
    result.per_example.save(target.output / f"robustbench_{name}_Linf_per_example.npz")
    try:
        card.add_evaluation(target.path.parent, result.card_entry(command), saved=entry_path)
    except card.CardWriteError as error:
        _fail(str(error))
    state.unlink(missing_ok=True)  # finished: the same command evaluates afresh
    print(
        f"RobustBench {name} Linf {protocol.epsilon} ({protocol.epsilon_pixels:g} pixels), "
        f"AutoAttack {result.version}, {result.num_examples} examples: clean "
        f"{100 * result.clean_accuracy:.2f}%, AutoAttack {100 * result.robust_accuracy:.2f}%"
    )
    for deviation in result.deviations:
        print(f"  differs from RobustBench: {deviation}")
    print(f"Entry: {entry_path}; card: {target.path.parent / card.CARD_NAME}")


def _sat(config, target, model, surrogate, command):
    import tensorflow as tf

    from sat_tf import atomic, card, evalstate, evaluation, preflight

    epsilons = _epsilons(config, target)
    step_size = config.step_size
    if step_size is None:
        step_size = target.value("eval_step_size", 1.0)
    spec, dataset = _data(config, target, int(model.output_shape[-1]))
    restarts = f"x{config.restarts}" if config.restarts > 1 else ""
    attacks = ["clean", *(f"pgd-{k}{restarts}" for k in config.num_steps), *config.attacks]
    try:
        results = evaluation.evaluate(
            model,
            dataset,
            attacks=attacks,
            epsilons=epsilons,
            num_examples=config.num_examples or None,
            batch_size=config.batch_size,
            seed=config.seed,
            surrogate=surrogate,
            pgd_step_size=step_size,
            jit_compile=config.jit_compile,
            verbose=_verbose(config),
            state=target.output / STATE_NAME,
            restart=config.restart,
        )
    except evalstate.StateMismatchError as error:
        _fail(str(error))
    except tf.errors.InvalidArgumentError as error:  # a bad record, named by sat_tf.data
        problem = preflight.data_problem(error)
        if problem is None:
            raise
        _fail(f"{spec}: {problem}. Fix or remove that file (tools/build_tfrecords.py).")
    output = target.output
    output.mkdir(parents=True, exist_ok=True)
    results.save(output)
    primary = epsilons[0]
    summary = {"clean": results.clean_accuracy, "epsilon": primary}
    summary |= {a: results.accuracy(a, primary) for a in attacks if a != "clean"}
    atomic.write_json(output / "summary.json", summary)
    entry = card.evaluation_entry(
        results, protocol="sat", command=command, dataset=spec, step_size=step_size
    )
    print((output / "results.md").read_text())
    try:
        card.add_evaluation(target.path.parent, entry, saved=output)
    except card.CardWriteError as error:
        _fail(str(error))
    (output / STATE_NAME).unlink(missing_ok=True)  # finished: the same command evaluates afresh
    print(f"Reports in {output}; card: {target.path.parent / card.CARD_NAME}")


def main(argv):
    del argv
    config = EvalConfig.from_flags(flags.FLAGS)
    logging.set_verbosity(logging.WARNING)
    target = _resolve(config)
    from sat_tf import rundir

    run_dir = target.path.parent
    try:  # evaluating a run writes into it: one process at a time (sat_tf.rundir)
        with rundir.locked(run_dir, "evaluation") if config.model_dir else contextlib.nullcontext():
            if config.model_dir and rundir.listed(run_dir) and target.output.parent == run_dir:
                rundir.record(run_dir, target.output.name)
            _evaluate(config, target)
    except (rundir.RunDirError, rundir.RunWriteError) as error:
        _fail(str(error))
    except KeyboardInterrupt:
        _fail(
            f"interrupted; every finished batch is saved in {target.output}: run the same "
            "command again to resume (--restart starts afresh)."
        )


def _evaluate(config, target):
    from sat_tf import saving, training

    training.seed_everything(config.seed, deterministic=config.deterministic)

    try:  # checks the archive first, always safe_mode=True
        model = saving.load_model(target.path)
        surrogate = saving.load_model(config.surrogate) if config.surrogate else None
    except saving.ModelFileError as error:
        _fail(str(error))
    command = " ".join(sys.argv)
    if config.protocol == "robustbench":
        _robustbench(config, target, model, command)
    else:
        _sat(config, target, model, surrogate, command)


if __name__ == "__main__":
    app.run(main)
