"""Converts an image folder (or a TFDS split) into sharded ImageNet-format TFRecords.

Input: `<input_dir>/<split>/<class or wnid>/<image>`. Output: `<output_dir>/<split>-00000-of-00016`
... in the standard format (`sat_tf.data.tfrecord.FEATURES`, every key but the optional boxes),
plus `<output_dir>/<split>.json` with the example and class counts that
`sat_tf.data.load("tfrecord:<output_dir>", ...)` reads.

Labels are 1-based, 0 being "background", as in the standard ImageNet TFRecords, so the pipeline's
default `label_offset=1` gives 0-based labels:
  - with `--labels_file` (one wnid or class name first on each line), label = line number, so
    `--labels_file=../shared/data/imagenet_synsets.txt` gives the real ImageNet labels;
  - without it, label = 1 + position of the folder name among the sorted class folders.

PNG data and CMYK JPEGs are re-encoded as RGB JPEG (quality 100, as the TPU ImageNet converter);
greyscale JPEGs are kept (the pipeline decodes them to 3 channels). Each shard is written under a
temporary name and renamed when complete, and existing shards are skipped, so an interrupted run
resumes where it stopped (delete the output to rebuild with other inputs).

  python tools/build_tfrecords.py --input_dir=/data/imagenette --split=val \
      --output_dir=/tmp/imagenette-tfr --labels_file=../shared/data/imagenet_synsets.txt \
      --num_shards=8 --num_workers=2
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sat_tf.atomic import atomic_path, atomic_write  # noqa: E402
from sat_tf.data import tfrecord  # noqa: E402

EXTENSIONS = (".jpg", ".jpeg", ".png")

flags.DEFINE_string("input_dir", None, "Folder with <split>/<class>/<image>.")
flags.DEFINE_string("output_dir", None, "Where the shards go (created if absent).")
flags.DEFINE_string("split", "train", "Split folder (or TFDS split) to convert.")
flags.DEFINE_string("labels_file", None, "One wnid/class a line; label = line number (1-based).")
flags.DEFINE_integer("num_shards", 16, "Number of output shards.")
flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Shards written in parallel (threads).")
flags.DEFINE_string("from_tfds", None, "Read this TFDS dataset instead of --input_dir.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (with --from_tfds).")


@dataclasses.dataclass(frozen=True)
class Config:
    output_dir: str
    split: str = "train"
    input_dir: str | None = None
    labels_file: str | None = None
    num_shards: int = 16
    num_workers: int = 1
    from_tfds: str | None = None
    data_dir: str | None = None


def read_labels(labels_file):
    """Maps the first word of each non-empty line to its 1-based line number."""
    with open(labels_file) as f:
        names = [line.split()[0] for line in f if line.strip()]
    return {name: i + 1 for i, name in enumerate(names)}


def list_folder(input_dir, split, labels_file=None):
    """`(items, num_classes)`: items are `(path, label, class name)`, sorted by class and file."""
    root = os.path.join(input_dir, split)
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    labels = read_labels(labels_file) if labels_file else {c: i + 1 for i, c in enumerate(classes)}
    unknown = sorted(set(classes) - set(labels))
    if unknown:
        raise ValueError(f"Class folders not in {labels_file}: {unknown[:5]}")
    items = [
        (os.path.join(root, c, f), labels[c], c)
        for c in classes
        for f in sorted(os.listdir(os.path.join(root, c)))
        if f.lower().endswith(EXTENSIONS)
    ]
    if not items:
        raise FileNotFoundError(f"No {'/'.join(EXTENSIONS)} images under {root}/<class>/.")
    return items, len(labels)


def to_rgb_jpeg(data):
    """`(jpeg bytes, height, width)`: PNG and CMYK JPEG become RGB JPEG; other JPEGs are kept."""
    if data[:3] == b"\xff\xd8\xff":
        height, width, channels = tf.image.extract_jpeg_shape(data).numpy()
        if channels != 4:
            return data, int(height), int(width)
        image = tf.io.decode_jpeg(data, channels=3)  # libjpeg converts CMYK to RGB.
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        image = tf.io.decode_png(data, channels=3)
    else:
        raise ValueError("not a JPEG or PNG image")
    encoded = tf.io.encode_jpeg(image, format="rgb", quality=100).numpy()
    return encoded, int(image.shape[0]), int(image.shape[1])


def make_example(data, label, synset, filename):
    """A `tf.train.Example` in the standard ImageNet format (re-encoding PNG/CMYK first)."""
    encoded, height, width = to_rgb_jpeg(data)
    return tfrecord.to_example(
        {
            "image/encoded": encoded,
            "image/format": b"JPEG",
            "image/height": height,
            "image/width": width,
            "image/class/label": int(label),
            "image/class/synset": synset.encode(),
            "image/filename": filename.encode(),
        }
    )


def shard_path(config, index):
    return os.path.join(config.output_dir, f"{config.split}-{index:05d}-of-{config.num_shards:05d}")


def write_shard(path, examples):
    """Writes serialized examples to `path` atomically (`sat_tf.atomic`)."""
    with atomic_path(path) as partial, tf.io.TFRecordWriter(str(partial)) as writer:
        for example in examples:
            writer.write(example.SerializeToString())


def build_from_folder(config):
    """Writes the missing shards of one split folder; returns `(num_examples, num_classes)`."""
    items, num_classes = list_folder(config.input_dir, config.split, config.labels_file)
    # Shuffle with a fixed seed so every shard mixes the classes (as the TPU converter does).
    order = np.random.RandomState(12345).permutation(len(items))
    shards = np.array_split(order, config.num_shards)
    todo = [i for i in range(config.num_shards) if not os.path.exists(shard_path(config, i))]
    progress = Progress(len(todo), sum(len(shards[i]) for i in todo))

    def write(index):
        chosen = [items[j] for j in shards[index]]
        examples = (_folder_example(path, label, name) for path, label, name in chosen)
        write_shard(shard_path(config, index), examples)
        progress.update(len(chosen))

    with concurrent.futures.ThreadPoolExecutor(config.num_workers) as pool:
        list(pool.map(write, todo))  # list() re-raises the first error of a worker.
    return len(items), num_classes


def _folder_example(path, label, name):
    with open(path, "rb") as f:
        data = f.read()
    try:
        return make_example(data, label, name, os.path.basename(path))
    except (ValueError, tf.errors.InvalidArgumentError) as error:
        raise ValueError(f"{path}: {error}") from error


def build_from_tfds(config):
    """Streams one TFDS split into the missing shards (example i goes to shard i % num_shards).

    Labels are shifted to 1-based. All missing shards are written at once, each under its
    temporary name until the split has been read, so memory stays at one example.

    Returns:
        `(num_examples, num_classes)`.
    """
    import tensorflow_datasets as tfds

    from sat_tf.data.tfds import prepared_builder

    builder = prepared_builder(config.from_tfds, data_dir=config.data_dir)
    names = builder.info.features["label"].names
    dataset = builder.as_dataset(split=config.split, decoders={"image": tfds.decode.SkipDecoding()})
    paths = [shard_path(config, i) for i in range(config.num_shards)]
    num_examples = 0
    with contextlib.ExitStack() as stack:  # every shard renamed only once the split is read
        writers = {
            i: stack.enter_context(tf.io.TFRecordWriter(str(stack.enter_context(atomic_path(p)))))
            for i, p in enumerate(paths)
            if not os.path.exists(p)
        }
        for i, example in enumerate(dataset.as_numpy_iterator()):
            num_examples += 1
            writer = writers.get(i % config.num_shards)
            if writer is not None:
                label = int(example["label"])
                filename = f"{config.from_tfds}_{config.split}_{i}"
                record = make_example(example["image"], label + 1, names[label], filename)
                writer.write(record.SerializeToString())
    progress = Progress(len(writers), num_examples)
    for index in writers:
        progress.update(len(range(index, num_examples, config.num_shards)))
    return num_examples, len(names)


class Progress:
    """Prints `shards done/total, images, images/s` to stderr after each shard."""

    def __init__(self, num_shards, num_images):
        self.total, self.images, self.done, self.seen = num_shards, num_images, 0, 0
        self.start, self.lock = time.time(), threading.Lock()

    def update(self, count):
        with self.lock:  # called from the worker threads
            self.done, self.seen = self.done + 1, self.seen + count
            rate = self.seen / max(time.time() - self.start, 1e-9)
            images = f"{self.seen}/{self.images} images, {rate:.0f}/s"
            print(
                f"\r[{self.done}/{self.total} shards] {images}",
                end="\n" if self.done == self.total else "",
                file=sys.stderr,
                flush=True,
            )


def build(config):
    """Writes the shards and `<split>.json`; returns the info dict."""
    if (config.input_dir is None) == (config.from_tfds is None):
        raise ValueError("Give exactly one of input_dir and from_tfds.")
    os.makedirs(config.output_dir, exist_ok=True)
    builder = build_from_folder if config.input_dir else build_from_tfds
    num_examples, num_classes = builder(config)
    info = {"num_examples": num_examples, "num_classes": num_classes, "label_offset": 1}
    info_path = os.path.join(config.output_dir, f"{config.split}.json")
    atomic_write(info_path, json.dumps(info, indent=1))
    return info


def main(argv):
    del argv
    config = Config(
        output_dir=flags.FLAGS.output_dir,
        split=flags.FLAGS.split,
        input_dir=flags.FLAGS.input_dir,
        labels_file=flags.FLAGS.labels_file,
        num_shards=flags.FLAGS.num_shards,
        num_workers=flags.FLAGS.num_workers,
        from_tfds=flags.FLAGS.from_tfds,
        data_dir=flags.FLAGS.data_dir,
    )
    print(json.dumps(build(config)))


if __name__ == "__main__":
    flags.mark_flag_as_required("output_dir")
    app.run(main)
