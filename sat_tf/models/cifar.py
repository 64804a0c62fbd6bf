"""CIFAR-scale networks with a pluggable activation: the models robust-training papers report on.

- `resnet20`, `resnet56`: He et al. 2016 ("Deep Residual Learning", Sec. 4.2): 3 stages of 16,
  32, 64 channels with 6n + 2 layers and option A shortcuts (subsample, zero-pad the channels;
  parameter free), as the paper uses on CIFAR. 269,722 / 853,018 parameters for 10 classes.
- `preact_resnet18`: the pre-activation ResNet-18 (He et al. 2016, "Identity Mappings") of
  Wong et al. 2020 and Rice et al. 2020, with the final BN + activation before pooling.
- `wide_resnet28_10`, `wide_resnet34_10`: WRN-d-k (Zagoruyko & Komodakis 2016) as in Madry et al.
  and TRADES; 36,479,194 / 46,160,474 parameters for 10 classes.

Normalisation (our choice, as Wong et al. and Rice et al.): the CIFAR-10 per-channel mean and
std, applied by the first layer. Conventions follow the PyTorch reference code: BN momentum 0.9
(PyTorch's 0.1), epsilon 1e-5, padding k // 2 on both sides, He fan_out conv init (the WRN
code's normal(0, sqrt(2 / (k * k * out)))), bias-free convs. Post-activation ResNets start the
last BN of each branch at gamma = 0, like the ImageNet models; pre-activation branches end in a
conv, so there is no such BN. The classifier is normal(std 0.01).
"""

import keras
from keras import ops

from sat_tf.models import common

NATIVE_SIZE = 32
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
CIFAR10_MEAN = (0.4914 * 255, 0.4822 * 255, 0.4465 * 255)
CIFAR10_STD = (0.2471 * 255, 0.2435 * 255, 0.2616 * 255)


@keras.saving.register_keras_serializable(package="sat_tf")
class ZeroPadChannels(keras.layers.Layer):
    """Appends zero channels up to `channels`: He et al.'s option A shortcut (after subsampling).

    Args:
        channels: Number of output channels, >= the input's.
    """

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"`channels` must be a positive int. Received: channels={channels!r}")
        self.channels = channels

    def call(self, x):
        extra = self.channels - x.shape[-1]
        if extra < 0:
            raise ValueError(
                f"Input has {x.shape[-1]} channels, more than channels={self.channels}"
            )
        return ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, extra]])

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.channels)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


def _bn(x, name, zero_gamma=False):
    return common.batch_norm(
        x, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, zero_gamma=zero_gamma, name=name
    )


def _option_a_block(x, filters, strides, act, name):
    """Post-activation basic block with a parameter-free shortcut."""
    shortcut = x
    if strides > 1:
        # A 1x1 max pool with stride 2 is x[:, ::2, ::2]: the option A subsampling.
        shortcut = keras.layers.MaxPooling2D(1, strides=strides, name=f"{name}_subsample")(x)
    if shortcut.shape[-1] != filters:
        shortcut = ZeroPadChannels(filters, name=f"{name}_zero_pad")(shortcut)
    y = common.conv(x, filters, 3, strides=strides, name=f"{name}_conv1")
    y = act(name=f"{name}_act1")(_bn(y, f"{name}_bn1"))
    y = _bn(common.conv(y, filters, 3, name=f"{name}_conv2"), f"{name}_bn2", zero_gamma=True)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return act(name=f"{name}_out")(y)


def _preact_block(x, filters, strides, act, name, dropout_rate=0.0):
    """Pre-activation block: BN-act-conv-BN-act-conv; a 1x1 conv shortcut where shapes change.

    The projection reads the pre-activated input, as in the PreActResNet and WRN reference code.
    """
    pre = act(name=f"{name}_act1")(_bn(x, f"{name}_bn1"))
    shortcut = x
    if strides > 1 or x.shape[-1] != filters:
        shortcut = common.conv(pre, filters, 1, strides=strides, name=f"{name}_proj_conv")
    y = common.conv(pre, filters, 3, strides=strides, name=f"{name}_conv1")
    y = act(name=f"{name}_act2")(_bn(y, f"{name}_bn2"))
    if dropout_rate:
        y = keras.layers.Dropout(dropout_rate, name=f"{name}_dropout")(y)
    y = common.conv(y, filters, 3, name=f"{name}_conv2")
    return keras.layers.Add(name=f"{name}_add")([y, shortcut])


def _stages(x, widths, blocks, first_stride, block, act, **block_kwargs):
    for stage, width in enumerate(widths):
        for i in range(blocks):
            strides = (first_stride if stage == 0 else 2) if i == 0 else 1
            x = block(x, width, strides, act, f"stage{stage + 1}_block{i + 1}", **block_kwargs)
    return x


def _stem(input_shape, filters):
    inputs = common.pixel_input(input_shape or (NATIVE_SIZE, NATIVE_SIZE, 3))
    x = common.normalize(inputs, CIFAR10_MEAN, CIFAR10_STD)
    return inputs, common.conv(x, filters, 3, name="stem_conv")


def _he_resnet(name, depth, num_classes, act, input_shape):
    blocks = (depth - 2) // 6
    inputs, x = _stem(input_shape, 16)
    x = act(name="stem_act")(_bn(x, "stem_bn"))
    x = _stages(x, (16, 32, 64), blocks, 1, _option_a_block, act)
    return keras.Model(inputs, common.classifier(x, num_classes), name=name)


def _preact_resnet(name, depth, widths, stem, num_classes, act, input_shape, dropout_rate):
    """Pre-activation ResNet (PreActResNet-18: 2 blocks per stage) and WRN (n = (d - 4) / 6)."""
    blocks = 2 if name == "preact_resnet18" else (depth - 4) // 6
    inputs, x = _stem(input_shape, stem)
    x = _stages(x, widths, blocks, 1, _preact_block, act, dropout_rate=dropout_rate)
    x = act(name="final_act")(_bn(x, "final_bn"))
    return keras.Model(inputs, common.classifier(x, num_classes), name=name)


# name -> (depth, stage widths, stem width); widths None marks He et al.'s CIFAR ResNet.
CONFIGS = {
    "resnet20": (20, None, 16),
    "resnet56": (56, None, 16),
    "preact_resnet18": (18, (64, 128, 256, 512), 64),
    "wide_resnet28_10": (28, (160, 320, 640), 16),
    "wide_resnet34_10": (34, (160, 320, 640), 16),
}


def build(name, *, num_classes, act, input_shape=None, dropout_rate=0.0):
    """Builds a CIFAR network from `CONFIGS`.

    Args:
        name: A key of `CONFIGS`.
        num_classes: Number of logits.
        act: Activation factory (from `sat_tf.activations.get`), called once per activation.
        input_shape: (H, W, C) of the pixel input; defaults to (32, 32, 3).
        dropout_rate: Dropout between the two convs of pre-activation blocks (WRN's; 0 in the
            robust-training papers). Not used by `resnet20` / `resnet56`.

    Returns:
        A `keras.Model` mapping [0, 255] pixels to float32 logits.
    """
    depth, widths, stem = CONFIGS[name]
    if widths is None:
        if dropout_rate:
            raise ValueError(f"{name} has no dropout. Received: dropout_rate={dropout_rate}")
        return _he_resnet(name, depth, num_classes, act, input_shape)
    return _preact_resnet(name, depth, widths, stem, num_classes, act, input_shape, dropout_rate)
