"""The CPU-scale SAT study (issue 9): every activation row x seeds, trained and evaluated alike.

    python tools/study.py --run                 # the queue, seed-major; resumes; ~8 min a run
    python tools/study.py --run --seeds=0 --rows=relu,silu
    python tools/study.py --report              # docs/study.md + docs/study_*.png from results/

Rows are the flagfiles `configs/study/<row>.cfg` (each also runs alone with tools/train.py). A run
is finished when `results/study/<row>_s<seed>.json` exists, and is skipped; a killed run resumes
from the checkpoints of `training.run` in `<cache>/runs/<row>_s<seed>` (outside the repository).
Each run trains in a child process (a fresh TensorFlow per run), then evaluates the final model
with the fixed protocol `EVAL` below, the same for every row; the protocol is recorded in the JSON.
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


def row_names():
    """The rows: `ROWS` in queue order (each must have a flagfile)."""
    return list(ROWS)


def queue(rows, seeds):
    """(row, seed) pairs, seed-major: every row at the first seed, then the next seed."""
    return [(row, seed) for seed in seeds for row in rows]


def result_path(row, seed, results=RESULTS):
    return Path(results) / f"{row}_s{seed}.json"


def is_current(path):
    """Whether `path` is a result of the current `EVAL` protocol (protocol 1 had no version)."""
    if not Path(path).exists():
        return False
    return json.loads(Path(path).read_text())["eval_protocol"].get("version", 1) == EVAL["version"]


def pending(rows, seeds, results=RESULTS):
    """The queue minus the runs whose result file exists with the current protocol."""
    return [(r, s) for r, s in queue(rows, seeds) if not is_current(result_path(r, s, results))]


def load_config(row, seed, *, cache=None):
    """The row's flagfile as a `TrainConfig`, parsed by absl exactly as tools/train.py does."""
    from absl import flags

    sys.path.insert(0, str(ROOT / "tools"))
    import train  # tools/train.py: its HELP and config_from_flags

    flag_values = flags.FlagValues()
    for name in train.HELP:  # a fresh FlagValues: nothing leaks from an earlier row
        field = {f.name: f for f in dataclasses.fields(train.TrainConfig)}[name]
        default = None if field.default is dataclasses.MISSING else field.default
        define = {
            bool: flags.DEFINE_bool,
            int: flags.DEFINE_integer,
            float: flags.DEFINE_float,
            tuple: flags.DEFINE_list,
        }.get(type(default), flags.DEFINE_string)
        default = list(default) if isinstance(default, tuple) else default
        define(name, default, train.HELP[name], flag_values=flag_values)
    model_dir = Path(cache or CACHE) / "runs" / f"{row}_s{seed}"
    cwd = os.getcwd()
    os.chdir(ROOT)  # nested flagfiles are written relative to the repository root
    try:
        flag_values(["study", f"--flagfile=configs/study/{row}.cfg", f"--seed={seed}"])
    finally:
        os.chdir(cwd)
    flag_values["model_dir"].value = str(model_dir)
    return train.config_from_flags(flag_values).validate()


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


def eval_arrays(config):
    """(images, labels) of the whole test split, permuted by `subset_seed`; cached as .npz."""
    import numpy as np

    cache = Path(config.model_dir).parents[1] / "cifar10-test.npz"
    if not cache.exists():
        from sat_tf import data, evaluation

        split = data.load(
            config.dataset, split=config.resolved_eval_split, global_batch_size=500,
            image_size=config.image_size, num_classes=config.num_classes, augmentation=None,
        )  # fmt: skip
        images, labels = evaluation.collect(split.dataset)
        order = np.random.default_rng(EVAL["subset_seed"]).permutation(len(labels))
        partial = cache.with_name(".partial-" + cache.name)
        with open(partial, "wb") as f:
            np.savez(f, images=images[order].astype(np.uint8), labels=labels[order])
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


def evaluate_model(model, images, labels):
    """The `EVAL` protocol on one model; every attack uses the model's exact (ReLU) gradient."""
    from sat_tf import activations, autoattack, evaluation, masking

    eps, step, n = EVAL["epsilon"], EVAL["step_size"], EVAL["subset_examples"]
    kw = dict(batch_size=EVAL["batch_size"], checks=False, large_epsilon=None, verbose=True)
    # SmoothGradReLU defaults to its smooth backward; the evaluation attacks the ReLU network.
    with activations.smooth_gradients(False):
        full = evaluation.evaluate(
            model, (images, labels), attacks=["clean", "pgd-20", "pgd-50x2"], epsilons=[eps],
            pgd_step_size=step, num_examples=EVAL["full_examples"], **kw,
        )  # fmt: skip
        sub = images[:n], labels[:n]
        rows = []
        for e in EVAL["curve_epsilons"]:
            part = evaluation.evaluate(model, sub, attacks=["clean", "pgd-20"], epsilons=[e],
                                       pgd_step_size=e / 4, **kw)  # fmt: skip
            rows += [r for r in part.rows if r["kind"] != "clean" or not rows]
        large = evaluation.evaluate(
            model, sub, attacks=["pgd-20"], epsilons=[EVAL["large_epsilon"]], **kw
        )
        rows += [r for r in large.rows if r["kind"] != "clean"]
        checks = masking.run_checks(model, sub[0], rows, large_epsilon=EVAL["large_epsilon"],
                                    tolerance=max(0.01, 1 / n), verbose=False)  # fmt: skip
        more = masking.check_more_iterations(full.rows, tolerance=0.01)  # on the 10,000
        checks = [more if c.name == more.name else c for c in checks]
        print("\n".join(c.line() for c in checks))
        start = time.perf_counter()
        aa = autoattack.auto_attack(model, *sub, epsilon=eps, version=EVAL["autoattack_version"])
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
        curve={str(e): at("pgd-20", e, rows) for e in EVAL["curve_epsilons"]},
        rows=full.rows + rows,
        checks=[dict(name=c.name, status=c.status, message=c.message) for c in checks],
    )


def run_one(row, seed, results=RESULTS):
    """Trains (or resumes, or reuses) one run, evaluates it and writes its result file."""
    import keras

    from sat_tf import training

    config = load_config(row, seed)
    ensure_data(config)
    started = time.time()
    final = Path(config.model_dir) / training.FINAL_MODEL
    if not final.exists():
        summary = training.run(config, command=f"python tools/study.py --run  # {row} seed {seed}")
        if summary.get("stopped"):
            sys.exit(f"{row} seed {seed}: stopped at step {summary['step']}; re-run to resume.")
    train_summary = json.loads((Path(config.model_dir) / "results.json").read_text())
    model = keras.saving.load_model(final)
    images, labels = eval_arrays(config)
    eval_start = time.time()
    metrics = evaluate_model(model, images, labels)
    record = dict(
        row=row,
        seed=seed,
        config=dataclasses.asdict(config),
        eval_protocol=EVAL,
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
    path = result_path(row, seed, results)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(".partial-" + path.name)
    partial.write_text(json.dumps(record, indent=2, default=float) + "\n")
    os.replace(partial, path)  # its presence marks the run finished
    print(f"Wrote {path}: {json.dumps({k: metrics[k] for k in SUMMARY})}")


SUMMARY = ("clean", "pgd20", "pgd50x2", "autoattack")


def run_queue(rows, seeds, *, results=RESULTS, stop_at=None, call=subprocess.call):
    """Runs each pending (row, seed) in a child process; stops before starting past `stop_at`.

    Returns the (row, seed) pairs started. A failing child stops the queue (e.g. a broken edit of
    a shared module would otherwise fail every later run in a second).
    """
    started = []
    for row, seed in pending(rows, seeds, results):
        if stop_at is not None and time.time() >= stop_at:
            print(f"Stop time reached; not starting {row} seed {seed}.", flush=True)
            break
        print(f"=== {row} seed {seed} ({time.strftime('%H:%M:%S')})", flush=True)
        started.append((row, seed))
        command = [sys.executable, __file__, "--one", f"{row}:{seed}", f"--results={results}"]
        code = call(command, cwd=ROOT)
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
    parser.add_argument("--results", default=str(RESULTS), help="folder of the result files")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # row:seed, child process
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.one:
        row, seed = args.one.split(":")
        run_one(row, int(seed), args.results)
    elif args.run:
        stop_at = _utc_today(args.stop_at) if args.stop_at else None
        run_queue(rows, seeds, results=args.results, stop_at=stop_at)
    if args.report:
        write_report(load_results(args.results), ROOT / "docs", rows=rows, seeds=seeds)
    if not (args.one or args.run or args.report):
        parser.print_help()


# ---- Report: docs/study.md's generated section and the two plots. ----

COLUMNS = (  # (metric key, header); accuracies in percent
    ("clean", "clean (10k)"),
    ("pgd20", "PGD-20 (10k)"),
    ("pgd50x2", "PGD-50x2 (10k)"),
    ("autoattack", "AutoAttack-fast (1k)"),
)
BEGIN, END = "<!-- study:generated -->", "<!-- /study:generated -->"


def load_results(results=RESULTS):
    """row -> list of result records of the current protocol, from `results/study/*.json`."""
    table = {}
    for path in sorted(Path(results).glob("*_s*.json")):
        record = json.loads(path.read_text())
        if record["eval_protocol"].get("version", 1) != EVAL["version"]:
            continue  # pending re-evaluation; `missing_markdown` lists it
        table.setdefault(record["row"], []).append(record)
    return table


def mean_std(values):
    """(mean, sample std) in percent; std is nan for a single value."""
    import numpy as np

    values = 100 * np.asarray(values, dtype=float)
    std = values.std(ddof=1) if len(values) > 1 else float("nan")
    return float(values.mean()), float(std)


def _cell(values, signed=False):
    mean, std = mean_std(values)
    mean = round(mean, 1) + 0.0  # no "-0.0"
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return text if std != std else f"{text} +- {std:.1f}"


def table_markdown(table, rows=ROWS):
    """One line per row with results: n, mean +- std of each `COLUMNS` metric, warnings, time."""
    head = ["row", "activation", "n"] + [h for _, h in COLUMNS] + ["masking warns", "min/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in [r for r in rows if r in table]:
        runs = table[row]
        cells = [_cell([r["metrics"][key] for r in runs]) for key, _ in COLUMNS]
        warns = sum(c["status"] == "warn" for r in runs for c in r["metrics"]["checks"])
        minutes = sum(r["wall_time_s"]["train"] + r["wall_time_s"]["eval"] for r in runs)
        act = runs[0]["config"]["activation"]
        if act == "smooth_grad_relu":
            act += " (" + "+".join(runs[0]["config"]["smooth_gradients"]) + ")"
        seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        line = [row, act, f"{len(runs)} (s{seeds})", *cells, str(warns)]
        lines.append("| " + " | ".join(line + [f"{minutes / 60 / len(runs):.1f}"]) + " |")
    return "\n".join(lines)


def paired_markdown(table, rows=ROWS, base="relu"):
    """Row minus `base` at the same seed (clean, PGD-20 on 10k): seed noise cancels in pairs."""
    if base not in table:
        return ""
    by_seed = {r["seed"]: r["metrics"] for r in table[base]}
    lines = [
        f"| row | seeds paired with {base} | clean - {base} | PGD-20 - {base} |",
        "|---|---|---|---|",
    ]
    for row in [r for r in rows if r in table and r != base]:
        pairs = [(r["metrics"], by_seed[r["seed"]]) for r in table[row] if r["seed"] in by_seed]
        if not pairs:
            continue
        cells = [_cell([a[k] - b[k] for a, b in pairs], signed=True) for k in ("clean", "pgd20")]
        lines.append(f"| {row} | {len(pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def missing_markdown(table, rows=ROWS, seeds=SEEDS):
    done = {(r["row"], r["seed"]) for runs in table.values() for r in runs}
    missing = [f"{row} s{seed}" for row, seed in queue(rows, seeds) if (row, seed) not in done]
    if not missing:
        return "Every row has every seed."
    return f"Not yet run ({len(missing)}): " + ", ".join(missing) + "."


def plot_curves(table, path, rows=ROWS):
    """Robust accuracy (PGD-20, 1k subset) vs epsilon, mean over seeds, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate([r for r in rows if r in table]):
        runs = table[row]
        epsilons = [0.0] + sorted(float(e) for e in runs[0]["metrics"]["curve"])
        stats = [mean_std([r["metrics"]["subset_clean"] for r in runs])] + [
            mean_std([r["metrics"]["curve"][str(e)] for r in runs]) for e in epsilons[1:]
        ]
        means = [m for m, _ in stats]
        errors = [0 if s != s else s for _, s in stats]
        style = "--" if row.startswith(("clean", "smoothgrad")) else "-"
        color = plt.cm.tab20(i % 20)  # 11 rows: more colours than the default cycle's 10
        ax.errorbar(epsilons, means, yerr=errors, label=row, marker="o", ls=style, capsize=2,
                    color=color)  # fmt: skip
    ax.set(xlabel="epsilon (pixels of 255)", ylabel="accuracy under PGD-20 (%)")
    ax.set_title("CIFAR-10, small_cnn, 1,000 test images (eps 0 = clean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scatter(table, path, rows=ROWS):
    """Clean vs PGD-20 accuracy (10k), mean +- std over seeds, one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in [r for r in rows if r in table and r != "clean_relu"]:
        runs = table[row]
        cx, sx = mean_std([r["metrics"]["clean"] for r in runs])
        cy, sy = mean_std([r["metrics"]["pgd20"] for r in runs])
        ax.errorbar(cx, cy, xerr=0 if sx != sx else sx, yerr=0 if sy != sy else sy,
                    marker="s" if row.startswith("smoothgrad") else "o", capsize=2)  # fmt: skip
        ax.annotate(row, (cx, cy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for get, put in ((ax.get_xlim, ax.set_xlim), (ax.get_ylim, ax.set_ylim)):
        low, high = get()  # at least 4 points wide: no zooming 0.2-point gaps into a trend
        middle, half = (low + high) / 2, max((high - low) / 2, 2.0)
        put(middle - half, middle + half)
    ax.set(xlabel="clean accuracy (%)", ylabel="PGD-20 accuracy at eps 4 (%)")
    ax.set_title("Adversarial rows, 10,000 test images (binomial s.e. ~0.45 points)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(table, docs, *, rows=ROWS, seeds=SEEDS):
    """Rewrites the generated section of docs/study.md and the plots; the prose is kept."""
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    plot_curves(table, docs / "study_epsilon.png", rows)
    plot_scatter(table, docs / "study_scatter.png", rows)
    checks = sorted({c["name"] for runs in table.values() for r in runs
                     for c in r["metrics"]["checks"] if c["status"] == "warn"})  # fmt: skip
    generated = "\n\n".join([
        BEGIN,
        f"Generated by `python tools/study.py --report` from {sum(map(len, table.values()))} "
        "result files in `results/study/`. Accuracies in %, mean +- sample std over seeds.",
        table_markdown(table, rows),
        "Paired with ReLU at the same seed (percentage points, mean +- std over the pairs):",
        paired_markdown(table, rows),
        missing_markdown(table, rows, seeds),
        "Masking checks that warned in some run: " + (", ".join(checks) or "none") + ".",
        "![robust accuracy vs epsilon](study_epsilon.png) ![clean vs robust](study_scatter.png)",
        END,
    ])  # fmt: skip
    path = docs / "study.md"
    text = path.read_text() if path.exists() else f"# CPU-scale SAT study\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    path.write_text(head + generated + rest.split(END, 1)[1])


def _utc_today(hhmm):
    """The next time the UTC clock reads HH:MM (tomorrow's if today's has passed), in epoch s."""
    hours, minutes = map(int, hhmm.split(":"))
    now = time.gmtime()
    when = time.mktime(now[:3] + (hours, minutes, 0) + now[6:]) - time.mktime(now) + time.time()
    return when + 86400 if when <= time.time() else when


if __name__ == "__main__":
    main()
