"""Model zoo: every builder takes `activation=`, so ReLU and SAT twins differ in nothing else.

Inputs are float pixels in [0, 255], NHWC; each model normalises its input in its first layer, so
attacks, epsilons and serving all work in pixel units. Logits are float32 under any dtype policy.

Families (one module each): `resnet` (ImageNet ResNet v1.5 / ResNeXt), `efficientnet` (B0-B7, L1),
`cifar` (He et al. ResNet-20/56, PreAct ResNet-18, WRN-28-10 / 34-10) and `small` (`small_cnn`).
"""

import functools

import keras

from sat_tf import _keras_compat as compat
from sat_tf import activations
from sat_tf.models import cifar, efficientnet, resnet, small

# name -> builder(num_classes=, act=, input_shape=, **overrides), where `act` is a resolved
# activation factory. Each family module owns its CONFIGS dict; this is the one registry.
_BUILDERS = {
    **{name: functools.partial(resnet.build, name) for name in resnet.CONFIGS},
    **{name: functools.partial(efficientnet.build, name) for name in efficientnet.CONFIGS},
    **{name: functools.partial(cifar.build, name) for name in cifar.CONFIGS},
    **{name: functools.partial(small.build, name) for name in small.CONFIGS},
}


def names():
    """The model names `build` accepts."""
    return sorted(_BUILDERS)


def build(name, *, num_classes, activation="silu", input_shape=None, **overrides):
    """Builds a named model with the given activation.

    The activation is resolved once, here, and the resulting factory is passed to every block.

    Args:
        name: One of `names()`.
        num_classes: Number of output logits.
        activation: Any identifier `sat_tf.activations.get` accepts (name, Layer class, config
            dict, or factory).
        input_shape: (H, W, C); defaults to the model's native resolution (224 for ResNets,
            224-600 for EfficientNet-B0..B7, 600 for L1, 32 for the CIFAR nets and `small_cnn`).
        **overrides: Family-specific options: `zero_init_residual` (ResNet), `dropout_rate`,
            `normalization`, `bn_epsilon` and
            `drop_connect_rate` (EfficientNet), `dropout_rate` (pre-activation CIFAR nets),
            `width` (`small_cnn`).

    Returns:
        A `keras.Model` mapping [0, 255] pixels to float32 logits, named `name`.

    Raises:
        ValueError: for an unknown name or activation.
    """
    if name not in _BUILDERS:
        raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(names())}.")
    act = activations.get(activation)
    return _BUILDERS[name](num_classes=num_classes, act=act, input_shape=input_shape, **overrides)


_DECAYED_LAYERS = (keras.layers.Conv2D, keras.layers.Dense, keras.layers.DepthwiseConv2D)


def weight_decay_variables(model):
    """The variables the trainer applies weight decay to: conv and dense kernels only.

    Biases, BatchNorm parameters and activation parameters (e.g. SmoothReLU's beta) are left out,
    as in the official SAT code's weight-decay pattern.
    """
    # Keras 3 (checked on 3.15) names the depthwise kernel `kernel` too.
    return [
        layer.kernel for layer in compat.flatten_layers(model) if isinstance(layer, _DECAYED_LAYERS)
    ]


def to_logits(model):
    """Returns `model` without its final softmax/sigmoid, weights kept: a model of logits.

    Every attack and `sat_tf.AdversarialModel` take logits (e.g. `keras.applications` heads end in
    softmax by default). An output layer that is only the activation (`Softmax`, `Activation`) is
    dropped; a layer with a fused `activation=` (e.g. the Dense head) is rebuilt with a linear
    activation. A model whose output is already logits is returned unchanged.

    Args:
        model: A Functional or Sequential `keras.Model`.

    Raises:
        TypeError: For subclassed models, whose layers cannot be rebuilt.
    """
    from sat_tf import attacks  # attacks imports keras models only, never sat_tf.models.

    if attacks.output_activation(model) is None:
        return model
    last = model.layers[-1]
    if isinstance(last, keras.Model):
        inner = to_logits(last)
        outputs = inner(model.layers[-1].input)
        return keras.Model(model.inputs, outputs, name=model.name)
    if isinstance(last, (keras.layers.Softmax, keras.layers.Activation)):
        return keras.Model(model.inputs, last.input, name=model.name)
    if not isinstance(model, keras.Sequential) and not hasattr(model, "inputs"):
        raise TypeError(f"to_logits needs a Functional or Sequential model. Received: {model!r}")

    def clone(layer):
        config = layer.get_config()
        if layer is last:
            config["activation"] = "linear"
        return layer.__class__.from_config(config)

    logits = keras.models.clone_model(model, clone_function=clone)
    logits.set_weights(model.get_weights())
    return logits
