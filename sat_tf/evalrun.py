"""One evaluation from an `EvalConfig`: the model, its data, the attacks, the reports and card.

`tools/eval.py` is the command-line face of `run`, as tools/train.py is of `sat_tf.training.run`.
What is evaluated is a run folder (`model_dir`: its model.keras, and from its config.json the
evaluation data, split, resolution, epsilon and PGD step) or a bare .keras file (`model_path`).

Protocol "sat" (the official SAT evaluation): clean, then untargeted L-inf PGD with random start
for each K of `num_steps`, plus `attacks`, at each epsilon in pixels. It writes results.json,
results.md, per_example.npz, plots and summary.json to the output folder (default
`<model_dir>/eval`). Protocol "robustbench" (`sat_tf.robustbench`): standard AutoAttack at the
leaderboard's epsilon on its examples; it writes robustbench_<leaderboard>_Linf.json (a
RobustBench model_info entry) and its per-example record. Both append an entry to the
robustness card beside the model.

While it runs, every finished batch is recorded in the output folder (eval_state.npz, or
robustbench_<leaderboard>_Linf_state.npz): the same call after a kill resumes there; the record
is removed once the reports are written.
"""

import contextlib
import dataclasses
from pathlib import Path

from sat_tf import atomic, card, evalstate, options, rundir, saving, shards
from sat_tf.config import EvalConfig, TrainConfig
from sat_tf.examples import Shard

STATE = "eval_state.npz"  # protocol "sat"; robustbench: robustbench_<leaderboard>_Linf_state.npz
SUMMARY = "summary.json"
# What an evaluation writes into its output folder (protocol "sat": `reporting.EvaluationResults
# .save` and this module; a bare model's card too), listed in the folder's manifest when the
# folder is not the run's own eval/.
OUTPUT_FILES = (
    "results.json",
    "results.md",
    "accuracy_vs_epsilon.png",
    "accuracy_vs_steps.png",
    "per_example.npz",
    SUMMARY,
    STATE,
    rundir.CARD,
)


# The entries of a run folder an evaluation's reports must not go into.
_RUN_ENTRIES = (*rundir.TRAINING_FILES, rundir.EXPORT, rundir.MANIFEST, rundir.LOCK)


def _robustbench_files():
    """The names the RobustBench protocol writes, for every leaderboard."""
    from sat_tf.robustbench import PROTOCOLS

    names = [f"robustbench_{name}_Linf" for name in PROTOCOLS]
    return [f"{n}{end}" for n in names for end in (".json", "_per_example.npz", "_state.npz")]


class EvalError(Exception):
    """A bad input or a failed write of an evaluation, as one line naming the flag or file."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What is evaluated: the .keras file, its run folder and settings (None for a bare file),
    and where the reports go."""

    path: Path
    run_dir: Path | None
    run: TrainConfig | None
    output: Path

    @property
    def card_dir(self):
        """The folder of the robustness card: the run folder; for a bare file, the output
        folder (nothing is written beside a file that is not in a run of ours)."""
        return self.run_dir or self.output

    @property
    def output_is_separate(self):
        """The output folder is not inside the run folder (or there is none, for a bare file):
        it is checked, listed and locked as a folder of ours (`sat_tf.rundir`) on its own."""
        return self.run_dir is None or self.output.parent != self.run_dir

    def data_spec(self, config):
        """--eval_files, else --dataset, else the run's evaluation data (its --eval_files too)."""
        if config.eval_files:
            return f"tfrecord:{config.eval_files}"
        spec = config.dataset or (self.run.data_spec(training=False) if self.run else "")
        if not spec:
            raise EvalError(
                "--dataset (or --eval_files) is needed with a model that has no config.json."
            )
        return spec

    def split(self, config, default):
        return config.eval_split or (self.run.eval_split if self.run else "") or default

    def data_dir(self, config):
        return config.data_dir or (self.run.data_dir if self.run else "") or None

    def image_size(self, config, default=None):
        size = config.image_size or (self.run.image_size if self.run else 0) or default
        if not size:
            raise EvalError("--image_size is needed with a model that has no config.json.")
        return size


def run(config: EvalConfig, *, command=""):
    """Evaluates what `config` names and writes the reports; returns the summary.

    Every input is checked before any attack runs: the flags, the model file, the run's
    config.json and card, and that the reports and the card can be written. A run folder is
    locked while it is evaluated, and so is an output folder outside it, which must be new,
    empty or one of ours (`sat_tf.rundir`); a bare .keras file (`model_path`) is evaluated into
    `output_dir` only, its card there too.

    Returns:
        Protocol "sat": the summary written to summary.json (clean accuracy, the epsilon, each
        attack's accuracy at it). Protocol "robustbench": the RobustBench entry.

    Raises:
        EvalError: one line naming the bad flag or file, or what is saved after a failure or
            an interruption (Ctrl-C) and how to resume.
    """
    try:
        config.validate()
    except ValueError as error:
        raise EvalError(str(error)) from None
    target = _resolve(config)
    if config.status:
        return _status(config, target)
    # A shard writes into its own folder only and only reads the run folder, so N shards of
    # one run go side by side; its folder is checked, listed and locked as an output folder.
    run_dir = None if config.shard else target.run_dir
    if config.shard:
        target = dataclasses.replace(target, output=target.output / Shard.parse(config.shard).name)
    try:  # evaluating writes into the run and the output folder: one process at a time each
        with contextlib.ExitStack() as held:
            if run_dir:
                held.enter_context(rundir.locked(run_dir, "evaluation"))
                if rundir.listed(run_dir) and not target.output_is_separate:
                    rundir.record(run_dir, target.output.name)
            if config.shard:  # _resolve checked the output folder above it
                rundir.check_ours(target.output, "the shard folder")
            if target.output_is_separate:  # checked by _resolve before the lock was made
                held.enter_context(rundir.locked(target.output, "evaluation"))
                rundir.check_ours(target.output, "--output_dir")  # again, under the lock
                rundir.record(target.output, *OUTPUT_FILES, *_robustbench_files())
            return _evaluate(config, target, command)
    except (
        rundir.RunDirError,
        rundir.RunWriteError,
        evalstate.StateMismatchError,
        shards.ShardError,
    ) as error:
        raise EvalError(str(error)) from None
    except KeyboardInterrupt:
        raise EvalError(
            f"interrupted; every finished batch is saved in {target.output}: run the same "
            "command again to resume (--discard_state starts afresh)."
        ) from None


def _shard_folders(config, target):
    if config.shard_dirs:
        return [Path(d) for d in config.shard_dirs]
    return shards.folders(target.output)


def _merge(config, target, state):
    """Joins the finished shards' states into the output's `state`, which the evaluation then
    finds done: it reads the examples to check them and writes the whole run's reports."""
    if state.exists() and not config.discard_state:
        saved, arrays = evalstate.load(state)
        if not arrays["cursor"][1]:
            raise EvalError(
                f"{state} holds an unfinished evaluation (not of the shards); finish it, or "
                "merge with --discard_state to replace it."
            )
    merged = shards.merge(_shard_folders(config, target), state)
    count = len(merged.fingerprint.get("passes", []))
    print(f"Merged {merged.num_examples} examples, {count} attacks, into {state}.", flush=True)


def _status(config, target):
    """Prints where each shard stands (`sat_tf.shards.status`); returns the rows."""
    rows = shards.status(_shard_folders(config, target))
    if not rows:
        print(f"No shard folders (shard-I-of-N) in {target.output}.")
    for row in rows:
        print(row.line())
    done = sum(row.state == "done" for row in rows)
    if rows:
        print(
            f"{done} of {len(rows)} shards done"
            + (": merge with --merge." if done == len(rows) else ".")
        )
    return rows


def _resolve(config):
    """The `Target` of the config; checks that its files exist and its folders are writable."""
    model_dir = Path(config.model_dir) if config.model_dir else None
    path = model_dir / rundir.FINAL_MODEL if model_dir else Path(config.model_path)
    if not path.is_file():
        raise EvalError(
            f"{path} not found; train first (tools/train.py) or fix --model_dir/--model_path."
        )
    if not (model_dir or config.output_dir):
        raise EvalError(
            f"--output_dir is needed with --model_path: a bare model file's reports and card go "
            f"there, never beside {path.name} (or give its run folder as --model_dir)."
        )
    run_config = None
    if model_dir:
        try:
            saved = rundir.read_config(model_dir)  # one clear line when not a JSON object
            run_config = TrainConfig.from_dict(saved) if saved else None
        except (rundir.RunDirError, TypeError) as error:
            raise EvalError(f"{model_dir / rundir.CONFIG}: {error}") from None
    output = Path(config.output_dir) if config.output_dir else model_dir / rundir.EVAL
    if model_dir and (
        output.resolve() == model_dir.resolve()
        or (output.parent.resolve() == model_dir.resolve() and output.name in _RUN_ENTRIES)
    ):
        raise EvalError(
            f"--output_dir={output} is the run folder or one of its own entries: the reports "
            f"would overwrite or mix with the run's files. Use {model_dir / rundir.EVAL} "
            "(the default) or another folder."
        )
    target = Target(path, model_dir, run_config, output)
    card_dir = target.card_dir
    if target.output_is_separate:  # before anything is written there, even a probe
        try:
            rundir.check_ours(output, "--output_dir")
        except rundir.RunDirError as error:
            raise EvalError(str(error)) from None
    try:  # read before any attack runs: a damaged card would fail only after all of them
        card.read(card_dir)
    except card.CardError as error:
        raise EvalError(str(error)) from None
    try:  # before any attack runs: an evaluation must be able to save what it finds
        rundir.check_writable(output, "the reports (--output_dir)")
        rundir.check_writable(card_dir, f"the robustness card ({card_dir.name or '.'})")
    except rundir.RunWriteError as error:
        raise EvalError(str(error)) from None
    return target


def _evaluate(config, target, command):
    _data()  # every --dataset is a tf.data pipeline: one line when TensorFlow is missing
    from sat_tf import training

    training.seed_everything(config.seed, deterministic=config.deterministic)
    try:  # checks the archive first, always safe_mode=True
        model = saving.load_model(target.path)
        surrogate = saving.load_model(config.surrogate) if config.surrogate else None
    except saving.ModelFileError as error:
        raise EvalError(str(error)) from None
    if config.protocol == "robustbench":
        name = _leaderboard(config, target, model)
        if config.merge:
            _merge(config, target, target.output / _robustbench_state(name))
        return _robustbench(config, target, model, name, command)
    if config.merge:
        _merge(config, target, target.output / STATE)
    return _sat(config, target, model, surrogate, command)


def _verbose(config):
    """Keras-style verbosity: 1 progress and the estimate, 2 (--noprogress) the results only."""
    return 1 if config.progress else 2


def _add_to_card(target, entry, saved):
    try:
        card.add_evaluation(target.card_dir, entry, saved=saved)
    except card.CardWriteError as error:
        raise EvalError(str(error)) from None


def _sat(config, target, model, surrogate, command):
    from sat_tf import evaluation, jobs, preflight

    restarts = f"x{config.restarts}" if config.restarts > 1 else ""
    attacks = ["clean", *(f"pgd-{k}{restarts}" for k in config.num_steps), *config.attacks]
    try:  # names checked before any data is read
        labels = [jobs.parse_attack(attack).label for attack in attacks]
    except ValueError as error:
        raise EvalError(f"--attacks={','.join(config.attacks)}: {error}") from None
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise EvalError(
            f"--attacks={','.join(config.attacks)} with --num_steps="
            f"{','.join(map(str, config.num_steps))} runs {', '.join(repeated)} twice; "
            "list each attack once."
        )
    epsilons = list(config.epsilons)
    if not epsilons:  # the run's evaluation epsilon; the paper's 4 for a bare file
        epsilons = [target.run.resolved_eval_epsilon if target.run else 4.0]
    step_size = config.step_size
    if step_size is None:  # the run's evaluation step; the official 1 pixel for a bare file
        step_size = target.run.eval_step_size if target.run else 1.0
    spec = target.data_spec(config)
    image_size = _image_size(config, target, model)
    data = _data()
    try:
        loaded = data.load(
            spec,
            split=target.split(config, options.default_eval_split(spec)),
            global_batch_size=config.batch_size,
            image_size=image_size,
            data_dir=target.data_dir(config),
            num_classes=int(model.output_shape[-1]),  # labels outside the outputs are errors
            training=False,  # also for a "train" split: no shuffling, augmentation or repeat
        )
        dataset = loaded.dataset
    except (ValueError, FileNotFoundError) as error:
        raise EvalError(str(error)) from None
    output = target.output
    counts = [n for n in (config.num_examples, loaded.num_examples) if n]
    try:
        results = evaluation.evaluate(
            model,
            dataset,
            attacks=attacks,
            epsilons=epsilons,
            num_examples=min(counts) if counts else None,
            batch_size=config.batch_size,
            chunk_size=config.chunk_size or None,
            shard=config.shard or None,
            seed=config.seed,
            surrogate=surrogate,
            pgd_step_size=step_size,
            jit_compile=config.jit_compile,
            verbose=_verbose(config),
            state=output / STATE,
            discard_state=config.discard_state,
            settings={"deterministic": config.deterministic},
        )
    except preflight.bad_record_errors() as error:  # a bad record, named by sat_tf.data
        problem = preflight.data_problem(error)
        if problem is None:
            raise
        raise EvalError(
            f"{spec}: {problem}. Fix or remove that file (tools/build_tfrecords.py)."
        ) from None
    output.mkdir(parents=True, exist_ok=True)
    results.save(output)
    primary = epsilons[0]
    summary = {"clean": results.clean_accuracy, "epsilon": primary}
    summary |= {a: results.accuracy(a, primary) for a in attacks if a != "clean"}
    atomic.write_json(output / SUMMARY, summary)
    entry = card.evaluation_entry(
        results, protocol="sat", command=command, dataset=spec, step_size=step_size
    )
    print(results.to_markdown())
    if config.shard:  # the state stays for the merge; the card gets the whole run's entry
        print(f"Shard {config.shard} done: {output}; merge all shards with --merge.")
        return summary
    _add_to_card(target, entry, output)
    (output / STATE).unlink(missing_ok=True)  # finished: the same command evaluates afresh
    print(f"Reports in {output}; card: {target.card_dir / rundir.CARD}")
    return summary


def _robustbench_state(name):
    return f"robustbench_{name}_Linf_state.npz"


def _leaderboard(config, target, model):
    """The RobustBench leaderboard: --leaderboard, else from the number of classes."""
    from sat_tf import jobs, robustbench

    if config.autoattack_version not in jobs.VERSIONS:
        raise EvalError(
            f"--autoattack_version={config.autoattack_version} is invalid: choose one of "
            f"{', '.join(jobs.VERSIONS)}."
        )
    run_config = target.run
    num_classes = int(model.output_shape[-1])
    by_classes = {p.num_classes: name for name, p in robustbench.PROTOCOLS.items()}
    name = config.leaderboard or by_classes.get(
        (run_config.num_classes if run_config else None) or num_classes
    )
    if name not in robustbench.PROTOCOLS:
        raise EvalError(
            "--leaderboard=cifar10|imagenet is needed: the model has neither 10 nor 1000 classes."
            if name is None
            else f"--leaderboard={name} is invalid: choose cifar10 or imagenet."
        )
    return name


def _robustbench(config, target, model, name, command):
    from sat_tf import robustbench

    run_config = target.run
    protocol = robustbench.PROTOCOLS[name]
    if config.num_examples > protocol.num_examples:
        raise EvalError(
            f"--num_examples={config.num_examples}: {name} has {protocol.num_examples}."
        )
    state = target.output / _robustbench_state(name)
    try:
        images, labels, source = _robustbench_data(config, target, protocol, model)
        architecture = f"{run_config.model} ({run_config.activation})" if run_config else model.name
        result = robustbench.benchmark(
            model,
            images,
            labels,
            leaderboard=name,
            num_examples=min(config.num_examples or protocol.num_examples, len(labels)),
            version=config.autoattack_version,
            batch_size=config.batch_size,
            seed=config.seed,
            model_info={"architecture": architecture},
            source=source,
            verbose=_verbose(config),
            state=state,
            discard_state=config.discard_state,
            settings={"deterministic": config.deterministic},
            shard=config.shard or None,
        )
    except evalstate.StateMismatchError:
        raise
    except (ValueError, OSError, RuntimeError) as error:
        raise EvalError(str(error)) from None
    target.output.mkdir(parents=True, exist_ok=True)
    if config.shard:  # the state stays for the merge, which writes the entry and the card's
        print(
            f"Shard {config.shard} done: {result.num_examples} examples, clean "
            f"{100 * result.clean_accuracy:.2f}%, AutoAttack {100 * result.robust_accuracy:.2f}% "
            f"on them; merge all shards with --merge."
        )
        return {"shard": config.shard, "num_examples": result.num_examples}
    entry_path = target.output / f"robustbench_{name}_Linf.json"
    entry = result.model_info_entry()
    atomic.write_json(entry_path, entry)
    result.per_example.save(target.output / f"robustbench_{name}_Linf_per_example.npz")
    _add_to_card(target, result.card_entry(command), entry_path)
    state.unlink(missing_ok=True)  # finished: the same command evaluates afresh
    print(
        f"RobustBench {name} Linf {protocol.epsilon} ({protocol.epsilon_pixels:g} pixels), "
        f"AutoAttack {result.version}, {result.num_examples} examples: clean "
        f"{100 * result.clean_accuracy:.2f}%, AutoAttack {100 * result.robust_accuracy:.2f}%"
    )
    for deviation in result.deviations:
        print(f"  differs from RobustBench: {deviation}")
    print(f"Entry: {entry_path}; card: {target.card_dir / rundir.CARD}")
    return entry


def _data():
    """`sat_tf.data` (the tf.data pipelines every --dataset goes through); EvalError in one line
    saying what to install when TensorFlow is missing."""
    try:
        from sat_tf import data
    except ImportError as error:
        raise EvalError(str(error)) from None
    return data


def _image_size(config, target, model, default=None):
    """The evaluation resolution: --image_size, the run's, or `default`; it must be the one the
    model takes when its input has a fixed size."""
    size = target.image_size(config, default)
    fixed = tuple(model.input_shape[1:3])
    if None not in fixed and fixed != (size, size):
        flag = f"--image_size={size}" if config.image_size else f"the run's image_size {size}"
        raise EvalError(
            f"{flag} does not fit the model, which takes {fixed[0]}x{fixed[1]} images; "
            f"use --image_size={fixed[0]}."
        )
    return size


def _robustbench_data(config, target, protocol, model):
    """`(images, labels, source)`: the protocol's first --num_examples examples, in its order."""
    from sat_tf import evaluation

    data = _data()  # first: one line when TensorFlow is missing
    from sat_tf.data import robustbench_data

    spec = target.data_spec(config)
    n = config.num_examples or protocol.num_examples
    image_size = _image_size(config, target, model, default=protocol.image_size)
    if protocol.leaderboard == "imagenet":
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
        num_classes=int(model.output_shape[-1]),
        training=False,
    )
    images, labels = evaluation.collect(loaded.dataset, n)
    return images, labels, f"{spec} split {split}: the first {len(labels)} in the pipeline's order"


def _robustbench_imagenet(config, target, spec, n, image_size):
    """RobustBench's ImageNet subset (the first n of --robustbench_ids) from tfrecord:/folder:."""
    data = _data()
    from sat_tf.data import robustbench_data

    if not config.robustbench_ids:
        raise EvalError(
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
        images, labels = robustbench_data.imagenet_from_tfrecord(
            data.tfrecord_pattern(location, split), ids[:n], image_size=image_size
        )
    else:
        raise EvalError(f"imagenet needs tfrecord:<pattern> or folder:<dir> data. Received: {spec}")
    return images, labels, source
