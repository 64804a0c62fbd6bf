"""The smooth activations' formulas and derivatives, written once for `fused_jax.py` and
`fused_torch.py`.

Each function takes `m`, the backend's array namespace, and a float32 `x` (the backends cast
half precision to float32 before and back after, and apply the chain rule with the upstream
gradient). `m` provides `exp`, `log`, `log1p`, `tanh`, `abs`, `erfc`, `sigmoid`, `where`,
`relu` (max(v, 0)), `sum`, `ones_like` and `zeros_like`. The derivatives are written in those
ops too, so the backend's autodiff differentiates them for second derivatives.

`fused_tf.py` writes the same formulas in TensorFlow ops inside XLA-compiled kernels, except
that it takes the sigmoid pair from one exp(-|v|) (see `sigmoids`). All of them take the same
care with overflow and cancellation: sigmoid(-v) computed, never 1 - sigmoid(v); Phi from
erfc; Mish in exp(-x) for x > 0.
"""

import math

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715  # the tanh form's cubic coefficient (Hendrycks & Gimpel, 2016)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def sigmoids(m, v):
    """(sigmoid(v), sigmoid(-v)), each by the backend's logistic: no overflow, no cancellation.

    Two logistics run faster on XLA:CPU than one exp(-|v|) with the selects and the division
    that `fused_tf.py` uses (87 vs 119 ms for SiLU's forward+backward on 64x56x56x64). Their
    autodiff (second derivatives) takes sigmoid' as s (1 - s), 0 once s rounds to 1 (v > ~17),
    where `fused_tf.py`'s form keeps the tail (SiLU'' at 20: -3.92e-8 here, -3.71e-8 exact).
    """
    return m.sigmoid(v), m.sigmoid(-v)


def softplus(m, x):
    # log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), written with where (see `_nonpositive`).
    return m.relu(x) + m.log1p(m.exp(m.where(x > 0, -x, x)))


def softplus_grad(m, x):
    return m.sigmoid(x)


def parametric_softplus(m, x, alpha):
    return softplus(m, alpha * x) / alpha


def parametric_softplus_grad(m, x, alpha):
    # Softplus(alpha)'s derivative, and SmoothGradReLU's smooth backward.
    return m.sigmoid(alpha * x)


def relu(m, x, alpha):
    del alpha  # SmoothGradReLU's forward; its backward is parametric_softplus_grad
    return m.relu(x)


def silu(m, x):
    return x * m.sigmoid(x)


def silu_grad(m, x):
    s, s_neg = sigmoids(m, x)
    return s * (1.0 + x * s_neg)


def gelu_tanh(m, x):
    inner = _SQRT_2_OVER_PI * (x + _GELU_K * (x * x * x))
    return 0.5 * x * (1.0 + m.tanh(inner))


def gelu_tanh_grad(m, x):
    # With u the tanh's argument: (1 + tanh u) / 2 = sigmoid(2u) and 1 - tanh^2 u =
    # 4 sigmoid(2u) sigmoid(-2u), so f' = s (1 + 2 x sigmoid(-2u) u').
    u = _SQRT_2_OVER_PI * (x + _GELU_K * (x * x * x))
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_K * x * x)
    s, s_neg = sigmoids(m, 2.0 * u)
    return s * (1.0 + 2.0 * x * s_neg * du)


def _normal_cdf(m, x):
    # erfc, not 1 + erf: keeps the left tail (see fused_tf.py).
    return 0.5 * m.erfc(-x * _INV_SQRT_2)


def gelu_erf(m, x):
    return x * _normal_cdf(m, x)


def gelu_erf_grad(m, x):
    return _normal_cdf(m, x) + x * _INV_SQRT_2PI * m.exp(-0.5 * x * x)


def _mish_parts(m, x):
    """(tanh(softplus(x)), x sigmoid(x) (1 - tanh(softplus(x))^2)) from one exp(-|x|).

    With e = exp(x) and n = e (e + 2): tanh(log(1 + e)) = n / (n + 2), and the second part
    is 4 x e (1 + e) / (n + 2)^2. For x > 0 both are rewritten in q = exp(-x), so nothing
    overflows and f = x, f' = 1 come out exactly for large x.
    """
    negative = x <= 0
    q = m.exp(m.where(negative, x, -x))
    num = m.where(negative, q * (q + 2.0), 1.0 + 2.0 * q)
    den = num + m.where(negative, 2.0 * m.ones_like(q), 2.0 * q * q)
    inv = 1.0 / den
    return num * inv, 4.0 * x * (1.0 + q) * m.where(negative, q, q * q) * inv * inv


def mish(m, x):
    return x * _mish_parts(m, x)[0]


def mish_grad(m, x):
    t, rest = _mish_parts(m, x)
    return t + rest


def _nonpositive(m, x):
    # min(x, 0), written with where: keeps the branch where() drops finite, and its derivative
    # at 0 is 1 (JAX splits a minimum's gradient at a tie), as TensorFlow's minimum gives.
    return m.where(x > 0, 0.0, x)


def elu(m, x, alpha):
    # exp(x) - 1, not expm1: the values of TensorFlow's Elu kernel (the stored fixtures').
    return m.where(x > 0, x, alpha * (m.exp(_nonpositive(m, x)) - 1.0))


def elu_grad(m, x, alpha):
    # At x == 0 the left derivative alpha, as autodiff of where(x > 0, ...) gives.
    return m.where(x > 0, m.ones_like(x), alpha * m.exp(_nonpositive(m, x)))


def smooth_relu(m, x, beta):
    return m.relu(x - m.log1p(beta * m.abs(x)) / beta)


def smooth_relu_grads(m, x, beta, dy):
    """(dy df/dx, sum of dy df/dbeta over the tensor), `dy` in float32.

    For x > 0, f = x - log1p(z) / beta with z = beta x: df/dx = z / (1 + z) and
    df/dbeta = (log1p(z) - z / (1 + z)) / beta^2. For x <= 0, f = 0.
    """
    positive = x > 0
    z = beta * m.relu(x)
    inv = 1.0 / (1.0 + z)
    ratio = m.where(z < 1.0, z * inv, 1.0 - inv)  # whichever form does not cancel
    dx = m.where(positive, dy * ratio, m.zeros_like(x))
    # log(1 + z), not log1p: XLA's log1p costs about a third of the layer. Beta's gradient is
    # a sum over the tensor, dominated by the large z where the two agree.
    dbeta = m.sum(m.where(positive, dy * (m.log(1.0 + z) - ratio), 0.0 * x))
    return dx, dbeta / (beta * beta)
