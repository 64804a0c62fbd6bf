"""Sections 1-2 of `make bench`: adversarial-training overhead and the cost of smooth activations.

1. PGD-1 train step / clean train step (ResNet-20 at 32 px, ResNet-50 at 224 px), and the
   step time of PGD-K for K = 1, 2, 3, 5 with a least-squares line through it.
2. PGD-1 step time with each smooth activation / with ReLU, same model, plus a per-op
   profile: each activation layer alone, forward and forward+backward, on one big tensor
   (timed, interleaved with ReLU), and the TensorFlow ops its graph runs.

Run alone: python benchmarks/bench_overhead.py [--repeats 5]. `run_all.py` calls these.
"""

import argparse
import collections

import common
import tensorflow as tf

from sat_tf import activations

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
    args = parser.parse_args()
    cache = common.StepCache()
    print(common.machine_line() + "\n")
    print(overhead(args, cache)[1] + "\n")
    print(activation_cost(args, cache)[1])


if __name__ == "__main__":
    main()
