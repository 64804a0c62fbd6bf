"""Checked decoding: every bad record becomes an error naming it, or a counted skip.

A source (one TFRecord file, one image folder, one TFDS split) is a dataset of dicts with
`index` (int64 position in the source), `encoded` (JPEG/PNG bytes), `label` (int64, after the
label offset), `bbox` (float32 `[N, 4]`), followed by ONE end marker with `end=True`,
`index` = number of records and `intact` = whether the source was read to its end.

`checked_decode` decodes such a stream and turns every bad record into either an error that names
the source and the record, or (skip_corrupt) a skipped record that is logged and counted. Checks
that need no decoding (empty bytes, unknown format, oversized declared shape, label out of range)
report their reason. Errors raised by the decoders themselves cannot carry a file name in
TensorFlow, so the decode stage runs under `ignore_errors` and a sequential scan afterwards notices
the gap in record indices and reports it; the end marker catches gaps at the end of a source and
truncated files.
"""

import sys

import tensorflow as tf

from sat_tf.data import preprocessing

AUTOTUNE = tf.data.AUTOTUNE


def end_marker(num_records, intact=True):
    """The element that closes a source (see the module docstring)."""
    return {
        "index": tf.cast(num_records, tf.int64),
        "encoded": tf.constant(b""),
        "label": tf.constant(0, tf.int64),
        "bbox": tf.zeros([0, 4], tf.float32),
        "end": tf.constant(True),
        "intact": tf.cast(intact, tf.bool),
    }


def validate(encoded, label, *, num_classes=None, max_pixels=preprocessing.MAX_PIXELS):
    """Why a record cannot be used, as a string tensor; "" when it looks fine (no decoding)."""

    def size_message():
        height, width = preprocessing.image_shape(encoded)
        pixels = tf.cast(height, tf.int64) * tf.cast(width, tf.int64)
        bad = tf.logical_or(tf.logical_or(height < 1, width < 1), pixels > max_pixels)
        text = tf.strings.format(
            "declares an image of {}x{} pixels (allowed: 1 to max_pixels={})",
            (height, width, max_pixels),
        )
        return tf.where(bad, text, "")

    known = tf.logical_or(preprocessing.is_jpeg(encoded), preprocessing.is_png(encoded))
    high = tf.constant(-1 if num_classes is None else num_classes, tf.int64)
    bad_label = tf.logical_or(label < 0, tf.logical_and(high >= 0, label >= high))
    label_text = tf.strings.format(
        "has label {} (after label_offset), outside [0, num_classes={})", (label, high)
    )
    message = tf.case(
        [
            (tf.equal(tf.strings.length(encoded), 0), lambda: tf.constant("has no image bytes")),
            (tf.logical_not(known), lambda: tf.constant("is not a JPEG or PNG image")),
        ],
        default=size_message,
    )
    return tf.where(tf.logical_and(tf.equal(message, ""), bad_label), label_text, message)


def checked_decode(
    source,
    preprocess,
    *,
    describe,
    image_size,
    dtype,
    skip_corrupt,
    skipped,
    start=0,
    stride=1,
    **checks,
):
    """Decodes one source with `preprocess(encoded, bbox)`, reporting or skipping bad records.

    Args:
        source: dataset of record dicts plus an end marker (module docstring).
        preprocess: function of `(encoded, bbox)` returning an `[image_size, image_size, 3]` image.
        describe: function of an int64 record index returning a string tensor naming the record
            (index -1: the source itself).
        image_size: output side, for the placeholder image of skipped records.
        dtype: output dtype of `preprocess`.
        skip_corrupt: skip (log and count) bad records instead of raising InvalidArgumentError.
        skipped: optional int64 `tf.Variable` that counts skipped records.
        start: index of the first record of this stream (record-level sharding: the shard id).
        stride: distance between consecutive indices of this stream (record-level sharding).
        **checks: `num_classes`, `max_pixels` for `validate`.

    Returns:
        Dataset of `(image, label)`.
    """
    placeholder = tf.zeros([image_size, image_size, 3], dtype)

    def decode(record):
        message = tf.cond(
            record["end"],
            lambda: tf.constant(""),
            lambda: validate(record["encoded"], record["label"], **checks),
        )
        ok = tf.logical_and(tf.logical_not(record["end"]), tf.equal(message, ""))
        image = tf.cond(
            ok, lambda: preprocess(record["encoded"], record["bbox"]), lambda: placeholder
        )
        keys = ("index", "label", "end", "intact")
        return {**{k: record[k] for k in keys}, "message": message, "image": image, "ok": ok}

    stream = source.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True).ignore_errors()

    def check(expected, item):
        missing = tf.maximum(item["index"] - expected + stride - 1, 0) // stride
        bad_record = tf.logical_and(tf.logical_not(item["end"]), tf.logical_not(item["ok"]))
        truncated = tf.logical_and(item["end"], tf.logical_not(item["intact"]))
        reports = [
            (
                missing > 0,
                tf.strings.join([describe(expected), " could not be decoded (corrupt data)"]),
            ),
            (bad_record, tf.strings.join([describe(item["index"]), " ", item["message"]])),
            (truncated, tf.strings.join([describe(-1), " is truncated or corrupt"])),
        ]
        ops = [_report(flag, text, skip_corrupt) for flag, text in reports]
        if skip_corrupt and skipped is not None:
            count = missing + tf.cast(bad_record, tf.int64) + tf.cast(truncated, tf.int64)
            ops.append(skipped.assign_add(count))
        with tf.control_dependencies(ops):
            keep = tf.identity(item["ok"])
        return item["index"] + stride, (item["image"], item["label"], keep)

    stream = stream.scan(tf.constant(start, tf.int64), check)
    stream = stream.filter(lambda image, label, keep: keep)
    return stream.map(lambda image, label, keep: (image, tf.cast(label, tf.int32)))


def _report(flag, text, skip_corrupt):
    """Raises (Assert) or logs `text` when `flag` holds."""
    if not skip_corrupt:
        return tf.debugging.Assert(tf.logical_not(flag), [text])

    def log():
        with tf.control_dependencies(
            [tf.print("sat_tf.data: skipping", text, output_stream=sys.stderr)]
        ):
            return tf.constant(True)

    return tf.cond(flag, log, lambda: tf.constant(True))
