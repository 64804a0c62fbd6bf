"""Train-step cost of adversarial training, of smooth activations, and of the custom loop.

Same model and batch for every row, in one process:
  * clean:      the plain classifier, Keras's own train_step (`fit`);
  * pgd1:       `AdversarialModel` with PGD-1 (the paper's training attack), `fit`;
  * pgd1_silu:  the same with SiLU instead of ReLU, `fit`;
  * pgd1_loop:  the ReLU pgd1 model trained by `sat_tf.distribute.train` (default strategy).
Goals (issue 5): pgd1 / clean <= 1.7; pgd1_silu / pgd1 <= 1.10; pgd1_loop / pgd1 <= 1.05.

Each timing is the second epoch of a 2-epoch call (the first absorbs tracing and iterator
start-up); configurations are interleaved round by round, so drifting machine load hits all
of them alike, and the median over rounds is reported. Run:

    python benchmarks/train_step.py --model resnet20 --batch-size 64 --steps 8 --rounds 5

Prints a Markdown table; the numbers in benchmarks/README.md come from this script.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402 - benchmarks/common.py: shared timing, models, machine info.
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from sat_tf import distribute  # noqa: E402

NUM_CLASSES = common.NUM_CLASSES


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock and process CPU seconds of each epoch."""

    def __init__(self):
        super().__init__()
        self.wall, self.cpu = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = common.clock()

    def on_epoch_end(self, epoch, logs=None):
        wall, cpu = common.elapsed(self._start)
        self.wall.append(wall)
        self.cpu.append(cpu)


def dataset_fn_for(args):
    rng = np.random.default_rng(0)
    shape = (4 * args.batch_size, args.image_size, args.image_size, 3)
    images = rng.uniform(0, 255, shape).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, shape[0]).astype("int32")

    def dataset_fn(context):
        batch = context.get_per_replica_batch_size(args.batch_size)
        dataset = tf.data.Dataset.from_tensor_slices((images, labels)).cache().repeat()
        return dataset.batch(batch, drop_remainder=True).prefetch(2)

    return dataset_fn


def build(args, activation, adversarial):
    # The paper's training attack: PGD-1, epsilon = step = 4 pixels (common.build_model).
    return common.build_model(
        args.model,
        image_size=args.image_size,
        activation=activation,
        num_steps=1 if adversarial else 0,
    )


def time_step(model, runner, dataset_fn, steps):
    """(wall, CPU) seconds per step: the second epoch of a 2-epoch run."""
    timer = EpochTimer()
    if runner == "fit":
        dataset = dataset_fn(tf.distribute.InputContext())
        model.fit(dataset, epochs=2, steps_per_epoch=steps, callbacks=[timer], verbose=0)
    else:
        distribute.train(
            model,
            dataset_fn,
            strategy=tf.distribute.get_strategy(),
            epochs=2,
            steps_per_epoch=steps,
            callbacks=[timer],
        )
    return timer.wall[-1] / steps, timer.cpu[-1] / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    dataset_fn = dataset_fn_for(args)
    configs = {
        "clean": (build(args, "relu", adversarial=False), "fit"),
        "pgd1": (build(args, "relu", adversarial=True), "fit"),
        "pgd1_silu": (build(args, "silu", adversarial=True), "fit"),
        "pgd1_loop": (build(args, "relu", adversarial=True), "loop"),
    }
    times = {name: [] for name in configs}
    for round_index in range(args.rounds + 1):  # Round 0 warms every configuration up.
        for name, (model, runner) in configs.items():
            seconds = time_step(model, runner, dataset_fn, args.steps)
            if round_index:
                times[name].append(seconds)
    report(args, {name: np.array(values) for name, values in times.items()})


def report(args, times):
    """Markdown tables: per-step times, and the ratios by three estimators.

    On a shared machine other jobs only ever add time, so the minimum wall time and the
    process CPU time are steadier than the median wall time; all three are shown.
    """
    print(
        f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
        f"{args.steps} steps x {args.rounds} rounds; {common.machine_line()}\n"
    )
    estimators = {
        "median wall": lambda t: np.median(t[:, 0]),
        "min wall": lambda t: np.min(t[:, 0]),
        "median CPU": lambda t: np.median(t[:, 1]),
    }
    print("| step | " + " | ".join(f"{e} ms" for e in estimators) + " |")
    print("|---|" + "---|" * len(estimators))
    for name, t in times.items():
        cells = " | ".join(f"{1e3 * f(t):.1f}" for f in estimators.values())
        print(f"| {name} | {cells} |")
    print("\n| ratio | " + " | ".join(estimators) + " | goal |")
    print("|---|" + "---|" * (len(estimators) + 1))
    for label, top, bottom, goal in (
        ("PGD-1 adversarial / clean", "pgd1", "clean", 1.7),
        ("SiLU / ReLU (PGD-1)", "pgd1_silu", "pgd1", 1.10),
        ("custom loop / fit (PGD-1)", "pgd1_loop", "pgd1", 1.05),
    ):
        cells = " | ".join(f"{f(times[top]) / f(times[bottom]):.3f}" for f in estimators.values())
        print(f"| {label} | {cells} | <= {goal} |")


if __name__ == "__main__":
    main()
