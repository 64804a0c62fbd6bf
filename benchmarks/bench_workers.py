"""Section 5 of `make bench`, multi-worker row: `sat_tf.distribute.train` over 2 local workers.

The driver launches, in turn (A B A B ...), one process with the default strategy and a
2-worker cluster (TF_CONFIG, MultiWorkerMirroredStrategy, one subprocess per worker), all at
the same global batch; each process times epochs 2.. of `distribute.train` and writes them
to JSON. `--worker` is the subprocess entry; `run_all.py` calls `multi_worker_scaling`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common
import keras
import numpy as np

from sat_tf import distribute


def _launch(args, workers, out_dir):
    """Runs one process (workers=1, default strategy) or a 2-worker cluster; returns results."""
    hosts = distribute.local_hosts(workers)
    processes = []
    for index in range(workers):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
        if workers > 1:
            env["TF_CONFIG"] = json.dumps(
                {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
            )
        out = os.path.join(out_dir, f"w{workers}_{index}_{time.monotonic_ns()}.json")
        command = [
            sys.executable,
            __file__,
            "--worker",
            out,
            "--strategy",
            "multi_worker" if workers > 1 else "default",
            "--small-batch-size",
            str(args.small_batch_size),
            "--small-image-size",
            str(args.small_image_size),
            "--worker-steps",
            str(args.worker_steps),
            "--worker-epochs",
            str(args.worker_epochs),
        ]
        processes.append(
            (subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True), out)
        )
    results = []
    for process, out in processes:
        _, stderr = process.communicate(timeout=args.worker_timeout)
        if process.returncode:
            raise RuntimeError(f"worker failed: {stderr[-2000:]}")
        with open(out) as f:
            results.append(json.load(f))
    # Per step: the chief's wall time, and the CPU time of all the workers together.
    wall = float(np.median(results[0]["wall"]))
    cpu = float(np.median(np.sum([r["cpu"] for r in results], axis=0)))
    return wall, cpu


def multi_worker_scaling(args):
    """`distribute.train` with 2 local workers / 1 process, same global batch, ABAB."""
    samples = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as out_dir:
        for _ in range(args.worker_rounds):
            for workers in (1, 2):
                samples[workers].append(_launch(args, workers, out_dir))
    samples = {k: np.array(v) for k, v in samples.items()}
    wall, cpu = common.ratio(samples[2], samples[1])
    row = (
        "`distribute.train`, 2 local workers (TF_CONFIG) / 1 process",
        f"{common.median_ms(samples[1])[0]:.0f}",
        f"{common.median_ms(samples[2])[0]:.0f}",
        f"{wall:.2f}",
        f"{cpu:.2f}",
    )
    return samples, row


def worker_main(args):
    """Subprocess: time epochs 2.. of `distribute.train`, write per-step (wall, CPU) lists."""
    strategy = distribute.get_strategy(args.strategy)
    size, batch = args.small_image_size, args.small_batch_size
    images, labels = (t.numpy() for t in common.random_batch(batch, size))
    with strategy.scope():
        model = common.build_model("resnet20", image_size=size, num_steps=1)

    dataset_fn = common.repeating_dataset_fn(images, labels, batch)

    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = common.clock()

        def on_epoch_end(self, epoch, logs=None):
            times.append(common.elapsed(self.start, args.worker_steps))

    distribute.train(
        model,
        dataset_fn,
        strategy=strategy,
        epochs=args.worker_epochs,
        steps_per_epoch=args.worker_steps,
        callbacks=[Timer()],
    )
    times = np.array(times[1:])  # Epoch 1 traces the step.
    with open(args.worker, "w") as f:
        json.dump({"wall": times[:, 0].tolist(), "cpu": times[:, 1].tolist()}, f)


def add_arguments(parser):
    parser.add_argument("--worker-rounds", type=int, default=2, help="ABAB rounds of processes")
    parser.add_argument("--worker-steps", type=int, default=4)
    parser.add_argument("--worker-epochs", type=int, default=3, help="the first is not timed")
    parser.add_argument("--worker-timeout", type=int, default=600)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="output JSON path")
    parser.add_argument("--strategy", default="default")
    parser.add_argument("--small-batch-size", type=int, default=32)
    parser.add_argument("--small-image-size", type=int, default=32)
    add_arguments(parser)
    worker_main(parser.parse_args())
