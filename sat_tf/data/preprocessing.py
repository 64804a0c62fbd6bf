"""Image preprocessing for training and evaluation, on encoded JPEG or PNG bytes.

Follows the shape of tensorflow/models' legacy `official/legacy/image_classification/resnet/
imagenet_preprocessing.py`: flat functions, an Inception-style random crop fused with JPEG decoding
for training (`tf.image.decode_and_crop_jpeg` decodes only the crop window), and a central crop with
the usual 224/256 ratio for evaluation (the `CROP_PADDING = 32` form of the EfficientNet code that
the official SAT repository builds on). Every function returns float32 pixels in [0, 255] with
exactly 3 channels: greyscale and CMYK JPEGs and greyscale/alpha PNGs are converted by the decoders
(`channels=3`); that is how the ImageNet train set's CMYK JPEGs and its PNG named .JPEG pass.

All functions work eagerly and inside `tf.data` (tests check both).
"""

import tensorflow as tf

# Central crop keeps image_size / (image_size + CROP_PADDING) of the shorter side: 224/256 at 224.
CROP_PADDING = 32
# Inception crop ranges (Szegedy et al. 2015; legacy imagenet_preprocessing.py).
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
# Refuse images whose header declares more pixels than this before decoding them: Pillow's
# decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS), far above any ImageNet image.
MAX_PIXELS = 89_478_485
AUGMENTATIONS = ("inception", "cifar", None)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_jpeg(encoded):
    """Whether `encoded` (scalar string tensor) starts with the JPEG magic bytes."""
    return tf.equal(tf.strings.substr(encoded, 0, 3), _JPEG_MAGIC)


def is_png(encoded):
    """Whether `encoded` (scalar string tensor) starts with the PNG signature."""
    return tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_MAGIC)


def _png_shape(encoded):
    """Height and width from a PNG's IHDR chunk (big-endian uint32 at bytes 16..24)."""
    header = tf.strings.substr(tf.strings.join([encoded, b"\0" * 24]), 16, 8)
    words = tf.io.decode_raw(header, tf.int32, little_endian=False)
    return words[1], words[0]


def image_shape(encoded):
    """Declared `(height, width)` of a JPEG or PNG, read from the header without decoding.

    Raises InvalidArgumentError (when the op runs) for JPEG data whose header cannot be parsed.
    """

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        return shape[0], shape[1]

    return tf.cond(is_jpeg(encoded), jpeg, lambda: _png_shape(encoded))


def decode_crop(encoded, offset_y, offset_x, height, width):
    """Decodes the window [offset_y:+height, offset_x:+width] of a JPEG or PNG as uint8 RGB.

    JPEGs go through the fused `decode_and_crop_jpeg`, which skips the pixels outside the window.
    """

    def jpeg():
        window = tf.stack([offset_y, offset_x, height, width])
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    def png():
        image = tf.io.decode_png(encoded, channels=3)
        return image[offset_y : offset_y + height, offset_x : offset_x + width]

    image = tf.cond(is_jpeg(encoded), jpeg, png)
    image.set_shape([None, None, 3])
    return image


def decode_image(encoded):
    """Decodes a whole JPEG or PNG to uint8 RGB `[height, width, 3]`."""
    height, width = image_shape(encoded)
    return decode_crop(encoded, 0, 0, height, width)


def resize(image, image_size):
    """Bilinear resize to `image_size x image_size`, float32 (as the legacy ImageNet pipeline)."""
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return tf.reshape(image, [image_size, image_size, 3])


def random_crop_window(height, width, bbox=None):
    """Samples an Inception crop window (area 8-100%, aspect 3/4-4/3) covering part of `bbox`.

    Args:
        height: image height (int32 scalar).
        width: image width.
        bbox: float32 `[N, 4]` boxes `(ymin, xmin, ymax, xmax)` in [0, 1], or None/empty for the
            whole image. At least 10% of a box must be covered (legacy `min_object_covered=0.1`).

    Returns:
        `(offset_y, offset_x, crop_height, crop_width)` int32 scalars.
    """
    if bbox is None:
        bbox = tf.zeros([0, 4], tf.float32)
    bbox = tf.reshape(tf.cast(bbox, tf.float32), [1, -1, 4])
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.stack([height, width, 3]),
        bounding_boxes=bbox,
        min_object_covered=0.1,
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=AREA_RANGE,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin[0], begin[1], size[0], size[1]


def center_crop_window(height, width, image_size):
    """The central square window keeping image_size / (image_size + 32) of the shorter side."""
    side = tf.cast(tf.minimum(height, width), tf.float32)
    crop = tf.cast(image_size / (image_size + CROP_PADDING) * side, tf.int32)
    crop = tf.maximum(crop, 1)
    return (height - crop + 1) // 2, (width - crop + 1) // 2, crop, crop


def random_flip(image):
    """Flips left-right with probability 1/2."""
    return tf.image.random_flip_left_right(image)


def cifar_augment(image, padding=4):
    """Zero-pads `padding` pixels on each side, takes a random crop of the original size, flips.

    The CIFAR augmentation of He et al. (2016), as in the TensorFlow CIFAR-10 ResNet example.
    """
    shape = tf.shape(image)
    padded = tf.image.pad_to_bounding_box(
        image, padding, padding, shape[0] + 2 * padding, shape[1] + 2 * padding
    )
    image = tf.image.random_crop(padded, shape)
    return random_flip(image)


def preprocess_for_train(encoded, image_size, *, bbox=None, augmentation="inception"):
    """Decodes and augments one training image.

    Args:
        encoded: scalar string tensor, JPEG or PNG bytes.
        image_size: output side in pixels.
        bbox: optional float32 `[N, 4]` object boxes for the Inception crop.
        augmentation: "inception" (random crop + flip + resize), "cifar" (resize, pad-4 random
            crop, flip) or None (resize only).

    Returns:
        float32 `[image_size, image_size, 3]` in [0, 255].
    """
    check_augmentation(augmentation)
    if augmentation == "inception":
        height, width = image_shape(encoded)
        image = decode_crop(encoded, *random_crop_window(height, width, bbox))
        return random_flip(resize(image, image_size))
    image = resize(decode_image(encoded), image_size)
    return cifar_augment(image) if augmentation == "cifar" else image


def preprocess_for_eval(encoded, image_size, *, augmentation="inception"):
    """Decodes one evaluation image: central crop then resize for "inception", else resize only.

    Args:
        encoded: scalar string tensor, JPEG or PNG bytes.
        image_size: output side in pixels.
        augmentation: the training augmentation whose evaluation counterpart to use.

    Returns:
        float32 `[image_size, image_size, 3]` in [0, 255].
    """
    check_augmentation(augmentation)
    if augmentation == "inception":
        height, width = image_shape(encoded)
        image = decode_crop(encoded, *center_crop_window(height, width, image_size))
    else:
        image = decode_image(encoded)
    return resize(image, image_size)


def check_augmentation(augmentation):
    """Raises ValueError unless `augmentation` is one of `AUGMENTATIONS`."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"augmentation must be one of {AUGMENTATIONS}. Received: augmentation={augmentation!r}"
        )
