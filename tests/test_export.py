"""Serving signatures under careless or hostile requests: bad images named by index, empty
batches answered, non-finite pixels refused, pixels outside [0, 255] clipped or refused.

Under every backend (JAX: the forward pass converted by jax2tf); the SavedModel needs TensorFlow,
and without it the export refuses in one line.
"""

import errno
import importlib
import io
import os
import sys

import keras
import numpy as np
import pytest
from conftest import HAS_TENSORFLOW, needs_tensorflow
from PIL import Image

from sat_tf import models, rundir

pytestmark = pytest.mark.backends
if HAS_TENSORFLOW:
    import tensorflow as tf

    from sat_tf import export

SIZE = 16


@pytest.mark.skipif(HAS_TENSORFLOW, reason="checks the refusal without TensorFlow")
def test_export_without_tensorflow_says_what_to_install():
    sys.modules.pop("sat_tf.export", None)
    with pytest.raises(ImportError) as info:
        importlib.import_module("sat_tf.export")
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert "SavedModel export" in message and "pip install 'sat_tf[cpu]'" in message


def jpeg(seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def classifier():
    # small_cnn has BatchNorm, the layer an empty batch used to trip.
    model = models.build(
        "small_cnn", num_classes=10, activation="silu", input_shape=(SIZE, SIZE, 3)
    )
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    return model


@pytest.fixture(scope="module")
def served(classifier, tmp_path_factory):
    path = export.export_saved_model(
        classifier, tmp_path_factory.mktemp("export"), image_size=SIZE, central_crop=False, top_k=3
    )
    return tf.saved_model.load(str(path)).signatures


@needs_tensorflow
def test_undecodable_images_are_named_by_index(served):
    good = jpeg(0)
    cut = good[: len(good) // 2]  # a valid header: only the decoder notices
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"image 1 is not a JPEG or PNG image; image 3 has no image bytes",
    ):
        served["serving_bytes"](image_bytes=tf.constant([good, b"GIF89a..", good, b""]))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"`image_bytes`: image 2 could not be decoded"
    ):
        served["serving_bytes"](image_bytes=tf.constant([good, jpeg(1), cut]))


@needs_tensorflow
def test_good_bytes_match_the_model_on_decoded_pixels(served, classifier):
    payload = [jpeg(0), jpeg(1)]
    decoded = np.stack(
        [
            tf.image.resize(np.asarray(Image.open(io.BytesIO(p))).astype("float32"), [SIZE, SIZE])
            for p in payload
        ]
    )
    out = served["serving_bytes"](image_bytes=tf.constant(payload))
    np.testing.assert_allclose(out["logits"], classifier(decoded), atol=1e-3)


@needs_tensorflow
@pytest.mark.parametrize(
    ("signature", "name", "shape", "dtype"),
    [
        ("serving_default", "images", [0, SIZE, SIZE, 3], "float32"),
        ("serving_bytes", "image_bytes", [0], "string"),
    ],
)
def test_empty_batch_gives_empty_outputs(served, signature, name, shape, dtype):
    out = served[signature](**{name: tf.zeros(shape, dtype)})
    assert out["logits"].shape == (0, 10) and out["probabilities"].shape == (0, 10)
    assert out["top_k_classes"].shape == (0, 3) and out["top_k_probabilities"].shape == (0, 3)


@needs_tensorflow
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused_with_the_index(served, value):
    images = np.full((3, SIZE, SIZE, 3), 100.0, np.float32)
    images[2, 5, 5, 1] = value
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"NaN or Inf pixels in image 2\]"):
        served["serving_default"](images=tf.constant(images))


@needs_tensorflow
@pytest.mark.parametrize("value", [1e38, 300.0, -2.0, 65535.0])
def test_pixels_far_outside_0_255_are_refused(served, value):
    images = np.full((2, SIZE, SIZE, 3), 100.0, np.float32)
    images[1, 0, 0, 0] = value
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"must be in \[0, 255\]; outside it in image 1 "
    ):
        served["serving_default"](images=tf.constant(images))


@needs_tensorflow
def test_resampling_overshoot_is_clipped_to_0_255(served, classifier):
    images = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    images[0, :4] = 255.0 + export.PIXEL_TOLERANCE  # the edge of what is accepted
    images[1, :4] = -export.PIXEL_TOLERANCE
    out = served["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(out["logits"], classifier(np.clip(images, 0, 255)), atol=1e-4)


@needs_tensorflow
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_failed_export_write_is_one_line_and_publishes_nothing(
    classifier, tmp_path, monkeypatch, code
):
    (tmp_path / "1").mkdir()  # an earlier version stays untouched

    def fail(*args, **kwargs):  # the disk fills up (or is read-only) while the model is written
        raise OSError(code, os.strerror(code))

    # keras.export.ExportArchive() builds the backend's archive class: patch that one.
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", fail)
    with pytest.raises(rundir.RunWriteError) as info:
        export.export_saved_model(classifier, tmp_path, image_size=SIZE, version=2)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert (
        f"Could not write the SavedModel version 2 in {tmp_path} ({os.strerror(code)})" in message
    )
    assert f"nothing was published ({tmp_path / '2'} does not exist" in message
    assert ("Free some space" if code == errno.ENOSPC else "Make it writable") in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # no partial left behind
