"""Tests for sat_tf.attacks: PGD/FGSM properties and agreement with an independent reference,
under every backend (the reference's gradients come from the backend's own autodiff)."""

import keras
import numpy as np
import pytest
from conftest import BACKEND, only_tensorflow

from sat_tf import attacks, backend

pytestmark = pytest.mark.backends

# |(x + eps) - x| in float32 can exceed eps by one rounding step at pixel scale 255.
FLOAT_SLACK = 1e-4
# Unseeded random starts are stateful draws (TensorFlow's, PyTorch's); JAX has none, so there tests
# seed them.
SEEDS = [3] if BACKEND == "jax" else [None, 3]


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def autodiff(fn, x):
    """d fn(x) / d x with the backend's own autodiff, written independently of sat_tf."""
    if BACKEND == "jax":
        import jax

        return np.asarray(jax.grad(fn)(keras.ops.convert_to_tensor(x)))
    if BACKEND == "torch":
        import torch

        with torch.enable_grad():
            x = keras.ops.convert_to_tensor(x).detach().requires_grad_(True)
            value = fn(x)
            if not value.requires_grad:  # the value does not depend on x
                return None
            (gradient,) = torch.autograd.grad(value, [x], allow_unused=True)
        return None if gradient is None else gradient.cpu().numpy()
    import tensorflow as tf

    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = fn(x)
    gradient = tape.gradient(value, x)
    return None if gradient is None else gradient.numpy()


def tiny_classifier(num_classes=3, policy="float32"):
    """Conv -> BN -> ReLU -> pool -> dense, on [0, 255] 8x8 RGB images."""
    keras.config.set_dtype_policy(policy)
    try:
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
        x = keras.layers.Conv2D(8, 3, padding="same")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(num_classes, dtype="float32")(x)
        return keras.Model(inputs, outputs)
    finally:
        keras.config.set_dtype_policy("float32")


def toy_data(n, seed=0):
    """Images whose label is the brightness tercile of the red channel: learnable quickly."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, 8, 8, 3)).astype("float32")
    images[..., 0] = rng.uniform(0, 255, (n, 1, 1))
    labels = np.digitize(images[:, 0, 0, 0], [85, 170]).astype("int32")
    return images, labels


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(1)
    model = tiny_classifier()
    model.compile(keras.optimizers.Adam(0.03), keras.losses.SparseCategoricalCrossentropy(True))
    images, labels = toy_data(256)
    model.fit(images, labels, batch_size=32, epochs=6, verbose=0)
    return model


def ce(model, images, labels):
    logits = model(images, training=False)
    return numpy(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


def mean_ce(model, labels):
    def loss(x):
        logits = model(x, training=False)
        return keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        )

    return loss


def reference_pgd(model, images, labels, *, epsilon, step_size, num_steps, targeted=False):
    """The backend's autodiff + NumPy projection, written independently of sat_tf.attacks."""
    x_adv = images.copy()
    for _ in range(num_steps):
        grad = autodiff(mean_ce(model, labels), x_adv)
        x_adv = x_adv + (-1.0 if targeted else 1.0) * step_size * np.sign(grad)
        x_adv = np.clip(np.clip(x_adv, images - epsilon, images + epsilon), 0.0, 255.0)
    return x_adv


@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_matches_reference_loop(trained, targeted):
    images, labels = toy_data(32, seed=5)
    kwargs = {"epsilon": 8.0, "step_size": 2.0, "num_steps": 5}
    got = attacks.pgd(trained, images, labels, random_start=False, targeted=targeted, **kwargs)
    want = reference_pgd(trained, images, labels, targeted=targeted, **kwargs)
    np.testing.assert_allclose(numpy(got), want, atol=1e-3)
    # One-hot labels are the same attack.
    one_hot = np.eye(3, dtype="float32")[labels]
    got_1h = attacks.pgd(trained, images, one_hot, random_start=False, targeted=targeted, **kwargs)
    np.testing.assert_allclose(numpy(got_1h), want, atol=1e-3)


def test_fgsm_is_one_signed_step_of_epsilon(trained):
    images, labels = toy_data(16, seed=6)
    grad = autodiff(mean_ce(trained, labels), images)
    want = np.clip(images + 6.0 * np.sign(grad), 0, 255)
    got = attacks.fgsm(trained, images, labels, epsilon=6.0)
    np.testing.assert_allclose(numpy(got), want, atol=1e-3)


def test_input_gradient_is_the_per_example_cross_entropy_gradient(trained):
    images, labels = toy_data(16, seed=16)
    losses, gradient = attacks.input_gradient(trained, images, labels)
    np.testing.assert_allclose(numpy(losses), ce(trained, images, labels), rtol=1e-5, atol=1e-6)
    # The gradient of the summed loss is that of the mean times the batch size.
    want = 16 * autodiff(mean_ce(trained, labels), images)
    np.testing.assert_allclose(numpy(gradient), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 4.0, "step_size": 4.0, "num_steps": 1},
        {"epsilon": 8.0, "step_size": 3.0, "num_steps": 4, "targeted": True},
        {"epsilon": 16.0, "step_size": 1.0, "num_steps": 0, "prob_start_from_clean": 0.5},
        {"epsilon": 2.0, "step_size": 5.0, "num_steps": 3, "clip_min": 10.0, "clip_max": 200.0},
    ],
)
def test_stays_in_epsilon_ball_and_pixel_range(trained, kwargs, seed):
    images, labels = toy_data(64, seed=7)
    images[:8] = 0.0  # Pixels at both ends of the range: the random start would leave it.
    images[8:16] = 255.0
    clip_min, clip_max = kwargs.get("clip_min", 0.0), kwargs.get("clip_max", 255.0)
    images = np.clip(images, clip_min, clip_max)
    x_adv = numpy(attacks.pgd(trained, images, labels, seed=seed, **kwargs))
    assert x_adv.dtype == np.float32
    assert np.abs(x_adv - images).max() <= kwargs["epsilon"] + FLOAT_SLACK
    assert x_adv.min() >= clip_min and x_adv.max() <= clip_max


def test_loss_rises_on_trained_model(trained):
    images, labels = toy_data(64, seed=8)
    clean = ce(trained, images, labels)
    assert clean.mean() < 0.7  # The model did learn the task.
    x_adv = numpy(
        attacks.pgd(trained, images, labels, epsilon=16.0, step_size=4.0, num_steps=5, seed=1)
    )
    adversarial = ce(trained, x_adv, labels)
    assert adversarial.mean() > 2 * clean.mean()
    assert np.mean(adversarial > clean) > 0.9


def test_targeted_lowers_target_loss(trained):
    images, labels = toy_data(64, seed=9)
    targets = (labels + 1) % 3
    x_adv = numpy(
        attacks.pgd(
            trained,
            images,
            targets,
            epsilon=16.0,
            step_size=4.0,
            num_steps=5,
            targeted=True,
            seed=1,
        )
    )
    before, after = ce(trained, images, targets), ce(trained, x_adv, targets)
    assert after.mean() < 0.8 * before.mean()
    assert np.mean(after < before) > 0.9


def test_weights_and_batchnorm_statistics_unchanged(trained):
    before = [numpy(v).copy() for v in trained.variables]
    bn = next(
        layer for layer in trained.layers if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert np.abs(numpy(bn.moving_mean)).max() > 0  # Trained: the check below is not vacuous.
    images, labels = toy_data(32, seed=10)
    attacks.pgd(trained, images, labels, epsilon=8.0, step_size=2.0, num_steps=3, seed=SEEDS[0])
    for old, new in zip(before, trained.variables, strict=True):
        np.testing.assert_array_equal(old, numpy(new))


def test_no_steps_and_no_random_start_returns_input(trained):
    images, labels = toy_data(8, seed=11)
    got = attacks.pgd(
        trained, images, labels, epsilon=8.0, step_size=2.0, num_steps=0, random_start=False
    )
    np.testing.assert_array_equal(numpy(got), images)
    as_uint8 = images.astype("uint8")
    got = attacks.pgd(
        trained, as_uint8, labels, epsilon=8.0, step_size=2.0, num_steps=0, random_start=False
    )
    np.testing.assert_array_equal(numpy(got), as_uint8.astype("float32"))


def test_result_carries_no_gradient(trained):
    images, labels = toy_data(4, seed=12)

    def total(x):
        kwargs = {"epsilon": 4.0, "step_size": 4.0, "num_steps": 1, "seed": SEEDS[0]}
        return keras.ops.sum(attacks.pgd(trained, x, labels, **kwargs))

    gradient = autodiff(total, images)  # TensorFlow, PyTorch: None; JAX: zeros
    assert gradient is None or not np.any(gradient)


@pytest.mark.skipif(BACKEND != "jax", reason="TensorFlow and PyTorch have stateful draws")
def test_unseeded_random_start_asks_for_a_seed(trained):
    images, labels = toy_data(4, seed=12)
    with pytest.raises(ValueError, match="seed"):
        attacks.pgd(trained, images, labels, epsilon=4.0, step_size=1.0, num_steps=1)


def test_seed_makes_random_start_reproducible(trained):
    images, labels = toy_data(8, seed=13)
    kwargs = {"epsilon": 8.0, "step_size": 2.0, "num_steps": 2}
    a = numpy(attacks.pgd(trained, images, labels, seed=3, **kwargs))
    b = numpy(attacks.pgd(trained, images, labels, seed=3, **kwargs))
    c = numpy(attacks.pgd(trained, images, labels, seed=4, **kwargs))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_prob_start_from_clean_is_drawn_per_example(trained):
    images = np.full((400, 8, 8, 3), 128.0, "float32")
    labels = np.zeros(400, "int32")
    kwargs = {"epsilon": 8.0, "step_size": 1.0, "num_steps": 0}
    for prob, low, high in ((0.0, 0.0, 0.0), (0.3, 0.22, 0.38), (1.0, 1.0, 1.0)):
        x0 = attacks.pgd(trained, images, labels, prob_start_from_clean=prob, seed=1, **kwargs)
        clean = np.all(numpy(x0) == images, axis=(1, 2, 3))
        assert low <= clean.mean() <= high, (prob, clean.mean())


def confident_classifier(policy):
    """A random tiny classifier with large logit margins (median above 15 from any backend's
    initialisation), so float16 gradients underflow."""
    keras.utils.set_random_seed(2)
    model = tiny_classifier(policy=policy)
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel * 80.0, bias])
    return model


def test_float16_attack_moves_as_many_pixels_as_float32():
    model32 = confident_classifier("float32")
    model16 = confident_classifier("mixed_float16")
    model16.set_weights(model32.get_weights())
    assert attacks.uses_float16(model16) and not attacks.uses_float16(model32)
    images, _ = toy_data(64, seed=14)
    logits = numpy(model32(images))
    # The model's own predictions as labels: confidently right, the loss's gradient is tiny (a
    # random model is also confidently wrong on some toy labels, and there it does not underflow).
    labels = np.argmax(logits, axis=1).astype("int32")
    logits = np.sort(logits, axis=1)
    assert np.median(logits[:, -1] - logits[:, -2]) > 15  # Confident enough to underflow.

    def moved(model, **kwargs):
        x_adv = attacks.pgd(
            model,
            images,
            labels,
            epsilon=4.0,
            step_size=1.0,
            num_steps=1,
            random_start=False,
            **kwargs,
        )
        return int(np.sum(numpy(x_adv) != images))

    full = moved(model32)
    assert full > 0.9 * images.size
    assert moved(model16, loss_scale=1.0) < 0.8 * full  # Without scaling float16 stalls...
    assert moved(model16) >= 0.999 * full  # ...with the automatic scale it does not.


def test_runs_compiled_for_any_batch_size(trained):
    images, labels = toy_data(8, seed=15)
    kwargs = {"epsilon": 8.0, "step_size": 2.0, "num_steps": 2}

    def build(model_ref):
        return lambda x, y, seed, ids: attacks.pgd(model_ref(), x, y, seed=seed, ids=ids, **kwargs)

    seed, ids = np.int32(5), np.arange(8, dtype=np.int32)
    run = backend.compiled(trained, ("test-pgd",), build, images, labels, seed, ids)
    eager = numpy(attacks.pgd(trained, images, labels, seed=5, **kwargs))
    np.testing.assert_allclose(numpy(run(images, labels, seed, ids)), eager, atol=1e-4)
    # A smaller batch (an evaluation's last chunk): the same examples, the same images.
    np.testing.assert_allclose(
        numpy(run(images[3:], labels[3:], seed, ids[3:])), eager[3:], atol=1e-4
    )


@only_tensorflow
def test_runs_in_tf_function_and_replica_context(trained):
    import tensorflow as tf

    images, labels = toy_data(8, seed=15)
    kwargs = {"epsilon": 8.0, "step_size": 2.0, "num_steps": 2, "random_start": False}
    eager = attacks.pgd(trained, images, labels, **kwargs).numpy()
    graph = tf.function(lambda x, y: attacks.pgd(trained, x, y, **kwargs))(images, labels)
    np.testing.assert_allclose(graph.numpy(), eager, atol=1e-4)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    per_replica = strategy.run(
        tf.function(lambda x, y: attacks.pgd(trained, x, y, **kwargs)), args=(images, labels)
    )
    for result in strategy.experimental_local_results(per_replica):
        np.testing.assert_allclose(result.numpy(), eager, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": -1.0},
        {"step_size": -0.5},
        {"num_steps": -1},
        {"num_steps": 1.5},
        {"prob_start_from_clean": 1.5},
        {"clip_min": 255.0, "clip_max": 0.0},
    ],
)
def test_invalid_arguments_raise(trained, kwargs):
    full = {"epsilon": 4.0, "step_size": 1.0, "num_steps": 1, **kwargs}
    with pytest.raises(ValueError, match="Received"):
        attacks.pgd(trained, np.zeros((1, 8, 8, 3), "float32"), [0], **full)
