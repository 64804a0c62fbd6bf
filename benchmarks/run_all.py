"""Runs every benchmark and rewrites the results block of benchmarks/README.md (`make bench`).

Sections (each figure a ratio measured side by side in this run; absolute times are context):
  1. PGD-1 train step / clean train step (ResNet-20 32 px, ResNet-50 224 px); PGD-K, K=1,2,3,5.
  2. Smooth activations / ReLU (fused, and unfused from `unfused.py`) at batch 32 and 128 and
     on ResNet-50, PGD-1 / clean per activation, and a per-layer profile.
  3. Peers: `AdversarialModel.fit` vs ART's PGD adversarial trainer; attacks vs ART, CleverHans.
  4. Input pipeline images/s / ResNet-50 PGD-1 step images/s.
  5. Scaling: batch size, replicas (MirroredStrategy, 2 local workers), image size; GPU rows.

    python benchmarks/run_all.py                 # everything (the header gives the run time)
    python benchmarks/run_all.py --repeats 9 --large-repeats 5 --peer-repeats 5   # longer
    python benchmarks/run_all.py --sections 1 2 --no-write                      # print only

The text between the markers in README.md is replaced; everything outside is kept.
"""

import argparse
import os
import pathlib
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402


def _two_logical_cpus():
    # Before the runtime starts: MirroredStrategy over 2 logical CPU devices (section 5).
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


_two_logical_cpus()

import bench_activations  # noqa: E402
import bench_determinism  # noqa: E402
import bench_overhead  # noqa: E402
import bench_peers  # noqa: E402
import bench_scaling  # noqa: E402
import bench_workers  # noqa: E402
import common  # noqa: E402

README = pathlib.Path(__file__).with_name("README.md")
GPU_COMMAND = "python benchmarks/run_all.py --sections 5 --gpu-only --no-write"


def log(message, start=[time.perf_counter()]):  # noqa: B006 - the run's start time.
    print(f"[bench {time.perf_counter() - start[0]:6.0f}s] {message}", file=sys.stderr, flush=True)


def section_1_and_4(args, cache):
    extra, pulls = None, []
    if 4 in args.sections and not args.skip_large:
        log("building the Imagenette TFRecords (once, cached)")
        pull = bench_scaling.pipeline_candidate(args)
        extra = {"pipeline": bench_scaling.timed_pulls(pull, pulls)}
    log("section 1: adversarial / clean train step")
    results, text = bench_overhead.overhead(args, cache, extra)
    if 1 in args.sections:
        log("section 1: the cost of --deterministic (child processes)")
        text += "\n\n" + bench_determinism.determinism_cost(args)[1]
    parts = [("1. Adversarial training overhead", text)]
    if extra:
        section_4 = bench_scaling.pipeline_text(args, results["resnet50"], pulls)
        parts.append(("4. Input pipeline against the ResNet-50 PGD-1 step", section_4))
    return parts


def section_5(args, cache):
    parts = []
    if not args.gpu_only:
        log("section 5: batch size")
        _, batch_text = bench_scaling.batch_scaling(args, cache)
        log("section 5: image size")
        _, image_text = bench_scaling.image_scaling(args, cache)
        log("section 5: replicas (MirroredStrategy)")
        _, mirrored = bench_scaling.replica_scaling(args)
        log("section 5: 2 local workers (subprocesses)")
        _, workers = bench_workers.multi_worker_scaling(args)
        header = (
            f"resnet20 PGD-1, global batch {args.small_batch_size}",
            "1: step ms",
            "2: step ms",
            "2 / 1 wall",
            "CPU (all processes)",
        )
        replicas = common.table(header, [r for r in (mirrored, workers) if isinstance(r, tuple)])
        note = REPLICA_NOTE.format(
            cpus=os.cpu_count(),
            rounds=args.worker_rounds,
            epochs=f"epochs 2-{args.worker_epochs}" if args.worker_epochs > 2 else "epoch 2",
            steps=args.worker_steps,
        )
        text = "\n\n".join((batch_text, image_text, replicas, note))
        parts.append(("5. Scaling", text))
    if _gpu_rows(args):
        log("section 5: GPU rows")
        parts.append(("5. Scaling on a GPU", bench_scaling.gpu_rows(args)[1]))
    else:
        parts.append(("5. Scaling on a GPU", NO_GPU.format(command=GPU_COMMAND)))
    return parts


REPLICA_NOTE = (
    "Every replica and worker here shares this machine's {cpus} logical CPUs (each worker "
    "process also starts its own thread pools), so there is no extra hardware to gain from: "
    "2 / 1 above 1.0 is what distribution costs (per-replica dispatch, all-reduce, gRPC "
    "collectives between worker processes); below 1.0, two concurrent replicas keep the cores "
    "busier than one replica's intra-op parallelism does. The CPU column sums all processes. "
    "The `distribute.train` row: {rounds} rounds of fresh processes (1 process, then the 2 "
    "workers), each timing {epochs} of {steps} steps."
)
NO_GPU = (
    "This machine has no GPU, so the GPU rows (ResNet-50, 224 px, batch 128, mixed_float16: "
    "images/s and PGD-1 / clean) are not filled in. They need a machine with a GPU and "
    "TensorFlow's GPU build (`pip install .[gpu]`): `make bench` there adds them, and "
    "`{command}` prints them alone."
)


def _gpu_rows(args):
    """Whether section 5 runs its mixed-precision GPU rows."""
    return bool(tf.config.list_physical_devices("GPU") or args.gpu_only)


def header(args, seconds, info):
    command = "make bench" if args.from_make else "python " + shlex.join(sys.argv)
    return "\n".join(
        [
            f"Generated by `{command}` on {info['date']} in {seconds / 60:.1f} min "
            f"(commit {info['commit']}).",
            "",
            f"- Machine: {info['cpu']}; GPU: {info['gpu']}; load average (1/5/15 min) at the "
            f"end: {info['load']}.",
            f"- Versions: {info['versions']}.",
            f"- Method: candidates timed in turn (A B A B ..., the order rotated each round), "
            f"1 untimed warm-up round, then "
            f"{args.repeats} rounds ({args.large_repeats} for ResNet-50, {args.peer_repeats} "
            f"for peers); each ratio is the median of the per-round ratios, for wall time and "
            f"for this process's CPU time (all threads). **Bold** = the headline ratio: wall time, "
            f"except in section 2 and the `--deterministic` row, where it is CPU time (their "
            f"headers say so); 'range' = lowest-highest per-round wall ratio.",
            (
                "- float32 throughout, except the GPU rows (mixed_float16)."
                if 5 in args.sections and _gpu_rows(args)
                else "- float32 throughout: the float32 upcast in Softplus/GELU/Mish/SmoothReLU "
                "for float16/bfloat16 inputs does not run and costs nothing."
            ),
        ]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, nargs="+", default=(1, 2, 3, 4, 5))
    parser.add_argument("--no-write", action="store_true", help="print, do not edit README")
    parser.add_argument(
        "--gpu-only", action="store_true", help="section 5: only the mixed-precision GPU rows"
    )
    parser.add_argument("--from-make", action="store_true", help=argparse.SUPPRESS)
    bench_overhead.add_arguments(parser)
    bench_activations.add_arguments(parser)
    bench_determinism.add_arguments(parser)
    bench_peers.add_arguments(parser)
    bench_scaling.add_arguments(parser)
    bench_workers.add_arguments(parser)
    args = parser.parse_args()
    start = time.perf_counter()
    cache = common.StepCache()
    parts = []
    if 1 in args.sections or 4 in args.sections:
        parts += section_1_and_4(args, cache)
    if 2 in args.sections:
        log("section 2: activations")
        parts.append(
            (
                "2. Smooth activations against ReLU",
                bench_activations.activation_cost(args, cache)[1],
            )
        )
    if 3 in args.sections:
        log("section 3: peers (ART, CleverHans)")
        parts.append(("3. Against ART and CleverHans", bench_peers.peers(args)[1]))
    if 5 in args.sections:
        parts += section_5(args, cache)
    parts.sort(key=lambda part: part[0])
    info = common.machine_info()
    body = header(args, time.perf_counter() - start, info)
    body += "".join(f"\n\n### {title}\n\n{text}" for title, text in parts)
    print(body)
    if not args.no_write:
        common.rewrite_between_markers(README, body)
        log(f"wrote {README}")


if __name__ == "__main__":
    main()
