"""convert_activations on keras.applications models and small hand-built ones."""

import keras
import numpy as np
import pytest

from sat_tf import activations
from sat_tf.convert import convert_activations

# Under JAX (`backends`) the small cases run; the Keras Applications builds are TensorFlow-only
# (each costs ten seconds under JAX, and the rewrite does not depend on the backend).


def _relu_left(model):
    found = []
    for layer in model._flatten_layers(include_self=False):
        config = layer.get_config()
        if isinstance(layer, keras.layers.ReLU) or config.get("activation") == "relu":
            found.append(layer.name)
    return found


def _check_same_weights(original, converted):
    names = {layer.name: layer for layer in converted._flatten_layers(include_self=False)}
    for layer in original._flatten_layers(include_self=False):
        if not layer.weights:
            continue
        for old, new in zip(layer.weights, names[layer.name].weights, strict=True):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(old), keras.ops.convert_to_numpy(new)
            )


@pytest.fixture(scope="module")
def resnet50():
    """One Keras Applications ResNet-50 for the tests below (convert_activations copies, never
    changes, the model it is given): building one takes seconds, under JAX most of ten."""
    keras.utils.set_random_seed(0)
    return keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)


@pytest.mark.parametrize(
    "name",
    [
        "ResNet50",
        # ReLU6 layers are ReLU layers: the same rewrite as ResNet-50's.
        "MobileNetV2",
    ],
)
def test_keras_applications_lose_every_relu_and_keep_weights(request, name):
    if name == "ResNet50":
        original = request.getfixturevalue("resnet50")
    else:
        original = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    assert _relu_left(original), "the fixture should start with ReLUs"
    converted = convert_activations(original, "silu")
    assert _relu_left(converted) == []
    silu = [lyr for lyr in converted.layers if isinstance(lyr, activations.SiLU)]
    assert len(silu) == sum(
        isinstance(lyr, keras.layers.ReLU) or lyr.get_config().get("activation") == "relu"
        for lyr in original.layers
    )
    assert converted.output_shape == original.output_shape
    _check_same_weights(original, converted)


def test_relu_like_activation_keeps_outputs_close(resnet50):
    original = resnet50
    # A very sharp softplus is ReLU up to log(2) / alpha; a config dict is a valid identifier.
    config = keras.saving.serialize_keras_object(activations.Softplus(alpha=1e3))
    converted = convert_activations(original, config)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    x = keras.applications.resnet.preprocess_input(x)
    ref = keras.ops.convert_to_numpy(original(x))
    out = keras.ops.convert_to_numpy(converted(x))
    np.testing.assert_allclose(out, ref, atol=5e-3)


@pytest.mark.backends
def test_fused_conv_and_dense_relu_and_sequential():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(5, activation="relu"),
            keras.layers.Dense(2),
        ]
    )
    converted = convert_activations(model, "parametric_softplus")
    assert _relu_left(converted) == []
    softplus = [lyr for lyr in converted.layers if isinstance(lyr, activations.Softplus)]
    assert len(softplus) == 2 and all(lyr.alpha == 10.0 for lyr in softplus)
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype("float32")
    # Reference: same weights, ReLU swapped by hand for softplus(10 x) / 10.
    w_conv, b_conv = model.layers[0].get_weights()
    h = keras.ops.convert_to_numpy(keras.ops.conv(x, w_conv)) + b_conv
    h = np.logaddexp(0, 10 * h).reshape(3, -1) / 10
    w1, b1 = model.layers[2].get_weights()
    h = np.logaddexp(0, 10 * (h @ w1 + b1)) / 10
    w2, b2 = model.layers[3].get_weights()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(converted(x)), h @ w2 + b2, rtol=1e-4, atol=1e-4
    )


@pytest.mark.backends
def test_converted_model_saves_and_loads_safely(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.ReLU()(inputs)))
    converted = convert_activations(model, "smooth_relu")
    converted.save(tmp_path / "c.keras")
    loaded = keras.saving.load_model(tmp_path / "c.keras", safe_mode=True)
    x = np.ones((1, 4), "float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(converted(x)), rtol=1e-6
    )


@pytest.mark.backends
def test_subclassed_model_gets_a_clear_error():
    class Custom(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2, activation="relu")

        def call(self, x):
            return self.dense(x)

    model = Custom()
    model(np.ones((1, 3), "float32"))
    with pytest.raises(TypeError, match="subclassed model"):
        convert_activations(model, "silu")
