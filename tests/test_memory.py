"""Evaluation memory does not grow with the number of examples (`sat_tf.examples` reads a chunk at
a time).

The pixels an evaluation holds are NumPy arrays (the chunk being attacked, its batches), which
`tracemalloc` counts; TensorFlow's own buffers it does not. Evaluating a tf.data pipeline of SMALL
and of LARGE = 10 x SMALL examples at the same batch, the peak of the traced memory must stay
within 10% (plus 1 MiB for bookkeeping), where reading the split into float32 first would add
at least the extra examples' pixels, which the test checks to be several times the tolerance, so
that it cannot pass for want of data. The whole process's peak RSS at ImageNet size is measured
by benchmarks/bench_memory.py (benchmarks/README.md: 1,000 vs 20,000 examples at 224 px).
"""

import tracemalloc

import keras
import numpy as np
import tensorflow as tf

from sat_tf import evaluation

SMALL, LARGE, BATCH, SIZE = 160, 1600, 16, 32
MIB = 1 << 20


def tiny_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(h)))


def dataset(n):
    """n examples of 32x32 RGB images, made inside the pipeline (not held here)."""
    index = tf.data.Dataset.range(n)
    images = index.map(lambda i: tf.fill([SIZE, SIZE, 3], tf.cast(i % 255, tf.float32)))
    labels = index.map(lambda i: tf.cast(i % 5, tf.int32))
    return tf.data.Dataset.zip((images, labels)).batch(BATCH)


def peak(model, n):
    """Peak traced memory (bytes) of an evaluation of n examples, clean + PGD-1."""
    options = dict(attacks=["clean", "pgd-1"], epsilons=[8], batch_size=BATCH, checks=False)
    evaluation.evaluate(model, dataset(SMALL), **options, verbose=0)  # traced once, warm
    tracemalloc.start()
    try:
        results = evaluation.evaluate(model, dataset(n), **options, verbose=0)
        found = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert results.num_examples == n
    return found


def test_peak_memory_does_not_grow_with_the_number_of_examples():
    model = tiny_model()
    small, large = peak(model, SMALL), peak(model, LARGE)
    tolerance = 0.10 * small + MIB
    held = (LARGE - SMALL) * SIZE * SIZE * 3 * np.dtype(np.float32).itemsize * 3
    assert held > 3 * tolerance, f"the test cannot tell: {held} bytes against {tolerance}"
    assert large - small <= tolerance, (
        f"peak traced memory {small / MIB:.2f} MiB at {SMALL} examples, {large / MIB:.2f} MiB at "
        f"{LARGE}: +{(large - small) / MIB:.2f} MiB > {tolerance / MIB:.2f} MiB allowed"
    )
