"""TensorFlow Datasets inputs (`tfds:cifar10`, `tfds:imagenet2012`, ...) through the same pipeline.

Images are read still encoded (`tfds.decode.SkipDecoding`), so ImageNet gets the fused
decode-and-crop and the same checks as the TFRecord path. TFDS labels are 0-based (no offset).
`imagenet2012` cannot be downloaded: TFDS builds it from ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar placed in a manual directory.
"""

import tensorflow as tf
import tensorflow_datasets as tfds

from sat_tf.data import checks, pipeline


def prepared_builder(name, *, data_dir=None, manual_dir=None, download=True):
    """A TFDS builder whose files exist, building them when allowed.

    Raises:
        RuntimeError: when the dataset is not prepared and cannot be built here (no internet,
            missing manual files), with the way to fix it.
    """
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    reason = "download=False"
    if download:
        try:
            config = tfds.download.DownloadConfig(manual_dir=manual_dir)
            builder.download_and_prepare(download_config=config)
            return builder
        except Exception as error:  # noqa: BLE001 - any failure gets the same advice.
            reason = f"{type(error).__name__}: {error}"
    manual = (
        " imagenet2012 is never downloaded: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"
        " in a folder and pass manual_dir=<folder> (--manual_dir)."
        if name.startswith("imagenet")
        else ""
    )
    raise RuntimeError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r} and could not be built "
        f"here ({reason}). This machine may have no internet access.{manual} To fix it, run "
        f"`tfds build {name} --data_dir=DIR` on a machine that can download it, copy DIR here and "
        "pass data_dir=DIR (--data_dir); or convert an image folder with tools/build_tfrecords.py "
        "and use tfrecord:<pattern>, or use folder:<dir>."
    )


def build_dataset(
    name,
    *,
    split,
    training,
    global_batch_size,
    image_size,
    input_context=None,
    data_dir=None,
    manual_dir=None,
    download=True,
    **kwargs,
):
    """Train or eval pipeline over a TFDS image classification dataset.

    Args:
        name: TFDS name, e.g. "cifar10" or "imagenet2012".
        split: TFDS split, e.g. "train", "test", "validation", "train[:10%]".
        input_context: `tf.distribute.InputContext`; TFDS shards its files between pipelines.
        data_dir, manual_dir, download: where TFDS keeps or builds its files.
        Other arguments: as `tfrecord.build_dataset`.

    Returns:
        The batched `tf.data.Dataset` (sizes: `info`).
    """
    builder = prepared_builder(name, data_dir=data_dir, manual_dir=manual_dir, download=download)
    read_config = tfds.ReadConfig(input_context=input_context, try_autocache=False)
    examples = builder.as_dataset(
        split=split,
        shuffle_files=training,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=read_config,
    )

    def make_source(_):
        records = examples.map(_record)
        records = records.concatenate(tf.data.Dataset.from_tensors(checks.end_marker(0)))
        # Numbered after the marker is appended, so the marker's index is the record count.
        records = records.enumerate().map(lambda i, r: {**r, "index": i})
        text = f"tfds:{name} split {split} example "
        return records, lambda i: tf.strings.join([text, tf.strings.as_string(i)])

    dataset = pipeline.build_from_sources(
        ([0],),
        make_source,
        shard=(0, 1),
        training=training,
        global_batch_size=global_batch_size,
        image_size=image_size,
        input_context=input_context,
        **kwargs,
    )
    return dataset


def info(name, *, split, data_dir=None, manual_dir=None, download=True):
    """`(num_examples, num_classes)` of a TFDS split."""
    builder = prepared_builder(name, data_dir=data_dir, manual_dir=manual_dir, download=download)
    return builder.info.splits[split].num_examples, builder.info.features["label"].num_classes


def _record(example):
    return {
        "index": tf.constant(0, tf.int64),
        "encoded": example["image"],
        "label": tf.cast(example["label"], tf.int64),
        "bbox": tf.zeros([0, 4], tf.float32),
        "end": tf.constant(False),
        "intact": tf.constant(True),
    }
