"""`sat_tf.fused` under JAX: each smooth activation as a `jax.custom_vjp` of its input.

The forward and the backward are each a function of `x` only (the backward recomputes what it
needs), so a step keeps one tensor per activation for the backward pass instead of autodiff's
intermediates; XLA fuses each into one loop over the tensor inside the step's `jax.jit`. The
formulas are those of `fused_tf.py`, written in `jax.numpy`: the same values and gradients on
both backends, and the same care with overflow and cancellation (sigmoid(-v) computed, never
1 - sigmoid(v); Phi from erfc; Mish in exp(-x) for x > 0). benchmarks/bench_activations.py times
these against the plain `keras.ops` formulas differentiated by JAX (benchmarks/README.md).

The backward functions are `jax.numpy` code, so reverse-mode of reverse-mode (second
derivatives, e.g. `jax.grad(jax.grad(f))`) differentiates them; forward mode (`jax.jvp`) does
not pass through a `custom_vjp`. Half-precision inputs are computed in float32 and cast back;
gradients come back in the dtype of the upstream gradient.
"""

import functools
import math

import jax
import jax.numpy as jnp

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715  # the tanh form's cubic coefficient (Hendrycks & Gimpel, 2016)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_HALF = (jnp.float16, jnp.bfloat16)


def _f32(x):
    return x.astype(jnp.float32) if x.dtype in _HALF else x


def _times(dy, grad):
    """dy * grad in float32, in dy's dtype: the chain rule through an upcast and a downcast."""
    return (_f32(dy) * grad).astype(dy.dtype)


def _sigmoids(v):
    """(sigmoid(v), sigmoid(-v)), each by XLA's logistic: no overflow, and 1 - s never cancels.

    Two logistics run faster on XLA:CPU than one exp(-|v|) with the selects and the division
    that `fused_tf.py` uses (87 vs 119 ms for SiLU's forward+backward on 64x56x56x64).
    """
    return jax.nn.sigmoid(v), jax.nn.sigmoid(-v)


def _gelu_tanh_fwd(x):
    x32 = _f32(x)
    inner = _SQRT_2_OVER_PI * (x32 + _GELU_K * (x32 * x32 * x32))
    return (0.5 * x32 * (1.0 + jnp.tanh(inner))).astype(x.dtype)


def _gelu_tanh_bwd(x, dy):
    # (1 + tanh u) / 2 = sigmoid(2u), 1 - tanh^2 u = 4 sigmoid(2u) sigmoid(-2u).
    x = _f32(x)
    u = _SQRT_2_OVER_PI * (x + _GELU_K * (x * x * x))
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_K * x * x)
    s, s_neg = _sigmoids(2.0 * u)
    return _times(dy, s * (1.0 + 2.0 * x * s_neg * du))


def _normal_cdf(x):
    # erfc, not 1 + erf: keeps the left tail (see fused_tf.py).
    return 0.5 * jax.lax.erfc(-x * _INV_SQRT_2)


def _gelu_erf_fwd(x):
    x32 = _f32(x)
    return (x32 * _normal_cdf(x32)).astype(x.dtype)


def _gelu_erf_bwd(x, dy):
    x = _f32(x)
    return _times(dy, _normal_cdf(x) + x * _INV_SQRT_2PI * jnp.exp(-0.5 * x * x))


def _silu_fwd(x):
    x32 = _f32(x)
    return (x32 * _sigmoids(x32)[0]).astype(x.dtype)


def _silu_bwd(x, dy):
    x = _f32(x)
    s, s_neg = _sigmoids(x)
    return _times(dy, s * (1.0 + x * s_neg))


def _softplus32(v):
    # log(1 + exp(v)) = max(v, 0) + log1p(exp(-|v|)), written with where (see _sigmoids).
    return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(jnp.where(v > 0, -v, v)))


def _softplus_fwd(x, alpha):
    return (_softplus32(alpha * _f32(x)) / alpha).astype(x.dtype)


def _plain_softplus_fwd(x):
    return _softplus32(_f32(x)).astype(x.dtype)


def _plain_softplus_bwd(x, dy):
    return _times(dy, _sigmoids(_f32(x))[0])


def _sigmoid_bwd(x, alpha, dy):
    # d/dx softplus(alpha x) / alpha: Softplus(alpha), and SmoothGradReLU's smooth backward.
    return _times(dy, _sigmoids(alpha * _f32(x))[0])


def _mish_parts(x):
    """(tanh(softplus(x)), x sigmoid(x) (1 - tanh(softplus(x))^2)); see fused_tf.py."""
    negative = x <= 0
    q = jnp.exp(jnp.where(negative, x, -x))
    num = jnp.where(negative, q * (q + 2.0), 1.0 + 2.0 * q)
    den = num + jnp.where(negative, 2.0 * jnp.ones_like(q), 2.0 * q * q)
    inv = 1.0 / den
    return num * inv, 4.0 * x * (1.0 + q) * jnp.where(negative, q, q * q) * inv * inv


def _mish_fwd(x):
    x32 = _f32(x)
    return (x32 * _mish_parts(x32)[0]).astype(x.dtype)


def _mish_bwd(x, dy):
    t, rest = _mish_parts(_f32(x))
    return _times(dy, t + rest)


def _nonpositive(x):
    # min(x, 0), written with where: keeps the branch where() drops finite, and its derivative
    # at 0 is 1 (JAX splits a minimum's gradient at a tie), as TensorFlow's minimum gives.
    return jnp.where(x > 0, 0.0, x)


def _elu_fwd(x, alpha):
    # exp(x) - 1, as TensorFlow's Elu kernel (the stored fixtures' values).
    x32 = _f32(x)
    return jnp.where(x32 > 0, x32, alpha * (jnp.exp(_nonpositive(x32)) - 1.0)).astype(x.dtype)


def _elu_bwd(x, alpha, dy):
    # At x == 0 the left derivative alpha, as autodiff of where(x > 0, ...) gives.
    x = _f32(x)
    return _times(dy, jnp.where(x > 0, jnp.ones_like(x), alpha * jnp.exp(_nonpositive(x))))


def _relu_fwd(x, alpha):
    del alpha
    return jnp.maximum(x, jnp.zeros_like(x))


def _unary(forward, backward):
    """An op `f(x, *params)` from `forward(x, *params)` and `backward(x, *params, dy)`.

    `params` are Python floats (layer configuration), fixed at trace time, with no gradient.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def op(x, params):
        return forward(x, *params)

    def op_fwd(x, params):
        return forward(x, *params), x

    def op_bwd(params, x, dy):
        return (backward(x, *params, dy),)

    op.defvjp(op_fwd, op_bwd)
    return lambda x, *params: op(jnp.asarray(x), tuple(float(p) for p in params))


gelu_tanh = _unary(_gelu_tanh_fwd, _gelu_tanh_bwd)
gelu_erf = _unary(_gelu_erf_fwd, _gelu_erf_bwd)
silu = _unary(_silu_fwd, _silu_bwd)
mish = _unary(_mish_fwd, _mish_bwd)
softplus = _unary(_plain_softplus_fwd, _plain_softplus_bwd)
parametric_softplus = _unary(_softplus_fwd, _sigmoid_bwd)
elu = _unary(_elu_fwd, _elu_bwd)
relu_with_softplus_grad = _unary(_relu_fwd, _sigmoid_bwd)


def _smooth_relu_fwd(x, beta):
    x32 = _f32(x)
    return jnp.maximum(x32 - jnp.log1p(beta * jnp.abs(x32)) / beta, 0.0).astype(x.dtype)


def _smooth_relu_bwd(x, beta, dy):
    """(df/dx, df/dbeta summed over the tensor); see fused_tf.py for the forms chosen."""
    x = _f32(x)
    dy32 = _f32(dy)
    positive = x > 0
    z = beta * jnp.maximum(x, 0.0)
    inv = 1.0 / (1.0 + z)
    ratio = jnp.where(z < 1.0, z * inv, 1.0 - inv)  # whichever form does not cancel
    dx = jnp.where(positive, dy32 * ratio, jnp.zeros_like(x))
    dbeta = jnp.sum(jnp.where(positive, dy32 * (jnp.log(1.0 + z) - ratio), 0.0 * x))
    return dx.astype(dy.dtype), dbeta / (beta * beta)


@jax.custom_vjp
def _smooth_relu(x, b):
    return _smooth_relu_fwd(x, b * b)


def _smooth_relu_vjp_fwd(x, b):
    return _smooth_relu_fwd(x, b * b), (x, b)


def _smooth_relu_vjp_bwd(residuals, dy):
    x, b = residuals
    dx, dbeta = _smooth_relu_bwd(x, b * b, dy)
    return dx, (2.0 * b * dbeta).astype(b.dtype)


_smooth_relu.defvjp(_smooth_relu_vjp_fwd, _smooth_relu_vjp_bwd)


def smooth_relu(x, b):
    """relu(x - log1p(beta |x|) / beta) with beta = b^2; `b` (a float32 scalar) gets a gradient."""
    return _smooth_relu(jnp.asarray(x), jnp.asarray(b, jnp.float32))
