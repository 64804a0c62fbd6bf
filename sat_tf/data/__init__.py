"""Input pipelines: `load(spec, ...)` for the command-line tools, and the modules behind it.

Specs:
  - `tfrecord:<pattern>`: ImageNet-format TFRecords (labels 1-based, `label_offset=1`). `<pattern>`
    is a glob, may contain `{split}`, or is a folder holding `<split>-*` files (as written by
    tools/build_tfrecords.py, whose `<split>.json` then gives the example and class counts).
  - `tfds:<name>`: a TensorFlow Datasets image set, e.g. `tfds:cifar10`, `tfds:imagenet2012`.
  - `folder:<dir>`: images in `<dir>/<split>/<class>/<image>`, labels = sorted class folders.
  - `demo`: scikit-learn's handwritten digits, built in, no download.

Every dataset yields `(float32 images [B, S, S, 3] in [0, 255], int32 labels [B])` batches
(plus float32 weights with `pad_final_batch`), with 0-based labels.

These are tf.data pipelines: they need TensorFlow, under any Keras backend (under JAX they feed
`fit` and the evaluation as NumPy batches). Without TensorFlow, importing this package (or any of
its modules) raises an ImportError in one line saying what to install; the core of sat_tf
(models, attacks, training and evaluation on arrays) does not import it.
"""

import dataclasses
import json
import os

from sat_tf.backend import tensorflow

tf = tensorflow("sat_tf.data (the tf.data input pipelines)")

from sat_tf.data import checks, demo, folder, pipeline, preprocessing, tfrecord  # noqa: E402
from sat_tf.data.preprocessing import preprocess_for_eval, preprocess_for_train  # noqa: E402
from sat_tf.data.tfrecord import build_dataset, parse_example  # noqa: E402

SCHEMES = ("tfrecord", "tfds", "folder", "demo")

__all__ = [
    "SCHEMES",
    "checks",
    "demo",
    "folder",
    "pipeline",
    "preprocessing",
    "tfrecord",
    "Data",
    "build_dataset",
    "load",
    "parse_example",
    "preprocess_for_eval",
    "preprocess_for_train",
    "tfrecord_pattern",
]


@dataclasses.dataclass(frozen=True)
class Data:
    """A loaded split: the dataset and what is known about it.

    Attributes:
        dataset: the batched `tf.data.Dataset`.
        num_examples: examples in the split over all workers, None when unknown.
        num_classes: number of classes, None when unknown.
        image_size: side of the images in pixels.
        global_batch_size: batch size over all replicas.
        training: whether this is the (repeating, augmented) training pipeline.
        skipped: int64 variable counting skipped bad records (with skip_corrupt), else None.
    """

    dataset: tf.data.Dataset
    num_examples: int | None
    num_classes: int | None
    image_size: int
    global_batch_size: int
    training: bool
    skipped: tf.Variable | None = None

    @property
    def steps_per_epoch(self):
        """Batches per pass over the split: full batches for training, all batches for eval."""
        if self.num_examples is None:
            return None
        if self.training:
            return self.num_examples // self.global_batch_size
        return -(-self.num_examples // self.global_batch_size)


def load(
    spec,
    *,
    split,
    global_batch_size,
    image_size=None,
    input_context=None,
    data_dir=None,
    num_classes=None,
    training=None,
    augmentation="auto",
    skip_corrupt=False,
    **options,
):
    """Loads one split of a dataset given by `spec` (see the module docstring).

    Args:
        spec: "tfrecord:<pattern>", "tfds:<name>", "folder:<dir>" or "demo".
        split: "train", "validation", "test", ...
        global_batch_size: batch size over all replicas.
        image_size: pixels; None: 16 for demo, 32 for tfds:cifar*, 224 otherwise.
        input_context: `tf.distribute.InputContext` from `distribute_datasets_from_function`.
        data_dir: TFDS data directory.
        num_classes: when given, labels outside [0, num_classes) are errors (tfrecord/folder).
        training: None: `split` starts with "train".
        augmentation: "inception", "cifar", None, or "auto": None for demo, "cifar" up to 64
            pixels, "inception" above.
        skip_corrupt: skip and count bad records instead of raising an error naming them.
        **options: passed on (e.g. pad_final_batch, cache, repeat, label_offset for tfrecord,
            manual_dir and download for tfds, shuffle_buffer_size, num_private_threads).

    Returns:
        A `Data`.
    """
    scheme, _, target = spec.partition(":")
    if scheme not in SCHEMES or (scheme == "demo") == bool(target):
        raise ValueError(
            f"Unknown dataset spec {spec!r}; valid forms: tfrecord:<pattern>, tfds:<name>, "
            "folder:<dir>, demo."
        )
    if image_size is None:
        image_size = {"demo": demo.IMAGE_SIZE}.get(
            scheme, 32 if target.startswith("cifar") else 224
        )
    if training is None:
        training = split.startswith("train")
    if augmentation == "auto":
        augmentation = None if scheme == "demo" else "cifar" if image_size <= 64 else "inception"
    common = dict(
        split=split,
        training=training,
        global_batch_size=global_batch_size,
        image_size=image_size,
        input_context=input_context,
    )
    skipped = tf.Variable(0, dtype=tf.int64, trainable=False) if skip_corrupt else None
    checked = dict(augmentation=augmentation, skip_corrupt=skip_corrupt, skipped=skipped, **options)
    if scheme == "demo":
        dataset = demo.build_dataset(**common, **options)
        count, classes = demo.info(split)
    elif scheme == "tfds":
        from sat_tf.data import tfds  # TFDS is slow to import; only pay for it when used.

        dataset = tfds.build_dataset(target, **common, data_dir=data_dir, **checked)
        sources = {k: options[k] for k in ("manual_dir", "download") if k in options}
        count, classes = tfds.info(target, split=split, data_dir=data_dir, **sources)
    elif scheme == "folder":
        dataset = folder.build_dataset(target, **common, num_classes=num_classes, **checked)
        count, classes = folder.info(target, split)
    else:
        dataset, count, classes = _load_tfrecord(target, common, num_classes, checked)
    return Data(
        dataset, count, num_classes or classes, image_size, global_batch_size, training, skipped
    )


def tfrecord_pattern(location, split):
    """The file pattern of `split` in a `tfrecord:` location: `{split}` replaced, and a folder
    read as its `<split>-*` files (as tools/build_tfrecords.py writes them)."""
    pattern = location.replace("{split}", split)
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, f"{split}-*")
    return pattern


def _load_tfrecord(target, common, num_classes, checked):
    """Resolves the pattern for the split and reads `<split>.json` beside the files if present."""
    split = common.pop("split")
    pattern = tfrecord_pattern(target, split)
    info_path = os.path.join(os.path.dirname(pattern), f"{split}.json")
    info = {}
    if tf.io.gfile.exists(info_path):
        with tf.io.gfile.GFile(info_path) as f:
            info = json.load(f)
    num_classes = num_classes or info.get("num_classes")
    dataset = build_dataset(pattern, **common, num_classes=num_classes, **checked)
    return dataset, info.get("num_examples"), num_classes
