"""sat_tf: Smooth Adversarial Training (Xie, Tan, Gong, Yuille, Le, 2020) in Keras 3."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from sat_tf import activations, attacks, data, models  # noqa: E402
from sat_tf.adversarial import AdversarialModel  # noqa: E402
from sat_tf.convert import convert_activations  # noqa: E402

__all__ = ["AdversarialModel", "activations", "attacks", "convert_activations", "data", "models"]
__version__ = "0.1.0"
