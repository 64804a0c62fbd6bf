"""JAX against TensorFlow on this CPU, side by side in one run (benchmarks/README.md, "Backends").

Keras fixes its backend per process, so this driver starts two long-lived workers, one with
KERAS_BACKEND=tensorflow and one with KERAS_BACKEND=jax, and asks them in turn (TF JAX TF JAX
..., the order rotated each round) to time the same train steps; each worker reports its own
wall and process CPU time per step, and every ratio is the median of the per-round ratios
(the method of benchmarks/common.py). Measured:

  - train steps (`model.train_on_batch` on a fixed synthetic batch, compiled as Keras compiles
    `fit` on each backend): clean and PGD-1 (`sat_tf.AdversarialModel`, the paper's recipe:
    epsilon 4, step 4, 1 step, 20% clean starts, keyed random starts with seed 0), each with
    ReLU and with SiLU, the same model otherwise; so images/s per backend, JAX / TF per step,
    and within each backend PGD-1 / clean and SiLU / ReLU;
  - standard AutoAttack (`sat_tf.autoattack.auto_attack`) on the first N CIFAR-10 test JPEGs
    (interleaved by class, decoded by Pillow) against tests/data/backends/cifar_relu.keras:
    the time and robust accuracy under each backend, and the examples whose verdicts differ.

    .venv/bin/python benchmarks/bench_backends.py            # the full run, about 15 min
    .venv/bin/python benchmarks/bench_backends.py --quick    # smoke run, about 3 min
    .venv/bin/python benchmarks/bench_backends.py --jax-python .venv-jax/bin/python  # no TF in JAX

Writes the raw results as JSON (`--out`) and prints Markdown tables.
"""

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import tarfile
import time
import traceback

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "jax")
SHORT = {"tensorflow": "TF", "jax": "JAX"}
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
MODEL = ROOT / "tests" / "data" / "backends" / "cifar_relu.keras"


# --- worker: one per backend, requests and replies as JSON lines on stdin / stdout ---------


def _candidate(name, *, model, image_size, batch_size, epsilon, step_size):
    """`(step, first call seconds)`: candidate "<activation> clean|pgd1" as a zero-argument
    `train_on_batch` on a fixed batch, after its first (compiling) call."""
    import keras

    from sat_tf import AdversarialModel, models

    activation, kind = name.split()
    # No keras.utils.set_random_seed: it imports TensorFlow wherever it is installed, which
    # would load TF's runtime into the JAX worker; the initial weights do not change the time.
    net = models.build(
        model, num_classes=10, activation=activation, input_shape=(image_size, image_size, 3)
    )
    if kind == "pgd1":
        # The paper's training attack; seed 0 keys the random starts the same on both backends.
        net = AdversarialModel(net, epsilon=epsilon, step_size=step_size, num_steps=1, seed=0)
    net.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)  # benchmarks/common.py's synthetic data, without TF
    x = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype("float32")
    y = rng.integers(0, 10, batch_size).astype("int32")
    x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)

    def step():
        return net.train_on_batch(x, y)  # returns host floats: the step has finished

    start = time.perf_counter()
    step()
    return step, time.perf_counter() - start


def _cifar(test_root, n):
    sys.path.insert(0, str(ROOT))
    from tests.data.backends.budgets import cifar_images

    images, labels = cifar_images(test_root, per_class=math.ceil(n / 10))
    return images[:n], labels[:n]


def _autoattack(cache, *, test_root, n, epsilon, version, batch_size, seed):
    import keras

    from sat_tf import autoattack

    # Loaded once per worker: a second run reuses the attacks compiled for this model.
    if "model" not in cache:
        cache["model"] = keras.saving.load_model(MODEL)
        cache["data"] = _cifar(test_root, n)
    model, (images, labels) = cache["model"], cache["data"]
    start = time.perf_counter(), time.process_time()
    result = autoattack.auto_attack(
        model,
        images,
        labels,
        epsilon=epsilon,
        version=version,
        batch_size=batch_size,
        seed=seed,
    )
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "clean": result.clean_accuracy,
        "robust": result.robust_accuracy,
        "stages": result.stages,
        "robust_mask": [bool(v) for v in result.robust],
        "fooled_by": [int(v) for v in result.fooled_by],
    }


def _info():
    import keras

    import sat_tf  # noqa: F401 - what `import sat_tf` pulls in is part of the answer

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        framework = f"JAX {jax.__version__} ({jax.devices()[0].platform})"
    else:
        import tensorflow as tf

        framework = f"TensorFlow {tf.__version__}"
    return {
        "backend": backend,
        "framework": framework,
        "keras": keras.__version__,
        "python": sys.executable,
        "tensorflow_imported": "tensorflow" in sys.modules,
    }


def worker():
    """Serves the driver's requests until stdin closes. Library output goes to stderr."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print must not mix with the replies
    sys.stdout = sys.stderr
    steps, cache = {}, {}
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            if op == "info":
                reply = _info()
            elif op == "setup":
                steps[request["name"]], first = _candidate(**request)
                reply = {"first_call_s": first}
            elif op == "time":
                step, calls = steps[request["name"]], request["calls"]
                start = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    step()
                end = time.perf_counter(), time.process_time()
                reply = {"seconds": [(e - s) / calls for e, s in zip(end, start, strict=True)]}
            elif op == "autoattack":
                reply = _autoattack(cache, **request)
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception:  # noqa: BLE001 - reported to the driver, which goes on without it
            reply = {"error": traceback.format_exc(limit=6)}
        replies.write(json.dumps(reply) + "\n")


# --- driver ----------------------------------------------------------------------------------


class Worker:
    """A worker process under one backend."""

    def __init__(self, backend, python):
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.backend = backend
        self.process = subprocess.Popen(
            [python, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )

    def ask(self, op, **request):
        self.process.stdin.write((json.dumps({"op": op, **request}) + "\n").encode())
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.backend} worker died (its stderr is above)")
        reply = json.loads(line)
        if "error" in reply:
            log(f"{SHORT[self.backend]} {op} {request.get('name', '')} failed:\n{reply['error']}")
        return reply

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def log(message, start=[time.perf_counter()]):  # noqa: B006 - the run's start time
    print(f"[backends {time.perf_counter() - start[0]:6.0f}s] {message}", file=sys.stderr)


def test_root(cache_dir):
    """The CIFAR-10 test JPEG folder, extracted from the shared tarball when missing."""
    root = pathlib.Path(cache_dir) / "cifar10-jpeg" / "test"
    if not root.is_dir():
        log(f"extracting {ARCHIVE} into {cache_dir}")
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(cache_dir, filter="data")
    return root


def time_steps(workers, args):
    """{backend: {candidate: first-call seconds}}, {backend: {candidate: [[wall, CPU], ...]}}."""
    names = [f"{a} {k}" for a in args.activations for k in ("clean", "pgd1")]
    config = {
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "epsilon": 4.0,
        "step_size": 4.0,
    }
    first, samples = {}, {}
    for worker in workers:  # one at a time: compilation is timed too
        first[worker.backend], samples[worker.backend] = {}, {}
        for name in names:
            log(f"{SHORT[worker.backend]}: building and compiling {name}")
            reply = worker.ask("setup", name=name, **config)
            if "error" not in reply:
                first[worker.backend][name] = reply["first_call_s"]
                samples[worker.backend][name] = []
    order = [(w, n) for n in names for w in workers if n in samples[w.backend]]
    for round_index in range(args.warmup + args.repeats if order else 0):
        shift = round_index % len(order)  # rotated, so no candidate always follows the same one
        for worker, name in order[shift:] + order[:shift]:
            reply = worker.ask("time", name=name, calls=args.calls)
            if round_index >= args.warmup and "seconds" in reply:
                samples[worker.backend][name].append(reply["seconds"])
        log(f"round {round_index + 1} of {args.warmup + args.repeats} done")
    return first, samples


def run_autoattack(workers, args):
    """{backend: [auto_attack reply per run]}: `--aa-runs` runs each, the backends in turn."""
    request = {
        "test_root": str(test_root(args.cache_dir)),
        "n": args.aa_images,
        "epsilon": args.aa_epsilon,
        "version": args.aa_version,
        "batch_size": args.aa_batch_size,
        "seed": 0,
    }
    out = {w.backend: [] for w in workers}
    for run in range(args.aa_runs):
        for worker in workers if run % 2 == 0 else workers[::-1]:
            log(f"{SHORT[worker.backend]}: AutoAttack {args.aa_version} run {run + 1}")
            out[worker.backend].append(worker.ask("autoattack", **request))
    return out


def step_tables(first, samples, args):
    """Markdown: the steps under both backends, then the ratios within each backend."""
    import common

    def arr(backend, name):
        values = samples.get(backend, {}).get(name)
        return np.array(values) if values else None

    names = [f"{a} {k}" for a in args.activations for k in ("clean", "pgd1")]
    rows = []
    for name in names:
        row = [name.replace("pgd1", "PGD-1")]
        for backend in BACKENDS:
            s = arr(backend, name)
            if s is None:
                row += ["failed", "", ""]
                continue
            ms = common.median_ms(s)[0]
            row += [f"{ms:.0f}", f"{args.batch_size / ms * 1e3:.0f}", f"{first[backend][name]:.1f}"]
        tf_s, jax_s = arr("tensorflow", name), arr("jax", name)
        if tf_s is None or jax_s is None:
            row += ["", "", ""]
        else:
            wall, cpu = common.ratio(jax_s, tf_s)
            row += [f"**{wall:.2f}**", common.spread(jax_s, tf_s), f"{cpu:.2f}"]
        rows.append(row)
    header = ["step"]
    for backend in BACKENDS:
        b = SHORT[backend]
        header += [f"{b} ms", f"{b} img/s", f"{b} first call s"]
    header += ["JAX / TF wall", "range", "CPU"]
    steps = common.table(header, rows)

    pairs = [
        ("PGD-1 / clean", f"{args.activations[0]} pgd1", f"{args.activations[0]} clean"),
        *[
            (f"{a} / {args.activations[0]}, PGD-1", f"{a} pgd1", f"{args.activations[0]} pgd1")
            for a in args.activations[1:]
        ],
        *[
            (f"{a} / {args.activations[0]}, clean", f"{a} clean", f"{args.activations[0]} clean")
            for a in args.activations[1:]
        ],
    ]
    goals = {"PGD-1 / clean": common.GOAL_PGD1_OVER_CLEAN}
    rows = []
    for label, top, bottom in pairs:
        goal = goals.get(label, common.GOAL_SMOOTH_OVER_RELU if "PGD-1" in label else None)
        row = [label]
        for backend in BACKENDS:
            t, b = arr(backend, top), arr(backend, bottom)
            if t is None or b is None:
                row += ["failed", ""]
                continue
            wall, cpu = common.ratio(t, b)
            row.append(f"**{wall:.3f}** / {cpu:.3f} ({common.spread(t, b)})")
            row.append(common.goal_cell(goal, (wall, cpu), digits=3) if goal else "")
        rows.append(row)
    header = ["ratio", "TF wall / CPU (range)", "goal", "JAX wall / CPU (range)", "goal"]
    return steps, common.table(header, rows)


def autoattack_table(results, args):
    """Markdown: one row per backend and run, then how the first runs' verdicts compare."""
    import common

    runs = [r for b in BACKENDS for r in results.get(b, []) if "error" not in r]
    stages = [s for s in runs[0]["stages"] if s != "clean"] if runs else []
    rows = []
    for backend in BACKENDS:
        for number, r in enumerate(results.get(backend, []), 1):
            row = [SHORT[backend], str(number)]
            if "error" in r:
                rows.append(row + ["failed"] + [""] * (len(stages) + 4))
                continue
            row += [f"{100 * r['clean']:.1f}", f"**{100 * r['robust']:.1f}**"]
            row += [str(round(r["stages"][s] * args.aa_images)) for s in stages]
            row += [f"{r['wall_s'] / 60:.2f}", f"{r['cpu_s'] / 60:.2f}"]
            rows.append(row + [f"{args.aa_images / r['wall_s']:.2f}"])
    header = ["backend", "run", "clean %", "robust %", *[f"robust after {s}" for s in stages]]
    text = common.table(header + ["wall min", "CPU min", "images/s (wall)"], rows)
    first = {b: results.get(b, [{"error": ""}])[0] for b in BACKENDS}
    if any("error" in r for r in first.values()):
        return text
    tf_r, jax_r = (np.array(first[b]["robust_mask"]) for b in BACKENDS)
    tf_f, jax_f = (np.array(first[b]["fooled_by"]) for b in BACKENDS)
    wall = first["jax"]["wall_s"] / first["tensorflow"]["wall_s"]
    return text + (
        f"\n\nFirst runs: verdicts differ on {int((tf_r != jax_r).sum())} of {len(tf_r)} images "
        f"(robust under TF only: {int((tf_r & ~jax_r).sum())}, under JAX only: "
        f"{int((jax_r & ~tf_r).sum())}); the stage that fooled an image differs on "
        f"{int((tf_f != jax_f).sum())}. JAX / TF wall time {wall:.2f} (compilation included; "
        "a second run, `--aa-runs 2`, reuses the compiled attacks)."
    )


def driver(args):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import common

    started, load_start = time.perf_counter(), os.getloadavg()
    pythons = {"tensorflow": args.tf_python, "jax": args.jax_python}
    workers = [Worker(b, pythons[b] or sys.executable) for b in BACKENDS]
    try:
        infos = {w.backend: w.ask("info") for w in workers}
        first, samples = time_steps(workers, args) if args.repeats else ({}, {})
        aa = run_autoattack(workers, args) if args.aa_images else {}
        infos = {w.backend: w.ask("info") for w in workers}  # what the work imported too
    finally:
        for w in workers:
            w.close()
    minutes = (time.perf_counter() - started) / 60
    machine = common.machine_info()
    machine["load_start"] = " / ".join(f"{v:.1f}" for v in load_start)
    out = {
        "args": vars(args),
        "minutes": minutes,
        "machine": machine,
        "workers": infos,
        "first_call_s": first,
        "step_seconds": samples,
        "autoattack": aa,
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    common.dump_json(args.out, out)

    lines = [
        f"`{' '.join(['python', 'benchmarks/bench_backends.py', *sys.argv[1:]])}` "
        f"in {minutes:.1f} min on {machine['date']} (commit {machine['commit']}).",
        "",
        f"- Machine: {machine['cpu']}; load average (1/5/15 min) at the start "
        f"{machine['load_start']}, at the end {machine['load']}.",
        *[
            f"- {SHORT[b]} worker: {i.get('framework', i.get('error', '?'))}, Keras "
            f"{i.get('keras', '?')}, TensorFlow imported: {i.get('tensorflow_imported', '?')}."
            for b, i in infos.items()
        ],
        f"- Steps: `{args.model}` at {args.image_size} px, batch {args.batch_size}, "
        f"`train_on_batch`; {args.warmup} warm-up + {args.repeats} rounds of {args.calls} "
        "calls, both backends in turn; ratios are medians of per-round ratios (wall, then CPU).",
        "",
    ]
    if samples:
        steps, ratios = step_tables(first, samples, args)
        lines += [steps, "", ratios, ""]
    if aa:
        lines += [
            f"AutoAttack `{args.aa_version}`, epsilon {args.aa_epsilon:g}/255, the first "
            f"{args.aa_images} CIFAR-10 test images, `{MODEL.relative_to(ROOT)}`, batch "
            f"{args.aa_batch_size}, seed 0:",
            "",
            autoattack_table(aa, args),
        ]
    print("\n".join(lines))
    log(f"wrote {args.out}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, fast AutoAttack")
    p.add_argument("--model", default="resnet20", help="sat_tf.models name for the steps")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--activations", nargs="+", default=["relu", "silu"], help="first: baseline")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (0: no step timing)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--calls", type=int, default=3, help="steps per timing")
    p.add_argument("--aa-images", type=int, default=500, help="0: no AutoAttack")
    p.add_argument("--aa-runs", type=int, default=1, help="runs per backend; later ones warm")
    p.add_argument("--aa-version", default="standard")
    p.add_argument("--aa-epsilon", type=float, default=8.0, help="pixels; the model's training")
    p.add_argument("--aa-batch-size", type=int, default=256)
    p.add_argument("--cache-dir", default="/tmp/sat_tf_cache")
    p.add_argument("--tf-python", help="interpreter of the TF worker (default: this one)")
    p.add_argument("--jax-python", help="interpreter of the JAX worker, e.g. .venv-jax/bin/python")
    p.add_argument(
        "--out", help="raw JSON (default benchmarks/raw/bench_backends.json; --quick: /tmp)"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:  # the same code paths at smoke sizes
        args.model, args.image_size, args.batch_size = "small_cnn", 16, 16
        args.repeats, args.warmup, args.calls = 2, 1, 1
        args.aa_images, args.aa_version, args.aa_batch_size, args.aa_runs = 20, "fast", 32, 2
    if args.out is None:
        quick = pathlib.Path("/tmp/bench_backends_quick.json")
        args.out = str(quick if args.quick else ROOT / "benchmarks" / "raw" / "bench_backends.json")
    return args


def main(argv=None):
    args = parse(argv)
    if args.worker:
        worker()
    else:
        driver(args)


if __name__ == "__main__":
    main()
