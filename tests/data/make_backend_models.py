"""Writes tests/data/backend_models/ and backend_models.npz: tiny zoo models and their logits.

One model per zoo family (ResNeXt's grouped bottleneck, EfficientNet's MBConv with
squeeze-excite, He et al.'s CIFAR ResNet with its option A shortcut, `small_cnn`), each with
another smooth activation, shrunk to a few thousand weights by narrowing the family modules'
stages for this script only (a saved `.keras` file holds its layer graph, not the builder that
made it), so that the files stay small (HDF5 costs about 2 KB a weight). Every activation layer
is also in activations_before.keras, which the backend suite loads too. Every weight is drawn
from a NumPy RandomState in the order of `model.weights`, so every backend builds the same
model with the same numbers.

    KERAS_BACKEND=tensorflow python tests/data/make_backend_models.py tests/data/backend_models
    KERAS_BACKEND=jax python tests/data/make_backend_models.py tests/data/backend_models

The TensorFlow run (first) writes every `<name>.keras` and `backend_models.npz` (`images`, and
the logits of each model computed under TensorFlow); the JAX run adds `<name>.jax.keras` for
`JAX_SAVED` and the logits JAX computes (`jax/<name>`). tests/test_models.py loads each file
under the backend it runs on and compares its logits with TensorFlow's.
"""

import contextlib
import math
import pathlib
import sys
from unittest import mock

import keras
import numpy as np

from sat_tf import activations
from sat_tf.models import cifar, efficientnet, resnet, small

IMAGES = np.random.RandomState(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
NUM_CLASSES = 10
JAX_SAVED = ("small_cnn_smooth_relu",)


@contextlib.contextmanager
def _narrow():
    """The family modules with tiny configurations and stage widths (this script only)."""
    stages, stem = cifar._stages, cifar._stem
    with contextlib.ExitStack() as stack:
        # One ResNeXt block of 8 filters (with its projection shortcut).
        stack.enter_context(mock.patch.object(resnet, "_STAGE_FILTERS", (8,)))
        stack.enter_context(
            mock.patch.dict(resnet.CONFIGS, {"resnext_tiny": ("bottleneck", (1,), 2, 32)})
        )
        # EfficientNet's first two stages (without and with expansion), one block each.
        stack.enter_context(mock.patch.object(efficientnet, "_STAGES", efficientnet._STAGES[:2]))
        stack.enter_context(
            mock.patch.dict(efficientnet.CONFIGS, {"efficientnet_tiny": (0.1, 0.1, 16, 0.2)})
        )
        stack.enter_context(mock.patch.dict(cifar.CONFIGS, {"he_resnet8": (8, None, 16)}))
        # He et al.'s widths (16, 32, 64) and stem are fixed in the module: a quarter of them.
        stack.enter_context(
            mock.patch.object(
                cifar, "_stages", lambda x, w, *a, **k: stages(x, tuple(c // 4 for c in w), *a, **k)
            )
        )
        stack.enter_context(
            mock.patch.object(cifar, "_stem", lambda shape, filters: stem(shape, filters // 4))
        )
        yield


# name -> (builder, model name, activation); one activation each, every one covered.
MODELS = {
    "resnext_tiny_mish": (resnet.build, "resnext_tiny", activations.Mish),
    "efficientnet_tiny_silu": (efficientnet.build, "efficientnet_tiny", activations.SiLU),
    "he_resnet8_gelu_erf": (cifar.build, "he_resnet8", lambda **k: activations.GELU(False, **k)),
    "small_cnn_smooth_relu": (small.build, "small_cnn", activations.SmoothReLU),
}


def _value(path, shape, rng):
    """A draw for the weight at `path`: kernels scaled by fan-in, BN statistics near 1 / 0."""
    last = path.rsplit("/", 1)[-1]
    if last == "kernel":
        # Depthwise kernels (k, k, C, 1) see k * k inputs; grouped ones their group's channels.
        fan_in = math.prod(shape[:-1]) if shape[-1] != 1 else math.prod(shape[:2])
        return rng.normal(0.0, math.sqrt(1.0 / fan_in), shape)
    if last in ("gamma", "moving_variance"):
        return rng.uniform(0.5, 1.5, shape)
    if last in ("beta", "moving_mean", "bias"):
        return rng.normal(0.0, 0.1, shape)
    if last == "b":  # SmoothReLU's sqrt(beta): a trained-looking value per layer
        return rng.uniform(2.0, 6.0, shape)
    raise ValueError(f"no draw for the weight {path}")


def build(name):
    """The model `name` of `MODELS`, with its weights drawn from NumPy."""
    builder, arch, activation = MODELS[name]
    options = {"width": 4} if builder is small.build else {}
    with _narrow():
        model = builder(
            arch,
            num_classes=NUM_CLASSES,
            act=activations.get(activation),
            input_shape=IMAGES.shape[1:],
            **options,
        )
    rng = np.random.RandomState(1)
    for weight in model.weights:
        weight.assign(_value(weight.path, tuple(weight.shape), rng).astype("float32"))
    return model


def main(folder):
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    npz = folder.parent / f"{folder.name}.npz"
    backend = keras.backend.backend()
    arrays = {"images": IMAGES}
    if backend != "tensorflow":
        arrays = dict(np.load(npz))  # TensorFlow's run comes first
    for name in MODELS if backend == "tensorflow" else JAX_SAVED:
        model = build(name)
        logits = np.asarray(keras.ops.convert_to_numpy(model(IMAGES, training=False)))
        assert np.all(np.isfinite(logits)) and 0.1 < np.abs(logits).max() < 1e3, (name, logits)
        if backend == "tensorflow":
            model.save(folder / f"{name}.keras")
            arrays[name] = logits
        else:
            model.save(folder / f"{name}.{backend}.keras")
            arrays[f"{backend}/{name}"] = logits
        print(name, model.count_params(), np.abs(logits).max())
    np.savez(npz, **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
