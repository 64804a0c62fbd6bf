"""Checkpoints with the official variable names and seeded, non-trivial values.

Imported both by the tests (plain TensorFlow) and by make_reference.py (the official code's
environment), so both sides read the same checkpoint. Values are drawn from a generator keyed by
the variable name: BatchNorm statistics far from 0 / 1, SmoothReLU's raw beta of either sign and a
different size per layer, EfficientNet moving-average shadows away from the raw weights.
"""

import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EMA = "/ExponentialMovingAverage"


def read_names(path):
    """[(name, shape)] from a `name dim,dim,...` list (one variable a line)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        name, _, dims = line.partition(" ")
        rows.append((name, tuple(int(d) for d in dims.split(",") if d)))
    return rows


def write_names(path, rows):
    Path(path).write_text("".join(f"{n} {','.join(map(str, s))}\n" for n, s in rows))


def value(name, shape):
    """The value of variable `name`: seeded by the name, scaled by its role."""
    if name.endswith(EMA):  # a shadow near, but not equal to, its raw variable
        raw = value(name[: -len(EMA)], shape)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        return (raw * rng.uniform(0.8, 1.2, shape) + rng.normal(0, 0.02, shape)).astype("float32")
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    leaf = name.rsplit("/", 1)[-1]
    if name == "global_step":
        return np.asarray(123456, dtype="int64")
    if leaf in ("W", "kernel", "depthwise_kernel") and len(shape) == 4:
        fan_in = shape[0] * shape[1] * (shape[2] if leaf != "depthwise_kernel" else 1)
        return rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype("float32")
    if leaf in ("W", "kernel"):  # the classifier
        return rng.normal(0, 1.0 / np.sqrt(shape[0]), shape).astype("float32")
    if leaf == "gamma":
        low, high = (0.1, 0.4) if "/conv3/" in name else (0.5, 1.5)
        return rng.uniform(low, high, shape).astype("float32")
    if leaf == "EMA" and "/mean/" in name or leaf == "moving_mean":
        return rng.uniform(-1.0, 1.0, shape).astype("float32")
    if leaf == "EMA" and "/variance/" in name or leaf == "moving_variance":
        return rng.uniform(0.3, 3.0, shape).astype("float32")
    if leaf == "smoothrelu_beta":
        return (rng.uniform(1.5, 6.0, shape) * rng.choice([-1.0, 1.0], shape)).astype("float32")
    return rng.uniform(-0.05, 0.05, shape).astype(
        "float32"
    )  # BN beta, biases, optimizer slots: small, so the logits depend on the image


def write_checkpoint(prefix, rows):
    """Writes a TF1-format checkpoint (`prefix.index`, `prefix.data-00000-of-00001`)."""
    import tensorflow as tf

    names = [n for n, _ in rows]
    tensors = [tf.constant(value(n, s)) for n, s in rows]
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    save = tf.raw_ops.SaveV2(
        prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors
    )
    if not tf.executing_eagerly():  # make_reference.py builds the official graph in graph mode
        with tf.compat.v1.Session() as session:
            session.run(save)
    return str(prefix)
