"""Placeholder main job until the trainer lands: checks every activation on a small grid."""

import numpy as np

from sat_tf import activations

x = np.linspace(-3, 3, 7, dtype="float32")
for name in activations.names():
    print(f"{name:>20}: {np.round(np.asarray(activations.get(name)()(x)), 3)}")
