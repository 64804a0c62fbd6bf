"""ImageNet-format TFRecords: the format, writing and parsing, the train/eval `tf.data` pipeline.

The record format is the one written by the TPU/Model Garden ImageNet tools (and by
tools/build_tfrecords.py, through `to_example`); `FEATURES` is its one definition, and each reader
parses the subset it uses (`features(...)`). Labels in those files run 1..1000 with 0 reserved for
"background", hence `label_offset=1` by default: the pipeline yields `label - label_offset`, so
0-based labels 0..999.

Use with `strategy.distribute_datasets_from_function`, passing its `input_context` on:
`lambda ctx: build_dataset(..., input_context=ctx)`.
"""

import os

import tensorflow as tf

from sat_tf.data import checks, pipeline

_BOX_KEYS = tuple(f"image/object/bbox/{k}" for k in ("ymin", "xmin", "ymax", "xmax"))
# The ImageNet TFRecord format: every key, its type and the value a record without it parses to
# (converters differ in what they write; `checks.validate` reports a missing image or label).
# The boxes are optional, one entry per box.
FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "image/format": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "image/height": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "image/width": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "image/class/synset": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=""),
    **{key: tf.io.VarLenFeature(tf.float32) for key in _BOX_KEYS},
}
_READ_BUFFER = 8 << 20  # 8 MiB per file, as the legacy ImageNet input function.


def features(*keys):
    """The parsing spec of `keys` only, taken from `FEATURES`: a reader parses what it uses."""
    return {key: FEATURES[key] for key in keys}


_PIPELINE_FEATURES = features("image/encoded", "image/class/label", *_BOX_KEYS)


def to_example(values):
    """A `tf.train.Example` of `values` (`{key: value or list}`), typed by each key's `FEATURES`.

    Raises:
        KeyError: for a key that `FEATURES` does not define.
    """

    def feature(key, value):
        value = list(value) if isinstance(value, list | tuple) else [value]
        if FEATURES[key].dtype == tf.int64:
            return tf.train.Feature(int64_list=tf.train.Int64List(value=value))
        if FEATURES[key].dtype == tf.float32:
            return tf.train.Feature(float_list=tf.train.FloatList(value=value))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=value))

    feature_map = {key: feature(key, value) for key, value in values.items()}
    return tf.train.Example(features=tf.train.Features(feature=feature_map))


def list_files(file_pattern):
    """Sorted files matching a glob pattern (or a comma-separated list of patterns).

    Raises:
        FileNotFoundError: naming the pattern, when nothing matches.
    """
    patterns = [p.strip() for p in file_pattern.split(",")]
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    if not files:
        raise FileNotFoundError(
            f"No TFRecord files match the pattern {file_pattern!r}.{_other_splits(patterns)}"
        )
    return files


def _other_splits(patterns):
    """A hint naming the `<split>-*` shards beside a pattern that matched nothing, if any."""
    folders = {os.path.dirname(p) or "." for p in patterns}
    found = sorted(
        {
            name.split("-")[0]
            for folder in folders
            if tf.io.gfile.isdir(folder)
            for name in tf.io.gfile.listdir(folder)
            if "-" in name and not name.startswith(".")
        }
    )
    if not found:
        return ""
    shards = ", ".join(f"{split}-*" for split in found[:8])
    return (
        f" The folder holds {shards}: use one of those split names (e.g. --eval_split="
        f"{found[0]}) or a pattern that matches."
    )


def parse_example(serialized, label_offset=1):
    """Parses one serialized `tf.train.Example` of the ImageNet format.

    Args:
        serialized: scalar string tensor.
        label_offset: subtracted from `image/class/label` (1 for the standard ImageNet files).

    Returns:
        dict with `encoded` (image bytes, "" when absent), `label` (int64, -1 - label_offset when
        absent) and `bbox` (float32 `[N, 4]` boxes `(ymin, xmin, ymax, xmax)`, N >= 0).
    """
    parsed = tf.io.parse_single_example(serialized, _PIPELINE_FEATURES)
    coords = [parsed[key].values for key in _BOX_KEYS]
    return {
        "encoded": parsed["image/encoded"],
        "label": parsed["image/class/label"] - label_offset,
        "bbox": tf.stack(coords, axis=1),
    }


def _file_source(filename, size, label_offset):
    """Parsed records of one file plus the end marker (see pipeline's docstring).

    A record occupies 16 bytes of framing plus its data, so the bytes read add up to the file
    size exactly when the whole file was read: that is how a truncated file is noticed after the
    reader's DataLossError has been swallowed by `ignore_errors`.
    """
    raw = tf.data.TFRecordDataset(filename, buffer_size=_READ_BUFFER).ignore_errors()
    raw = raw.map(lambda r: (r, False))
    raw = raw.concatenate(tf.data.Dataset.from_tensors((tf.constant(b""), True)))

    def count(state, item):
        record, end = item
        index, consumed = state[0], state[1]
        length = tf.cast(tf.strings.length(record), tf.int64) + 16
        new_state = tf.where(end, state, tf.stack([index + 1, consumed + length]))
        return new_state, (index, record, end, tf.equal(consumed, tf.cast(size, tf.int64)))

    raw = raw.scan(tf.constant([0, 0], tf.int64), count)

    def to_dict(index, record, end, intact):
        def parse():
            return {
                **parse_example(record, label_offset),
                "index": index,
                "end": tf.constant(False),
                "intact": tf.constant(True),
            }

        return tf.cond(end, lambda: checks.end_marker(index, intact), parse)

    # A record that is not a tf.train.Example fails here; `checked_decode` reports the gap.
    return raw.map(to_dict).ignore_errors()


def build_dataset(
    file_pattern,
    *,
    training,
    global_batch_size,
    image_size,
    label_offset=1,
    input_context=None,
    **kwargs,
):
    """Builds the train or eval pipeline over ImageNet-format TFRecord files.

    Args:
        file_pattern: glob (or comma-separated globs) of TFRecord files.
        training: training pipeline (sharded + shuffled files, augmentation, repeat, full
            batches) or evaluation (deterministic, every example exactly once).
        global_batch_size: batch size over all replicas.
        image_size: output side in pixels.
        label_offset: subtracted from the stored labels (1 for the standard ImageNet files).
        input_context: `tf.distribute.InputContext`; shards files between input pipelines (or
            records, when there are fewer files than pipelines) and batches per replica.
        **kwargs: options of `pipeline.build_from_sources`, all keyword-only:
            augmentation: "inception", "cifar" or None (see preprocessing.preprocess_for_train).
            num_classes: when given, labels outside [0, num_classes) are bad records.
            pad_final_batch: evaluation only: pad the last batch to full size; elements become
                `(images, labels, weights)` with weight 0 on padding.
            skip_corrupt: skip bad records (logged to stderr) instead of raising an error that names
                the file and record.
            skipped: optional int64 `tf.Variable` counting the skipped records.
            cache: keep decoded images in memory (evaluation, or training with "cifar"/None,
                where the random augmentation runs after the cache).
            repeat: repeat forever; defaults to `training`.
            shuffle_buffer_size: training shuffle buffer in images (stored as uint8).
            cycle_length: files read in parallel.
            max_pixels: refuse images whose header declares more pixels (decompression bombs).
            num_private_threads: size of a private tf.data thread pool; None uses the shared one.

    Returns:
        `tf.data.Dataset` of `(float32 [B, image_size, image_size, 3] in [0, 255], int32 [B])`.
    """
    files = list_files(file_pattern)
    num_pipelines, pipeline_id = pipeline.shard_info(input_context)
    shard_records = len(files) < num_pipelines
    if not shard_records:
        files = files[pipeline_id::num_pipelines]
    sizes = [tf.io.gfile.stat(f).length for f in files]
    if not any(sizes):
        raise ValueError(f"All TFRecord files of this input pipeline are empty: {files}.")

    def make_source(filename, size):
        source = _file_source(filename, size, label_offset)
        return source, lambda index: _describe(filename, index)

    return pipeline.build_from_sources(
        (files, sizes),
        make_source,
        shard=(pipeline_id, num_pipelines) if shard_records else (0, 1),
        training=training,
        global_batch_size=global_batch_size,
        image_size=image_size,
        input_context=input_context,
        **kwargs,
    )


def _describe(filename, index):
    record = tf.strings.join([filename, " (record ", tf.strings.as_string(index), ")"])
    return tf.where(index < 0, filename, record)
