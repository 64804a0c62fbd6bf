"""Activations against NumPy formulas, finite differences, and .keras round trips."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import activations

GRID = np.array([-1e4, -50.0, -3.0, -1.0, -0.3, -1e-3, 0.0, 1e-3, 0.3, 1.0, 3.0, 50.0, 1e4])


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softplus(x):
    return np.logaddexp(0.0, x)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _gelu_erf(x):
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _smooth_relu(x, b):
    beta = b * b
    return np.maximum(x - np.log1p(beta * np.abs(x)) / beta, 0.0)


# (layer, numpy reference) pairs, with non-default arguments where there are any.
CASES = {
    "softplus_a1": (lambda: activations.Softplus(), _softplus),
    "softplus_a10": (lambda: activations.Softplus(alpha=10.0), lambda x: _softplus(10 * x) / 10),
    "silu": (activations.SiLU, lambda x: x * _sigmoid(x)),
    "gelu_tanh": (activations.GELU, _gelu_tanh),
    "gelu_erf": (lambda: activations.GELU(approximate=False), _gelu_erf),
    "elu": (
        lambda: activations.ELU(alpha=0.5),
        lambda x: np.where(x > 0, x, 0.5 * np.expm1(np.minimum(x, 0))),
    ),
    "mish": (activations.Mish, lambda x: x * np.tanh(_softplus(x))),
    "smooth_relu": (lambda: activations.SmoothReLU(beta_init=3.0), lambda x: _smooth_relu(x, 3.0)),
    "smooth_grad_relu": (activations.SmoothGradReLU, lambda x: np.maximum(x, 0.0)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_values_match_numpy_float32(name):
    make, ref = CASES[name]
    y = np.asarray(make()(tf.constant(GRID, tf.float32)))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref(GRID), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_low_precision_is_finite_and_close(name, dtype):
    make, ref = CASES[name]
    keras.config.set_dtype_policy(dtype)  # layers compute in the policy's dtype
    y = make()(tf.constant(GRID, dtype))
    assert y.dtype == tf.as_dtype(dtype)
    y = np.asarray(tf.cast(y, tf.float32))
    assert np.all(np.isfinite(y)), f"{name} overflowed in {dtype}: {y}"
    # Half types carry about 3 (bf16: 2) significant digits; inputs are rounded too.
    x = np.asarray(tf.cast(tf.constant(GRID, dtype), tf.float32), np.float64)
    np.testing.assert_allclose(y, ref(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"smooth_grad_relu"}))
def test_gradients_match_finite_differences(name):
    make, ref = CASES[name]
    layer = make()
    x = np.array([-4.0, -1.0, -0.3, -0.05, 0.05, 0.3, 1.0, 4.0])
    xt = tf.constant(x, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(tf.cast(xt, tf.float32))
    grad = tape.gradient(y, xt).numpy()
    h = 1e-5
    numeric = (ref(x + h) - ref(x - h)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_softplus_gradient_at_zero_and_extremes():
    x = tf.constant([-1e4, 0.0, 1e4])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = activations.Softplus(alpha=10.0)(x)
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), [0.0, 0.5, 1.0], atol=1e-6)


def test_smooth_grad_relu_forward_is_exactly_relu():
    x = tf.random.normal([1000]) * 10
    for enabled in (True, False):
        with activations.smooth_gradients(enabled):
            y = activations.SmoothGradReLU(alpha=10.0)(x)
        np.testing.assert_array_equal(y.numpy(), tf.nn.relu(x).numpy())


def _smooth_grad_relu_gradient(x, alpha, enabled=None, default=True):
    layer = activations.SmoothGradReLU(alpha=alpha, smooth_backward=default)

    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return tape.gradient(y, x)

    if enabled is None:
        return run().numpy()
    with activations.smooth_gradients(enabled):
        return run().numpy()


def test_smooth_grad_relu_gradient_switch():
    x = tf.constant(GRID[2:-2], tf.float32)
    np.testing.assert_allclose(
        _smooth_grad_relu_gradient(x, 10.0, enabled=True), _sigmoid(10.0 * GRID[2:-2]), atol=1e-6
    )
    np.testing.assert_array_equal(
        _smooth_grad_relu_gradient(x, 10.0, enabled=False), (GRID[2:-2] > 0).astype(np.float32)
    )
    # Outside any block, the layer's own default decides.
    np.testing.assert_array_equal(
        _smooth_grad_relu_gradient(x, 10.0, default=False), (GRID[2:-2] > 0).astype(np.float32)
    )


def test_smooth_grad_switch_inside_tf_function():
    layer = activations.SmoothGradReLU(alpha=2.0)
    x = tf.constant([-1.0, 0.5])

    @tf.function
    def two_phases(x):
        grads = []
        for enabled in (True, False):
            with activations.smooth_gradients(enabled), tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
            grads.append(tape.gradient(y, x))
        return grads

    smooth, hard = two_phases(x)
    np.testing.assert_allclose(smooth.numpy(), _sigmoid(2.0 * np.array([-1.0, 0.5])), atol=1e-6)
    np.testing.assert_array_equal(hard.numpy(), [0.0, 1.0])


def test_smooth_grad_switch_under_mirrored_strategy():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
    if len(devices) < 2:
        pytest.skip("needs two logical CPU devices (set up in conftest.py)")
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        layer = activations.SmoothGradReLU(alpha=2.0)

    @tf.function
    def step(x):
        def replica_fn(x):
            out = []
            for enabled in (True, False):
                with activations.smooth_gradients(enabled), tf.GradientTape() as tape:
                    tape.watch(x)
                    y = layer(x)
                out.append(tape.gradient(y, x))
            return out

        return strategy.run(replica_fn, args=(x,))

    smooth, hard = step(tf.constant([-1.0, 0.5]))
    for value in strategy.experimental_local_results(smooth):
        np.testing.assert_allclose(value.numpy(), _sigmoid(2.0 * np.array([-1.0, 0.5])), atol=1e-6)
    for value in strategy.experimental_local_results(hard):
        np.testing.assert_array_equal(value.numpy(), [0.0, 1.0])


def test_smooth_relu_beta_is_learnable():
    layer = activations.SmoothReLU(beta_init=2.0)
    x = tf.constant([0.5, 2.0])
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(layer(x))
    (grad,) = tape.gradient(y, layer.trainable_weights)
    assert float(grad) != 0.0
    frozen = activations.SmoothReLU(beta_init=2.0, trainable_beta=False)
    frozen.build((2,))
    assert frozen.trainable_weights == []


@pytest.mark.parametrize(
    "layer",
    [
        activations.Softplus(alpha=10.0),
        activations.GELU(approximate=False),
        activations.ELU(alpha=0.25),
        activations.SmoothReLU(beta_init=7.0, trainable_beta=False),
        activations.SmoothGradReLU(alpha=3.0, smooth_backward=False),
        activations.SiLU(),
        activations.Mish(),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_keras_round_trip_with_non_default_arguments(layer, tmp_path):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    inputs = keras.Input((5,))
    model = keras.Model(inputs, layer(keras.layers.Dense(5)(inputs)))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    restored = [lyr for lyr in loaded.layers if type(lyr) is type(layer)][0]
    assert restored.get_config() == config
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32") * 3
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: activations.Softplus(alpha=0.0), "alpha=0.0"),
        (lambda: activations.ELU(alpha=-1.0), "alpha=-1.0"),
        (lambda: activations.SmoothGradReLU(alpha=-2), "alpha=-2"),
        (lambda: activations.SmoothReLU(beta_init=0.0), "beta_init=0.0"),
        (lambda: activations.GELU(approximate="yes"), "approximate='yes'"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_get_resolves_every_identifier_kind():
    for name in activations.names():
        layer = activations.get(name)()
        assert isinstance(layer, keras.layers.Layer)
        assert layer is not activations.get(name)(), "factories must make fresh layers"
    assert activations.get("parametric_softplus")().alpha == 10.0
    assert isinstance(activations.get("swish")(), activations.SiLU)
    assert isinstance(activations.get("relu")(), keras.layers.ReLU)
    assert activations.get(activations.ELU) is activations.ELU
    config = keras.saving.serialize_keras_object(activations.Softplus(alpha=4.0))
    assert activations.get(config)().alpha == 4.0
    wrapped = activations.get(keras.activations.silu)()
    np.testing.assert_allclose(wrapped(tf.constant([1.0])), [1.0 * _sigmoid(1.0)], rtol=1e-6)


def test_get_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="Valid names: .*smooth_grad_relu"):
        activations.get("relu6")
    with pytest.raises(ValueError, match="must be a name"):
        activations.get(3)
