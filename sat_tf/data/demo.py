"""The built-in demo data: scikit-learn's handwritten digits (no download, ships with sklearn).

1,797 greyscale 8x8 images of the digits 0-9 (UCI "Optical Recognition of Handwritten Digits",
pixel values 0..16). They are scaled to [0, 255], resized (bilinear) to `image_size` and repeated
to 3 channels, so the models and attacks see the same kind of input as with ImageNet. The split is
fixed: a permutation with seed 0, the first 1,437 images for "train" and the last 360 for "test"
(the usual 80/20), identical on every machine.
"""

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

from sat_tf.data import pipeline

NUM_CLASSES = 10
NUM_EXAMPLES = 1797
NUM_TRAIN = 1437
IMAGE_SIZE = 16  # 2x the native 8x8: cheap enough for PGD training on 2 CPU cores in minutes.
SPLITS = ("train", "test", "validation")  # "validation" is the test split.


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"The demo data has splits {SPLITS}. Received: split={split!r}")


def info(split):
    """`(num_examples, num_classes)` of a split."""
    _check_split(split)
    return (NUM_TRAIN if split == "train" else NUM_EXAMPLES - NUM_TRAIN), NUM_CLASSES


def arrays(split, image_size=IMAGE_SIZE):
    """Images `[N, image_size, image_size, 3]` float32 in [0, 255] and int32 labels of a split."""
    _check_split(split)
    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.target))
    order = order[:NUM_TRAIN] if split == "train" else order[NUM_TRAIN:]
    images = digits.images[order, :, :, None].astype(np.float32) * (255.0 / 16.0)
    if image_size != images.shape[1]:
        images = tf.image.resize(images, [image_size, image_size], method="bilinear").numpy()
    images = np.repeat(np.clip(images, 0.0, 255.0), 3, axis=-1)
    return images, digits.target[order].astype(np.int32)


def build_dataset(
    *,
    split,
    training,
    global_batch_size,
    image_size=IMAGE_SIZE,
    input_context=None,
    pad_final_batch=False,
    repeat=None,
):
    """Train or eval pipeline over the digits; no augmentation (flips would change digits).

    Args:
        split: "train", or "test" (alias "validation").
        training: shuffle each epoch, repeat, drop the last partial batch.
        global_batch_size: batch size over all replicas.
        image_size: output side in pixels.
        input_context: `tf.distribute.InputContext`; examples are sharded between pipelines.
        pad_final_batch: as in `tfrecord.build_dataset`.
        repeat: repeat forever; defaults to `training`.

    Returns:
        The batched `tf.data.Dataset` (sizes: `info`).
    """
    images, labels = arrays(split, image_size)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    dataset = dataset.shard(*pipeline.shard_info(input_context))
    if training:
        dataset = dataset.shuffle(len(labels), reshuffle_each_iteration=True)
    if training if repeat is None else repeat:
        dataset = dataset.repeat()
    dataset = pipeline.batch(
        dataset,
        training=training,
        batch_size=pipeline.per_replica_batch_size(global_batch_size, input_context),
        pad_final_batch=pad_final_batch,
    )
    return dataset
