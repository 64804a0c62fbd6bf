"""`sat_tf.fused` under JAX: each smooth activation as a `jax.custom_vjp` of its input.

The forward and the backward are each a function of `x` only (the backward recomputes what it
needs), so a step keeps one tensor per activation for the backward pass instead of autodiff's
intermediates; XLA fuses each into one loop over the tensor inside the step's `jax.jit`. The
formulas are `fused_formulas.py`'s, run on `jax.numpy`: the same values and gradients as
`fused_tf.py`, with the same care with overflow and cancellation.
benchmarks/bench_activations.py times these against the plain `keras.ops` formulas
differentiated by JAX (benchmarks/README.md).

The backward functions are `jax.numpy` code, so reverse-mode of reverse-mode (second
derivatives, e.g. `jax.grad(jax.grad(f))`) differentiates them; forward mode (`jax.jvp`) does
not pass through a `custom_vjp`. Half-precision inputs are computed in float32 and cast back;
gradients come back in the dtype of the upstream gradient.
"""

import functools
import types

import jax
import jax.numpy as jnp

from sat_tf import fused_formulas as formulas

# The array namespace the formulas run on.
_M = types.SimpleNamespace(
    **{n: getattr(jnp, n) for n in ("exp", "log", "log1p", "tanh", "abs", "where", "sum")},
    ones_like=jnp.ones_like,
    zeros_like=jnp.zeros_like,
    erfc=jax.lax.erfc,
    sigmoid=jax.nn.sigmoid,
    relu=lambda v: jnp.maximum(v, 0.0),
)
_HALF = (jnp.float16, jnp.bfloat16)


def _f32(x):
    return x.astype(jnp.float32) if x.dtype in _HALF else x


def _times(dy, grad):
    """dy * grad in float32, in dy's dtype: the chain rule through an upcast and a downcast."""
    return (_f32(dy) * grad).astype(dy.dtype)


def _unary(value, derivative):
    """An op `f(x, *params)` from the formulas `value(m, x, *params)`, `derivative(m, x, *params)`.

    `params` are Python floats (layer configuration), fixed at trace time, with no gradient.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def op(x, params):
        return value(_M, _f32(x), *params).astype(x.dtype)

    def op_fwd(x, params):
        return op(x, params), x

    def op_bwd(params, x, dy):
        return (_times(dy, derivative(_M, _f32(x), *params)),)

    op.defvjp(op_fwd, op_bwd)
    return lambda x, *params: op(jnp.asarray(x), tuple(float(p) for p in params))


softplus = _unary(formulas.softplus, formulas.softplus_grad)
parametric_softplus = _unary(formulas.parametric_softplus, formulas.parametric_softplus_grad)
silu = _unary(formulas.silu, formulas.silu_grad)
gelu_tanh = _unary(formulas.gelu_tanh, formulas.gelu_tanh_grad)
gelu_erf = _unary(formulas.gelu_erf, formulas.gelu_erf_grad)
elu = _unary(formulas.elu, formulas.elu_grad)
mish = _unary(formulas.mish, formulas.mish_grad)
relu_with_softplus_grad = _unary(formulas.relu, formulas.parametric_softplus_grad)


@jax.custom_vjp
def _smooth_relu(x, b):
    return formulas.smooth_relu(_M, _f32(x), b * b).astype(x.dtype)


def _smooth_relu_fwd(x, b):
    return _smooth_relu(x, b), (x, b)


def _smooth_relu_bwd(residuals, dy):
    x, b = residuals
    dx, dbeta = formulas.smooth_relu_grads(_M, _f32(x), b * b, _f32(dy))
    return dx.astype(dy.dtype), (2.0 * b * dbeta).astype(b.dtype)


_smooth_relu.defvjp(_smooth_relu_fwd, _smooth_relu_bwd)


def smooth_relu(x, b):
    """relu(x - log1p(beta |x|) / beta) with beta = b^2; `b` (a float32 scalar) gets a gradient."""
    return _smooth_relu(jnp.asarray(x), jnp.asarray(b, jnp.float32))
