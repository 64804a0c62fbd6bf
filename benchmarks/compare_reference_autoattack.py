"""Standard AutoAttack: the reference code (fra31/auto-attack) and ours, same model and images.

The reference is PyPI's `pyautoattack` 0.2.0 (fra31/auto-attack packaged, PyTorch). It attacks
`sat_tf.torch_module(model)`: under KERAS_BACKEND=torch the Keras model is a `torch.nn.Module`, so
the reference and ours attack the very same weights (no twin). Ours runs
`sat_tf.autoattack.auto_attack(version="standard")` under each Keras backend: TensorFlow, JAX and
PyTorch. Every side gets the same CIFAR-10 test images (the first `--per-class` JPEGs of every
class of `../shared/data/cifar10-jpeg.tar.gz`, interleaved by class), L-inf, epsilon 8/255, and
records per image its verdict, per stage the robust count and the CPU seconds (process time, all
threads), and its total CPU and wall seconds.

One side per process (`--side`: reference, tensorflow, jax or torch; the Keras backend is set from
it before Keras is imported). Runs in chunks of `--chunk` images and writes every finished chunk to
`--out` (JSON, shared by the sides under a lock), so an interrupted run resumes where it stopped:
rerun the same command. Needs the bench extras (torch's CPU build, pyautoattack, JAX):

    M=results/reference_autoattack/model.keras; OUT=results/reference_autoattack/standard.json
    for side in reference torch tensorflow jax; do
        python benchmarks/compare_reference_autoattack.py --model=$M --out=$OUT --side=$side
    done
    python benchmarks/compare_reference_autoattack.py --out=$OUT --report   # Markdown tables
"""

import argparse
import fcntl
import json
import logging
import os
import re
import tarfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
SIDES = ("reference", "torch", "tensorflow", "jax")  # the reference runs under torch


def cifar10_test_images(per_class, cache_dir, archive):
    """The first `per_class` test JPEGs of each class, interleaved: ([N, 32, 32, 3] uint8, [N])."""
    from PIL import Image

    root = os.path.join(cache_dir, "cifar10-jpeg", "test")
    if not os.path.isdir(root):
        with tarfile.open(archive) as tar:
            tar.extractall(cache_dir, filter="data")
    classes = sorted(os.listdir(root))
    images, labels = [], []
    for index in range(per_class):
        for label, name in enumerate(classes):
            path = os.path.join(root, name, f"{index:04d}.jpg")
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB"), np.uint8))
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.int64)


class _StageLog(logging.Handler):
    """Collects pyautoattack's 'robust accuracy after APGD-CE: 41.20% ...' lines."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.after = {}

    def emit(self, record):
        found = re.match(r"robust accuracy after (\S+): ([\d.]+)%", record.getMessage())
        if found:
            self.after[found.group(1).lower()] = float(found.group(2)) / 100.0


def _cpu_timed(obj, name, seconds):
    """Wraps `obj.perturb` to add its CPU seconds to `seconds[name]`."""
    perturb = obj.perturb

    def timed(*args, **kwargs):
        began = time.process_time()
        try:
            return perturb(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.process_time() - began

    obj.perturb = timed


def run_reference(model, x, y, epsilon, attacks=None):
    """The reference AutoAttack on `sat_tf.torch_module(model)`: (robust [N], counts, stage CPU
    seconds)."""
    import torch
    from pyautoattack import AutoAttack

    import sat_tf

    module = sat_tf.torch_module(model)
    log = _StageLog()
    logger = logging.getLogger("auto-attack")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(log)
    seconds = {}
    try:
        adversary = AutoAttack(module, eps=epsilon / 255.0, version="standard", seed=0)
        if attacks is not None:  # the standard settings, these stages only
            adversary.attacks_to_run = list(attacks)
        for name, obj in (
            ("apgd", adversary.apgd),
            ("apgd-t", adversary.apgd_targeted),
            ("fab", adversary.fab),
            ("square", adversary.square),
        ):
            _cpu_timed(obj, name, seconds)
        images = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0).contiguous()
        labels = torch.from_numpy(y.astype(np.int64))
        x_adv, _ = adversary.run_standard_evaluation(images, labels, batch_size=len(y))
        with torch.no_grad():
            robust = (module(x_adv).argmax(1) == labels).numpy()
            clean = (module(images).argmax(1) == labels).numpy()
    finally:
        logger.removeHandler(log)
    counts = {"clean": int(clean.sum())}
    last = counts["clean"]
    for stage in attacks or STAGES:  # a stage skipped once nothing is left keeps the last count
        last = counts[stage] = int(round(log.after[stage] * len(y))) if stage in log.after else last
    renamed = {"apgd": "apgd-ce", "fab": "fab-t"}
    return robust, counts, {renamed.get(k, k): v for k, v in seconds.items()}


def run_ours(model, x, y, epsilon, attacks=None):
    """`sat_tf.autoattack.auto_attack(version="standard")`: (robust [N], counts, stage CPU
    seconds), the stage seconds read from the evaluation's own per-batch checkpoints with the
    clock switched to process time."""
    import types

    from sat_tf import autoattack, passes

    seconds = {}
    run_job = passes.run_job

    def timed_run_job(model, job, *args, checkpoint=None, **kwargs):
        def timed(position, spent):
            stage = job.passes[min(position[0], len(job.passes) - 1)].name
            seconds[stage] = seconds.get(stage, 0.0) + spent
            if checkpoint is not None:
                checkpoint(position, spent)

        return run_job(model, job, *args, checkpoint=timed, **kwargs)

    passes.run_job, clock = timed_run_job, passes.time
    passes.time = types.SimpleNamespace(perf_counter=time.process_time)
    try:
        result = autoattack.auto_attack(
            model,
            x.astype(np.float32),
            y,
            epsilon=epsilon,
            version="standard",
            attacks=attacks,
            batch_size=len(y),
        )
    finally:
        passes.run_job, passes.time = run_job, clock
    counts = {name: int(round(value * len(y))) for name, value in result.stages.items()}
    return result.robust, counts, seconds


def _load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"chunks": {}}


def _save(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


LABELS = {
    "reference": "reference: fra31/auto-attack (`pyautoattack` 0.2.0) under PyTorch",
    "torch": "sat_tf under PyTorch",
    "tensorflow": "sat_tf under TensorFlow",
    "jax": "sat_tf under JAX",
}


def report(data):
    """Markdown: per side the images, clean and robust accuracy, robust counts after each stage
    and CPU minutes per stage; then each sat_tf side's verdicts against the reference's."""
    stages = tuple(data.get("attacks") or STAGES)
    verdicts, lines = {}, []
    names = " | ".join(f"after {s.upper()}" for s in stages)
    cpu = " | ".join(f"{s.upper()} CPU (min)" for s in stages)
    lines.append(
        f"| code | images | clean (%) | robust (%) | {names} | {cpu} | CPU (min) | wall (min) |"
    )
    lines.append("|---" * (6 + 2 * len(stages)) + "|")
    for side in SIDES:
        chunks = [c[side] for c in data["chunks"].values() if side in c]
        if not chunks:
            continue
        n = sum(len(c["robust"]) for c in chunks)
        counts = {s: sum(c["counts"][s] for c in chunks) for s in ("clean",) + stages}
        stage_cpu = {s: sum(c["stage_cpu"].get(s, 0.0) for c in chunks) for s in stages}
        verdicts[side] = {k: c[side]["robust"] for k, c in data["chunks"].items() if side in c}
        robust = np.concatenate([c["robust"] for c in chunks])
        cells = [LABELS[side], n, f"{100 * counts['clean'] / n:.1f}", f"{100 * robust.mean():.1f}"]
        cells += [counts[s] for s in stages] + [f"{stage_cpu[s] / 60:.2f}" for s in stages]
        cells += [f"{sum(c[k] for c in chunks) / 60:.1f}" for k in ("cpu", "wall")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    for side in SIDES[1:]:
        if "reference" not in verdicts or side not in verdicts:
            continue
        both = sorted(set(verdicts["reference"]) & set(verdicts[side]), key=int)
        ref = np.concatenate([verdicts["reference"][k] for k in both]).astype(bool)
        ours = np.concatenate([verdicts[side][k] for k in both]).astype(bool)
        lines.append(
            f"- {LABELS[side]} against the reference, {len(ref)} images: verdicts equal on "
            f"{int((ref == ours).sum())}; robust for the reference only: "
            f"{int((ref & ~ours).sum())}, for sat_tf only: {int((ours & ~ref).sum())}."
        )
    return "\n".join(lines)


def _set_backend(side, threads):
    """KERAS_BACKEND for `side` (the reference runs under torch) and one CPU thread pool size,
    before Keras or a framework is imported."""
    os.environ["KERAS_BACKEND"] = "torch" if side == "reference" else side
    if side == "jax":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
        ).strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Keras classifier (.keras) of 32x32 pixels in [0, 255]")
    parser.add_argument("--out", required=True, help="JSON results file (resumed if present)")
    parser.add_argument("--per-class", type=int, default=100, help="test images per class")
    parser.add_argument("--chunk", type=int, default=250, help="images per resumable chunk")
    parser.add_argument("--epsilon", type=float, default=8.0, help="L-inf radius in pixels")
    parser.add_argument("--side", choices=SIDES, help="the code (and Keras backend) to run")
    parser.add_argument(
        "--attacks", default="", help="comma-separated stages (e.g. fab-t); default: standard"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the framework")
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    parser.add_argument("--cache-dir", default="/tmp/sat_tf_cache")
    parser.add_argument("--report", action="store_true", help="print the tables and exit")
    args = parser.parse_args(argv)
    attacks = tuple(args.attacks.split(",")) if args.attacks else None
    if args.report:
        print(report(_load(args.out)))
        return
    if not args.model or not args.side:
        parser.error("--model and --side are needed to run (or --report)")
    _set_backend(args.side, args.threads)
    import keras

    if args.side == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    model = keras.saving.load_model(args.model)
    x, y = cifar10_test_images(args.per_class, args.cache_dir, args.data)
    run = run_reference if args.side == "reference" else run_ours
    for start in range(0, len(y), args.chunk):
        key = str(start)
        if args.side in _load(args.out)["chunks"].get(key, {}):
            continue
        rows = slice(start, start + args.chunk)
        wall, cpu = time.time(), time.process_time()
        robust, counts, stage_cpu = run(model, x[rows], y[rows], args.epsilon, attacks)
        wall, cpu = time.time() - wall, time.process_time() - cpu
        with open(args.out + ".lock", "w") as lock:  # other sides may write too
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = _load(args.out)
            data.update(model=args.model, epsilon=args.epsilon, attacks=attacks)
            data["chunks"].setdefault(key, {})[args.side] = dict(
                robust=[bool(r) for r in robust],
                counts=counts,
                stage_cpu={k: round(v, 2) for k, v in stage_cpu.items()},
                cpu=round(cpu, 2),
                wall=round(wall, 2),
                threads=args.threads,
                versions={"keras": keras.__version__, "backend": keras.backend.backend()},
            )
            _save(args.out, data)
        print(f"{args.side} images {start}-{start + len(robust)}: {counts}", flush=True)
    print(report(_load(args.out)))


if __name__ == "__main__":
    main()
