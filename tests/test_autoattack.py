"""Tests for sat_tf.apgd, sat_tf.square and sat_tf.autoattack on a tiny trained classifier."""

import keras
import numpy as np
import pytest
from conftest import only_tensorflow

from sat_tf import attacks, autoattack, jobs

pytestmark = pytest.mark.backends

NUM_CLASSES, SIZE = 5, 8
EPSILON = 32.0  # pixels; the tiny model below is partly robust at this radius.
# Square on 8x8 images with a few hundred queries: the p schedule rescaled to the budget (with
# AutoAttack's unrescaled one p stays large for the first 200 queries).
RESCALED = {"rescale_schedule": True}


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


def predict(model, images):
    """The model's predicted classes, as NumPy (under PyTorch its outputs carry autograd)."""
    return np.argmax(keras.ops.convert_to_numpy(model(images, training=False)), axis=1)


def accuracy(model, images, labels):
    return float(np.mean(predict(model, images) == labels))


def assert_in_ball(adv, images, epsilon):
    adv = keras.ops.convert_to_numpy(adv)
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


def reference_checkpoints(n_iter):
    """The iterations i (1-based count) after which autopgd_base.py's loop checks its step:
    counter3 counts iterations and the check fires when it reaches k, which then shrinks."""
    k, size_decr, n_iter_min = max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), 0
    n_iter_min = max(int(0.06 * n_iter), 1)
    found, counter3 = [], 0
    for i in range(n_iter):
        counter3 += 1
        if counter3 == k:
            found.append(i + 1)
            k = max(k - size_decr, n_iter_min)
            counter3 = 0
    return [c for c in found if c < n_iter]  # A check after the last iteration changes nothing.


@pytest.mark.parametrize("num_steps", [1, 5, 10, 20, 33, 50, 100, 250, 1000])
def test_checkpoints_follow_the_reference_loop(num_steps):
    assert autoattack.checkpoints(num_steps) == reference_checkpoints(num_steps)


def test_checkpoints_by_hand():
    # 100 steps: windows 22, 19, 16, 13, 10, 7, 6, 6 (the paper's p_j times 100).
    assert autoattack.checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    # 20 steps ("fast"): windows int(4.4) = 4, then 3, 2, then the 1-step floor.
    assert autoattack.checkpoints(20) == [4, 7, 9] + list(range(10, 20))


def test_p_schedule_changes_where_autoattack_changes_it():
    # AutoAttack's Square (resc_schedule=False, 5,000 queries, p_init 0.8): square.py p_selection
    # halves p once `it` exceeds 10, 50, 200, 500, 1000, 2000, 4000 (6000 and 8000 are not
    # reached with 5,000 queries).
    schedule = lambda q: autoattack.p_schedule(q, 0.8)  # noqa: E731
    p = keras.ops.convert_to_numpy(keras.ops.vectorized_map(schedule, keras.ops.arange(5000)))
    changes = [q for q in range(1, 5000) if p[q] != p[q - 1]]
    assert changes == [11, 51, 201, 501, 1001, 2001, 4001]
    assert p[0] == pytest.approx(0.8) and p[-1] == pytest.approx(0.8 / 128)


def test_p_schedule_rescaled_to_the_budget():
    p = lambda q, n: float(autoattack.p_schedule(q, 0.8, num_queries=n))  # noqa: E731
    assert p(10, 10000) == pytest.approx(0.8) and p(11, 10000) == pytest.approx(0.4)
    assert p(9000, 10000) == pytest.approx(0.8 / 512)
    assert p(11, 1000) == pytest.approx(0.8 / 4)  # 11 of 1,000 queries is 110 of 10,000.


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
    adv = autoattack.square(
        model, images, labels, epsilon=EPSILON, num_queries=200, seed=1, **RESCALED
    )
    assert_in_ball(adv, images, EPSILON)
    assert accuracy(model, adv, labels) < accuracy(model, images, labels) - 0.2
    again = autoattack.square(
        model, images, labels, epsilon=EPSILON, num_queries=200, seed=1, **RESCALED
    )
    np.testing.assert_array_equal(adv, again)


def test_square_uses_no_gradients(batch):
    """A model whose gradient is zero everywhere is still broken by Square."""
    images, labels = batch
    protos = np.random.default_rng(123).uniform(40, 215, (NUM_CLASSES, SIZE * SIZE))
    protos = protos.astype(np.float32)
    ops = keras.ops

    class NearestPrototype(keras.Model):  # Logits -distance to each class prototype, no gradient.
        def call(self, x, training=False):
            flat = ops.stop_gradient(ops.reshape(x, (-1, SIZE * SIZE)))
            return -ops.sum(ops.square(flat[:, None] - protos[None]), axis=-1) / 1e4

    masked = NearestPrototype()
    assert accuracy(masked, images, labels) > 0.9
    adv = autoattack.square(masked, images, labels, epsilon=48.0, num_queries=1000, **RESCALED)
    assert accuracy(masked, adv, labels) < accuracy(masked, images, labels) - 0.2


def test_auto_attack_stages(model, batch):
    images, labels = batch
    result = autoattack.auto_attack(
        model,
        images,
        labels,
        epsilon=EPSILON,
        version="fast",
        batch_size=64,
        attacks=["apgd-ce", "apgd-t", "fab-t", "square"],
    )
    assert list(result.stages) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    accs = list(result.stages.values())
    assert all(b <= a for a, b in zip(accs[:-1], accs[1:], strict=True))
    assert result.robust_accuracy == accs[-1] <= min(accs)
    assert result.clean_accuracy == pytest.approx(accuracy(model, images, labels))
    assert_in_ball(result.adversarial_images, images, EPSILON)
    # The robust flags agree with a fresh forward pass on the returned images.
    predicted = predict(model, result.adversarial_images)
    np.testing.assert_array_equal(result.robust, predicted == labels)
    assert result.robust_accuracy == pytest.approx(result.robust.mean())
    with pytest.raises(ValueError, match="version"):
        autoattack.auto_attack(model, images, labels, epsilon=EPSILON, version="slow")


@pytest.mark.slow
@only_tensorflow  # ART's TensorFlowV2Classifier runs the model in TensorFlow
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


def _tiny_classifier(num_classes, dtype=None, logit_scale=1.0):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((SIZE, SIZE, 1))
    h = keras.layers.Rescaling(1 / 127.5, -1.0, dtype="float32")(inputs)
    h = keras.layers.Flatten()(keras.layers.Conv2D(8, 3, activation="relu", dtype=dtype)(h))
    h = keras.layers.Dense(num_classes, dtype=dtype)(h)
    return keras.Model(inputs, keras.layers.Rescaling(logit_scale, dtype="float32")(h))


def test_two_classes_get_a_clear_error_and_the_fix_runs(batch):
    images, labels = batch
    two = _tiny_classifier(2)
    labels = labels % 2
    with pytest.raises(ValueError, match=r"attacks=\['apgd-ce', 'fab-t', 'square'\]"):
        autoattack.auto_attack(two, images, labels, epsilon=EPSILON)
    with pytest.raises(ValueError, match="at least 3 classes"):
        autoattack.apgd(two, images, labels, epsilon=EPSILON, loss="dlr")
    result = autoattack.auto_attack(
        two, images[:16], labels[:16], epsilon=EPSILON, version="fast",
        attacks=["apgd-ce", "fab-t", "square"],
    )  # fmt: skip
    assert list(result.stages) == ["clean", "apgd-ce", "fab-t", "square"]


def test_fewer_classes_than_targets_warns_and_uses_k_minus_1(model, batch):
    images, labels = batch
    context = jobs.Context(model, NUM_CLASSES)
    with pytest.warns(
        UserWarning, match="apgd-t, fab-t: a 5-class model has 4 target classes, not 9"
    ):
        jobs.job(autoattack.spec("standard"), EPSILON, context)
    with pytest.warns(UserWarning, match="apgd-t-100 eps=2: a 5-class model has 4 target"):
        jobs.job("apgd-t", 2, context)
    with pytest.warns(UserWarning, match="APGD-T: a 5-class model has 4 target classes, not 9"):
        autoattack.apgd(
            model, images[:8], labels[:8], epsilon=EPSILON, num_steps=2, loss="dlr",
            targeted=True, target_classes=9,
        )  # fmt: skip
    with pytest.raises(ValueError, match="attacks must be"):
        autoattack.auto_attack(model, images, labels, epsilon=EPSILON, attacks=["fab"])


def test_rand_version_runs_apgd_with_eot(model, batch):
    assert autoattack.VERSIONS["rand"]["attacks"] == ("apgd-ce", "apgd-dlr")
    assert autoattack.VERSIONS["rand"]["eot_iter"] == 20
    images, labels = batch
    # With a deterministic model, EOT's mean of identical gradients changes nothing.
    once = autoattack.apgd(model, images[:16], labels[:16], epsilon=EPSILON, num_steps=5)
    eot = autoattack.apgd(model, images[:16], labels[:16], epsilon=EPSILON, num_steps=5, eot_iter=3)
    np.testing.assert_allclose(once, eot, atol=1e-3)
    assert autoattack.describe("rand").endswith(
        "APGD-CE 100 steps, then APGD-DLR 100 steps, EOT 20 gradients per step"
    )


def test_apgd_under_float16_scales_the_loss(batch):
    """A confident float16 model: unscaled CE gradients underflow to 0 and APGD cannot move;
    with the per-example loss scale APGD does as well as on the same model in float32."""
    images, labels = batch
    # Margins of ~50: float16 gradients underflow, float32 ones stay normal. (At 200 they are
    # float32 denormals, which TensorFlow flushes to zero and XLA keeps: float32 APGD itself
    # then differs between backends.)
    confident = dict(logit_scale=100.0)
    f32 = _tiny_classifier(NUM_CLASSES, **confident)
    f32.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    f32.fit(*make_data(512, seed=0), epochs=5, batch_size=64, verbose=0)
    f16 = _tiny_classifier(NUM_CLASSES, dtype="mixed_float16", **confident)
    f16.set_weights(f32.get_weights())
    assert attacks.uses_float16(f16)
    # Without scaling the float16 input gradient of the CE is all zeros on most examples.
    _, gradient = attacks.input_gradient(f16, images, labels, loss_scale=1.0)
    gradient = keras.ops.convert_to_numpy(gradient)
    zero = np.all(gradient.reshape(len(images), -1) == 0, axis=1)
    assert zero.mean() > 0.5
    run = dict(epsilon=EPSILON, num_steps=20)
    acc16 = accuracy(f16, autoattack.apgd(f16, images, labels, **run), labels)
    acc32 = accuracy(f32, autoattack.apgd(f32, images, labels, **run), labels)
    assert acc16 < accuracy(f16, images, labels) - 0.2
    assert abs(acc16 - acc32) <= 3 / len(labels)
