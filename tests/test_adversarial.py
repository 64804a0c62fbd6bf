"""Tests for sat_tf.adversarial.AdversarialModel: the train step against a NumPy reference,
Keras integration (fit/evaluate, callbacks, sample weights, steps_per_execution, XLA, mixed
precision) and saving."""

import itertools

import keras
import numpy as np
import pytest
from conftest import BACKEND

from sat_tf import activations, attacks
from sat_tf.adversarial import AdversarialModel

pytestmark = pytest.mark.backends

PHASE_SETTINGS = [(), ("attack",), ("update",), ("attack", "update")]
ALPHA, EPSILON, LR, WEIGHT_DECAY = 1.0, 4.0, 0.05, 0.01
# Keras runs one step per execution under PyTorch (it refuses more).
STEPS_PER_EXECUTION = 1 if BACKEND == "torch" else 2


def mlp(alpha=ALPHA):
    """Dense -> SmoothGradReLU -> Dense on 4 'pixels' in [0, 255]."""
    inputs = keras.Input((4,))
    x = keras.layers.Dense(6)(inputs)
    x = activations.SmoothGradReLU(alpha=alpha)(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def convnet(policy="float32"):
    keras.config.set_dtype_policy(policy)
    try:
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
        x = keras.layers.Conv2D(4, 3, padding="same")(x)
        x = keras.layers.BatchNormalization()(x)
        x = activations.SiLU()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(x))
    finally:
        keras.config.set_dtype_policy("float32")


def images_and_labels(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, 8, 8, 3)).astype("float32"), rng.integers(0, 3, n)


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ---- The NumPy reference of one adversarial SGD step on the MLP (float64). ----


def _forward_backward(params, x, y, smooth):
    w1, b1, w2, b2 = params
    z = x @ w1 + b1
    h = np.maximum(z, 0)
    logits = h @ w2 + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(len(y)), y]))
    d_logits = (p - np.eye(3)[y]) / len(y)
    relu_grad = 1 / (1 + np.exp(-ALPHA * z)) if smooth else (z > 0).astype(float)
    dz = (d_logits @ w2.T) * relu_grad
    grads = [x.T @ dz, dz.sum(0), h.T @ d_logits, d_logits.sum(0)]
    return loss, dz @ w1.T, grads


def reference_step(params, x, y, phases):
    """PGD-1 (no random start) with the attack's gradient, then SGD with the update's."""
    _, dx, _ = _forward_backward(params, x, y, "attack" in phases)
    x_adv = np.clip(x + EPSILON * np.sign(dx), 0, 255)
    loss, _, grads = _forward_backward(params, x_adv, y, "update" in phases)
    w1, _, w2, _ = params
    loss += WEIGHT_DECAY * 0.5 * (np.sum(w1**2) + np.sum(w2**2))  # Kernels only.
    grads[0] = grads[0] + WEIGHT_DECAY * w1
    grads[2] = grads[2] + WEIGHT_DECAY * w2
    return loss, [p - LR * g for p, g in zip(params, grads, strict=True)]


@pytest.fixture(scope="module")
def mlp_case():
    """MLP weights whose pre-activations straddle 0, where smooth and ReLU gradients differ."""
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 255, (8, 4))
    y = rng.integers(0, 3, 8)
    w1 = rng.normal(0, 0.02, (4, 6))
    b1 = -x.mean(0) @ w1
    params = [w1, b1, rng.normal(0, 1.0, (6, 3)), rng.normal(0, 0.1, 3)]
    return params, x, y


@pytest.mark.parametrize("phases", PHASE_SETTINGS)
def test_each_phase_sees_the_requested_gradient(mlp_case, phases):
    params, x, y = mlp_case
    references = {p: reference_step(params, x, y, p) for p in PHASE_SETTINGS}
    for a, b in itertools.combinations(PHASE_SETTINGS, 2):  # The four outcomes differ...
        diff = max(
            np.abs(u - v).max() for u, v in zip(references[a][1], references[b][1], strict=True)
        )
        assert diff > 1e-3, (a, b)
    classifier = mlp()
    classifier.set_weights([p.astype("float32") for p in params])
    model = AdversarialModel(
        classifier,
        epsilon=EPSILON,
        step_size=EPSILON,
        random_start=False,
        smooth_gradients=phases,
        weight_decay=WEIGHT_DECAY,
    )
    model.compile(keras.optimizers.SGD(LR), sparse_ce())
    history = model.fit(x.astype("float32"), y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    want_loss, want_params = references[phases]  # ...and only the requested one matches.
    for got, want in zip(classifier.get_weights(), want_params, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(history.history["loss"][0], want_loss, rtol=1e-5)


def test_fit_and_evaluate_log_clean_and_adversarial_metrics():
    images, labels = images_and_labels(32)
    model = AdversarialModel(convnet(), epsilon=8.0, eval_step_size=4.0, eval_num_steps=2)
    model.compile(
        keras.optimizers.Adam(0.01),
        sparse_ce(),
        metrics=["accuracy"],
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    seen = []
    callback = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(logs))
    history = model.fit(
        images,
        labels,
        batch_size=8,
        epochs=2,
        validation_data=(images[:16], labels[:16]),
        callbacks=[callback],
        verbose=0,
    )
    assert set(history.history) == {
        "loss",
        "adv_accuracy",
        "val_loss",
        "val_accuracy",
        "val_adv_loss",
        "val_adv_accuracy",
    }
    # 4 steps an epoch, 2 epochs: one callback per execution.
    assert len(seen) == 8 // STEPS_PER_EXECUTION and set(seen[-1]) == {"loss", "adv_accuracy"}
    results = model.evaluate(images, labels, batch_size=16, return_dict=True, verbose=0)
    logits = model.classifier.predict(images, verbose=0)
    clean_loss = keras.ops.convert_to_numpy(sparse_ce()(labels, logits))
    np.testing.assert_allclose(results["loss"], clean_loss, rtol=1e-5)
    np.testing.assert_allclose(results["accuracy"], np.mean(logits.argmax(1) == labels))
    assert 0.0 <= results["adv_accuracy"] <= 1.0 and results["adv_loss"] > clean_loss


def test_evaluate_adversarial_accuracy_is_that_of_the_eval_attack():
    images, labels = images_and_labels(32, seed=1)
    model = AdversarialModel(
        convnet(), random_start=False, eval_epsilon=6.0, eval_step_size=2.0, eval_num_steps=3
    )
    model.compile("sgd", sparse_ce(), metrics=["accuracy"])
    results = model.evaluate(images, labels, batch_size=8, return_dict=True, verbose=0)
    x_adv = attacks.pgd(
        model.classifier,
        images,
        labels,
        epsilon=6.0,
        step_size=2.0,
        num_steps=3,
        random_start=False,
    )
    logits = model.classifier.predict(x_adv, verbose=0)
    np.testing.assert_allclose(results["adv_accuracy"], np.mean(logits.argmax(1) == labels))
    np.testing.assert_allclose(results["adv_loss"], sparse_ce()(labels, logits), rtol=1e-5)


def one_step_weights(images, labels, sample_weight=None, **compile_kwargs):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))  # No BatchNorm: batch statistics would mix examples.
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    classifier = keras.Model(
        inputs, keras.layers.Dense(3)(activations.SiLU()(keras.layers.Dense(8)(x)))
    )
    model = AdversarialModel(classifier, random_start=False)
    model.compile(keras.optimizers.SGD(0.5), sparse_ce(), **compile_kwargs)
    model.fit(images, labels, sample_weight=sample_weight, batch_size=len(images), verbose=0)
    return classifier.get_weights(), model


def test_sample_weights_remove_zero_weighted_examples():
    images, labels = images_and_labels(8, seed=2)
    weights = np.array([1, 1, 1, 1, 0, 0, 0, 0], "float32")
    other_images, other_labels = images.copy(), labels.copy()
    other_images[4:] = 255 - other_images[4:]
    other_labels[4:] = (labels[4:] + 1) % 3
    a, _ = one_step_weights(images, labels, weights)
    b, _ = one_step_weights(other_images, other_labels, weights)
    c, _ = one_step_weights(other_images, other_labels)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    assert max(np.abs(u - v).max() for u, v in zip(a, c, strict=True)) > 1e-4


@pytest.mark.skipif(
    BACKEND == "torch",
    reason="under PyTorch jit_compile is torch.compile: one to two minutes on a CPU for one step",
)
def test_jit_compile_gives_the_same_step():
    images, labels = images_and_labels(8, seed=3)
    graph, _ = one_step_weights(images, labels, jit_compile=False)
    xla, model = one_step_weights(images, labels, jit_compile=True)
    assert model.jit_compile
    for u, v in zip(graph, xla, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


def test_mixed_float16_training_has_nonzero_gradients():
    classifier = convnet(policy="mixed_float16")
    model = AdversarialModel(classifier, random_start=False)  # Takes the classifier's policy.
    model.compile(keras.optimizers.SGD(0.1), sparse_ce(), metrics=["accuracy"])
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert attacks.uses_float16(classifier)
    before = [np.array(v) for v in classifier.trainable_variables]
    images, labels = images_and_labels(16, seed=4)
    history = model.fit(images, labels, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    for old, new in zip(before, classifier.trainable_variables, strict=True):
        assert np.all(np.isfinite(np.array(new)))
        assert np.abs(np.array(new) - old).max() > 0, new.path


def test_save_and_load_keep_classifier_and_attack_settings(tmp_path):
    settings = {
        "epsilon": 8.0,
        "step_size": 2.0,
        "num_steps": 3,
        "random_start": False,
        "prob_start_from_clean": 0.5,
        "eval_epsilon": 6.0,
        "eval_step_size": 0.5,
        "eval_num_steps": 4,
        "smooth_gradients": ["update"],
        "weight_decay": 1e-3,
    }
    model = AdversarialModel(convnet(), **settings)
    model.compile(keras.optimizers.Adam(0.01), sparse_ce(), metrics=["accuracy"])
    images, labels = images_and_labels(16, seed=5)
    model.fit(images, labels, batch_size=8, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    assert isinstance(loaded, AdversarialModel) and isinstance(loaded.classifier, keras.Model)
    config = loaded.get_config()
    assert {key: config[key] for key in settings} == settings
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    want = model.evaluate(images, labels, return_dict=True, verbose=0)
    np.testing.assert_allclose(
        list(loaded.evaluate(images, labels, return_dict=True, verbose=0).values()),
        list(want.values()),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"smooth_gradients": ("attack", "forward")}, {"epsilon": -1.0}, {"weight_decay": -0.1}],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="Received"):
        AdversarialModel(mlp(), **kwargs)


# ---- The training callback's adversarial images: the model's own evaluation attack. ----


def _input_gradient(params, x, y, smooth):
    """d(cross-entropy)/dx of the MLP (float64), with the smooth or the step ReLU gradient."""
    w1, b1, w2, b2 = params
    z = x @ w1 + b1
    logits = np.maximum(z, 0) @ w2 + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d_h = (p - np.eye(3)[y]) @ w2.T
    d_z = d_h * (1 / (1 + np.exp(-ALPHA * z)) if smooth else (z > 0))
    return d_z @ w1.T


@pytest.mark.parametrize("phases", [(), ("attack",), ("update",)])
def test_adversarial_images_callback_runs_the_models_eval_attack(phases, tmp_path):
    from sat_tf import callbacks

    keras.utils.set_random_seed(3)
    classifier = mlp()
    rng = np.random.default_rng(3)
    x = rng.uniform(0.5, 2.0, (16, 4)).astype("float32")  # moderate logits: no saturation
    y = rng.integers(0, 3, 16)
    params = [np.array(w, np.float64) for w in classifier.weights]
    model = AdversarialModel(
        classifier,
        epsilon=2.0,
        eval_epsilon=0.25,
        eval_step_size=0.25,
        eval_num_steps=1,
        random_start=False,
        smooth_gradients=phases,
    )
    images = callbacks.AdversarialImages(tmp_path, x, y)
    images.set_model(model)
    # Reference: one signed step of the evaluation attack from the clean point (no random
    # start), with the smooth gradient only where the model's phases say "attack".
    gradient = _input_gradient(params, x.astype(np.float64), y, "attack" in phases)
    expected = np.clip(x + 0.25 * np.sign(gradient), 0, 255)
    np.testing.assert_allclose(np.asarray(images.adversarial()), expected, atol=1e-3)

    clean = AdversarialModel(classifier, eval_num_steps=0, random_start=False)
    images.set_model(clean)  # no steps, no random start: the images themselves
    np.testing.assert_array_equal(np.asarray(images.adversarial()), x)


def test_attack_leaves_batchnorm_statistics_to_the_training_forward():
    """One step with a 3-step attack: the moving statistics move once, by the adversarial
    batch's statistics (NumPy), as if the attack's forwards (inference mode) never ran."""
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(5)
    norm = keras.layers.BatchNormalization(momentum=0.9)
    x = keras.layers.ReLU()(norm(dense(inputs)))
    model = AdversarialModel(
        keras.Model(inputs, keras.layers.Dense(3)(x)),
        epsilon=8.0,
        step_size=4.0,
        num_steps=3,
        seed=2,
    )
    model.compile(keras.optimizers.SGD(0.1), sparse_ce())
    rng = np.random.default_rng(6)
    images = rng.uniform(0, 255, (8, 4)).astype("float32")
    labels = rng.integers(0, 3, 8)
    kernel, bias = (np.array(w, np.float64) for w in dense.weights)
    # The step's adversarial batch: keyed by (seed, example 0..7 of step 0).
    x_adv = model.adversarial_examples(images, labels, training=True, ids=np.arange(8))
    x_adv = np.array(keras.ops.convert_to_numpy(x_adv), np.float64)
    np.testing.assert_array_equal(np.array(norm.moving_mean), 0.0)  # the attack wrote nothing
    np.testing.assert_array_equal(np.array(norm.moving_variance), 1.0)
    assert np.abs(x_adv - images).max() > 1.0
    model.fit(images, labels, batch_size=8, shuffle=False, verbose=0)
    z = x_adv @ kernel + bias
    np.testing.assert_allclose(np.array(norm.moving_mean), 0.1 * z.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.array(norm.moving_variance), 0.9 + 0.1 * z.var(0), rtol=1e-4, atol=1e-4
    )
