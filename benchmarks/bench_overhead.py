"""Section 1 of `make bench`: adversarial-training overhead.

PGD-1 train step / clean train step (ResNet-20 at 32 px, ResNet-50 at 224 px), and the step
time of PGD-K for K = 1, 2, 3, 5 with a least-squares line through it. Section 2 (smooth
activations) is `bench_activations.py`.

Run alone: python benchmarks/bench_overhead.py [--repeats 5]. `run_all.py` calls these.

With `--fit`, the same costs through whole training epochs instead of one compiled step, plus the
custom loop of `sat_tf.distribute` against `fit` (`fit_and_loop`, "Train step overhead" in
benchmarks/README.md):

    python benchmarks/bench_overhead.py --fit --fit-batch-size 32 --fit-steps 4 --fit-rounds 8
"""

import argparse

import common
import keras
import numpy as np
import tensorflow as tf

from sat_tf import distribute


def _models(args):
    return {
        "resnet20": (args.small_image_size, args.small_batch_size),
        "resnet50": (args.large_image_size, args.large_batch_size),
    }


def overhead(args, cache, extra=None):
    """PGD-1 / clean for each model, and PGD-K linearity on the small one.

    `extra`: {name: callable} timed in the same rounds as the ResNet-50 steps (the input
    pipeline of section 4, so that its ratio is side by side too).

    Returns:
        (results, Markdown).
    """
    results, rows = {}, []
    for name, (size, batch) in _models(args).items():
        if name == "resnet50" and args.skip_large:
            continue
        candidates = {
            "clean": cache.step(name, size, batch),
            "pgd1": cache.step(name, size, batch, num_steps=1),
        }
        if name == "resnet50" and extra:
            candidates.update(extra)
        repeats = args.large_repeats if name == "resnet50" else args.repeats
        samples = common.interleave(candidates, repeats=repeats)
        results[name] = samples
        wall, cpu = common.ratio(samples["pgd1"], samples["clean"])
        ms = common.median_ms(samples["clean"])[0], common.median_ms(samples["pgd1"])[0]
        rows.append(
            (
                f"{name}, {size} px, batch {batch}",
                f"{ms[0]:.0f} / {ms[1]:.0f}",
                f"**{wall:.2f}**",
                common.spread(samples["pgd1"], samples["clean"]),
                f"{cpu:.2f}",
                common.goal_cell(common.GOAL_PGD1_OVER_CLEAN, (wall, cpu)),
            )
        )
    text = common.table(
        ("model", "clean / PGD-1 ms (median wall)", "PGD-1/clean wall", "range", "CPU", "goal"),
        rows,
    )
    k_text, k_results = pgd_k(args, cache)
    results["pgd_k"] = k_results
    return results, text + "\n\n" + k_text


def pgd_k(args, cache):
    size, batch = args.small_image_size, args.small_batch_size
    ks = (1, 2, 3, 5)
    candidates = {"clean": cache.step("resnet20", size, batch)}
    candidates.update({f"pgd{k}": cache.step("resnet20", size, batch, num_steps=k) for k in ks})
    samples = common.interleave(candidates, repeats=args.repeats)
    rel = {k: common.ratio(samples[f"pgd{k}"], samples["clean"]) for k in ks}
    slope, intercept, r2 = common.linear_fit(ks, [rel[k][0] for k in ks])
    slope_c, _, r2_c = common.linear_fit(ks, [rel[k][1] for k in ks])
    rows = [
        (
            f"PGD-{k}",
            f"{common.median_ms(samples[f'pgd{k}'])[0]:.0f}",
            f"{rel[k][0]:.2f}",
            common.spread(samples[f"pgd{k}"], samples["clean"]),
            f"{rel[k][1]:.2f}",
        )
        for k in ks
    ]
    text = common.table(
        ("resnet20 step", "median wall ms", "/ clean wall", "range", "/ clean CPU"), rows
    )
    text += (
        f"\n\nLeast squares over K (in units of one clean step): each extra attack step adds "
        f"**{slope:.3f}** (wall; CPU {slope_c:.3f}), intercept {intercept:.2f}, "
        f"R^2 = **{r2:.3f}** (CPU {r2_c:.3f}). "
        + ("Linear in K." if min(r2, r2_c) >= 0.95 else "**Not clearly linear (R^2 < 0.95).**")
    )
    return text, {"samples": samples, "slope": slope, "r2": r2, "slope_cpu": slope_c}


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


def _epoch_step_time(model, runner, dataset_fn, steps):
    """(wall, CPU) seconds per step: the second epoch of a 2-epoch run (the first traces)."""
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


def fit_and_loop(args):
    """Per-step times of whole epochs: clean and PGD-1 `fit`, SiLU PGD-1 `fit`, PGD-1 through
    `distribute.train` (default strategy); same model and in-memory batches, one process.

    Configurations run in turn, round by round, after a warm-up round.

    Returns:
        {name: array (rounds, 2)} of (wall, CPU) seconds per step.
    """
    size, batch = args.fit_image_size, args.fit_batch_size
    images, labels = common.synthetic_data(4 * batch, size)
    dataset_fn = common.repeating_dataset_fn(images, labels, batch)

    def build(activation, num_steps):  # the paper's training attack (common.build_model)
        return common.build_model(
            args.fit_model, image_size=size, activation=activation, num_steps=num_steps
        )

    configs = {
        "clean": (build("relu", 0), "fit"),
        "pgd1": (build("relu", 1), "fit"),
        "pgd1_silu": (build("silu", 1), "fit"),
        "pgd1_loop": (build("relu", 1), "loop"),
    }
    times = {name: [] for name in configs}
    for round_index in range(args.fit_rounds + 1):  # Round 0 warms every configuration up.
        for name, (model, runner) in configs.items():
            seconds = _epoch_step_time(model, runner, dataset_fn, args.fit_steps)
            if round_index:
                times[name].append(seconds)
    return {name: np.array(values) for name, values in times.items()}


def fit_and_loop_text(args, times):
    """Markdown tables: per-step times, and the ratios by three estimators.

    On a shared machine other jobs only ever add time, so the minimum wall time and the
    process CPU time are steadier than the median wall time; all three are shown.
    """
    lines = [
        f"{args.fit_model}, batch {args.fit_batch_size}, {args.fit_image_size}x"
        f"{args.fit_image_size}, {args.fit_steps} steps x {args.fit_rounds} rounds; "
        f"{common.machine_line()}\n"
    ]
    estimators = {
        "median wall": lambda t: np.median(t[:, 0]),
        "min wall": lambda t: np.min(t[:, 0]),
        "median CPU": lambda t: np.median(t[:, 1]),
    }
    lines.append("| step | " + " | ".join(f"{e} ms" for e in estimators) + " |")
    lines.append("|---|" + "---|" * len(estimators))
    for name, t in times.items():
        cells = " | ".join(f"{1e3 * f(t):.1f}" for f in estimators.values())
        lines.append(f"| {name} | {cells} |")
    lines.append("\n| ratio | " + " | ".join(estimators) + " | goal |")
    lines.append("|---|" + "---|" * (len(estimators) + 1))
    for label, top, bottom, goal in (
        ("PGD-1 adversarial / clean", "pgd1", "clean", common.GOAL_PGD1_OVER_CLEAN),
        ("SiLU / ReLU (PGD-1)", "pgd1_silu", "pgd1", common.GOAL_SMOOTH_OVER_RELU),
        ("custom loop / fit (PGD-1)", "pgd1_loop", "pgd1", common.GOAL_LOOP_OVER_FIT),
    ):
        values = [f(times[top]) / f(times[bottom]) for f in estimators.values()]
        cells = " | ".join(f"{v:.3f}" for v in values)
        judged = common.goal_cell(goal, values, digits=3, names=tuple(estimators))
        lines.append(f"| {label} | {cells} | {judged} |")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (after 1 warm-up)")
    parser.add_argument("--large-repeats", type=int, default=4, help="rounds for ResNet-50")
    parser.add_argument("--small-image-size", type=int, default=32)
    parser.add_argument("--small-batch-size", type=int, default=32)
    parser.add_argument("--large-image-size", type=int, default=224)
    parser.add_argument("--large-batch-size", type=int, default=8)
    parser.add_argument("--skip-large", action="store_true", help="no ResNet-50 rows")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--fit", action="store_true", help="whole epochs: fit and custom loop")
    parser.add_argument("--fit-model", default="resnet20")
    parser.add_argument("--fit-batch-size", type=int, default=64)
    parser.add_argument("--fit-image-size", type=int, default=32)
    parser.add_argument("--fit-steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--fit-rounds", type=int, default=5)
    args = parser.parse_args()
    if args.fit:
        print(fit_and_loop_text(args, fit_and_loop(args)))
        return
    cache = common.StepCache()
    print(common.machine_line() + "\n")
    print(overhead(args, cache)[1])


if __name__ == "__main__":
    main()
