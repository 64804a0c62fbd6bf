"""Random draws keyed by (seed, example): the same numbers for an example in any batch.

An evaluation attacks its examples in batches, chunks and shards (other processes). For every
split to give each example exactly the records of one unsplit run, an example's random draws
(random starts, Square's windows and signs) may depend only on the seed, the example's index in
the whole evaluation and which draw it is, never on the batch it shares. Stateful and
stateless TensorFlow generators draw per batch (the k-th number goes to whichever example is
k-th), so here every number is a hash of (key, counter, position):

    key     = h(stream, seed, example index)       `keys`, one uint32 per example
    number  = h(key, counter, element position)    `uniform`, 24 bits -> float32 in [0, 1)

A counter-based generator (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC
2011): no state to carry, any draw computed on its own. The hash is written in `keras.ops` on
uint32 (multiplies wrap modulo 2**32, shifts are logical; under PyTorch, whose Keras backend holds
uint32 in int64, each product is cut back to its low word), so the same seed gives the same
numbers eagerly, in `tf.function`, under XLA and on any Keras backend. Its mixing step is
"lowbias32" (Chris Wellons' hash prospector: x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15;
x *= 0x846CA68B; x ^= x >> 16), a bijection of 32-bit words with low avalanche bias. The
numbers are for attacks, not for secrets: the hash is not cryptographic.
"""

import keras
import numpy as np

# Each attack draws from its own stream, so two attacks run with one seed draw independent
# numbers. APGD-CE and APGD-T share one, as fra31/auto-attack seeds every attack alike.
STREAMS = {"pgd": 1, "apgd": 2, "square": 3}

_WORD = 0xFFFFFFFF
_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
_SHIFTS = (16, 15, 16)
# Odd constants (the golden ratio and the fractional parts of sqrt(2), sqrt(3)) that start the
# key chain and tell counters from element positions.
_START, _COUNTER, _POSITION = 0x9E3779B9, 0x6A09E667, 0xBB67AE85


def _u32(value):
    """A uint32 tensor: Python ints and NumPy integers modulo 2**32 (on the host, so 64-bit
    values work where the backend has no int64, as JAX by default), integer tensors truncated
    to their low word (two's complement)."""
    if isinstance(value, int | np.integer):
        return keras.ops.convert_to_tensor(int(value) & _WORD, "uint32")
    if isinstance(value, np.ndarray | list | tuple):
        value = np.asarray(value)
        if value.dtype.kind not in "iu":
            raise ValueError(f"Expected integers. Received: dtype={value.dtype}")
        return keras.ops.convert_to_tensor((value.astype(np.int64) & _WORD).astype(np.uint32))
    return _low_word(keras.ops.cast(value, "uint32"))


def _low_word(x):
    """`x` modulo 2**32. Only Keras's PyTorch backend needs it: it keeps "uint32" in int64 (torch
    has no uint32 arithmetic), where products wrap modulo 2**64 and casts keep the sign; the low
    word is the uint32 result. Elsewhere uint32 wraps by itself and `x` is returned as it is."""
    if keras.backend.backend() != "torch":
        return x
    return keras.ops.bitwise_and(x, keras.ops.convert_to_tensor(_WORD, "uint32"))


def _mix(x):
    """lowbias32 of uint32 words: a bijection, each output bit depending on every input bit."""
    shifts = [_u32(s) for s in _SHIFTS]
    x = keras.ops.bitwise_xor(x, keras.ops.right_shift(x, shifts[0]))
    x = _low_word(keras.ops.multiply(x, _u32(_MULTIPLIERS[0])))
    x = keras.ops.bitwise_xor(x, keras.ops.right_shift(x, shifts[1]))
    x = _low_word(keras.ops.multiply(x, _u32(_MULTIPLIERS[1])))
    return keras.ops.bitwise_xor(x, keras.ops.right_shift(x, shifts[2]))


def _absorb(h, word):
    return _mix(keras.ops.bitwise_xor(h, word))


def _seed_words(seed):
    """The low and high 32-bit words of an int or scalar integer tensor seed (two's complement)."""
    if isinstance(seed, int | np.integer):
        seed = int(seed)
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"A seed must fit in 64 bits. Received: seed={seed}")
        return _u32(seed), _u32(seed >> 32)
    seed = keras.ops.convert_to_tensor(seed)
    if len(seed.shape) != 0:
        raise ValueError(f"A seed tensor must be a scalar. Received: shape={tuple(seed.shape)}")
    dtype = keras.backend.standardize_dtype(seed.dtype)
    if dtype == "int64":
        return _u32(seed), _u32(keras.ops.right_shift(seed, keras.ops.convert_to_tensor(32, dtype)))
    # A narrower seed (JAX has no int64: seeds arrive as int32) is sign-extended to 64 bits.
    high = keras.ops.where(seed < 0, _u32(_WORD), _u32(0)) if dtype.startswith("int") else _u32(0)
    return _u32(seed), high


def keys(seed, ids, stream):
    """Per-example keys: a hash of (stream, seed, example index).

    Args:
        seed: An int (64 bits; negative ones as two's complement) or a scalar integer tensor
            (int32 ones, as under JAX, are sign-extended: -1 and 2**64 - 1 are one seed).
        ids: [B] int indices of the examples in the whole evaluation (below 2**32), a tensor
            or a NumPy array (int64 ones are reduced modulo 2**32 on the host).
        stream: A name of `STREAMS`: the attack drawing.

    Returns:
        [B] uint32 keys. For one (stream, seed) they are distinct for distinct indices (the
        chain of bijections is one in the index).
    """
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {sorted(STREAMS)}. Received: stream={stream!r}")
    low, high = _seed_words(seed)
    h = _absorb(_u32(_START), _u32(STREAMS[stream]))
    h = _absorb(_absorb(h, low), high)
    return _absorb(h, _u32(ids))


def uniform(keys, shape, counter):
    """Uniform float32 numbers in [0, 1), `shape` of them per key.

    Number [b, j] (j the element's flat position in `shape`) is a hash of (keys[b], counter,
    j) alone, so an example draws the same numbers in any batch; different counters give
    independent draws (a draw per query, per restart, ...).

    Args:
        keys: [B] uint32 keys (`keys`).
        shape: The static per-example shape, e.g. (H, W, C) or () for one number each.
        counter: Which draw: an int in [0, 2**32) or an integer scalar tensor (a loop variable
            of `keras.ops.while_loop` or `fori_loop` works).

    Returns:
        [B, *shape] float32: the high 24 bits of each hash times 2**-24 (exact in float32).
    """
    shape = tuple(int(d) for d in shape)
    size = int(np.prod(shape, dtype=np.int64))
    stream = _absorb(keys, _mix(keras.ops.bitwise_xor(_u32(counter), _u32(_COUNTER))))
    position = keras.ops.cast(keras.ops.arange(size, dtype="int32"), "uint32")
    position = _mix(keras.ops.bitwise_xor(position, _u32(_POSITION)))
    bits = _mix(keras.ops.bitwise_xor(stream[:, None], position[None, :]))
    top = keras.ops.cast(keras.ops.right_shift(bits, _u32(8)), "float32")
    return keras.ops.reshape(top * (2.0**-24), (-1, *shape))


__all__ = ["STREAMS", "keys", "uniform"]
