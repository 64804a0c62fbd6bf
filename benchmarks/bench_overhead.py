"""Sections 1-2 of `make bench`: adversarial-training overhead and the cost of smooth activations.

1. PGD-1 train step / clean train step (ResNet-20 at 32 px, ResNet-50 at 224 px), and the
   step time of PGD-K for K = 1, 2, 3, 5 with a least-squares line through it.
2. PGD-1 step time with each smooth activation / with ReLU, same model, plus a per-op
   profile: each activation layer alone, forward and forward+backward, on one big tensor
   (timed, interleaved with ReLU), and the TensorFlow ops its graph runs.

Run alone: python benchmarks/bench_overhead.py [--repeats 5]. `run_all.py` calls these.

With `--fit`, the same costs through whole training epochs instead of one compiled step, plus the
custom loop of `sat_tf.distribute` against `fit` (`fit_and_loop`, "Train step overhead" in
benchmarks/README.md):

    python benchmarks/bench_overhead.py --fit --fit-batch-size 32 --fit-steps 4 --fit-rounds 8
"""

import argparse
import collections

import common
import keras
import numpy as np
import tensorflow as tf

from sat_tf import activations, distribute

SMOOTH = ("silu", "gelu", "softplus", "smooth_relu", "mish")

# What each layer computes per element in float32 (sat_tf/activations.py), i.e. the reason a
# layer can cost more than ReLU, and what would remove that cost.
WHY = {
    "silu": "x * sigmoid(x): two kernels forward (Sigmoid, Mul), a custom gradient with a "
    "second sigmoid backward; ReLU is one kernel each way. Fix: a fused Swish kernel (oneDNN "
    "has eltwise_swish) or XLA fusion.",
    "gelu": "tanh approximation: Pow/Mul/Add/Tanh chain, ~8 elementwise kernels forward and "
    "their gradients backward. Fix: a fused GELU kernel (oneDNN eltwise_gelu) or XLA fusion.",
    "softplus": "Softplus kernel plus the alpha scale and divide (Mul, RealDiv); backward "
    "SoftplusGrad + 2 Mul. Fix: skip the scale when alpha == 1.",
    "smooth_relu": "relu(x - log1p(b|x|)/b): Abs, Mul, Log1p, RealDiv, Sub, Relu and the "
    "square of the trainable beta, plus their gradients and beta's gradient (a reduction). "
    "Fix: a fused kernel; fold beta^2 once per step.",
    "mish": "x * tanh(softplus(x)): Softplus, Tanh, Mul forward and three gradient kernels "
    "backward. Fix: a fused Mish kernel or XLA fusion.",
}


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
                f"<= 1.7: {common.verdict(wall, cpu, 1.7)}",
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


def activation_cost(args, cache):
    """PGD-1 step with each smooth activation / with ReLU, then the per-op profile."""
    size, batch = args.small_image_size, args.small_batch_size
    candidates = {"relu": cache.step("resnet20", size, batch, num_steps=1)}
    for name in SMOOTH:
        candidates[name] = cache.step("resnet20", size, batch, num_steps=1, activation=name)
    samples = common.interleave(candidates, repeats=args.repeats)
    profile = activation_profile(args)
    rows = []
    for name in SMOOTH:
        wall, cpu = common.ratio(samples[name], samples["relu"])
        layer = profile[name]
        ok = common.verdict(wall, cpu, 1.10)
        rows.append(
            (
                name,
                f"**{wall:.3f}**",
                common.spread(samples[name], samples["relu"]),
                f"{cpu:.3f}",
                f"<= 1.10: {ok}",
                f"{layer['forward']:.1f}x / {layer['backward']:.1f}x",
                f"{layer['ops']} / {layer['grad_ops']}",
            )
        )
    header = (
        "activation",
        "PGD-1 step / ReLU wall",
        "range",
        "CPU",
        "goal",
        "layer alone fwd / fwd+bwd vs ReLU",
        "ops in its traced graph fwd / fwd+bwd (ReLU: "
        f"{profile['relu']['ops']} / {profile['relu']['grad_ops']})",
    )
    text = common.table(header, rows)
    missed = [n for n in SMOOTH if max(common.ratio(samples[n], samples["relu"])) > 1.10]
    if missed:
        text += "\n\nWhere the time goes (per-op profile above; fwd+bwd graph ops before Grappler):"
        for name in missed:
            text += f"\n- **{name}**: {WHY[name]} Ops: {profile[name]['op_list']}."
    return {"samples": samples, "profile": profile}, text


def _op_types(concrete):
    skip = {"Placeholder", "Identity", "NoOp", "Const", "ReadVariableOp", "Shape"}
    counts = collections.Counter(
        op.type for op in concrete.graph.get_operations() if op.type not in skip
    )
    return counts


def activation_profile(args):
    """Each activation layer alone on one (B, H, W, C) tensor: timed and its op types."""
    shape = tuple(args.profile_shape)
    x = tf.random.normal(shape)
    upstream = tf.random.normal(shape)
    forward, backward, info = {}, {}, {}
    for name in ("relu", *SMOOTH):
        layer = activations.get(name)()
        layer.build(shape)

        @tf.function
        def fwd(x, layer=layer):
            return layer(x)

        @tf.function
        def fwd_bwd(x, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
            return tape.gradient(y, x, output_gradients=upstream)

        forward[name] = lambda f=fwd: f(x).numpy()
        backward[name] = lambda f=fwd_bwd: f(x).numpy()
        ops = _op_types(fwd.get_concrete_function(x))
        grad_ops = _op_types(fwd_bwd.get_concrete_function(x))
        info[name] = {
            "ops": sum(ops.values()),
            "grad_ops": sum(grad_ops.values()),
            "op_list": ", ".join(f"{t}x{n}" if n > 1 else t for t, n in sorted(grad_ops.items())),
        }
    t_fwd = common.interleave(forward, repeats=args.repeats, calls=3)
    t_bwd = common.interleave(backward, repeats=args.repeats, calls=3)
    for name in info:
        info[name]["forward"] = common.ratio(t_fwd[name], t_fwd["relu"])[0]
        info[name]["backward"] = common.ratio(t_bwd[name], t_bwd["relu"])[0]
        info[name]["ms"] = common.median_ms(t_fwd[name])[0], common.median_ms(t_bwd[name])[0]
    return info


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
        ("PGD-1 adversarial / clean", "pgd1", "clean", 1.7),
        ("SiLU / ReLU (PGD-1)", "pgd1_silu", "pgd1", 1.10),
        ("custom loop / fit (PGD-1)", "pgd1_loop", "pgd1", 1.05),
    ):
        cells = " | ".join(f"{f(times[top]) / f(times[bottom]):.3f}" for f in estimators.values())
        lines.append(f"| {label} | {cells} | <= {goal} |")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (after 1 warm-up)")
    parser.add_argument("--large-repeats", type=int, default=4, help="rounds for ResNet-50")
    parser.add_argument("--small-image-size", type=int, default=32)
    parser.add_argument("--small-batch-size", type=int, default=32)
    parser.add_argument("--large-image-size", type=int, default=224)
    parser.add_argument("--large-batch-size", type=int, default=8)
    parser.add_argument("--skip-large", action="store_true", help="no ResNet-50 rows")
    parser.add_argument(
        "--profile-shape", type=int, nargs=4, default=(32, 32, 32, 64), help="B H W C"
    )


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
    print(overhead(args, cache)[1] + "\n")
    print(activation_cost(args, cache)[1])


if __name__ == "__main__":
    main()
