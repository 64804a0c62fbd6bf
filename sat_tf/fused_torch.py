"""`sat_tf.fused` under PyTorch: each smooth activation as a `torch.autograd.Function`.

The forward and the backward are each a function of `x` only (the backward recomputes what it
needs), so autograd keeps one tensor per activation for the backward pass instead of the
intermediates of the plain formula. The formulas are `fused_formulas.py`'s, run on `torch`:
the same values and gradients as `fused_jax.py` and `fused_tf.py`, with the same care with
overflow and cancellation. PyTorch runs them op by op (eagerly, nothing is fused).

The backward functions are differentiable torch code, so a backward with `create_graph=True`
(second derivatives, nested `torch.autograd.grad`) differentiates them. Half-precision inputs
are computed in float32 and cast back; gradients come back in the dtype of the upstream
gradient.
"""

import types

import keras
import torch

from sat_tf import fused_formulas as formulas

# The array namespace the formulas run on.
_M = types.SimpleNamespace(
    **{n: getattr(torch, n) for n in ("exp", "log", "log1p", "tanh", "abs", "where", "sum")},
    ones_like=torch.ones_like,
    zeros_like=torch.zeros_like,
    erfc=torch.special.erfc,
    sigmoid=torch.sigmoid,
    relu=torch.relu,
)
_HALF = (torch.float16, torch.bfloat16)


def _f32(x):
    return x.to(torch.float32) if x.dtype in _HALF else x


def _times(dy, grad):
    """dy * grad in float32, in dy's dtype: the chain rule through an upcast and a downcast."""
    return (_f32(dy) * grad).to(dy.dtype)


def _unary(name, value, derivative):
    """An op `f(x, *params)` from the formulas `value(m, x, *params)`, `derivative(m, x, *params)`.

    `params` are Python floats (layer configuration) with no gradient. The op is a
    `torch.autograd.Function` subclass called `name` (its graph nodes read `<name>Backward`).
    """

    def forward(ctx, x, *params):
        ctx.save_for_backward(x)
        ctx.params = params
        return value(_M, _f32(x), *params).to(x.dtype)

    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _times(dy, derivative(_M, _f32(x), *ctx.params)), *[None] * len(ctx.params)

    function = type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )
    return lambda x, *params: function.apply(
        keras.ops.convert_to_tensor(x), *(float(p) for p in params)
    )


softplus = _unary("Softplus", formulas.softplus, formulas.softplus_grad)
parametric_softplus = _unary(
    "ParametricSoftplus", formulas.parametric_softplus, formulas.parametric_softplus_grad
)
silu = _unary("SiLU", formulas.silu, formulas.silu_grad)
gelu_tanh = _unary("GELUTanh", formulas.gelu_tanh, formulas.gelu_tanh_grad)
gelu_erf = _unary("GELUErf", formulas.gelu_erf, formulas.gelu_erf_grad)
elu = _unary("ELU", formulas.elu, formulas.elu_grad)
mish = _unary("Mish", formulas.mish, formulas.mish_grad)
relu_with_softplus_grad = _unary(
    "ReLUWithSoftplusGrad", formulas.relu, formulas.parametric_softplus_grad
)


class _SmoothReLU(torch.autograd.Function):
    """relu(x - log1p(beta |x|) / beta) with beta = b^2, differentiable in `x` and `b`."""

    @staticmethod
    def forward(ctx, x, b):
        ctx.save_for_backward(x, b)
        return formulas.smooth_relu(_M, _f32(x), b * b).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, b = ctx.saved_tensors
        dx, dbeta = formulas.smooth_relu_grads(_M, _f32(x), b * b, _f32(dy))
        return dx.to(dy.dtype), (2.0 * b * dbeta).to(b.dtype)


def smooth_relu(x, b):
    """relu(x - log1p(beta |x|) / beta) with beta = b^2; `b` (a float32 scalar) gets a gradient."""
    return _SmoothReLU.apply(
        keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(b, "float32")
    )
