"""Image folders read directly with tf.data: `<directory>/<split>/<class>/<image>`.

Labels are the positions of the class folder names in the sorted union of the class folders of all
splits (0-based), so train and validation agree even when a split lacks a class. The files are read
in chunks of `chunk_size` images that play the role of TFRecord shards: chunks are sharded between
input pipelines, shuffled and interleaved, and a bad image is reported with its path.
"""

import os

import numpy as np
import tensorflow as tf

from sat_tf.data import checks, pipeline

EXTENSIONS = (".jpg", ".jpeg", ".png")


def _visible(folder):
    """Sorted entries of `folder`, hidden ones (`.ipynb_checkpoints`, `._x.jpg`) skipped."""
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def split_classes(directory):
    """`{split: set of class folder names}` for each split folder of `directory`."""
    splits = [s for s in _visible(directory) if os.path.isdir(os.path.join(directory, s))]
    return {
        split: {c for c in _visible(os.path.join(directory, split)) if _is_dir(directory, split, c)}
        for split in splits
    }


def _is_dir(*parts):
    return os.path.isdir(os.path.join(*parts))


def class_names(directory):
    """Sorted class folder names over all split folders of `directory` (hidden ones skipped)."""
    return sorted(set().union(*split_classes(directory).values()))


def check_classes(directory, num_classes):
    """Raises ValueError when the class folders outnumber `num_classes`, naming the folders that
    differ between splits (a label would otherwise fall outside the model's classes)."""
    classes = split_classes(directory)
    names = set().union(*classes.values())
    if num_classes is None or len(names) <= num_classes:
        return
    differ = [
        f"only in {split}/: {', '.join(sorted(found - set.intersection(*classes.values())))}"
        for split, found in sorted(classes.items())
        if found - set.intersection(*classes.values())
    ]
    detail = "; ".join(differ) if differ else "every split has them all"
    raise ValueError(
        f"{directory} has {len(names)} class folders over its splits, more than "
        f"num_classes={num_classes} ({detail}). Rename or remove the extra folders so that every "
        "split has the same class folders, or set num_classes."
    )


def list_images(directory, split):
    """`(paths, labels, class_names)` of the JPEG/PNG files under `<directory>/<split>/<class>/`.

    Raises:
        FileNotFoundError: when the split folder is missing or holds no images.
    """
    root = os.path.join(directory, split)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"No folder {root!r}: expected <directory>/<split>/<class>/<image>."
        )
    names = class_names(directory)
    paths, labels = [], []
    for label, name in enumerate(names):
        folder = os.path.join(root, name)
        files = _visible(folder) if os.path.isdir(folder) else []
        found = [os.path.join(folder, f) for f in files if f.lower().endswith(EXTENSIONS)]
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise FileNotFoundError(f"No {'/'.join(EXTENSIONS)} images under {root!r}/<class>/.")
    return paths, labels, names


def info(directory, split):
    """`(num_examples, num_classes)` of a split folder."""
    paths, _, names = list_images(directory, split)
    return len(paths), len(names)


def build_dataset(
    directory,
    *,
    split,
    training,
    global_batch_size,
    image_size,
    input_context=None,
    augmentation="inception",
    chunk_size=256,
    **kwargs,
):
    """Train or eval pipeline over an image folder; see `tfrecord.build_dataset` for the arguments.

    Returns:
        The batched `tf.data.Dataset` (sizes: `info`).
    """
    check_classes(directory, kwargs.get("num_classes"))
    paths, labels, _ = list_images(directory, split)
    paths, labels = np.asarray(paths), np.asarray(labels, np.int64)
    if training:  # Mix the classes inside each chunk (the listing is sorted by class).
        order = np.random.RandomState(0).permutation(len(paths))
    else:  # Classes in turn (the i-th image of every class, then the (i+1)-th), so that the
        # first batches, e.g. --eval_examples, cover every class; each class keeps its file order.
        rank = np.arange(len(labels)) - np.searchsorted(labels, labels)  # position in its class
        order = np.lexsort((labels, rank))
    paths, labels = paths[order], labels[order]
    num_pipelines, pipeline_id = pipeline.shard_info(input_context)
    starts = list(range(0, len(paths), chunk_size))
    shard_records = len(starts) < num_pipelines
    if not shard_records:
        starts = starts[pipeline_id::num_pipelines]
    stops = [min(s + chunk_size, len(paths)) for s in starts]
    all_paths, all_labels = tf.constant(paths), tf.constant(labels)

    def make_source(start, stop):
        return _chunk_source(all_paths[start:stop], all_labels[start:stop])

    dataset = pipeline.build_from_sources(
        (starts, stops),
        make_source,
        shard=(pipeline_id, num_pipelines) if shard_records else (0, 1),
        training=training,
        global_batch_size=global_batch_size,
        image_size=image_size,
        input_context=input_context,
        augmentation=augmentation,
        **kwargs,
    )
    return dataset


def _chunk_source(paths, labels):
    """One chunk of files as records plus end marker, and a `describe` naming files by path."""

    def read(index, item):
        path, label = item
        return {
            "index": index,
            "encoded": tf.io.read_file(path),
            "label": label,
            "bbox": tf.zeros([0, 4], tf.float32),
            "end": tf.constant(False),
            "intact": tf.constant(True),
        }

    records = tf.data.Dataset.from_tensor_slices((paths, labels)).enumerate().map(read)
    # An unreadable file is dropped here and reported as a gap by `checks.checked_decode`.
    records = records.ignore_errors()
    records = records.concatenate(tf.data.Dataset.from_tensors(checks.end_marker(tf.size(paths))))

    def describe(index):
        # Clipped: `checks` builds every message, and uses it only when the index is valid.
        index = tf.cast(index, tf.int64)
        path = tf.gather(paths, tf.clip_by_value(index, 0, tf.cast(tf.size(paths), tf.int64) - 1))
        return tf.where(index < 0, "image folder chunk", path)

    return records, describe
