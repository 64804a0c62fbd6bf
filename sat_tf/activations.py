"""Smooth activations for Smooth Adversarial Training (Xie et al., 2020).

Every activation is a Keras 3 layer, registered for safe `.keras` loading, so a
ReLU model and its SAT twin differ in one constructor argument. `get()` turns a
name, class, config dict or callable into a factory that makes a fresh layer:
models resolve the activation once and pass the factory to every block.

Each smooth activation runs as one fused op (`sat_tf.fused`): one XLA-compiled
elementwise kernel forward and one backward that recomputes from the input, so it
costs about what ReLU costs instead of a chain of 3-8 kernels each way. The
formulas are the ones in the docstrings; gradients, second derivatives included,
equal autodiff of those formulas (tests/test_activations.py).

`SmoothGradReLU` is ReLU forward with a Softplus gradient backward (the paper's
gradient-quality study, Sec. 3). Whether the smooth backward is used is chosen
per phase with the `smooth_gradients(...)` context manager. The switch is read
when the layer's `call` is traced, and it lives in thread-local state: under
`tf.function` each phase traces its own branch, and under MirroredStrategy each
replica thread runs its own train step with its own switch.
"""

import contextlib
import threading

import keras
from keras import ops

from sat_tf import fused


def _check_positive(name, value):
    if not value > 0:
        raise ValueError(f"`{name}` must be > 0. Received: {name}={value!r}")


class _Elementwise(keras.layers.Layer):
    """Base of the activation layers here: an elementwise function of the input.

    Holds what every elementwise layer repeats, as Keras's own activation layers do
    (`keras.layers.LeakyReLU`): the output has the input's shape, and a mask passes through
    unchanged. Subclasses define `call` and, when they take arguments, `get_config`.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="sat_tf")
class Softplus(_Elementwise):
    """Parametric softplus: f(x) = softplus(alpha * x) / alpha = log(1 + exp(alpha x)) / alpha.

    alpha = 1 is the usual softplus; larger alpha approaches ReLU (the SAT paper
    uses alpha = 10). Computed in float32 for float16/bfloat16 inputs, so it does
    not overflow at large |alpha * x|.

    Args:
        alpha: Sharpness, > 0.
    """

    def __init__(self, alpha=1.0, **kwargs):
        super().__init__(**kwargs)
        _check_positive("alpha", alpha)
        self.alpha = float(alpha)

    def call(self, x):
        if self.alpha == 1.0:  # plain softplus, no scaling (faster than TensorFlow's Softplus op)
            return fused.softplus(x)
        return fused.parametric_softplus(x, self.alpha)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="sat_tf")
class SiLU(_Elementwise):
    """SiLU / Swish: f(x) = x * sigmoid(x) (Ramachandran et al., 2017)."""

    def call(self, x):
        return fused.silu(x)


@keras.saving.register_keras_serializable(package="sat_tf")
class GELU(_Elementwise):
    """GELU: f(x) = x * Phi(x) (Hendrycks & Gimpel, 2016).

    With `approximate=True` (the tanh form the official SAT code uses):
    f(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Args:
        approximate: Use the tanh approximation instead of the exact erf form.
    """

    def __init__(self, approximate=True, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(approximate, bool):
            raise ValueError(f"`approximate` must be a bool. Received: approximate={approximate!r}")
        self.approximate = approximate

    def call(self, x):
        return fused.gelu_tanh(x) if self.approximate else fused.gelu_erf(x)

    def get_config(self):
        return {**super().get_config(), "approximate": self.approximate}


@keras.saving.register_keras_serializable(package="sat_tf")
class ELU(_Elementwise):
    """ELU: f(x) = x for x > 0, alpha * (exp(x) - 1) otherwise (Clevert et al., 2016).

    Args:
        alpha: Negative saturation value, > 0.
    """

    def __init__(self, alpha=1.0, **kwargs):
        super().__init__(**kwargs)
        _check_positive("alpha", alpha)
        self.alpha = float(alpha)

    def call(self, x):
        # Fused for alpha = 1 too: TensorFlow's EluGrad works from exp(x) - 1 + 1, which
        # loses the left tail (0 instead of 2e-22 at x = -50).
        return fused.elu(x, self.alpha)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="sat_tf")
class Mish(_Elementwise):
    """Mish: f(x) = x * tanh(softplus(x)) (Misra, 2019)."""

    def call(self, x):
        return fused.mish(x)


@keras.saving.register_keras_serializable(package="sat_tf")
class SmoothReLU(_Elementwise):
    """SmoothReLU: f(x) = relu(x - log(beta |x| + 1) / beta), with beta = b^2 learnable.

    For x > 0 this is x - log(beta x + 1) / beta, whose derivative
    beta x / (beta x + 1) rises smoothly from 0; for x <= 0 it is 0. As in the
    official SAT code, the layer learns b (initialised to `beta_init`) and uses
    beta = b^2, so beta stays positive.

    Args:
        beta_init: Initial value of b, != 0.
        trainable_beta: Whether b is trained.
    """

    def __init__(self, beta_init=20.0, trainable_beta=True, **kwargs):
        super().__init__(**kwargs)
        if not beta_init or beta_init != beta_init:
            raise ValueError(
                f"`beta_init` must be a non-zero number. Received: beta_init={beta_init!r}"
            )
        self.beta_init = float(beta_init)
        self.trainable_beta = bool(trainable_beta)

    def build(self, input_shape):
        self.b = self.add_weight(
            name="b",
            shape=(),
            initializer=keras.initializers.Constant(self.beta_init),
            trainable=self.trainable_beta,
        )

    def call(self, x):
        # b as the layer reads it (rounded to the compute dtype under a mixed policy), then
        # float32: the kernel computes in float32.
        return fused.smooth_relu(x, ops.cast(self.b, "float32"))

    def get_config(self):
        return {
            **super().get_config(),
            "beta_init": self.beta_init,
            "trainable_beta": self.trainable_beta,
        }


_switch = threading.local()


@contextlib.contextmanager
def smooth_gradients(enabled):
    """Turns the smooth backward pass of every `SmoothGradReLU` on or off.

    Applies to layers called (or traced) inside the block, in this thread. Use
    one block around each phase: the attack's forward and input gradient, or the
    training forward and weight gradient.

    Args:
        enabled: True for the Softplus gradient, False for ReLU's step gradient.
    """
    previous = getattr(_switch, "enabled", None)
    _switch.enabled = bool(enabled)
    try:
        yield
    finally:
        _switch.enabled = previous


def smooth_gradients_enabled(default=True):
    """The switch set by the innermost `smooth_gradients` block, or `default`."""
    enabled = getattr(_switch, "enabled", None)
    return default if enabled is None else enabled


@keras.saving.register_keras_serializable(package="sat_tf")
class SmoothGradReLU(_Elementwise):
    """ReLU forward, parametric-softplus gradient backward.

    Forward: f(x) = max(x, 0), exactly. Backward, when smooth: df/dx = sigmoid(alpha x),
    the derivative of `Softplus(alpha)`; otherwise ReLU's step function. This is the
    SAT paper's gradient-quality ablation: only the gradient changes, never the
    function. The active setting comes from `smooth_gradients(...)`; outside any
    such block, `smooth_backward` decides.

    Args:
        alpha: Sharpness of the backward softplus, > 0 (the paper uses 10).
        smooth_backward: Default when no `smooth_gradients` block is active.
    """

    def __init__(self, alpha=10.0, smooth_backward=True, **kwargs):
        super().__init__(**kwargs)
        _check_positive("alpha", alpha)
        self.alpha = float(alpha)
        self.smooth_backward = bool(smooth_backward)

    def call(self, x):
        if smooth_gradients_enabled(self.smooth_backward):
            return fused.relu_with_softplus_grad(x, self.alpha)
        return ops.relu(x)

    def get_config(self):
        return {
            **super().get_config(),
            "alpha": self.alpha,
            "smooth_backward": self.smooth_backward,
        }


def _relu(**kwargs):
    return keras.layers.ReLU(**kwargs)


_ACTIVATIONS = {
    "relu": _relu,
    "softplus": Softplus,
    "parametric_softplus": lambda **kw: Softplus(**{"alpha": 10.0, **kw}),
    "silu": SiLU,
    "swish": SiLU,
    "gelu": GELU,
    "elu": ELU,
    "smooth_relu": SmoothReLU,
    "mish": Mish,
    "smooth_grad_relu": SmoothGradReLU,
}


def names():
    """The activation names `get` accepts."""
    return sorted(_ACTIVATIONS)


def get(identifier):
    """Resolves an activation identifier to a factory `f(**layer_kwargs) -> Layer`.

    Args:
        identifier: A name from `names()`, a `keras.layers.Layer` subclass, a
            Keras config dict (`{"class_name": ..., "config": ...}`), a Keras
            activation function (wrapped in `keras.layers.Activation`), or a
            callable that returns a fresh layer.

    Returns:
        A callable; each call returns a new layer (layers are never shared, so
        each block gets its own weights, e.g. SmoothReLU's beta).
    """
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _ACTIVATIONS:
            raise ValueError(
                f"Unknown activation {identifier!r}. Valid names: {', '.join(names())}."
            )
        return _ACTIVATIONS[key]
    if isinstance(identifier, dict):
        if "class_name" not in identifier:
            raise ValueError(
                "An activation config dict needs 'class_name' and 'config' keys, as "
                f"produced by keras.saving.serialize_keras_object. Received: {identifier!r}"
            )
        return lambda **kw: keras.saving.deserialize_keras_object(
            {**identifier, "config": {**identifier.get("config", {}), **kw}}
        )
    if isinstance(identifier, type) and issubclass(identifier, keras.layers.Layer):
        return identifier
    if callable(identifier) and getattr(identifier, "__module__", "").startswith("keras"):
        # A Keras activation function such as keras.activations.silu.
        return lambda **kw: keras.layers.Activation(identifier, **kw)
    if callable(identifier):
        return identifier
    raise ValueError(
        "An activation must be a name, a Layer class, a config dict or a callable. "
        f"Received: {identifier!r}"
    )
