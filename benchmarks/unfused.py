"""The smooth activations as unfused chains of ops: the "unfused" columns of section 2.

Each `call` is a chain of `keras.ops` (TensorFlow kernels, differentiated by autodiff), the form
of these layers at commit b012865, so section 2 can time unfused and fused (`sat_tf/fused.py`)
side by side in one run. Same formulas as `sat_tf.activations`; not registered for saving
(benchmarks only).
"""

import keras
from keras import ops

from sat_tf import activations

_LOW = ("float16", "bfloat16")


def _up(x):
    dtype = keras.backend.standardize_dtype(x.dtype)
    return (ops.cast(x, "float32"), dtype) if dtype in _LOW else (x, None)


def _down(y, dtype):
    return y if dtype is None else ops.cast(y, dtype)


class Softplus(activations.Softplus):
    def call(self, x):
        x, dtype = _up(x)
        return _down(ops.softplus(self.alpha * x) / self.alpha, dtype)


class SiLU(activations.SiLU):
    def call(self, x):
        return ops.silu(x)


class GELU(activations.GELU):
    def call(self, x):
        x, dtype = _up(x)
        return _down(ops.gelu(x, approximate=self.approximate), dtype)


class ELU(activations.ELU):
    def call(self, x):
        return ops.elu(x, alpha=self.alpha)


class Mish(activations.Mish):
    def call(self, x):
        x, dtype = _up(x)
        return _down(x * ops.tanh(ops.softplus(x)), dtype)


class SmoothReLU(activations.SmoothReLU):
    def call(self, x):
        x, dtype = _up(x)
        beta = ops.square(ops.cast(self.b, x.dtype))
        return _down(ops.relu(x - ops.log1p(beta * ops.abs(x)) / beta), dtype)


def _parametric_softplus(**kwargs):
    return Softplus(**{"alpha": 10.0, **kwargs})


# The names section 2 times, as factories `activations.get` accepts.
ACTIVATIONS = {
    "silu": SiLU,
    "gelu": GELU,
    "softplus": Softplus,
    "parametric_softplus": _parametric_softplus,
    "elu": ELU,
    "smooth_relu": SmoothReLU,
    "mish": Mish,
}
