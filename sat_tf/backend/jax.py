"""`sat_tf.backend` under JAX: `jax.value_and_grad`, `jax.jit` over the model's variables."""

import weakref

import jax
import keras

_COMPILED = weakref.WeakKeyDictionary()  # model -> {key: compiled function}


def value_and_gradient(fn, x):
    """(value, aux, d value / d x) of `fn(x) -> (value, aux)`, with `jax.value_and_grad`."""
    (value, aux), gradient = jax.value_and_grad(fn, has_aux=True)(x)
    return value, aux, gradient


def compiled(model, key, build, *args, jit_compile=False):
    """`build(model_ref)` under `jax.jit`, once per (model, key); `args` are not needed here
    (JAX traces at the first call, once per shape).

    The model's variables are arguments of the compiled function, mapped onto the model with a
    `keras.StatelessScope` while it runs, so the function reads the weights of the call, never
    those of its trace. `jit_compile` is accepted for the TensorFlow signature: JAX always
    compiles.
    """
    del args, jit_compile
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        fn = build(weakref.ref(model))
        variables = list(model.variables)

        @jax.jit
        def run(values, *call_args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                return fn(*call_args)

        def call(*call_args):
            return run([v.value for v in variables], *call_args)

        per_model[key] = call
    return per_model[key]


def uniform(shape, minval, maxval):
    """Refused: a compiled JAX function has no random state; pass a seed (`sat_tf.draws`)."""
    raise ValueError(
        "Unseeded random draws are TensorFlow-only; under JAX give the attack a `seed` "
        "(sat_tf.draws keys its draws by seed and example)."
    )


def replica():
    """(0, 1): under JAX a step sees the global batch, however it is sharded."""
    return 0, 1


def compiled_call(model, key, build, *args):
    """`build(model_ref)(*args)`; called eagerly, through `compiled` (once per key and shapes).

    An eager `keras.ops.fori_loop` traces and compiles its body at every call, so an attack
    called outside `jax.jit` is compiled whole and cached; inside a traced function (a train
    step, `jax.grad`) it runs inline.
    """
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(args)):
        return build(weakref.ref(model))(*args)
    return compiled(model, key, build, *args)(*args)


def batch_bucket(batch):
    """The power of two >= `batch`: `jax.jit` compiles once per shape, so a caller whose batch
    shrinks (APGD's early exit) pads to these sizes and compiles O(log batch) times."""
    return 1 << max(int(batch) - 1, 0).bit_length()
