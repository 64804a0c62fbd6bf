"""Section 2 of `make bench`: smooth activations against ReLU, fused and unfused.

For each model (ResNet-20 at 32 px, batch 32 and 128; ResNet-50 at 224 px), in one
interleaved run: the PGD-1 train step with each smooth activation / with ReLU, for the
fused layers of `sat_tf.activations` and for the same activations as unfused chains of ops
(`benchmarks/unfused.py`), and each activation's PGD-1 step / its own clean step. Then each
layer alone on one big tensor, forward and forward+backward against ReLU, with the ops of
its traced graph. Ratios are by process CPU time (other jobs on a shared machine do not
inflate it) with wall time beside.

Run alone: python benchmarks/bench_activations.py [--repeats 5] [--skip-large].
"""

import argparse
import collections
import sys

import bench_overhead
import common
import tensorflow as tf
import unfused

from sat_tf import activations

# Timed in the train step (the profile covers every name in unfused.ACTIVATIONS; the step
# leaves out plain Softplus and ELU, whose fused kernels are the simplest, to keep runs short).
STEP = ("silu", "gelu", "parametric_softplus", "smooth_relu", "mish")


def _configs(args):
    sizes = () if getattr(args, "skip_small", False) else args.activation_batch_sizes
    out = [("resnet20", args.small_image_size, b) for b in sizes]
    if not args.skip_large:
        out.append(("resnet50", args.large_image_size, args.large_batch_size))
    return out


def step_ratios(args, cache):
    """PGD-1 step / ReLU's (fused and unfused) and PGD-1 / clean, per model configuration."""
    results, blocks = {}, []
    for model, size, batch in _configs(args):
        small = model == "resnet20"

        def step(activation, num_steps=1, model=model, size=size, batch=batch):
            return cache.step(model, size, batch, num_steps=num_steps, activation=activation)

        candidates = {"relu": step("relu")}
        if small:
            candidates["relu clean"] = step("relu", 0)
        for name in STEP:
            candidates[name] = step(name)
            if small:
                candidates[f"{name} clean"] = step(name, 0)
            if not args.skip_unfused:
                candidates[f"{name} unfused"] = step(unfused.ACTIVATIONS[name])
        repeats = args.repeats if small else args.large_repeats
        samples = common.interleave(candidates, repeats=repeats)
        results[(model, size, batch)] = samples
        blocks.append(_step_table(model, size, batch, samples, small, args.skip_unfused))
        print(blocks[-1] + "\n", file=sys.stderr, flush=True)  # progress: runs are long
    return results, "\n\n".join(blocks)


def _step_table(model, size, batch, samples, small, skip_unfused):
    relu_ms = common.median_ms(samples["relu"])[1]
    rows = []
    for name in ("relu", *STEP):
        wall, cpu = common.ratio(samples[name], samples["relu"])
        row = [name, f"**{cpu:.3f}**", f"{wall:.3f}"]
        if not skip_unfused:
            chain = samples.get(f"{name} unfused")
            row.append("" if chain is None else f"{common.ratio(chain, samples['relu'])[1]:.3f}")
        row.append("" if name == "relu" else _goal(common.GOAL_SMOOTH_OVER_RELU, cpu, 3))
        if small:
            at = common.ratio(samples[name], samples[f"{name} clean"])[1]
            row += [f"{at:.2f}", _goal(common.GOAL_PGD1_OVER_CLEAN, at, 2)]
        rows.append(row)
    header = ["activation", "PGD-1 step / ReLU, CPU", "wall"]
    if not skip_unfused:
        header.append("unfused / ReLU, CPU")
    header.append("goal")
    if small:
        header += ["PGD-1 / clean step, CPU", "goal"]
    title = f"**{model}, {size} px, batch {batch}** (ReLU PGD-1 step: {relu_ms:.0f} ms CPU)"
    return title + "\n\n" + common.table(header, rows)


def _goal(goal, cpu, digits, unit=""):
    """Goal column of section 2, judged by the CPU ratio (the headline here)."""
    return common.goal_cell(goal, (cpu,), digits=digits, unit=unit, names=("CPU",))


def _op_types(concrete):
    skip = {"Placeholder", "Identity", "NoOp", "Const", "ReadVariableOp", "Shape"}
    return collections.Counter(
        op.type for op in concrete.graph.get_operations() if op.type not in skip
    )


def _profiled(layer, x, upstream):
    layer.build(x.shape)

    @tf.function
    def fwd(x):
        return layer(x)

    @tf.function
    def fwd_bwd(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        # Both outputs: with the gradient alone, Grappler would prune a forward that the
        # backward does not need (a fused op's backward recomputes from x).
        return y, tape.gradient(y, x, output_gradients=upstream)

    ops = _op_types(fwd.get_concrete_function(x))
    grad_ops = _op_types(fwd_bwd.get_concrete_function(x))
    info = {
        "ops": sum(ops.values()),
        "grad_ops": sum(grad_ops.values()),
        "op_list": ", ".join(f"{t}x{n}" if n > 1 else t for t, n in sorted(grad_ops.items())),
    }
    return (lambda: fwd(x).numpy()), (lambda: [t.numpy() for t in fwd_bwd(x)]), info


def layer_profile(args):
    """Each layer alone on one (B, H, W, C) tensor, fused and unfused: CPU ratios to ReLU."""
    shape = tuple(args.profile_shape)
    x, upstream = tf.random.normal(shape), tf.random.normal(shape)
    layers = {"relu": activations.get("relu")()}
    for name, chain in unfused.ACTIVATIONS.items():
        layers[name] = activations.get(name)()
        layers[f"{name} unfused"] = chain()
    forward, backward, info = {}, {}, {}
    for name, layer in layers.items():
        forward[name], backward[name], info[name] = _profiled(layer, x, upstream)
    t_fwd = common.interleave(forward, repeats=args.repeats, calls=3)
    t_bwd = common.interleave(backward, repeats=args.repeats, calls=3)
    for name in info:
        info[name]["forward"] = common.ratio(t_fwd[name], t_fwd["relu"])[1]
        info[name]["backward"] = common.ratio(t_bwd[name], t_bwd["relu"])[1]
    rows = []
    for name in unfused.ACTIVATIONS:
        fused, chain = info[name], info[f"{name} unfused"]
        rows.append(
            (
                name,
                f"**{fused['backward']:.2f}x** / {fused['forward']:.2f}x",
                f"{chain['backward']:.2f}x / {chain['forward']:.2f}x",
                _goal(common.GOAL_LAYER_OVER_RELU, fused["backward"], 2, unit="x"),
                f"{fused['ops']} / {fused['grad_ops']}",
                f"{chain['ops']} / {chain['grad_ops']}",
            )
        )
    header = (
        f"layer alone, {'x'.join(map(str, shape))}",
        "fwd+bwd / fwd vs ReLU, CPU",
        "unfused",
        "goal (fwd+bwd)",
        "graph ops fwd / fwd+bwd",
        f"unfused (ReLU: {info['relu']['ops']} / {info['relu']['grad_ops']})",
    )
    text = common.table(header, rows)
    text += "\n\nOps of each fused layer's fwd+bwd graph as traced, ahead of Grappler's rewrites "
    text += "(a PartitionedCall is a function that `sat_tf/fused.py` compiles with XLA): "
    text += "; ".join(f"{n}: {info[n]['op_list']}" for n in unfused.ACTIVATIONS)
    return info, text


def activation_cost(args, cache):
    """Section 2: the step table per model, then the per-layer profile."""
    results, steps = step_ratios(args, cache)
    if args.skip_profile:
        return {"steps": results}, steps
    profile, layers = layer_profile(args)
    return {"steps": results, "profile": profile}, steps + "\n\n" + layers


def add_arguments(parser):
    parser.add_argument(
        "--activation-batch-sizes",
        type=int,
        nargs="+",
        default=(32, 128),
        help="section 2: ResNet-20 batch sizes",
    )
    parser.add_argument("--skip-unfused", action="store_true", help="section 2: no unfused columns")
    parser.add_argument(
        "--skip-profile", action="store_true", help="section 2: no per-layer profile"
    )
    parser.add_argument(
        "--profile-shape", type=int, nargs=4, default=(32, 32, 32, 64), help="B H W C"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_overhead.add_arguments(parser)  # --repeats, --large-repeats, sizes, --skip-large
    parser.add_argument("--skip-small", action="store_true", help="no ResNet-20 rows")
    add_arguments(parser)
    args = parser.parse_args()
    print(common.machine_line() + "\n")
    print(activation_cost(args, common.StepCache())[1])


if __name__ == "__main__":
    main()
