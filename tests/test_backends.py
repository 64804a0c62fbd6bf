"""Every backend computes what TensorFlow computes, on one trained model and real images.

tests/data/backends/reference.npz holds TensorFlow's logits, input gradients, PGD images and the
adversarial images and verdicts of APGD-CE, APGD-T, FAB-T and Square (small budgets, seed 0) on
40 CIFAR-10 test images, for the PGD-trained small_cnn beside it (make_reference.py wrote them).
Under TensorFlow this checks that they are still what they were; under JAX, that JAX agrees.
The attacks' random draws are keyed by (seed, example) (`sat_tf.draws`), so every backend draws
the same numbers and the verdicts can be compared one by one.
"""

import pathlib

import keras
import numpy as np
import pytest
from conftest import BACKEND

from sat_tf import attacks, autoattack
from tests.data.backends.budgets import ATTACKS, EPSILON, PGD, cifar_images, cifar_test_root

pytestmark = [pytest.mark.backends, pytest.mark.data]

FIXTURES = pathlib.Path(__file__).parent / "data" / "backends"
# Agreement asked of a backend other than TensorFlow: relative to the largest reference value.
RELATIVE = 1e-5


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from conftest import SHARED_DATA

    root = cifar_test_root(SHARED_DATA, tmp_path_factory.mktemp("cifar"))
    if root is None:
        pytest.skip(f"{SHARED_DATA} has no cifar10-jpeg.tar.gz: needs the shared data folder")
    images, labels = cifar_images(root)
    reference = dict(np.load(FIXTURES / "reference.npz"))
    np.testing.assert_array_equal(labels, reference["labels"])
    model = keras.saving.load_model(FIXTURES / "cifar_relu.keras")
    return model, images, labels, reference


def _close(actual, expected):
    np.testing.assert_allclose(
        actual, expected, rtol=RELATIVE, atol=RELATIVE * np.abs(expected).max()
    )


def test_logits_and_input_gradients_agree(case):
    model, images, labels, reference = case
    _close(keras.ops.convert_to_numpy(model(images, training=False)), reference["logits"])
    losses, gradient = attacks.input_gradient(model, images, labels)
    _close(keras.ops.convert_to_numpy(losses), reference["losses"])
    _close(keras.ops.convert_to_numpy(gradient), reference["gradient"])


def test_pgd_from_the_same_keyed_start_gives_the_same_images(case):
    model, images, labels, reference = case
    adv = keras.ops.convert_to_numpy(attacks.pgd(model, images, labels, seed=0, **PGD))
    differs = np.abs(adv - reference["pgd"]) > 1e-3
    # A sign step flips only where a gradient entry is within rounding of zero; none did here.
    assert differs.mean() <= (0.0 if BACKEND == "tensorflow" else 1e-3), differs.mean()
    assert np.abs(adv - images).max() <= EPSILON + 1e-4


FUNCTIONS = {
    "apgd-ce": autoattack.apgd,
    "apgd-t": autoattack.apgd,
    "fab-t": autoattack.fab_targeted,
    "square": autoattack.square,
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_verdicts_agree_example_by_example(case, name):
    model, images, labels, reference = case
    adv = keras.ops.convert_to_numpy(
        FUNCTIONS[name](model, images, labels, epsilon=EPSILON, **ATTACKS[name])
    )
    robust = np.argmax(keras.ops.convert_to_numpy(model(adv, training=False)), -1) == labels
    np.testing.assert_array_equal(robust, reference[f"{name}_robust"])
    assert np.abs(adv - images).max() <= EPSILON + 1e-4
    if BACKEND == "tensorflow":
        np.testing.assert_allclose(adv, reference[name], atol=1e-4)
