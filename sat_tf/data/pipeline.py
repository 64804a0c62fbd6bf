"""The shared tf.data skeleton: sharding, interleaved sources, checked decoding, batching.

`build_from_sources` turns a list of sources (TFRecord files, chunks of an image folder) into the
train or eval pipeline; `sat_tf.data.checks` decodes each source and names bad records.
"""

import tensorflow as tf

from sat_tf.data import checks, preprocessing

AUTOTUNE = tf.data.AUTOTUNE


def shard_info(input_context):
    """`(num_input_pipelines, input_pipeline_id)` of a `tf.distribute.InputContext` or None."""
    if input_context is None:
        return 1, 0
    return input_context.num_input_pipelines, input_context.input_pipeline_id


def per_replica_batch_size(global_batch_size, input_context):
    """The batch size one pipeline produces: per replica when a context is given."""
    if input_context is None:
        return global_batch_size
    return input_context.get_per_replica_batch_size(global_batch_size)


def build_from_sources(
    sources,
    make_source,
    *,
    shard,
    training,
    global_batch_size,
    image_size,
    input_context=None,
    augmentation="inception",
    num_classes=None,
    pad_final_batch=False,
    skip_corrupt=False,
    skipped=None,
    cache=False,
    repeat=None,
    shuffle_buffer_size=2048,
    cycle_length=16,
    max_pixels=preprocessing.MAX_PIXELS,
    num_private_threads=None,
):
    """The train/eval pipeline over sources already sharded by source (see tfrecord.build_dataset).

    Args:
        sources: tuple of equal-length lists, one entry per source (e.g. `(files, sizes)`).
        make_source: function of one entry's tensors returning `(records, describe)` for
            `checks.checked_decode`.
        shard: `(first, stride)` record-level sharding inside every source, `(0, 1)` for none.
        Other arguments: as documented in `tfrecord.build_dataset`.

    Returns:
        The batched `tf.data.Dataset`.
    """
    preprocessing.check_augmentation(augmentation)
    if cache and training and augmentation == "inception":
        raise ValueError("cache=True would freeze the random Inception crops; use cache=False.")
    num_sources = len(sources[0])
    repeat = training if repeat is None else repeat
    dataset = tf.data.Dataset.from_tensor_slices(tuple(tf.constant(c) for c in sources))
    if training and not cache:
        dataset = dataset.shuffle(num_sources, reshuffle_each_iteration=True)
        dataset = dataset.repeat() if repeat else dataset
    decode, augment = _stages(training, image_size, augmentation, cache)
    start, stride = shard

    def read(*entry):
        records, describe = make_source(*entry)
        if stride > 1:
            records = records.filter(lambda r: r["end"] | (r["index"] % stride == start))
        return checks.checked_decode(
            records,
            decode,
            describe=describe,
            image_size=image_size,
            dtype=tf.uint8 if training else tf.float32,
            skip_corrupt=skip_corrupt,
            skipped=skipped,
            start=start,
            stride=stride,
            num_classes=num_classes,
            max_pixels=max_pixels,
        )

    dataset = dataset.interleave(
        read,
        cycle_length=min(cycle_length, num_sources),
        num_parallel_calls=AUTOTUNE,
        deterministic=not training,
    )
    if cache:
        dataset = dataset.cache()
        dataset = dataset.repeat() if repeat and training else dataset
    if augment is not None:
        dataset = dataset.map(lambda x, y: (augment(x), y), num_parallel_calls=AUTOTUNE)
    dataset = batch(
        dataset,
        training=training,
        batch_size=per_replica_batch_size(global_batch_size, input_context),
        pad_final_batch=pad_final_batch,
        shuffle_buffer_size=shuffle_buffer_size,
    )
    return dataset.with_options(_options(num_private_threads))


def batch(dataset, *, training, batch_size, pad_final_batch=False, shuffle_buffer_size=0):
    """Shuffles (training), batches and prefetches `(image, label)` elements.

    Training drops the last partial batch (it repeats anyway) and casts images to float32 after
    batching. Evaluation keeps every example: the last partial batch stays smaller, or with
    `pad_final_batch` it is padded to `batch_size` with zero images whose weight (a third element,
    float32) is 0, so a fixed batch shape loses and double-counts nothing.
    """
    if training:
        if shuffle_buffer_size:
            dataset = dataset.shuffle(shuffle_buffer_size)
        dataset = dataset.batch(batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE)
        dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=AUTOTUNE)
        return dataset.prefetch(AUTOTUNE)
    dataset = dataset.batch(batch_size, num_parallel_calls=AUTOTUNE, deterministic=True)
    if pad_final_batch:
        dataset = dataset.map(lambda x, y: _pad_batch(x, y, batch_size))
    return dataset.prefetch(AUTOTUNE)


def _pad_batch(images, labels, batch_size):
    count = tf.shape(labels)[0]
    extra = batch_size - count
    images = tf.pad(tf.cast(images, tf.float32), [[0, extra], [0, 0], [0, 0], [0, 0]])
    labels = tf.pad(labels, [[0, extra]])
    weights = tf.pad(tf.ones([count], tf.float32), [[0, extra]])
    images.set_shape([batch_size, *images.shape[1:]])
    labels.set_shape([batch_size])
    weights.set_shape([batch_size])
    return images, labels, weights


def _stages(training, image_size, augmentation, cache):
    """`(decode(encoded, bbox), augment or None)`; training images are kept as uint8.

    With a cache, training decodes and resizes once and the random "cifar" augmentation runs
    after the cache, every epoch.
    """

    def evaluation(encoded, bbox):
        return preprocessing.preprocess_for_eval(encoded, image_size, augmentation=augmentation)

    def train(encoded, bbox):
        image = preprocessing.preprocess_for_train(
            encoded, image_size, bbox=bbox, augmentation=augmentation
        )
        return _to_uint8(image)

    def plain(encoded, bbox):
        return _to_uint8(preprocessing.resize(preprocessing.decode_image(encoded), image_size))

    if not training:
        return evaluation, None
    if augmentation == "inception" or not cache:
        return train, None
    return plain, preprocessing.cifar_augment if augmentation == "cifar" else None


def _to_uint8(image):
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _options(num_private_threads):
    options = tf.data.Options()
    if num_private_threads:
        options.threading.private_threadpool_size = num_private_threads
    return options
