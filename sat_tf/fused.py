"""The smooth activations as fused ops: one forward and one backward kernel each, per backend.

`sat_tf.activations` calls these; each is a function of the input `x` (and, for SmoothReLU, of its
parameter `b`) whose forward and backward are each one elementwise function of `x`, so the
backward recomputes what it needs instead of keeping autodiff's intermediates, and XLA fuses
each into one loop over the tensor where the backend compiles with it:

  - TensorFlow (`fused_tf.py`): `tf.custom_gradient` ops with XLA-compiled forward and backward.
  - JAX (`fused_jax.py`): `jax.custom_vjp` functions, fused by the step's `jax.jit`.
  - PyTorch (`fused_torch.py`): `torch.autograd.Function`s, run op by op (eager, not fused).

JAX and PyTorch run the formulas of `fused_formulas.py` on their own array ops; TensorFlow's
kernels write the same formulas in TensorFlow ops. All compute half precision in float32, with
the same values and gradients as autodiff of those formulas (tests/test_activations.py, run
under each backend). The module of the running Keras backend is picked at import
(`sat_tf.backend`), so TensorFlow is never imported under JAX or PyTorch.

    softplus(x), parametric_softplus(x, alpha), silu(x), gelu_tanh(x), gelu_erf(x),
    elu(x, alpha), mish(x), smooth_relu(x, b), relu_with_softplus_grad(x, alpha)
"""

import importlib

from sat_tf import backend

_MODULES = {
    "tensorflow": "sat_tf.fused_tf",
    "jax": "sat_tf.fused_jax",
    "torch": "sat_tf.fused_torch",
}
_impl = importlib.import_module(_MODULES[backend.NAME])

softplus = _impl.softplus
parametric_softplus = _impl.parametric_softplus
silu = _impl.silu
gelu_tanh = _impl.gelu_tanh
gelu_erf = _impl.gelu_erf
elu = _impl.elu
mish = _impl.mish
smooth_relu = _impl.smooth_relu
relu_with_softplus_grad = _impl.relu_with_softplus_grad

__all__ = [
    "elu",
    "gelu_erf",
    "gelu_tanh",
    "mish",
    "parametric_softplus",
    "relu_with_softplus_grad",
    "silu",
    "smooth_relu",
    "softplus",
]
