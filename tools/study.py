"""The CPU-scale SAT study (issue 9): every activation row x seeds, trained and evaluated alike.

    python tools/study.py --run                 # the queue, seed-major; resumes; ~8 min a run
    python tools/study.py --run --seeds=0 --rows=relu,silu
    python tools/study.py --run --arm=digits    # the same rows on the built-in digits
    python tools/study.py --report [--arm=digits]   # docs/study.md + docs/study_*.png
    python tools/study.py --run --autoattack_standard --rows=relu,silu   # the AutoAttack check

Rows are the flagfiles `configs/study/<row>.cfg` (each also runs alone with tools/train.py). A run
is finished when `results/study/<row>_s<seed>.json` exists with the current protocol, and is
skipped; a killed run resumes from the checkpoints of `training.run` in
`<cache>/runs/<row>_s<seed>` (outside the repository). Each run trains in a child process (a fresh
TensorFlow per run), then evaluates the final model with the fixed protocol `EVAL` below, the same
for every row; the protocol is recorded in the JSON. The digits arm (`ARMS`) adds
configs/study/_digits.cfg after each row's flagfile and writes under `digits/` subfolders.
Several `--run` queues may run at once; they split the runs between them (`claim`).

`--autoattack_standard` queues another pass over finished runs: standard AutoAttack on the same
subset, from the saved model, into `results/study/autoattack_standard/` (the protocol's own
AutoAttack is the fast version, which only bounds standard AutoAttack from above; `STANDARD_AA`).
"""

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

import study_report  # noqa: E402  (tools/, beside this file)

# Queue order inside a seed: the paper's comparison first, then the ablation, then the rest.
ROWS = (
    "relu",
    "silu",
    "clean_relu",
    "smoothgrad_attack",
    "smoothgrad_update",
    "smoothgrad_both",
    "softplus",
    "parametric_softplus",
    "gelu",
    "elu",
    "smooth_relu",
)
SEEDS = (0, 1, 2)
RESULTS = Path(os.environ.get("SAT_TF_STUDY_RESULTS") or ROOT / "results" / "study")
CACHE = Path(os.environ.get("SAT_TF_CACHE", "/tmp/sat_tf_cache"))
TARBALL = Path(
    os.environ.get("SAT_TF_CIFAR10_TARBALL") or ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"
)

# The evaluation protocol (pixels of [0, 255]). Sized by the probe in docs/study.md: PGD-20 and
# PGD-50 x 2 on all 10,000 test images are the headline (attacking only the examples still
# standing keeps them affordable); the epsilon curve and AutoAttack run on a fixed subset.
EVAL = dict(
    version=2,  # results of another version are re-evaluated (the trained model is reused)
    epsilon=4.0,  # the SAT paper's threat model
    step_size=1.0,  # the official SAT evaluation's PGD step at epsilon 4
    full_examples=10_000,  # clean, PGD-20, PGD-50 x 2 restarts
    subset_examples=1_000,  # the epsilon curve, masking checks, AutoAttack
    subset_seed=0,  # permutation of the test set that picks the subset (the listing is by class)
    curve_epsilons=(2.0, 4.0, 8.0),  # PGD-20 with step epsilon / 4 (1 at epsilon 4)
    large_epsilon=128.0,  # PGD-20 here must reach ~0% (masking check)
    autoattack_version="fast",  # "standard" costs ~1M gradients per run: see docs/study.md
    batch_size=128,
)
# The digits arm: all 360 test digits for everything, at `make demo`'s epsilon of 16/255.
EVAL_DIGITS = dict(
    EVAL,
    version=1,
    epsilon=16.0,
    step_size=4.0,  # epsilon / 4, as in the CIFAR-10 arm and configs/demo.cfg
    full_examples=360,
    subset_examples=360,
    curve_epsilons=(8.0, 16.0, 32.0),
)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One dataset of the study: the same rows, another recipe scale and evaluation.

    Attributes:
        name: "cifar10" or "digits" (`--arm`).
        data: The dataset's name in the report.
        flagfile: Given after each row's flagfile (its data and recipe), or "" for none.
        folder: Subfolder of results/study/, of `<cache>/runs/` and of the claims ("" for none).
        protocol: The evaluation protocol (`EVAL`).
    """

    name: str
    data: str
    flagfile: str
    folder: str
    protocol: dict


ARMS = {
    "cifar10": Arm("cifar10", "CIFAR-10", "", "", EVAL),
    "digits": Arm("digits", "digits", "configs/study/_digits.cfg", "digits", EVAL_DIGITS),
}
CIFAR10 = ARMS["cifar10"]


def row_names():
    """The rows: `ROWS` in queue order (each must have a flagfile)."""
    return list(ROWS)


def queue(rows, seeds):
    """(row, seed) pairs, seed-major: every row at the first seed, then the next seed."""
    return [(row, seed) for seed in seeds for row in rows]


STANDARD_AA = "autoattack_standard"  # subfolder of the standard-AutoAttack pass's results


def result_path(row, seed, results=RESULTS, arm=CIFAR10, standard_aa=False):
    """The run's result file, or with `standard_aa` its standard-AutoAttack file."""
    folder = Path(results) / arm.folder
    return (folder / STANDARD_AA if standard_aa else folder) / f"{row}_s{seed}.json"


def is_current(path, arm=CIFAR10):
    """Whether `path` is a result of the arm's current protocol (protocol 1 had no version)."""
    if not Path(path).exists():
        return False
    version = json.loads(Path(path).read_text())["eval_protocol"].get("version", 1)
    return version == arm.protocol["version"]


def pending(rows, seeds, results=RESULTS, arm=CIFAR10, standard_aa=False):
    """The queue minus the runs whose result file exists with the current protocol.

    With `standard_aa`: the finished runs (current result file) without a current
    standard-AutoAttack file.
    """
    done = [
        (r, s) for r, s in queue(rows, seeds) if is_current(result_path(r, s, results, arm), arm)
    ]
    if not standard_aa:
        return [pair for pair in queue(rows, seeds) if pair not in done]
    return [(r, s) for r, s in done if not is_current(result_path(r, s, results, arm, True), arm)]


def load_config(row, seed, *, cache=None, arm=CIFAR10):
    """The row's flagfile as a `TrainConfig`, parsed by absl exactly as tools/train.py does."""
    from absl import flags

    from sat_tf import config as config_lib

    flag_values = flags.FlagValues()  # a fresh one: nothing leaks from an earlier row
    config_lib.define_flags(flag_values)
    model_dir = Path(cache or CACHE) / "runs" / arm.folder / f"{row}_s{seed}"
    arm_flags = [f"--flagfile={arm.flagfile}"] if arm.flagfile else []
    cwd = os.getcwd()
    os.chdir(ROOT)  # nested flagfiles are written relative to the repository root
    try:
        flag_values(["study", f"--flagfile=configs/study/{row}.cfg", *arm_flags, f"--seed={seed}"])
    finally:
        os.chdir(cwd)
    flag_values["model_dir"].value = str(model_dir)
    return config_lib.from_flags(flag_values).validate()


def ensure_data(config):
    """Extracts the CIFAR-10 JPEG copy into the cache once, if the config's folder is missing."""
    folder = Path(config.dataset.removeprefix("folder:"))
    if folder.is_dir() or not config.dataset.startswith("folder:"):
        return folder
    if not TARBALL.exists():
        sys.exit(f"error: {folder} is missing and {TARBALL} is not there to extract it from.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(TARBALL) as archive:
        archive.extractall(folder.parent, filter="data")
    return folder


def eval_arrays(config, arm=CIFAR10):
    """(images, labels) of the whole test split in the protocol's order; cached as .npz.

    The order does not depend on how the loader reads the folder: the images are sorted by
    (label, SHA-1 of their pixels), then permuted with `subset_seed`. Its first
    `subset_examples` are the subset.
    """
    import hashlib

    import numpy as np

    protocol = arm.protocol
    cache = CACHE / f"{arm.name}-test-p{protocol['version']}.npz"
    if not cache.exists():
        from sat_tf import data, evaluation

        split = data.load(
            config.dataset, split=config.resolved_eval_split, global_batch_size=500,
            image_size=config.image_size, num_classes=config.num_classes, augmentation=None,
        )  # fmt: skip
        images, labels = evaluation.collect(split.dataset)
        images = images.astype(np.uint8)
        digests = [hashlib.sha1(image.tobytes()).hexdigest() for image in images]
        canonical = np.lexsort((np.asarray(digests), labels))
        order = canonical[np.random.default_rng(protocol["subset_seed"]).permutation(len(labels))]
        partial = cache.with_name(".partial-" + cache.name)
        with open(partial, "wb") as f:
            np.savez(f, images=images[order], labels=labels[order])
        os.replace(partial, cache)
    arrays = np.load(cache)
    return arrays["images"].astype(np.float32), arrays["labels"].astype(np.int32)


def machine():
    import tensorflow as tf

    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        tensorflow=tf.__version__,
        load_average=list(os.getloadavg()),
        code_version=os.environ.get("SAT_TF_STUDY_COMMIT") or _git_head(),
    )


def _git_head():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def evaluate_model(model, images, labels, protocol=EVAL):
    """An `EVAL`-shaped protocol on one model; every attack uses the model's exact gradient."""
    from sat_tf import activations, autoattack, evaluation, masking

    eps, step, n = protocol["epsilon"], protocol["step_size"], protocol["subset_examples"]
    kw = dict(batch_size=protocol["batch_size"], checks=False, large_epsilon=None, verbose=True)
    # SmoothGradReLU defaults to its smooth backward; the evaluation attacks the ReLU network.
    with activations.smooth_gradients(False):
        full = evaluation.evaluate(
            model, (images, labels), attacks=["clean", "pgd-20", "pgd-50x2"], epsilons=[eps],
            pgd_step_size=step, num_examples=protocol["full_examples"], **kw,
        )  # fmt: skip
        sub = images[:n], labels[:n]
        rows = []
        for e in protocol["curve_epsilons"]:
            part = evaluation.evaluate(model, sub, attacks=["clean", "pgd-20"], epsilons=[e],
                                       pgd_step_size=e / 4, **kw)  # fmt: skip
            rows += [r for r in part.rows if r["kind"] != "clean" or not rows]
        large = evaluation.evaluate(
            model, sub, attacks=["pgd-20"], epsilons=[protocol["large_epsilon"]], **kw
        )
        rows += [r for r in large.rows if r["kind"] != "clean"]
        checks = masking.run_checks(model, sub[0], rows, large_epsilon=protocol["large_epsilon"],
                                    tolerance=max(0.01, 1 / n), verbose=False)  # fmt: skip
        more = masking.check_more_iterations(full.rows, tolerance=0.01)  # on all images
        checks = [more if c.name == more.name else c for c in checks]
        print("\n".join(c.line() for c in checks))
        start = time.perf_counter()
        aa = autoattack.auto_attack(
            model, *sub, epsilon=eps, version=protocol["autoattack_version"]
        )
        aa_seconds = time.perf_counter() - start

    def at(attack, epsilon, table):
        return next(
            r["accuracy"] for r in table if r["attack"] == attack and r["epsilon"] == epsilon
        )

    return dict(
        clean=full.clean_accuracy,
        pgd20=at("pgd-20", eps, full.rows),
        subset_clean=rows[0]["accuracy"],
        subset_pgd20=at("pgd-20", eps, rows),
        pgd50x2=at("pgd-50x2", eps, full.rows),
        autoattack=aa.robust_accuracy,
        autoattack_stages=aa.stages,
        autoattack_seconds=round(aa_seconds, 1),
        curve={str(e): at("pgd-20", e, rows) for e in protocol["curve_epsilons"]},
        rows=full.rows + rows,
        checks=[dict(name=c.name, status=c.status, message=c.message) for c in checks],
    )


def run_one(row, seed, results=RESULTS, arm=CIFAR10):
    """Trains (or resumes, or reuses) one run, evaluates it and writes its result file."""
    import keras

    from sat_tf import training

    config = load_config(row, seed, arm=arm)
    ensure_data(config)
    started = time.time()
    final = Path(config.model_dir) / training.FINAL_MODEL
    if not final.exists():
        command = f"python tools/study.py --run --arm={arm.name}  # {row} seed {seed}"
        summary = training.run(config, command=command)
        if summary.get("stopped"):
            sys.exit(f"{row} seed {seed}: stopped at step {summary['step']}; re-run to resume.")
    train_summary = json.loads((Path(config.model_dir) / "results.json").read_text())
    model = keras.saving.load_model(final)
    images, labels = eval_arrays(config, arm)
    eval_start = time.time()
    metrics = evaluate_model(model, images, labels, arm.protocol)
    record = dict(
        row=row,
        seed=seed,
        config=dataclasses.asdict(config),
        arm=arm.name,
        eval_protocol=arm.protocol,
        metrics=metrics,
        train_results=train_summary["results"],
        wall_time_s=dict(
            train=train_summary["wall_time_s"],
            eval=round(time.time() - eval_start, 1),
            this_process=round(time.time() - started, 1),
        ),
        machine=machine(),
        finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    path = result_path(row, seed, results, arm)
    _write_json(path, record)
    print(f"Wrote {path}: {json.dumps({k: metrics[k] for k in SUMMARY})}")


SUMMARY = ("clean", "pgd20", "pgd50x2", "autoattack")


def run_standard_autoattack(row, seed, results=RESULTS, arm=CIFAR10):
    """Standard AutoAttack on the protocol's subset of one finished run; writes its result file.

    The model is the run's saved final model (`<cache>/runs/...`); the images are the subset the
    run's AutoAttack-fast saw, so the two numbers pair image for image.
    """
    import keras

    from sat_tf import activations, autoattack, training

    config = load_config(row, seed, arm=arm)
    final = Path(config.model_dir) / training.FINAL_MODEL
    if not final.exists():
        sys.exit(
            f"error: {row} seed {seed}: no saved model at {final} (the cache was cleared?). "
            f"Remove {result_path(row, seed, results, arm)} and run `tools/study.py --run "
            f"--rows={row} --seeds={seed}` to train it again, then this pass."
        )
    ensure_data(config)
    model = keras.saving.load_model(final)
    images, labels = eval_arrays(config, arm)
    n, protocol = arm.protocol["subset_examples"], arm.protocol
    start = time.perf_counter()
    with activations.smooth_gradients(False):  # the ReLU network's true gradient, as in `EVAL`
        aa = autoattack.auto_attack(
            model, images[:n], labels[:n], epsilon=protocol["epsilon"], version="standard"
        )
    main = json.loads(result_path(row, seed, results, arm).read_text())["metrics"]
    record = dict(
        row=row,
        seed=seed,
        arm=arm.name,
        eval_protocol=protocol,
        autoattack_version="standard",
        budget=autoattack.VERSIONS["standard"],
        num_examples=n,
        clean=aa.clean_accuracy,
        autoattack=aa.robust_accuracy,
        stages=aa.stages,
        autoattack_fast=main["autoattack"],
        seconds=round(time.perf_counter() - start, 1),
        machine=machine(),
        finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    _write_json(result_path(row, seed, results, arm, standard_aa=True), record)
    print(f"{row} seed {seed}: AutoAttack standard {aa.robust_accuracy:.3f}, "
          f"fast {main['autoattack']:.3f} ({record['seconds']:.0f} s)")  # fmt: skip


def _write_json(path, record):
    """Writes `record` atomically: the file's presence marks the work finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(".partial-" + path.name)
    partial.write_text(json.dumps(record, indent=2, default=float) + "\n")
    os.replace(partial, path)


def claim(row, seed, claims):
    """Claims a run for this process: the path of its claim file, or None if a live runner has it.

    Several `--run` queues may share the machine and its results folder (a small model's
    evaluation keeps about one core busy, so two queues use two cores). A claim is
    `<claims>/<row>_s<seed>.pid`, created complete and atomically with a hard link; the claim of
    a runner that died is taken over.
    """
    claims = Path(claims)
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / f"{row}_s{seed}.pid"
    draft = claims / f".{row}_s{seed}.{os.getpid()}"
    draft.write_text(str(os.getpid()))
    try:
        for _ in range(2):  # a second try after removing a dead runner's claim
            try:
                os.link(draft, path)
                return path
            except FileExistsError:
                try:
                    os.kill(int(path.read_text()), 0)
                    return None  # its runner is alive
                except ProcessLookupError:
                    path.unlink(missing_ok=True)
                except (FileNotFoundError, ValueError, PermissionError):
                    pass  # released meanwhile, or another user's process: try once more
        return None
    finally:
        draft.unlink(missing_ok=True)


def run_queue(
    rows,
    seeds,
    *,
    results=RESULTS,
    stop_at=None,
    call=subprocess.call,
    claims=None,
    arm=CIFAR10,
    standard_aa=False,
):
    """Runs each pending, unclaimed (row, seed) in a child process; none after `stop_at`.

    With `standard_aa` the queue is the standard-AutoAttack pass (`run_standard_autoattack`).

    Returns the (row, seed) pairs started. A failing child stops the queue (e.g. a broken edit of
    a shared module would otherwise fail every later run in a second).
    """
    claims = Path(claims or CACHE / "claims") / arm.folder / (STANDARD_AA if standard_aa else "")
    started = []
    for row, seed in pending(rows, seeds, results, arm, standard_aa):
        if stop_at is not None and time.time() >= stop_at:
            print(f"Stop time reached; not starting {row} seed {seed}.", flush=True)
            break
        held = claim(row, seed, claims)
        if held is None:
            continue  # another queue runs it
        try:
            if is_current(result_path(row, seed, results, arm, standard_aa), arm):
                continue  # another queue finished it since `pending` was listed
            print(f"=== {row} seed {seed} ({time.strftime('%H:%M:%S')})", flush=True)
            started.append((row, seed))
            command = [sys.executable, __file__, "--one", f"{row}:{seed}", f"--arm={arm.name}",
                       f"--results={results}"]  # fmt: skip
            command += ["--autoattack_standard"] * standard_aa
            code = call(command, cwd=ROOT)
        finally:
            held.unlink(missing_ok=True)
        if code:
            print(f"{row} seed {seed} failed (exit {code}); stopping the queue.", flush=True)
            break
    return started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="store_true", help="run the pending queue")
    parser.add_argument("--report", action="store_true", help="write docs/study.md and plots")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma list of rows")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma list")
    parser.add_argument("--stop_at", default="", help="UTC HH:MM: start no run after it")
    parser.add_argument("--arm", default="cifar10", choices=sorted(ARMS), help="the dataset")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the result files")
    parser.add_argument(
        "--autoattack_standard", action="store_true",
        help=f"with --run: standard AutoAttack on finished runs (results/study/{STANDARD_AA})",
    )  # fmt: skip
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # row:seed, child process
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    arm = ARMS[args.arm]
    if args.one:
        row, seed = args.one.split(":")
        one = run_standard_autoattack if args.autoattack_standard else run_one
        one(row, int(seed), args.results, arm)
    elif args.run:
        stop_at = _utc_today(args.stop_at) if args.stop_at else None
        run_queue(rows, seeds, results=args.results, stop_at=stop_at, arm=arm,
                  standard_aa=args.autoattack_standard)  # fmt: skip
    if args.report:
        folder = Path(args.results) / arm.folder
        version = arm.protocol["version"]
        table = study_report.load_results(folder, version=version)
        standard = study_report.load_results(folder / STANDARD_AA, version=version)
        study_report.write_report(table, ROOT / "docs", rows=rows, seeds=seeds, standard=standard,
                                  protocol=arm.protocol, arm=arm.name, data=arm.data)  # fmt: skip
    if not (args.one or args.run or args.report):
        parser.print_help()


def _utc_today(hhmm):
    """The next time the UTC clock reads HH:MM (tomorrow's if today's has passed), in epoch s."""
    hours, minutes = map(int, hhmm.split(":"))
    now = time.gmtime()
    when = time.mktime(now[:3] + (hours, minutes, 0) + now[6:]) - time.mktime(now) + time.time()
    return when + 86400 if when <= time.time() else when


if __name__ == "__main__":
    main()
