"""Writes activations_before.keras/.npz: every activation layer, saved by the unfused layers.

The fixture is a real "before" artifact: it was written by the activations as they were before
they became fused ops (commit b012865), with that commit's package first on the path:

    mkdir -p /tmp/old && git archive b012865 sat_tf | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/data/make_activations_before.py tests/data

tests/test_activations.py loads it with today's code and checks the outputs it stored.
"""

import sys

import keras
import numpy as np

from sat_tf import activations

keras.utils.set_random_seed(0)
inputs = keras.Input((6,))
h = keras.layers.Dense(6)(inputs)
outs = []
for layer in [
    activations.Softplus(alpha=10.0),
    activations.Softplus(),
    activations.SiLU(),
    activations.GELU(),
    activations.GELU(approximate=False),
    activations.ELU(alpha=0.5),
    activations.ELU(),
    activations.Mish(),
    activations.SmoothReLU(beta_init=3.0),
    activations.SmoothReLU(beta_init=-7.0, trainable_beta=False),
    activations.SmoothGradReLU(alpha=3.0, smooth_backward=False),
]:
    outs.append(layer(h))
model = keras.Model(inputs, keras.layers.Concatenate()(outs))
# A trained-looking beta: not the initial value.
for lyr in model.layers:
    if isinstance(lyr, activations.SmoothReLU):
        lyr.b.assign(lyr.b * 1.37)
x = (np.random.default_rng(1).normal(size=(16, 6)) * 4).astype("float32")
model.save(sys.argv[1] + "/activations_before.keras")
np.savez(sys.argv[1] + "/activations_before.npz", x=x, y=np.asarray(model(x)))
print("ok", model.output.shape)
