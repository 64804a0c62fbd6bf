"""Tests for sat_tf.draws and the keyed draws of the attacks: an example draws the same numbers,
and is attacked the same way, in any batch."""

import keras
import numpy as np
import pytest
from conftest import BACKEND, only_tensorflow

from sat_tf import apgd, attacks, backend, draws, square

pytestmark = pytest.mark.backends

MASK = 0xFFFFFFFF


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def lowbias32(x):
    """NumPy reference of the mixing step, from its published constants (hash prospector)."""
    x = np.asarray(x, np.uint64) & MASK
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK
    x ^= x >> 16
    return x


def reference_uniform(seed, ids, stream, shape, counter):
    """The documented chain in NumPy: key = h(stream, seed words, id), number = h(key, counter,
    position), top 24 bits over 2**24."""
    h = lowbias32(0x9E3779B9 ^ stream)
    h = lowbias32(h ^ (seed & MASK))
    h = lowbias32(h ^ ((seed >> 32) & MASK))
    key = lowbias32(h ^ np.asarray(ids, np.uint64))
    per_draw = lowbias32(key ^ lowbias32((counter & MASK) ^ 0x6A09E667))
    position = lowbias32(np.arange(int(np.prod(shape)), dtype=np.uint64) ^ 0xBB67AE85)
    bits = lowbias32(per_draw[:, None] ^ position[None, :])
    return ((bits >> 8).astype(np.float64) / 2.0**24).reshape(len(ids), *shape)


def draw(seed, ids, shape, counter, stream="pgd"):
    """NumPy int64 ids: reduced modulo 2**32 on the host, so ids up to 2**32 work on JAX too."""
    return numpy(draws.uniform(draws.keys(seed, np.asarray(ids, np.int64), stream), shape, counter))


@pytest.mark.parametrize("seed", [0, 7, -3, 2**40 + 5])
def test_uniform_equals_numpy_reference_bit_for_bit(seed):
    ids = [0, 1, 2, 11, 123456, 2**31 + 9]
    for stream, shape, counter in (
        ("pgd", (2, 3), 0),
        ("apgd", (), 5),
        ("square", (4,), 2**32 - 1),
    ):
        got = draw(seed, ids, shape, counter, stream)
        want = reference_uniform(seed, ids, draws.STREAMS[stream], shape, counter)
        assert got.dtype == np.float32 and got.shape == (len(ids), *shape)
        np.testing.assert_array_equal(got.astype(np.float64), want)


def test_values_are_uniform_in_unit_interval():
    u = draw(3, np.arange(1000), (100,), 0).ravel()  # 1e5 draws
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005  # std of the mean: 0.0009
    assert abs(u.var() - 1 / 12) < 0.002
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    expected = len(u) / 20
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 45.3  # the 0.999 quantile of chi-square with 19 degrees of freedom


def correlation(a, b):
    return abs(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_streams_are_uncorrelated():
    ids = np.arange(2000)
    base = draw(1, ids, (50,), 0)  # 1e5 numbers: |r| of independent ones ~ 0.003
    assert correlation(base, draw(1, ids, (50,), 1)) < 0.015  # next counter
    assert correlation(base, draw(2, ids, (50,), 0)) < 0.015  # next seed
    assert correlation(base, draw(1 + 2**32, ids, (50,), 0)) < 0.015  # seed's high word
    assert correlation(base, draw(1, ids + 1, (50,), 0)) < 0.015  # next example
    assert correlation(base, draw(1, ids, (50,), 0, "apgd")) < 0.015  # another attack
    assert correlation(base[:, :-1], base[:, 1:]) < 0.015  # neighbouring positions
    # A (seed, stream) gives distinct keys to distinct examples.
    keys = numpy(draws.keys(1, keras.ops.arange(100000, dtype="int32"), "pgd"))
    assert len(np.unique(keys)) == len(keys)


def test_an_example_draws_the_same_in_any_batch():
    whole = draw(5, np.arange(12), (3, 2), 4)
    alone = np.concatenate([draw(5, [i], (3, 2), 4) for i in range(12)])
    order = np.random.default_rng(0).permutation(12)
    permuted = draw(5, order, (3, 2), 4)
    np.testing.assert_array_equal(alone, whole)
    np.testing.assert_array_equal(permuted, whole[order])
    # An int seed and a scalar tensor seed are the same seed; int32 tensors (all JAX has) are
    # sign-extended, as a negative Python int is.
    tensor = keras.ops.convert_to_tensor
    np.testing.assert_array_equal(draw(tensor(5, "int32"), np.arange(12), (3, 2), 4), whole)
    np.testing.assert_array_equal(draw(-1, [3], (), 0), draw(tensor(-1, "int32"), [3], (), 0))
    # Tensor ids (int32 on every backend) and a tensor counter are the same draws.
    keys = draws.keys(5, tensor(np.arange(12), "int32"), "pgd")
    np.testing.assert_array_equal(numpy(draws.uniform(keys, (3, 2), tensor(4, "int32"))), whole)


def test_works_in_a_compiled_loop():
    """The counter is a loop variable of a compiled function, the seed and ids its arguments."""
    ids = np.arange(6, dtype=np.int32)

    def build(model_ref):
        def loop(seed, ids):
            keys = draws.keys(seed, ids, "square")

            def body(c, out):
                return keras.ops.scatter_update(out, [[c]], draws.uniform(keys, (4,), c)[None])

            return keras.ops.fori_loop(0, 3, body, keras.ops.zeros((3, 6, 4)))

        return loop

    eager = np.stack([draw(9, ids, (4,), c, "square") for c in range(3)])
    seed = np.int32(9)
    model = keras.Sequential([keras.layers.Identity()])  # `compiled` caches per model
    loop = backend.compiled(model, ("test-draws",), build, seed, ids)
    np.testing.assert_array_equal(numpy(loop(seed, ids)), eager)


@only_tensorflow
def test_works_in_tf_function_and_under_xla():
    import tensorflow as tf

    ids = tf.range(6, dtype=tf.int64)

    def loop(seed, ids):  # the counter is a while-loop variable
        keys = draws.keys(seed, ids, "square")

        def body(c, out):
            return c + 1, out.write(c, draws.uniform(keys, (4,), c))

        out = tf.TensorArray(tf.float32, size=3)
        return tf.while_loop(lambda c, _: c < 3, body, (tf.constant(0), out))[1].stack()

    eager = np.stack([draw(9, ids.numpy(), (4,), c, "square") for c in range(3)])
    seed = tf.constant(9, tf.int64)
    np.testing.assert_array_equal(tf.function(loop)(seed, ids), eager)
    np.testing.assert_array_equal(tf.function(loop, jit_compile=True)(seed, ids), eager)


def test_bad_seed_and_stream_raise():
    ids = np.arange(2)
    with pytest.raises(ValueError, match="64 bits"):
        draws.keys(2**64, ids, "pgd")
    with pytest.raises(ValueError, match="scalar"):
        draws.keys(keras.ops.convert_to_tensor([1, 0]), ids, "pgd")
    with pytest.raises(ValueError, match="stream"):
        draws.keys(0, ids, "fgsm")


# The attacks: one call on 12 examples, two calls on [0:5] and [5:12], and a permuted call give
# each example exactly the same adversarial image.
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def model_and_data():
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Rescaling(1 / 127.5, offset=-1),
            keras.layers.Conv2D(6, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("silu"),
            keras.layers.Flatten(),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )
    images = np.random.default_rng(1).uniform(0, 255, (12, 8, 8, 3)).astype(np.float32)
    labels = np.argmax(numpy(model(images, training=False)), axis=1).astype(np.int32)  # all correct
    return model, images, labels


ATTACKS = {
    "pgd": lambda m, x, y, ids, seed: attacks.pgd(
        m, x, y, epsilon=8.0, step_size=2.0, num_steps=3, prob_start_from_clean=0.3, seed=seed,
        ids=ids,
    ),
    "apgd-ce": lambda m, x, y, ids, seed: apgd.apgd(
        m, x, y, epsilon=8.0, num_steps=8, num_restarts=2, seed=seed, ids=ids
    ),
    "apgd-t": lambda m, x, y, ids, seed: apgd.apgd(
        m, x, y, epsilon=8.0, num_steps=5, loss="dlr", targeted=True, target_classes=2, seed=seed,
        ids=ids,
    ),
    "square": lambda m, x, y, ids, seed: square.square(
        m, x, y, epsilon=8.0, num_queries=30, chunk_size=10, seed=seed, ids=ids,
        rescale_schedule=True,
    ),
}  # fmt: skip


@pytest.mark.skipif(
    BACKEND == "jax", reason="NumPy and keyed draws; JAX's padding: tests/test_apgd.py (compiles)"
)
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_the_same_in_any_batch(model_and_data, name):
    model, images, labels = model_and_data
    attack = ATTACKS[name]

    def run(index, seed=0):
        return numpy(attack(model, images[index], labels[index], index, seed))

    everyone = np.arange(12)
    whole = run(everyone)
    assert not np.array_equal(whole, images)  # the attack moved the images
    split = np.concatenate([run(everyone[:5]), run(everyone[5:])])
    np.testing.assert_array_equal(split, whole)
    order = np.random.default_rng(2).permutation(12)
    np.testing.assert_array_equal(run(order), whole[order])
    # Another seed, other draws.
    assert not np.array_equal(run(everyone, seed=1), whole)


class FlatColumns(keras.Model):
    """Class 0 wins by a margin that shrinks as the columns of the image stop being constant:
    Square's vertical stripes start with every column constant, so each of its candidates (a
    window that differs from the stripes somewhere) lowers the margin and is kept. Stateless, so
    it reads the same inside any compiled function on any backend."""

    def call(self, x, training=False):
        unevenness = keras.ops.sum(keras.ops.var(x, axis=1), axis=(1, 2))
        return keras.ops.stack([1e6 - 100.0 * unevenness, keras.ops.zeros_like(unevenness)], 1)


def test_square_draws_a_window_per_example():
    """One query on twelve copies of one image: each moves its own 3x3 window (p 0.1 of 8x8)."""
    images, labels = np.full((12, 8, 8, 3), 128.0, np.float32), np.zeros(12, np.int32)
    model = FlatColumns()
    start = square.square(model, images, labels, epsilon=8.0, num_queries=0, p_init=0.1)
    adv = square.square(model, images, labels, epsilon=8.0, num_queries=1, p_init=0.1)
    changed = np.any(numpy(adv) != numpy(start), axis=3)  # [12, 8, 8]
    first_rows, first_cols = [], []
    for moved in changed:
        rows, cols = np.flatnonzero(moved.any(axis=1)), np.flatnonzero(moved.any(axis=0))
        assert len(rows) == 3 and rows[-1] - rows[0] == 2  # the window's rows, in one piece
        assert len(cols) <= 3 and cols[-1] - cols[0] <= 2  # columns where a sign flipped
        first_rows.append(rows[0])
        first_cols.append(cols[0])
    # Five places per axis: twelve shared corners would all be equal.
    assert len(set(first_rows)) > 1 and len(set(first_cols)) > 1
