"""Activations against NumPy formulas, finite differences, and .keras round trips.

Run under each backend (`backends`). The exact reference of the fused gradients is float64
autodiff of the plain formulas, under JAX inside `jax.enable_x64` (JAX computes without 64-bit
types otherwise); the fused layers always run in float32 and meet the same tolerances on both.
"""

import contextlib
import functools
import json
import math
import pathlib
import zipfile

import keras
import numpy as np
import pytest
from conftest import BACKEND, only_tensorflow
from keras import ops

from sat_tf import activations, backend

pytestmark = pytest.mark.backends

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


def _tensor(x, dtype="float32"):
    return ops.convert_to_tensor(np.asarray(x), dtype)


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def _gradient(fn, x):
    """d sum(fn(x)) / dx (x a tensor or a list of tensors): each element's derivative."""
    return backend.value_and_gradient(lambda x: (ops.sum(fn(x)), None), x)[2]


def _compiled(fn):
    """`fn` compiled as the backend compiles a step (tf.function / jax.jit; PyTorch: eager)."""
    if BACKEND == "torch":
        return fn
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

    return tf.function(fn)


def _float64():
    """A context in which the backend computes in float64 (JAX: `jax.enable_x64`)."""
    if BACKEND == "jax":
        import jax

        return jax.enable_x64(True)
    return contextlib.nullcontext()


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
    y = _numpy(make()(_tensor(GRID)))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref(GRID), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_low_precision_is_finite_and_close(name, dtype):
    make, ref = CASES[name]
    keras.config.set_dtype_policy(dtype)  # layers compute in the policy's dtype
    y = make()(_tensor(GRID, dtype))
    assert keras.backend.standardize_dtype(y.dtype) == dtype
    y = _numpy(ops.cast(y, "float32"))
    assert np.all(np.isfinite(y)), f"{name} overflowed in {dtype}: {y}"
    # Half types carry about 3 (bf16: 2) significant digits; inputs are rounded too.
    x = _numpy(ops.cast(_tensor(GRID, dtype), "float32")).astype(np.float64)
    np.testing.assert_allclose(y, ref(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"smooth_grad_relu"}))
def test_gradients_match_finite_differences(name):
    make, ref = CASES[name]
    layer = make()
    x = np.array([-4.0, -1.0, -0.3, -0.05, 0.05, 0.3, 1.0, 4.0])
    grad = _numpy(_gradient(layer, _tensor(x)))
    h = 1e-5
    numeric = (ref(x + h) - ref(x - h)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_softplus_gradient_at_zero_and_extremes():
    grad = _gradient(activations.Softplus(alpha=10.0), _tensor([-1e4, 0.0, 1e4]))
    np.testing.assert_allclose(_numpy(grad), [0.0, 0.5, 1.0], atol=1e-6)


def test_smooth_grad_relu_forward_is_exactly_relu():
    x = np.random.default_rng(0).normal(size=1000).astype("float32") * 10
    for enabled in (True, False):
        with activations.smooth_gradients(enabled):
            y = activations.SmoothGradReLU(alpha=10.0)(_tensor(x))
        np.testing.assert_array_equal(_numpy(y), np.maximum(x, 0.0))


def _smooth_grad_relu_gradient(x, alpha, enabled=None, default=True):
    layer = activations.SmoothGradReLU(alpha=alpha, smooth_backward=default)

    if enabled is None:
        return _numpy(_gradient(layer, x))
    with activations.smooth_gradients(enabled):
        return _numpy(_gradient(layer, x))


def test_smooth_grad_relu_gradient_switch():
    x = _tensor(GRID[2:-2])
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


def test_smooth_grad_switch_inside_a_compiled_function():
    # The switch is read at trace time: one compiled function can hold both phases.
    layer = activations.SmoothGradReLU(alpha=2.0)

    @_compiled
    def two_phases(x):
        grads = []
        for enabled in (True, False):
            with activations.smooth_gradients(enabled):
                grads.append(_gradient(layer, x))
        return grads

    smooth, hard = two_phases(_tensor([-1.0, 0.5]))
    np.testing.assert_allclose(_numpy(smooth), _sigmoid(2.0 * np.array([-1.0, 0.5])), atol=1e-6)
    np.testing.assert_array_equal(_numpy(hard), [0.0, 1.0])


@only_tensorflow
def test_smooth_grad_switch_under_mirrored_strategy():
    import tensorflow as tf

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


def _weight_gradients(layer, x):
    """d sum(layer(x)) / d layer.trainable_variables, through `stateless_call`."""
    if not layer.built:
        layer.build(x.shape)
    frozen = [v.value for v in layer.non_trainable_variables]

    def fn(values):
        return layer.stateless_call(values, frozen, x)[0]

    return _gradient(fn, [v.value for v in layer.trainable_variables])


def test_smooth_relu_beta_is_learnable():
    layer = activations.SmoothReLU(beta_init=2.0)
    (grad,) = _weight_gradients(layer, _tensor([0.5, 2.0]))
    assert float(_numpy(grad)) != 0.0
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
    np.testing.assert_allclose(_numpy(loaded(x)), _numpy(model(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_layers_keep_the_input_shape_and_mask(name):
    make, ref = CASES[name]
    layer = make()
    assert layer.compute_output_shape((None, 3, 2)) == (None, 3, 2)
    # A masked time step (all zeros) must stay out of the masked average after the activation.
    inputs = keras.Input((3, 2))
    pooled = keras.layers.GlobalAveragePooling1D()(layer(keras.layers.Masking(0.0)(inputs)))
    model = keras.Model(inputs, pooled)
    x = np.array([[[1.0, -2.0], [0.0, 0.0], [0.5, 3.0]]], np.float32)
    expected = ref(x[:, [0, 2]].astype(np.float64)).mean(axis=1)
    np.testing.assert_allclose(_numpy(model(x)), expected, rtol=1e-5, atol=1e-6)


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
    np.testing.assert_allclose(_numpy(wrapped(_tensor([1.0]))), [_sigmoid(1.0)], rtol=1e-6)


def test_get_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="Valid names: .*smooth_grad_relu"):
        activations.get("relu6")
    with pytest.raises(ValueError, match="must be a name"):
        activations.get(3)


# --- Fused ops: gradients against autodiff of the plain formulas --------------------------------

# The plain formulas, written here in array ops `m` (keras.ops, or jax.numpy for JAX's float64
# reference, see `_ops`) so that the backend's autodiff differentiates them: the reference the
# fused forward/backward kernels must match. Each takes (m, x, b) where b is the SmoothReLU
# parameter (ignored by the others).
_C = math.sqrt(2.0 / math.pi)
PLAIN = {
    "softplus_a1": lambda m, x, b: m.softplus(x),
    "softplus_a10": lambda m, x, b: m.softplus(10.0 * x) / 10.0,
    "silu": lambda m, x, b: x * m.sigmoid(x),
    "gelu_tanh": lambda m, x, b: 0.5 * x * (1.0 + m.tanh(_C * (x + 0.044715 * x**3))),
    "gelu_erf": lambda m, x, b: 0.5 * x * (1.0 + m.erf(x / math.sqrt(2.0))),
    # expm1 of where(x > 0, 0, x): exp(1e4) in the branch where() drops would make autodiff NaN,
    # and where (not minimum, whose gradient JAX splits at a tie) gives the left derivative at 0.
    "elu": lambda m, x, b: m.where(x > 0, x, 0.5 * m.expm1(m.where(x > 0, 0.0, x))),
    "elu_a1": lambda m, x, b: m.where(x > 0, x, m.expm1(m.where(x > 0, 0.0, x))),
    "mish": lambda m, x, b: x * m.tanh(m.softplus(x)),
    "smooth_relu": lambda m, x, b: m.relu(x - m.log1p(b * b * m.abs(x)) / (b * b)),
    # SmoothGradReLU's smooth backward is the derivative of Softplus(alpha=10).
    "smooth_grad_relu": lambda m, x, b: m.softplus(10.0 * x) / 10.0,
}


def _ops(dtype):
    """The array ops the plain formulas run on: keras.ops, except for float64 under JAX, where
    keras.ops computes some functions (tanh) in float32 even inside `jax.enable_x64`."""
    if BACKEND != "jax" or dtype != "float64":
        return ops
    import types

    import jax
    import jax.numpy as jnp

    return types.SimpleNamespace(
        **{n: getattr(jnp, n) for n in ("tanh", "where", "expm1", "log1p", "abs")},
        softplus=jax.nn.softplus,
        sigmoid=jax.nn.sigmoid,
        relu=jax.nn.relu,
        erf=jax.scipy.special.erf,
    )


FUSED = {
    "softplus_a1": lambda: activations.Softplus(),
    "softplus_a10": lambda: activations.Softplus(alpha=10.0),
    "silu": activations.SiLU,
    "gelu_tanh": activations.GELU,
    "gelu_erf": lambda: activations.GELU(approximate=False),
    "elu": lambda: activations.ELU(alpha=0.5),
    "elu_a1": activations.ELU,
    "mish": activations.Mish,
    "smooth_relu": lambda: activations.SmoothReLU(beta_init=3.0),
    "smooth_grad_relu": lambda: activations.SmoothGradReLU(alpha=10.0),
}
# 0, +-1e-6, +-1e4, and a dense sweep of the range where the functions bend.
GRAD_GRID = np.concatenate(
    [
        [-1e4, -100.0, -50.0, -20.0, -1e-3, -1e-6, 0.0, 1e-6, 1e-3, 20.0, 50.0, 100.0, 1e4],
        np.linspace(-8.0, 8.0, 161),
    ]
).astype(np.float32)


def _grads(fn, x, b, order):
    """d^order fn(x, b) / dx^order (upstream ones) and, for order 1, d sum(fn) / db.

    `x` and `b` are NumPy arrays computed in `dtype`: float64 (the exact reference, under JAX
    inside `jax.enable_x64`) or float32 (the floor: float32 autodiff's own error).
    """
    dtype = x.dtype.name
    fn = functools.partial(fn, _ops(dtype))
    with _float64() if dtype == "float64" else contextlib.nullcontext():
        x, b = _tensor(x, dtype), _tensor(b, dtype)
        if order == 1:
            dx, db = _gradient(lambda xb: fn(*xb), [x, b])
            return _numpy(dx), (0.0 if db is None else _numpy(db))  # TF: None if unconnected
        return _numpy(_gradient(lambda x: _gradient(lambda x: fn(x, b), x), x)), None


def _fused_grads(name, x, order):
    """The fused layer's gradients; for SmoothReLU also the gradient of its variable b."""
    layer = FUSED[name]()
    layer.build((None,))
    x = _tensor(x)
    if order == 2:
        return _numpy(_gradient(lambda x: _gradient(layer, x), x)), None
    weights = _weight_gradients(layer, x)
    return _numpy(_gradient(layer, x)), (_numpy(weights[0]) if weights else None)


def _assert_as_accurate(got, exact, autodiff32, rtol, atol, what):
    """|got - exact| within rtol |exact|, atol, or twice float32 autodiff's own error there.

    `exact` is float64 autodiff of the plain formula. The floors cover what float32 cannot
    resolve for any formula: values near a zero crossing of the derivative (an absolute error
    of an ulp of the terms), far tails (~1e-20, where float64's own 1 - tanh already
    cancels), and the few points where the plain formula itself cancels in float32.
    """
    err = np.abs(got.astype(np.float64) - exact)
    bound = np.maximum(rtol * np.abs(exact), 2.0 * np.abs(autodiff32 - exact))
    bad = err > np.maximum(bound, atol)
    assert not bad.any(), (
        f"{what}: x={GRAD_GRID[bad]}, got={got[bad]}, exact={exact[bad]}, "
        f"float32 autodiff={autodiff32[bad]}"
    )


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_gradients_equal_autodiff_of_the_plain_formula(name, order):
    got, got_db = _fused_grads(name, GRAD_GRID, order)
    exact, exact_db = _grads(PLAIN[name], GRAD_GRID.astype(np.float64), np.float64(3.0), order)
    auto32, _ = _grads(PLAIN[name], GRAD_GRID, np.float32(3.0), order)
    assert np.all(np.isfinite(got))
    tol = {1: (1e-6, 1e-7), 2: (1e-5, 1e-6)}[order]  # (rtol, atol): about one ulp of 1.0 for atol
    _assert_as_accurate(got, exact, auto32, *tol, f"{name} order {order}")
    if name == "smooth_relu" and order == 1:
        # Beta's gradient: one sum over the whole tensor; float32 summation order differs.
        np.testing.assert_allclose(got_db, exact_db, rtol=1e-5)


def test_fused_second_derivatives_inside_a_compiled_function():
    # TensorFlow's graph mode takes another path through tf.custom_gradient than eager mode;
    # under JAX every call is traced, and jit compiles the whole second derivative.
    layers = {name: FUSED[name]() for name in FUSED}
    for layer in layers.values():
        layer.build((None,))

    def second_derivative(layer, x):
        return _gradient(lambda x: _gradient(layer, x), x)

    @_compiled
    def second(x):
        return {name: second_derivative(layer, x) for name, layer in layers.items()}

    got = second(_tensor(GRAD_GRID))
    for name in FUSED:
        exact, _ = _grads(PLAIN[name], GRAD_GRID.astype(np.float64), np.float64(3.0), 2)
        auto32, _ = _grads(PLAIN[name], GRAD_GRID, np.float32(3.0), 2)
        _assert_as_accurate(_numpy(got[name]), exact, auto32, 1e-5, 1e-6, f"{name} (compiled)")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_gradients_in_half_precision(name, dtype):
    keras.config.set_dtype_policy(dtype)
    x = _tensor(GRAD_GRID, dtype)
    layer = FUSED[name]()
    y = layer(x)
    got = _gradient(layer, x)
    assert y.dtype == x.dtype and got.dtype == x.dtype
    got = _numpy(ops.cast(got, "float32")).astype(np.float64)
    # Exact gradient at the rounded inputs, then one rounding to the half type's precision.
    rounded = _numpy(ops.cast(x, "float32")).astype(np.float64)
    exact, _ = _grads(PLAIN[name], rounded, np.float64(3.0), 1)
    rtol = {"float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    np.testing.assert_allclose(got, exact, rtol=rtol, atol=1e-6)


def test_smooth_relu_beta_gradient_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    layer = activations.SmoothReLU(beta_init=3.0)
    x = _tensor(GRAD_GRID[np.abs(GRAD_GRID) < 100], "float16")
    (db,) = _weight_gradients(layer, x)
    y = layer(x)
    assert layer.b.dtype == "float32" and keras.backend.standardize_dtype(y.dtype) == "float16"
    rounded = _numpy(ops.cast(x, "float32")).astype(np.float64)
    _, exact = _grads(PLAIN["smooth_relu"], rounded, np.float64(3.0), 1)
    # Keras reads b as float16 under this policy, so its gradient passes a float16 cast.
    np.testing.assert_allclose(float(_numpy(db)), exact, rtol=2.0**-10)


def test_models_saved_before_fusion_load_with_the_same_outputs():
    # Written by the unfused layers (tests/data/make_activations_before.py says how).
    data = pathlib.Path(__file__).parent / "data"
    model = keras.saving.load_model(data / "activations_before.keras", safe_mode=True)
    with zipfile.ZipFile(data / "activations_before.keras") as archive:
        saved = json.loads(archive.read("config.json"))["config"]["layers"]
    saved = {layer["config"]["name"]: layer["config"] for layer in saved}
    for layer in model.layers:
        if type(layer).__module__ == activations.__name__:
            # The config format is unchanged (the saved dtype entry carries extra bookkeeping).
            config = {k: v for k, v in layer.get_config().items() if k != "dtype"}
            assert config == {k: v for k, v in saved[layer.name].items() if k != "dtype"}
    arrays = np.load(data / "activations_before.npz")
    np.testing.assert_allclose(_numpy(model(arrays["x"])), arrays["y"], rtol=1e-6, atol=1e-6)
