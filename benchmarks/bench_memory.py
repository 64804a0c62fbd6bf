"""Peak memory of `tools/eval.py` against --num_examples: 1,000 vs 20,000 ImageNet-size examples.

An evaluation reads its examples a chunk at a time (`sat_tf.examples`, `--chunk_size`, default 8
batches), so its peak resident memory should not grow with --num_examples. This script checks
that on real-sized data. It writes synthetic ImageNet-format TFRecords once into `--work_dir`:
224 x 224 JPEGs of smooth random images (13 KiB each; Imagenette's 224-px ImageNet photos average
10 KiB), 1-based labels, every key that tools/build_tfrecords.py writes, through the same
`sat_tf.data.tfrecord.to_example`, under its shard names. It saves a small classifier
(`small_cnn`, width 4, 224 px, 1,000 classes), then runs the same `tools/eval.py` command (clean
+ PGD-1 at 4 pixels, batch 32) for each --num_examples, each in a fresh process, and reports the
process's peak RSS (its `ru_maxrss`, from `os.wait4`) and wall time (start-up included). With
`--before=REV`, the same commands also run against a checkout of REV (a temporary `git
worktree`, removed afterwards), e.g. the commit before chunked reading.

The classifier's output bias favours class 0, and 1 example in `CORRECT_EVERY` has that label:
those are classified correctly and go on to the attacks (PGD-1, and the PGD-20 at 128 pixels of
the masking checks), the same share at every size. A random classifier would get ~0.1% right,
and the attacks would barely run.

    python benchmarks/bench_memory.py --work_dir=/tmp/sat_tf_bench_memory
    python benchmarks/bench_memory.py --work_dir=/tmp/sat_tf_bench_memory \
        --before=f7e5a01 --before_examples 1000 5000
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import common
import keras
import numpy as np
import tensorflow as tf

from sat_tf import atomic, models
from sat_tf.data import tfrecord

ROOT = pathlib.Path(__file__).resolve().parents[1]

SPLIT = "validation"
NUM_CLASSES = 1000
CORRECT_EVERY = 50  # 1 example in 50 is classified correctly and attacked
MIB = 1 << 20


def smooth_images(rng, count, image_size):
    """uint8 [count, size, size, 3]: smooth random images with some texture, so that their JPEGs
    are about the size of a real photo's at that resolution (not of flat colour or of noise)."""
    size = (image_size, image_size)
    coarse = rng.uniform(0, 255, (count, 6, 6, 3)).astype(np.float32)
    detail = 30 * rng.standard_normal((count, image_size // 8, image_size // 8, 3), np.float32)
    grain = 4 * rng.standard_normal((count, *size, 3), np.float32)
    image = tf.image.resize(coarse, size, "bicubic") + tf.image.resize(detail, size) + grain
    return np.clip(image.numpy(), 0, 255).astype(np.uint8)


def label_of(index):
    """The 1-based label of example `index`: 1 (class 0, the model's answer) every
    `CORRECT_EVERY` examples, another class otherwise."""
    if index % CORRECT_EVERY == 0:
        return 1
    return 2 + index % (NUM_CLASSES - 1)


def write_records(folder, num_examples, *, image_size, num_shards=8, seed=0):
    """Writes `num_examples` records into `folder`/validation-*-of-* and validation.json (the
    counts `sat_tf.data.load("tfrecord:<folder>")` reads), unless as many or more of that size
    are there already.

    Returns:
        The folder.
    """
    folder = pathlib.Path(folder)
    made = {"num_examples": num_examples, "image_size": image_size, "num_shards": num_shards}
    marker = folder / "bench_memory.json"
    if marker.exists():
        found = json.loads(marker.read_text())
        if found["num_examples"] >= num_examples and found["image_size"] == image_size:
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # written again only once every shard is
    for old in folder.glob(f"{SPLIT}-*"):
        old.unlink()
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, num_examples, num_shards + 1).astype(int)
    for shard, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        path = folder / f"{SPLIT}-{shard:05d}-of-{num_shards:05d}"  # as tools/build_tfrecords.py
        with atomic.atomic_path(path) as partial, tf.io.TFRecordWriter(str(partial)) as writer:
            for example in _examples(rng, begin, end, image_size):
                writer.write(example.SerializeToString())
    info = {"num_examples": num_examples, "num_classes": NUM_CLASSES, "label_offset": 1}
    atomic.atomic_write(str(folder / f"{SPLIT}.json"), json.dumps(info, indent=1))
    atomic.atomic_write(str(marker), json.dumps(made))
    return folder


def _examples(rng, begin, end, image_size, block=256):
    for start in range(begin, end, block):
        images = smooth_images(rng, min(block, end - start), image_size)
        for offset, image in enumerate(images):
            index = start + offset
            yield tfrecord.to_example(
                {
                    "image/encoded": tf.io.encode_jpeg(image, quality=90).numpy(),
                    "image/format": b"JPEG",
                    "image/height": image_size,
                    "image/width": image_size,
                    "image/class/label": label_of(index),
                    "image/class/synset": b"n00000000",
                    "image/filename": f"{index}.JPEG".encode(),
                }
            )


def save_model(path, *, image_size, width=4):
    """Saves `small_cnn` (`width`, SiLU) for `image_size` px whose output bias makes class 0
    its answer for every image; returns the path."""
    keras.utils.set_random_seed(0)
    model = models.build(
        "small_cnn", num_classes=NUM_CLASSES, input_shape=(image_size, image_size, 3), width=width
    )
    dense = model.layers[-1]
    # Logits of this initialisation are ~0.1 apart; 10 more for class 0 survives PGD at 4 px.
    dense.bias.assign(np.eye(NUM_CLASSES, dtype=np.float32)[0] * 10.0)
    model.save(path)
    return path


def eval_command(
    checkout, data_dir, model_path, output_dir, *, num_examples, batch_size, image_size
):
    """The `tools/eval.py` command of one measurement (flags the checkout before chunked
    reading knows too): clean + PGD-1 at 4 pixels."""
    return [
        sys.executable,
        str(pathlib.Path(checkout) / "tools" / "eval.py"),
        f"--model_path={model_path}",
        f"--dataset=tfrecord:{data_dir}",
        f"--eval_split={SPLIT}",
        f"--image_size={image_size}",
        f"--output_dir={output_dir}",
        f"--num_examples={num_examples}",
        f"--batch_size={batch_size}",
        "--num_steps=1",
        "--epsilons=4",
        "--noprogress",
    ]


def peak_rss(command, *, cwd, log_path):
    """Runs `command` in a fresh process; returns (its peak RSS in bytes, wall seconds).

    The peak is the child's own `ru_maxrss` (from `os.wait4` on it alone, so earlier
    measurements in this process do not mix in). Output goes to `log_path`.

    Raises:
        RuntimeError: naming the log, when the command fails.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
    env["PYTHONPATH"] = str(cwd)  # that checkout's sat_tf, not the installed one
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{command[1]} exited with {process.returncode}; see {log_path}")
    # Linux reports kibibytes, macOS bytes.
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024), seconds


def model_path(work_dir, image_size):
    return pathlib.Path(work_dir) / f"model-{image_size}px.keras"


def measure(checkout, work_dir, sizes, *, batch_size, image_size, label):
    """Peak RSS and time of one `tools/eval.py` run per size in `sizes`, on `checkout`."""
    rows = []
    for n in sizes:
        output = pathlib.Path(work_dir) / f"eval-{label.replace(' ', '-')}-{n}"
        shutil.rmtree(output, ignore_errors=True)
        command = eval_command(
            checkout,
            pathlib.Path(work_dir) / "records",
            model_path(work_dir, image_size),
            output,
            num_examples=n,
            batch_size=batch_size,
            image_size=image_size,
        )
        rss, seconds = peak_rss(command, cwd=checkout, log_path=f"{output}.log")
        print(f"[bench_memory] {label} {n}: {rss / MIB:.0f} MiB, {seconds:.1f} s", flush=True)
        rows.append({"checkout": label, "examples": n, "rss": rss, "seconds": seconds})
    return rows


def report(rows):
    """Markdown: one row per run, and per checkout the growth from its smallest run."""
    out = [
        (r["checkout"], f"{r['examples']:,}", f"{r['rss'] / MIB:.0f}", f"{r['seconds']:.1f}")
        + (f"{1e3 * r['seconds'] / r['examples']:.2f}",)
        for r in rows
    ]
    header = ("code", "examples", "peak RSS (MiB)", "seconds", "ms/example")
    lines = [common.table(header, out), ""]
    for label in dict.fromkeys(r["checkout"] for r in rows):
        mine = sorted((r for r in rows if r["checkout"] == label), key=lambda r: r["examples"])
        small, large = mine[0], mine[-1]
        extra = large["examples"] - small["examples"]
        if not extra:
            continue
        growth = (large["rss"] - small["rss"]) / MIB
        marginal = 1e3 * (large["seconds"] - small["seconds"]) / extra
        lines.append(
            f"- {label}: peak RSS at {large['examples']:,} / at {small['examples']:,} = "
            f"**{large['rss'] / small['rss']:.3f}** ({growth:+.0f} MiB; goal <= 1.10: "
            f"{common.verdict([large['rss'] / small['rss']], 1.10, names=('RSS',))}); "
            f"{marginal:.2f} ms per extra example."
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="/tmp/sat_tf_bench_memory")
    parser.add_argument("--num_examples", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--before", default="", help="also measure this git revision")
    parser.add_argument("--before_examples", type=int, nargs="+", default=[1000, 5000])
    args = parser.parse_args()
    work = pathlib.Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_records(work / "records", max(args.num_examples), image_size=args.image_size)
    if not model_path(work, args.image_size).exists():
        save_model(model_path(work, args.image_size), image_size=args.image_size)
    count = json.loads((work / "records" / f"{SPLIT}.json").read_text())["num_examples"]
    size = sum(f.stat().st_size for f in (work / "records").glob(f"{SPLIT}-*")) / count
    print(
        f"[bench_memory] {count:,} records ready ({size / 1024:.1f} KiB each) after "
        f"{time.perf_counter() - start:.0f} s",
        flush=True,
    )
    kwargs = dict(batch_size=args.batch_size, image_size=args.image_size)
    rows = measure(ROOT, work, args.num_examples, **kwargs, label="this checkout")
    if args.before:
        tree = work / f"before-{args.before}"
        remove = ["git", "worktree", "remove", "--force", str(tree)]
        subprocess.run(remove, cwd=ROOT, capture_output=True)  # a leftover of a killed run
        git = ["git", "worktree", "add", "--detach", str(tree), args.before]
        subprocess.run(git, cwd=ROOT, check=True, capture_output=True)
        try:
            rows += measure(tree, work, args.before_examples, **kwargs, label=args.before)
        finally:
            subprocess.run(remove, cwd=ROOT, check=True, capture_output=True)
    print(f"\n{common.machine_line()}; {time.perf_counter() - start:.0f} s in all\n")
    print(report(rows))


if __name__ == "__main__":
    main()
