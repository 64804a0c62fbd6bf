"""Preprocessing ops, run eagerly AND inside tf.data, against NumPy references and properties."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from sat_tf.data import preprocessing as pp

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (40, 56, 3), dtype=np.uint8)


def encode(array, fmt="PNG", mode=None):
    image = Image.fromarray(array)
    image = image.convert(mode) if mode else image
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=95)
    return buffer.getvalue()


def both(fn, *args):
    """`fn(*args)` eagerly and as a tf.data map; both results as NumPy."""
    eager = tf.nest.map_structure(np.asarray, fn(*args))
    mapped = tf.data.Dataset.from_tensors(args).map(fn)
    in_data = tf.nest.map_structure(np.asarray, next(iter(mapped)))
    return eager, in_data


SMOOTH = np.tile(np.linspace(0, 255, 56, dtype=np.uint8)[None, :, None], (40, 1, 3))
FORMATS = {
    "png": (encode(PIXELS), PIXELS, 0),
    "jpeg": (encode(SMOOTH, "JPEG"), SMOOTH, 4),
    "cmyk_jpeg": (encode(SMOOTH, "JPEG", "CMYK"), SMOOTH, 8),
    "grey_jpeg": (encode(SMOOTH[..., 0], "JPEG"), SMOOTH, 4),
    "grey_png": (encode(PIXELS[..., 0]), np.repeat(PIXELS[..., :1], 3, -1), 0),
    "rgba_png": (encode(np.dstack([PIXELS, PIXELS[..., :1]])), PIXELS, 0),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_decode_image_gives_rgb_close_to_source(name):
    encoded, expected, tolerance = FORMATS[name]
    for image in both(pp.decode_image, encoded):
        assert image.shape == (40, 56, 3) and image.dtype == np.uint8
        assert np.abs(image.astype(int) - expected).mean() <= tolerance


@pytest.mark.parametrize("name", ["png", "jpeg", "grey_jpeg"])
def test_image_shape_reads_header(name):
    for shape in both(pp.image_shape, FORMATS[name][0]):
        assert tuple(int(s) for s in shape) == (40, 56)


def test_decode_crop_matches_numpy_slice():
    png = FORMATS["png"][0]
    for crop in both(lambda e: pp.decode_crop(e, 5, 7, 20, 30), png):
        np.testing.assert_array_equal(crop, PIXELS[5:25, 7:37])


def test_center_crop_window_hand_computed():
    # 256x320 at 224: crop = 224/256 * 256 = 224, offsets ((256-224+1)//2, (320-224+1)//2).
    for window in both(lambda h, w: pp.center_crop_window(h, w, 224), 256, 320):
        assert [int(v) for v in window] == [16, 48, 224, 224]


def test_eval_center_crop_at_native_scale_is_the_numpy_slice():
    big = RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    for image in both(lambda e: pp.preprocess_for_eval(e, 224), encode(big)):
        assert image.dtype == np.float32
        np.testing.assert_allclose(image, big[16:240, 16:240], atol=1e-3)


def test_eval_without_crop_resizes_whole_image():
    flat = np.full((40, 56, 3), 77, np.uint8)
    for image in both(lambda e: pp.preprocess_for_eval(e, 32, augmentation=None), encode(flat)):
        assert image.shape == (32, 32, 3)
        np.testing.assert_allclose(image, 77.0, atol=1e-4)


def test_random_crop_window_respects_inception_ranges():
    boxes = tf.constant([[0.1, 0.2, 0.6, 0.9]])
    for _ in range(20):
        for y, x, h, w in both(lambda a, b: pp.random_crop_window(a, b, boxes), 300, 400):
            assert y >= 0 and y + h <= 300 and x >= 0 and x + w <= 400
            assert 0.08 - 0.01 <= h * w / (300 * 400) <= 1.0
            whole = (h, w) == (300, 400)  # the fallback after 10 failed attempts
            assert whole or 3 / 4 - 0.03 <= w / h <= 4 / 3 + 0.03
            # At least 10% of the box (rows 30..180, cols 80..360) is covered.
            overlap = max(0, min(y + h, 180) - max(y, 30)) * max(0, min(x + w, 360) - max(x, 80))
            assert overlap >= 0.1 * 150 * 280 - 1


def test_random_flip_is_identity_or_mirror():
    image = tf.constant(PIXELS)
    seen = set()
    for _ in range(16):
        for out in both(pp.random_flip, image):
            mirrored = np.array_equal(out, PIXELS[:, ::-1])
            assert mirrored or np.array_equal(out, PIXELS)
            seen.add(mirrored)
    assert seen == {True, False}


def test_cifar_augment_is_a_window_of_the_zero_padded_image():
    image = RNG.integers(1, 256, (32, 32, 3), dtype=np.uint8)
    padded = np.pad(image, [(4, 4), (4, 4), (0, 0)])
    windows = [padded[y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
    for _ in range(5):
        for out in both(pp.cifar_augment, tf.constant(image)):
            assert any(np.array_equal(out, w) or np.array_equal(out, w[:, ::-1]) for w in windows)


@pytest.mark.parametrize("augmentation", ["inception", "cifar", None])
@pytest.mark.parametrize("name", ["png", "cmyk_jpeg", "grey_jpeg"])
def test_preprocess_for_train_shape_dtype_range(name, augmentation):
    def train(e):
        return pp.preprocess_for_train(e, 24, augmentation=augmentation)

    for image in both(train, FORMATS[name][0]):
        assert image.shape == (24, 24, 3) and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 255.0


def test_bad_augmentation_name():
    with pytest.raises(ValueError, match="augmentation"):
        pp.preprocess_for_train(FORMATS["png"][0], 8, augmentation="autoaugment")
