"""Softmax-headed models: a clear error at every entry point, and `models.to_logits` as the fix."""

import keras
import numpy as np
import pytest

import sat_tf
from sat_tf import attacks, autoattack, evaluation
from sat_tf.models import to_logits


def tiny(head):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    if head == "fused":
        return keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="probs")(h))
    logits = keras.layers.Dense(4, name="dense")(h)
    if head == "layer":
        return keras.Model(inputs, keras.layers.Softmax(name="probs")(logits))
    return keras.Model(inputs, logits)


@pytest.mark.backends
@pytest.mark.parametrize("head", ["fused", "layer"])
def test_every_entry_point_rejects_probabilities(head):
    model = tiny(head)
    x = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    y = np.arange(4) % 4
    fix = r"'probs' applies softmax\. .*sat_tf\.models\.to_logits\(model\)"
    with pytest.raises(ValueError, match="AdversarialModel needs .*" + fix):
        sat_tf.AdversarialModel(model, epsilon=4.0, step_size=1.0, num_steps=1)
    with pytest.raises(ValueError, match="auto_attack needs .*" + fix):
        autoattack.auto_attack(model, x, y, epsilon=4.0)
    with pytest.raises(ValueError, match="pgd needs .*" + fix):
        attacks.pgd(model, x, y, epsilon=4.0, step_size=1.0, num_steps=1)
    with pytest.raises(ValueError, match="evaluate needs .*" + fix):
        evaluation.evaluate(model, (x, y), attacks=["clean"], epsilons=[4.0])
    assert attacks.output_activation(tiny("logits")) is None


@pytest.mark.backends
@pytest.mark.parametrize("head", ["fused", "layer"])
def test_to_logits_keeps_weights_and_drops_only_the_softmax(head):
    model = tiny(head)
    logits = to_logits(model)
    assert attacks.output_activation(logits) is None
    x = np.random.default_rng(1).uniform(0, 255, (5, 8, 8, 3)).astype(np.float32)
    # Softmax of the new outputs is the old output: same weights, the head's softmax removed.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.softmax(logits(x))),
        keras.ops.convert_to_numpy(model(x)),
        atol=1e-6,
    )
    assert to_logits(logits) is logits  # Already logits: unchanged.


# Not `backends`: finding the softmax and dropping it is graph surgery, the same under any backend
# (the tiny models above check it under JAX); training a ResNet-50 there costs half a minute.
@pytest.mark.slow
def test_keras_applications_resnet50_trains_after_to_logits():
    keras.utils.set_random_seed(0)
    resnet = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    assert attacks.output_activation(resnet) == ("predictions", "softmax")
    model = sat_tf.AdversarialModel(to_logits(resnet), epsilon=4.0, step_size=4.0, num_steps=1)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=True,  # One step: tracing ResNet-50's train step would take most of a minute.
    )
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    history = model.fit(x, np.arange(4), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
