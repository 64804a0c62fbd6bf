"""Section 2 of `make bench`: smooth activations against ReLU, fused and unfused.

For each model (ResNet-20 at 32 px, batch 32 and 128; ResNet-50 at 224 px), in one
interleaved run: the PGD-1 train step with each smooth activation / with ReLU, for the
fused layers of `sat_tf.activations` and for the same activations as unfused chains of ops
(`benchmarks/unfused.py`), and each activation's PGD-1 step / its own clean step. Then each
layer alone on one big tensor, forward and forward+backward against ReLU, with the ops of
its traced graph. Ratios are by process CPU time (other jobs on a shared machine do not
inflate it) with wall time beside.

Under KERAS_BACKEND=jax it times instead what `sat_tf/fused.py` picks for JAX: each activation as
a `jax.custom_vjp` (`sat_tf/fused_jax.py`) against the same formula as plain `keras.ops`
differentiated by JAX (`unfused.py`), both under `jax.jit`: each layer alone (forward+backward on
one big tensor) and a clean ResNet-20 train step (`jax_fusion`).

Run alone: python benchmarks/bench_activations.py [--repeats 5] [--skip-large];
KERAS_BACKEND=jax python benchmarks/bench_activations.py [--repeats 5].
"""

import argparse
import collections
import sys

import bench_overhead
import common
import keras
import tensorflow as tf
import unfused

from sat_tf import activations, models

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


def _jax_layer_call(layer, x, upstream):
    """A callable running the layer's forward and backward (`jax.vjp`) once, jitted."""
    import jax

    layer.build(x.shape)
    variables = [v.value for v in layer.variables]

    def fwd_bwd(values, x, upstream):
        def f(x):
            return layer.stateless_call(values, [], x)[0]

        y, vjp = jax.vjp(f, x)
        return y, vjp(upstream)[0]

    step = jax.jit(fwd_bwd)
    return lambda: [t.block_until_ready() for t in step(variables, x, upstream)]


def _jax_train_step(activation, image_size, batch_size):
    """A callable running one clean jitted train step (loss, weight gradients) of ResNet-20."""
    import jax

    keras.utils.set_random_seed(0)
    model = models.build(
        "resnet20", num_classes=10, activation=activation, input_shape=(image_size,) * 2 + (3,)
    )
    images, labels = common.synthetic_data(batch_size, image_size)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def loss(trainable, frozen, x, y):
        logits, frozen = model.stateless_call(trainable, frozen, x, training=True)
        return loss_fn(y, logits), frozen

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return lambda: jax.block_until_ready(step(trainable, frozen, images, labels))


def jax_fusion(args):
    """Under JAX: custom_vjp (fused) vs plain keras.ops (unfused) per activation, CPU / ReLU."""
    import jax

    shape = tuple(args.jax_layer_shape)
    keys = jax.random.split(jax.random.key(0))
    x, upstream = (jax.random.normal(k, shape) for k in keys)
    layers = {"relu": activations.get("relu")()}
    steps = {"relu": _jax_train_step("relu", args.small_image_size, args.jax_batch_size)}
    for name, chain in unfused.ACTIVATIONS.items():
        layers[name], layers[f"{name} unfused"] = activations.get(name)(), chain()
        for label, act in ((name, name), (f"{name} unfused", chain)):
            steps[label] = _jax_train_step(act, args.small_image_size, args.jax_batch_size)
    calls = {name: _jax_layer_call(layer, x, upstream) for name, layer in layers.items()}
    t_layer = common.interleave(calls, repeats=args.repeats, calls=3)
    t_step = common.interleave(steps, repeats=args.repeats, calls=3)
    rows = []
    for name in unfused.ACTIVATIONS:
        cells = [name]
        for times in (t_layer, t_step):
            fused = common.ratio(times[name], times["relu"])[1]
            chain = common.ratio(times[f"{name} unfused"], times["relu"])[1]
            cells += [f"**{fused:.2f}x**", f"{chain:.2f}x"]
        rows.append(cells)
    header = (
        "activation (JAX)",
        f"layer fwd+bwd {'x'.join(map(str, shape))} / ReLU, custom_vjp, CPU",
        "plain keras.ops",
        f"ResNet-20 {args.small_image_size} px batch {args.jax_batch_size} clean step / ReLU, "
        "custom_vjp, CPU",
        "plain keras.ops",
    )
    relu = common.median_ms(t_layer["relu"])[1], common.median_ms(t_step["relu"])[1]
    text = common.table(header, rows)
    text += f"\n\nReLU: layer {relu[0]:.0f} ms CPU, step {relu[1]:.0f} ms CPU."
    return {"layer": t_layer, "step": t_step}, text


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
    parser.add_argument(
        "--jax-layer-shape", type=int, nargs=4, default=(64, 56, 56, 64), help="JAX: B H W C"
    )
    parser.add_argument("--jax-batch-size", type=int, default=32, help="JAX: ResNet-20 batch")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_overhead.add_arguments(parser)  # --repeats, --large-repeats, sizes, --skip-large
    parser.add_argument("--skip-small", action="store_true", help="no ResNet-20 rows")
    add_arguments(parser)
    args = parser.parse_args()
    print(common.machine_line() + "\n")
    if keras.backend.backend() == "jax":
        print(jax_fusion(args)[1])
        return
    print(activation_cost(args, common.StepCache())[1])


if __name__ == "__main__":
    main()
