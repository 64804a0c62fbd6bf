"""Tests for sat_tf.apgd, sat_tf.square and sat_tf.autoattack on a tiny trained classifier."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import attacks, autoattack

NUM_CLASSES, SIZE = 5, 8
EPSILON = 32.0  # pixels; the tiny model below is partly robust at this radius.


def make_data(n, seed):
    """Five classes, each a fixed random 8x8 prototype plus Gaussian noise: separable."""
    protos = np.random.default_rng(123).uniform(40, 215, (NUM_CLASSES, SIZE, SIZE, 1))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    images = np.clip(protos[labels] + rng.normal(0, 25, (n, SIZE, SIZE, 1)), 0, 255)
    return images.astype(np.float32), labels.astype(np.int32)


def train_tiny_model(epochs=5):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 1))
    h = keras.layers.Rescaling(1 / 127.5, -1.0)(inputs)
    h = keras.layers.Conv2D(8, 3, activation="relu")(h)
    h = keras.layers.Dense(32, activation="relu")(keras.layers.Flatten()(h))
    model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = make_data(512, seed=0)
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def model():
    return train_tiny_model()


@pytest.fixture(scope="module")
def batch():
    return make_data(96, seed=1)


def accuracy(model, images, labels):
    return float(np.mean(np.argmax(model(images, training=False), axis=1) == labels))


def assert_in_ball(adv, images, epsilon):
    adv = np.asarray(adv)
    assert np.max(np.abs(adv - images)) <= epsilon + 1e-3  # float32 rounding at 255 scale.
    assert adv.min() >= 0.0 and adv.max() <= 255.0


def test_dlr_loss_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(16, 7)).astype(np.float32)
    labels = np.arange(16) % 7
    s = np.sort(logits, axis=1)[:, ::-1]
    z_y = logits[np.arange(16), labels]
    other = np.where(np.argmax(logits, 1) == labels, s[:, 1], s[:, 0])
    expected = -(z_y - other) / (s[:, 0] - s[:, 2] + 1e-12)
    np.testing.assert_allclose(autoattack.dlr_loss(logits, labels), expected, rtol=1e-5)
    targets = (labels + 3) % 7
    z_t = logits[np.arange(16), targets]
    expected_t = -(z_y - z_t) / (s[:, 0] - 0.5 * (s[:, 2] + s[:, 3]) + 1e-12)
    got = autoattack.targeted_dlr_loss(logits, labels, targets)
    np.testing.assert_allclose(got, expected_t, rtol=1e-5)
    # DLR is invariant to shifting and (positively) scaling the logits, unlike cross-entropy.
    np.testing.assert_allclose(autoattack.dlr_loss(3 * logits + 7, labels), expected, rtol=1e-4)


def test_checkpoints_follow_the_paper():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (Croce & Hein 2020, Sec. 3.2) -> ceil(100 p).
    assert autoattack.checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert autoattack.checkpoints(10) == [3, 5, 6, 7, 8, 9]


def test_p_schedule_halves_at_the_thresholds():
    p = lambda q, n=10000: float(autoattack.p_schedule(q, n, 0.8))  # noqa: E731
    assert p(0) == p(10) == pytest.approx(0.8)
    assert p(11) == pytest.approx(0.4)
    assert p(201) == pytest.approx(0.1)
    assert p(9000) == pytest.approx(0.8 / 512)
    assert p(11, n=1000) == pytest.approx(0.8 / 4)  # 11 of 1,000 queries is 110 of 10,000.


def test_apgd_stays_in_ball_and_box(model, batch):
    images, labels = batch
    images = images.copy()
    images[:, :2] = 0.0  # Pixels at the box edges: the projection must clip them.
    images[:, -2:] = 255.0
    for kwargs in ({"loss": "ce"}, {"loss": "dlr", "targeted": True, "target_classes": 2}):
        adv = autoattack.apgd(model, images, labels, epsilon=EPSILON, num_steps=10, **kwargs)
        assert_in_ball(adv, images, EPSILON)


def test_apgd_at_least_as_strong_as_pgd(model, batch):
    images, labels = batch
    clean = accuracy(model, images, labels)
    pgd = attacks.pgd(
        model, images, labels, epsilon=EPSILON, step_size=2.5 * EPSILON / 100, num_steps=100, seed=0
    )
    apgd = autoattack.apgd(model, images, labels, epsilon=EPSILON, num_steps=100)
    pgd_acc, apgd_acc = accuracy(model, pgd, labels), accuracy(model, apgd, labels)
    assert clean > 0.9 and 0.1 < pgd_acc < clean  # Robustness is non-trivial at this epsilon.
    assert apgd_acc <= pgd_acc + 1.0 / len(labels)


def test_apgd_targeted_dlr_finds_more_than_untargeted(model, batch):
    images, labels = batch
    ce = accuracy(
        model, autoattack.apgd(model, images, labels, epsilon=EPSILON, num_steps=30), labels
    )
    targeted = autoattack.apgd(
        model,
        images,
        labels,
        epsilon=EPSILON,
        num_steps=20,
        loss="dlr",
        targeted=True,
        target_classes=3,
    )
    assert accuracy(model, targeted, labels) <= ce


def test_apgd_is_reproducible(model, batch):
    images, labels = batch

    def run(seed):
        return autoattack.apgd(model, images, labels, epsilon=EPSILON, num_steps=10, seed=seed)

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_square_stays_in_ball_lowers_accuracy_and_is_reproducible(model, batch):
    images, labels = batch
    adv = autoattack.square(model, images, labels, epsilon=EPSILON, num_queries=200, seed=1)
    assert_in_ball(adv, images, EPSILON)
    assert accuracy(model, adv, labels) < accuracy(model, images, labels) - 0.2
    again = autoattack.square(model, images, labels, epsilon=EPSILON, num_queries=200, seed=1)
    np.testing.assert_array_equal(adv, again)


def test_square_uses_no_gradients(batch):
    """A model whose gradient is zero everywhere is still broken by Square."""
    images, labels = batch
    protos = tf.constant(
        np.random.default_rng(123).uniform(40, 215, (NUM_CLASSES, SIZE * SIZE)), tf.float32
    )

    class NearestPrototype(keras.Model):  # Logits -distance to each class prototype, no gradient.
        def call(self, x, training=False):
            flat = tf.stop_gradient(tf.reshape(x, [-1, SIZE * SIZE]))
            return -tf.reduce_sum(tf.square(flat[:, None] - protos[None]), axis=-1) / 1e4

    masked = NearestPrototype()
    assert accuracy(masked, images, labels) > 0.9
    adv = autoattack.square(masked, images, labels, epsilon=48.0, num_queries=300)
    assert accuracy(masked, adv, labels) < accuracy(masked, images, labels) - 0.2


def test_auto_attack_stages(model, batch):
    images, labels = batch
    result = autoattack.auto_attack(
        model, images, labels, epsilon=EPSILON, version="fast", batch_size=64
    )
    assert list(result.stages) == ["clean", "apgd-ce", "apgd-t", "square"]
    accs = list(result.stages.values())
    assert all(b <= a for a, b in zip(accs[:-1], accs[1:], strict=True))
    assert result.robust_accuracy == accs[-1] <= min(accs)
    assert result.clean_accuracy == pytest.approx(accuracy(model, images, labels))
    assert_in_ball(result.adversarial_images, images, EPSILON)
    # The robust flags agree with a fresh forward pass on the returned images.
    predicted = np.argmax(model(result.adversarial_images, training=False), axis=1)
    np.testing.assert_array_equal(result.robust, predicted == labels)
    assert result.robust_accuracy == pytest.approx(result.robust.mean())
    with pytest.raises(ValueError, match="version"):
        autoattack.auto_attack(model, images, labels, epsilon=EPSILON, version="slow")


@pytest.mark.slow
def test_apgd_matches_art(model, batch):
    """Our APGD-CE is within 2 examples of ART's, or stronger, on the same examples."""
    art = pytest.importorskip("art.attacks.evasion")
    estimators = pytest.importorskip("art.estimators.classification")
    images, labels = batch
    classifier = estimators.TensorFlowV2Classifier(
        model=model,
        nb_classes=NUM_CLASSES,
        input_shape=(SIZE, SIZE, 1),
        clip_values=(0.0, 255.0),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    theirs = art.AutoProjectedGradientDescent(
        classifier,
        norm=np.inf,
        eps=EPSILON,
        eps_step=2 * EPSILON,
        max_iter=100,
        nb_random_init=1,
        batch_size=len(labels),
        loss_type="cross_entropy",
        verbose=False,
    ).generate(images, labels)
    ours = autoattack.apgd(model, images, labels, epsilon=EPSILON, num_steps=100)
    assert accuracy(model, ours, labels) <= accuracy(model, theirs, labels) + 2.0 / len(labels)
