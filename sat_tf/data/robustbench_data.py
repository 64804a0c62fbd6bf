"""The evaluation data of RobustBench's L-inf protocols (see `sat_tf.robustbench`), as pixels.

    cifar10_from_tfds()                         the first 10,000 test images, original order
    read_image_ids(path)                        RobustBench's 5,000 ImageNet validation ids
    imagenet_from_folder(dir, ids, split=...)   those images from a class-folder tree
    imagenet_from_tfrecord(pattern, ids)        those images from ImageNet-format TFRecords

Every loader returns `(uint8 [N, S, S, 3], int32 [N])` in RobustBench's order.
"""

import hashlib
import os
import re

import numpy as np
import tensorflow as tf

from sat_tf.data import folder, preprocessing, tfrecord

IDS_URL = (
    "https://raw.githubusercontent.com/RobustBench/robustbench/master/"
    "robustbench/helper_files/imagenet_test_image_ids.txt"
)
# sha256 of that file at RobustBench commit 78fcc9e (last changed in 5be8f6a, August 2022).
IDS_SHA256 = "d4121626d07722a0126c35b1563042e46a546f1a05ce705f2cdc635896d58574"
_ID = re.compile(r"^(n\d{8})/([^/\s]+)$")  # "<synset>/<file name>"


MAX_IDS_BYTES = 16 * 2**20  # far above the ~170 KB of RobustBench's list


def read_image_ids(path):
    """RobustBench's ImageNet subset: `(ids, sha256)`, ids as "<synset>/<file name>" in order.

    Raises:
        ValueError: naming the file and its first malformed or repeated line, or a file far
            larger than the list (read no further than `MAX_IDS_BYTES`).
    """
    with open(path, "rb") as f:
        raw = f.read(MAX_IDS_BYTES + 1)
    if len(raw) > MAX_IDS_BYTES:
        raise ValueError(
            f"{path} holds more than {MAX_IDS_BYTES // 2**20} MiB; RobustBench's list of 5,000 "
            f"ids is about 170 KB ({IDS_URL})."
        )
    try:
        text = raw.decode()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a text file of ids ({error.reason}).") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    for number, line in enumerate(ids, 1):
        if not _ID.match(line):
            raise ValueError(f"{path} line {number}: {line!r} is not '<synset>/<file name>'.")
    seen = set()
    for line in ids:
        if line in seen:
            raise ValueError(f"{path} lists {line!r} more than once.")
        seen.add(line)
    return ids, hashlib.sha256(raw).hexdigest()


def _decode(encoded, image_size):
    """Our ImageNet evaluation crop, rounded to uint8 (RobustBench's images are k/255 too)."""
    image = preprocessing.preprocess_for_eval(encoded, image_size, augmentation="inception")
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def imagenet_from_folder(directory, image_ids, *, split, image_size=224):
    """RobustBench's ImageNet images from `<directory>/<split>/<synset>/<file>`, in ids order.

    Labels are positions in the sorted class folders (`data.folder.class_names`, as in training
    and as in RobustBench's ImageFolder), so the folder must hold all 1,000 classes.

    Returns:
        `(uint8 [N, S, S, 3], int32 [N])`.
    """
    names = folder.class_names(directory)
    index = {name: i for i, name in enumerate(names)}
    paths = [os.path.join(directory, split, i) for i in image_ids]
    missing = [p for p in paths if not os.path.isfile(p)]
    unknown = sorted({i.split("/")[0] for i in image_ids} - set(index))
    if missing or unknown:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images missing (first: {missing[:3]}), "
            f"{len(unknown)} synsets without a class folder (first: {unknown[:3]})."
        )
    labels = np.array([index[i.split("/")[0]] for i in image_ids], np.int32)
    dataset = tf.data.Dataset.from_tensor_slices(paths)
    dataset = dataset.map(lambda p: _decode(tf.io.read_file(p), image_size), tf.data.AUTOTUNE)
    images = np.concatenate(list(dataset.batch(64).as_numpy_iterator()))
    return images, labels


def imagenet_from_tfrecord(file_pattern, image_ids, *, image_size=224, label_offset=1):
    """RobustBench's ImageNet images from ImageNet-format TFRecords, matched by `image/filename`.

    The records must keep the original file names (ILSVRC2012_val_XXXXXXXX.JPEG), as the TPU
    converter and `tools/build_tfrecords.py --input_dir` write them; labels are
    `image/class/label - label_offset`, as in training. Where a record has `image/class/synset`,
    it must match the id's synset.

    Returns:
        `(uint8 [N, S, S, 3], int32 [N])`, in `image_ids` order.
    """
    names = [i.split("/")[1] for i in image_ids]
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(names, tf.range(len(names), dtype=tf.int64)), -1
    )
    spec = tfrecord.features(
        "image/filename", "image/class/synset", "image/encoded", "image/class/label"
    )

    def parse(serialized):
        f = tf.io.parse_single_example(serialized, spec)
        base = tf.strings.regex_replace(f["image/filename"], r"^.*/", "")
        label = f["image/class/label"]
        return table.lookup(base), f["image/class/synset"], f["image/encoded"], label

    # Any read order will do (the images are put in the ids' order below), so read in parallel.
    files = tfrecord.list_files(file_pattern)
    dataset = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
    dataset = dataset.map(parse, tf.data.AUTOTUNE).filter(lambda position, *_: position >= 0)
    dataset = dataset.map(
        lambda p, s, e, y: (p, s, _decode(e, image_size), y - label_offset), tf.data.AUTOTUNE
    )
    parts = list(dataset.batch(64).as_numpy_iterator())
    position, synset, images, labels = (
        np.concatenate([p[k] for p in parts]) if parts else np.zeros([0], np.int64)
        for k in range(4)
    )
    found = np.zeros(len(names), bool)
    found[position] = True
    if len(position) != len(set(position.tolist())) or not found.all():
        raise FileNotFoundError(
            f"{int(found.sum())} of {len(names)} images found in {file_pattern!r} (each must be "
            f"exactly once); first missing: {[image_ids[i] for i in np.flatnonzero(~found)[:3]]}."
        )
    for p, s in zip(position, synset, strict=True):
        if s and s.decode() != image_ids[p].split("/")[0]:
            raise ValueError(f"Record {names[p]} has synset {s.decode()}, not {image_ids[p]}.")
    order = np.argsort(position)
    return images[order], labels[order].astype(np.int32)


def cifar10_from_tfds(*, num_examples=10_000, data_dir=None):
    """The first `num_examples` CIFAR-10 test images in the original order (TFDS's "id" field).

    TFDS stores examples in a hashed order; its "id" ("test_00000", ...) numbers them as in the
    original test batch, which is RobustBench's (torchvision's) order.

    Returns:
        `(uint8 [N, 32, 32, 3], int32 [N])`.
    """
    from sat_tf.data import tfds  # TFDS is slow to import; only pay for it when used.

    examples = tfds.prepared_builder("cifar10", data_dir=data_dir).as_dataset(split="test")
    ids, images, labels = [], [], []
    for example in examples.as_numpy_iterator():
        ids.append(example["id"])
        images.append(example["image"])
        labels.append(example["label"])
    order = np.argsort(np.asarray(ids))[:num_examples]
    return np.stack(images)[order], np.asarray(labels, np.int32)[order]
