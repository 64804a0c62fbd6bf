"""`sat_tf.fused` under TensorFlow: one op per smooth activation, one forward and one backward.

TensorFlow runs a formula such as GELU's `0.5 x (1 + tanh(c (x + k x^3)))` as a chain of
elementwise kernels, each a full pass over the tensor, and its autodiff gradient as a longer
chain that also keeps the intermediates alive. Here each activation is one
`tf.custom_gradient` op whose forward and backward are each an XLA-compiled function of the
input `x` only (the backward recomputes what it needs from `x`, so nothing else is kept):
XLA fuses each into a single loop over the tensor. Only these small elementwise functions
are compiled; the model's convolutions stay on TensorFlow's own kernels (oneDNN on CPU).

The backward functions are ordinary TensorFlow ops, so a nested `tf.GradientTape` (second
derivatives, as TRADES or gradient penalties need) differentiates them like any other op.

Half-precision inputs (float16, bfloat16) are computed in float32 inside the same kernel and
cast back, so `alpha * x` or `exp(x)` cannot overflow; gradients come back in the dtype of
the upstream gradient.
"""

import math

import tensorflow as tf

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715  # the tanh form's cubic coefficient (Hendrycks & Gimpel, 2016)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _kernel(fn):
    # One XLA cluster per call: its elementwise ops fuse into one loop. reduce_retracing keeps
    # one trace for every batch size; XLA still compiles once per concrete shape.
    return tf.function(fn, jit_compile=True, reduce_retracing=True, autograph=False)


def _f32(x):
    return tf.cast(x, tf.float32) if x.dtype in (tf.float16, tf.bfloat16) else x


def _times(dy, grad):
    """dy * grad in float32, in dy's dtype: the chain rule through an upcast and a downcast."""
    return tf.cast(_f32(dy) * grad, dy.dtype)


def _sigmoids(v):
    """(sigmoid(v), sigmoid(-v)) from one exp(-|v|): no overflow, and 1 - s never cancels.

    The exponent is chosen by `where` rather than `abs`, so that autodiff of the result
    (second derivatives) is right at v = 0 too.
    """
    positive = v > 0
    q = tf.exp(tf.where(positive, -v, v))
    inv = 1.0 / (1.0 + q)
    return tf.where(positive, inv, q * inv), tf.where(positive, q * inv, inv)


@_kernel
def _gelu_tanh_fwd(x):
    x32 = _f32(x)
    inner = _SQRT_2_OVER_PI * (x32 + _GELU_K * (x32 * x32 * x32))
    return tf.cast(0.5 * x32 * (1.0 + tf.tanh(inner)), x.dtype)


@_kernel
def _gelu_tanh_bwd(x, dy):
    # With u the tanh's argument: (1 + tanh u) / 2 = sigmoid(2u) and 1 - tanh^2 u =
    # 4 sigmoid(2u) sigmoid(-2u), so f' = s (1 + 2 x sigmoid(-2u) u').
    x = _f32(x)
    u = _SQRT_2_OVER_PI * (x + _GELU_K * (x * x * x))
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_K * x * x)
    s, s_neg = _sigmoids(2.0 * u)
    return _times(dy, s * (1.0 + 2.0 * x * s_neg * du))


def _normal_cdf(x):
    # Phi(x) = (1 + erf(x / sqrt 2)) / 2, written with erfc: XLA's erf does not reach -1 in
    # float32 (1 + erf(-7071) came out 1.8e-7), erfc(7071) is 0, and it keeps the left tail's
    # digits that 1 + erf cancels away.
    return 0.5 * tf.math.erfc(-x * _INV_SQRT_2)


@_kernel
def _gelu_erf_fwd(x):
    x32 = _f32(x)
    return tf.cast(x32 * _normal_cdf(x32), x.dtype)


@_kernel
def _gelu_erf_bwd(x, dy):
    x = _f32(x)
    return _times(dy, _normal_cdf(x) + x * _INV_SQRT_2PI * tf.exp(-0.5 * x * x))


@_kernel
def _silu_fwd(x):
    x32 = _f32(x)
    return tf.cast(x32 * tf.sigmoid(x32), x.dtype)


@_kernel
def _silu_bwd(x, dy):
    x = _f32(x)
    s, s_neg = _sigmoids(x)
    return _times(dy, s * (1.0 + x * s_neg))


@_kernel
def _softplus_fwd(x, alpha):
    x32 = _f32(x)
    return tf.cast(tf.math.softplus(alpha * x32) / alpha, x.dtype)


@_kernel
def _plain_softplus_fwd(x):
    return tf.cast(tf.math.softplus(_f32(x)), x.dtype)


@_kernel
def _plain_softplus_bwd(x, dy):
    return _times(dy, _sigmoids(_f32(x))[0])


@_kernel
def _sigmoid_bwd(x, alpha, dy):
    # d/dx softplus(alpha x) / alpha: Softplus(alpha), and SmoothGradReLU's smooth backward.
    return _times(dy, _sigmoids(alpha * _f32(x))[0])


def _mish_parts(x):
    """(tanh(softplus(x)), x sigmoid(x) (1 - tanh(softplus(x))^2)) from one exp(-|x|).

    With e = exp(x) and n = e (e + 2): tanh(log(1 + e)) = n / (n + 2), and the second part
    is 4 x e (1 + e) / (n + 2)^2. For x > 0 both are rewritten in q = exp(-x), so nothing
    overflows and f = x, f' = 1 come out exactly for large x.
    """
    negative = x <= 0
    q = tf.exp(tf.where(negative, x, -x))
    num = tf.where(negative, q * (q + 2.0), 1.0 + 2.0 * q)
    den = num + tf.where(negative, 2.0 * tf.ones_like(q), 2.0 * q * q)
    inv = 1.0 / den
    return num * inv, 4.0 * x * (1.0 + q) * tf.where(negative, q, q * q) * inv * inv


@_kernel
def _mish_fwd(x):
    x32 = _f32(x)
    return tf.cast(x32 * _mish_parts(x32)[0], x.dtype)


@_kernel
def _mish_bwd(x, dy):
    t, rest = _mish_parts(_f32(x))
    return _times(dy, t + rest)


@_kernel
def _elu_fwd(x, alpha):
    # exp(x) - 1, not expm1: the same values as TensorFlow's Elu kernel (`tf.nn.elu`), whose
    # outputs tests/data/activations_before.npz stores. min(x, 0) keeps the unused branch finite
    # (an inf there makes autodiff NaN).
    x32 = _f32(x)
    return tf.cast(tf.where(x32 > 0, x32, alpha * (tf.exp(tf.minimum(x32, 0.0)) - 1.0)), x.dtype)


@_kernel
def _elu_bwd(x, alpha, dy):
    # At x == 0 the left derivative alpha, as autodiff of where(x > 0, ...) gives.
    x = _f32(x)
    return _times(dy, tf.where(x > 0, tf.ones_like(x), alpha * tf.exp(tf.minimum(x, 0.0))))


@_kernel
def _smooth_relu_fwd(x, beta):
    x32 = _f32(x)
    return tf.cast(tf.nn.relu(x32 - tf.math.log1p(beta * tf.abs(x32)) / beta), x.dtype)


@_kernel
def _smooth_relu_bwd(x, beta, dy):
    # For x > 0, f = x - log1p(z) / beta with z = beta x: df/dx = z / (1 + z) and
    # df/dbeta = (log1p(z) - z / (1 + z)) / beta^2. For x <= 0, f = 0.
    x = _f32(x)
    dy32 = _f32(dy)
    positive = x > 0
    z = beta * tf.nn.relu(x)
    inv = 1.0 / (1.0 + z)
    ratio = tf.where(z < 1.0, z * inv, 1.0 - inv)  # whichever form does not cancel
    dx = tf.where(positive, dy32 * ratio, tf.zeros_like(x))
    # log(1 + z), not log1p: XLA's log1p costs about a third of the layer. Beta's gradient is
    # a sum over the tensor, dominated by the large z where the two agree.
    dbeta = tf.reduce_sum(tf.where(positive, dy32 * (tf.math.log(1.0 + z) - ratio), 0.0 * x))
    return tf.cast(dx, dy.dtype), dbeta / (beta * beta)


def _unary(forward, backward):
    """An op `f(x, *params)` from `forward(x, *params)` and `backward(x, *params, dy)`.

    `params` are float32 scalars that get no gradient.
    """

    def op(x, *params):
        params = [tf.constant(p, tf.float32) for p in params]

        @tf.custom_gradient
        def fused(x):
            return forward(x, *params), lambda dy: backward(x, *params, dy)

        return fused(x)

    return op


gelu_tanh = _unary(_gelu_tanh_fwd, _gelu_tanh_bwd)
gelu_erf = _unary(_gelu_erf_fwd, _gelu_erf_bwd)
silu = _unary(_silu_fwd, _silu_bwd)
mish = _unary(_mish_fwd, _mish_bwd)
softplus = _unary(_plain_softplus_fwd, _plain_softplus_bwd)
parametric_softplus = _unary(_softplus_fwd, _sigmoid_bwd)
elu = _unary(_elu_fwd, _elu_bwd)
relu_with_softplus_grad = _unary(lambda x, alpha: tf.nn.relu(x), _sigmoid_bwd)


def smooth_relu(x, b):
    """relu(x - log1p(beta |x|) / beta) with beta = b^2; `b` (a float32 scalar) gets a gradient.

    Beta's gradient is reduced over the whole tensor inside the backward kernel, once per call.
    """

    @tf.custom_gradient
    def fused(x, b):
        beta = b * b

        def grad(dy):
            dx, dbeta = _smooth_relu_bwd(x, beta, dy)
            return dx, 2.0 * b * dbeta

        return _smooth_relu_fwd(x, beta), grad

    return fused(x, b)
