"""Tests for sat_tf.apgd's batch handling, under every backend: the padding that keeps JAX's
compilations few, and the forms labels, ids and seeds may take. (The algorithm itself is tested
against the reference loop and the paper in tests/test_autoattack.py and
tests/test_reference_autoattack.py.)"""

import keras
import numpy as np
import pytest

from sat_tf import apgd, backend

pytestmark = pytest.mark.backends


@pytest.fixture(scope="module")
def model_and_data():
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Rescaling(1 / 127.5, offset=-1),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("silu"),
            keras.layers.Flatten(),
            keras.layers.Dense(5),
        ]
    )
    images = np.random.default_rng(3).uniform(0, 255, (6, 6, 6, 3)).astype(np.float32)
    labels = np.argmax(keras.ops.convert_to_numpy(model(images)), axis=1).astype(np.int32)
    labels[0] = (labels[0] + 1) % 5  # one example misclassified from the start
    return model, images, labels


RUNS = {
    "apgd-ce": {"num_steps": 6, "num_restarts": 2},
    "apgd-t": {"num_steps": 4, "loss": "dlr", "targeted": True, "target_classes": 2},
}


@pytest.mark.parametrize("name", list(RUNS))
def test_padding_to_the_batch_bucket_changes_nothing(model_and_data, monkeypatch, name):
    """Padded rows (copies of the last example) never reach the real examples' results."""
    model, images, labels = model_and_data

    def run(bucket):
        monkeypatch.setattr(backend, "batch_bucket", bucket)
        adv = apgd.apgd(model, images, labels, epsilon=8.0, seed=1, **RUNS[name])
        return keras.ops.convert_to_numpy(adv)

    # The backend's own (TensorFlow: none; JAX: powers of two) against one size for all.
    default = run(backend.batch_bucket)
    np.testing.assert_array_equal(run(lambda batch: 8), default)
    assert not np.array_equal(default, images)
    np.testing.assert_array_equal(default[0], images[0])  # misclassified: left as it is


def test_labels_ids_and_seeds_in_any_integer_form(model_and_data):
    model, images, labels = model_and_data
    kwargs = {"epsilon": 8.0, "num_steps": 3}

    def run(labels, **more):
        return keras.ops.convert_to_numpy(apgd.apgd(model, images, labels, **kwargs, **more))

    want = run(labels, seed=2, ids=np.arange(10, 16))
    tensor = keras.ops.convert_to_tensor
    for labels_, more in (
        (labels.astype(np.int64), {"seed": 2, "ids": np.arange(10, 16, dtype=np.int64)}),
        (list(labels), {"seed": np.int64(2), "ids": list(range(10, 16))}),
        (tensor(labels), {"seed": tensor(2, "int32"), "ids": tensor(np.arange(10, 16), "int32")}),
    ):
        np.testing.assert_array_equal(run(labels_, **more), want)
    # The default ids number the batch 0..B-1.
    np.testing.assert_array_equal(run(labels, seed=2), run(labels, seed=2, ids=np.arange(6)))
