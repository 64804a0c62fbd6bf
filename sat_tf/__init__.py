"""sat_tf: Smooth Adversarial Training (Xie, Tan, Gong, Yuille, Le, 2020) in Keras 3.

The core (activations, models, attacks, `AdversarialModel`, the evaluation) is `keras.ops` code
for the TensorFlow (default), JAX and PyTorch backends, and importing it needs no TensorFlow under
JAX or PyTorch. `sat_tf.torch_module(model)` hands a model to PyTorch's robustness tools.
`sat_tf.data` (tf.data pipelines), `sat_tf.export` (SavedModel) and the TF1 checkpoint reader
import TensorFlow when they are first used (`sat_tf.backend.tensorflow`).
"""

import importlib
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from sat_tf import activations, attacks, backend, models  # noqa: E402
from sat_tf.adversarial import AdversarialModel  # noqa: E402
from sat_tf.convert import convert_activations  # noqa: E402

_LAZY = ("data",)  # needs TensorFlow: imported on first use


def torch_module(model):
    """`model` as the `torch.nn.Module` PyTorch's robustness tools expect: NCHW images in
    [0, 1] -> logits (`sat_tf.pytorch.TorchClassifier`; needs KERAS_BACKEND=torch)."""
    return importlib.import_module("sat_tf.pytorch").torch_module(model)


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"sat_tf.{name}")
    raise AttributeError(f"module 'sat_tf' has no attribute {name!r}")


__all__ = [
    "AdversarialModel",
    "activations",
    "attacks",
    "backend",
    "convert_activations",
    "data",
    "models",
    "torch_module",
]
__version__ = "0.1.0"
