"""Model zoo: every builder takes `activation=`, so a ReLU model and its SAT twin differ in nothing else.

Inputs are float pixels in [0, 255], NHWC; each model normalises its input in its first layer, so
attacks, epsilons and serving all work in pixel units.
"""

import keras

_BUILDERS = {}  # name -> builder(num_classes, activation, input_shape, **overrides); filled below.


def names():
    """The model names `build` accepts."""
    return sorted(_BUILDERS)


def build(name, *, num_classes, activation="silu", input_shape=None, **overrides):
    """Builds a named model with the given activation.

    Args:
        name: One of `names()`.
        num_classes: Number of output logits.
        activation: Any identifier `sat_tf.activations.get` accepts.
        input_shape: (H, W, C); defaults to the model's native resolution.
        **overrides: Family-specific options (e.g. `width`, `dropout_rate`).

    Returns:
        A `keras.Model` mapping [0, 255] pixels to float32 logits.
    """
    if name not in _BUILDERS:
        raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(names())}.")
    return _BUILDERS[name](
        num_classes=num_classes, activation=activation, input_shape=input_shape, **overrides
    )


_DECAYED_LAYERS = (keras.layers.Conv2D, keras.layers.Dense, keras.layers.DepthwiseConv2D)


def weight_decay_variables(model):
    """The variables the trainer applies weight decay to: conv and dense kernels only.

    Biases, BatchNorm parameters and activation parameters (e.g. SmoothReLU's beta) are left out,
    as in the official SAT code's weight-decay pattern.
    """
    found = []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, _DECAYED_LAYERS):
            is_depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
            found.append(layer.depthwise_kernel if is_depthwise else layer.kernel)
    return found
