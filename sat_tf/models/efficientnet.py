"""EfficientNet-B0..B7 and EfficientNet-L1 with a pluggable activation.

Follows the official code the SAT paper trains (cihangxie/SmoothAdversarialTraining,
EfficientNet/efficientnet_{builder,model}.py, from tensorflow/tpu):
- the activation replaces Swish everywhere the original uses it: stem, expansion, depthwise,
  inside squeeze-and-excitation (between its two 1x1 convs) and head; the SE gate stays sigmoid;
- B0's seven MBConv stages, scaled by (width, depth) with `round_filters` / `round_repeats`;
  "same" padding, as the official code;
- BN momentum 0.99, epsilon 1e-3; conv kernels normal(0, sqrt(2 / fan_out)); the classifier is
  uniform(+-1 / sqrt(num_classes)), the official `dense_kernel_initializer`; no zero-init gamma
  (the official MBConv does not use it);
- drop connect (stochastic depth) with survival probability falling linearly from 1 to 0.8 over
  the blocks, applied to residual blocks only; dropout before the classifier;
- pixels normalised with the ImageNet mean and std (official MEAN_RGB / STDDEV_RGB).
EfficientNet-L1 is the Noisy Student model (Xie et al. 2020), (3.9, 3.7, 600, 0.5) as in the
official SAT builder's 'efficientnet-bL1'.
"""

import math

import keras

from sat_tf.models import common

BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# name -> (width coefficient, depth coefficient, native resolution, dropout rate)
CONFIGS = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5),
    "efficientnet_l1": (3.9, 3.7, 600, 0.5),
}

# B0's stages: (kernel, repeats, in filters, out filters, expand ratio, stride); SE ratio 0.25.
_STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
_SE_RATIO = 0.25


def round_filters(filters, width, divisor=8):
    """Scales a channel count by `width`, to a multiple of `divisor`, losing at most 10%."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats, depth):
    """Scales a stage's block count by `depth`, rounding up."""
    return int(math.ceil(depth * repeats))


def _conv_init():
    return keras.initializers.VarianceScaling(
        2.0, mode="fan_out", distribution="untruncated_normal"
    )


def _conv(x, filters, name, use_bias=False):
    return keras.layers.Conv2D(
        filters, 1, use_bias=use_bias, kernel_initializer=_conv_init(), name=name
    )(x)


def _bn(x, name, epsilon=BN_EPSILON):
    return common.batch_norm(x, momentum=BN_MOMENTUM, epsilon=epsilon, name=name)


def _squeeze_excite(x, in_filters, act, name):
    """SE: reduce to in_filters * 0.25 channels (of the block input), activation, sigmoid gate."""
    se = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_squeeze")(x)
    se = _conv(se, max(1, int(in_filters * _SE_RATIO)), f"{name}_se_reduce", use_bias=True)
    se = act(name=f"{name}_se_act")(se)
    se = _conv(se, x.shape[-1], f"{name}_se_expand", use_bias=True)
    se = keras.layers.Activation("sigmoid", name=f"{name}_se_gate")(se)
    return keras.layers.Multiply(name=f"{name}_se_excite")([x, se])


def _mbconv(x, out_filters, kernel_size, expand_ratio, strides, act, drop_rate, name, eps):
    """Mobile inverted bottleneck: expand 1x1, depthwise kxk, SE, project 1x1, skip."""
    in_filters = x.shape[-1]
    y = x
    if expand_ratio != 1:
        y = _conv(y, in_filters * expand_ratio, f"{name}_expand_conv")
        y = act(name=f"{name}_expand_act")(_bn(y, f"{name}_expand_bn", eps))
    y = keras.layers.DepthwiseConv2D(
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        depthwise_initializer=_conv_init(),
        name=f"{name}_dwconv",
    )(y)
    y = act(name=f"{name}_dw_act")(_bn(y, f"{name}_dw_bn", eps))
    y = _squeeze_excite(y, in_filters, act, name)
    y = _bn(_conv(y, out_filters, f"{name}_project_conv"), f"{name}_project_bn", eps)
    if strides == 1 and in_filters == out_filters:
        if drop_rate > 0:
            # Drop connect: drops the whole residual branch per example.
            y = keras.layers.Dropout(
                drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop_connect"
            )(y)
        y = keras.layers.Add(name=f"{name}_add")([y, x])
    return y


def _block_specs(width, depth):
    """Yields (out filters, kernel, expand, stride) for every block of the scaled network."""
    for kernel, repeats, _, out_filters, expand, stride in _STAGES:
        for i in range(round_repeats(repeats, depth)):
            yield round_filters(out_filters, width), kernel, expand, stride if i == 0 else 1


# Input normalisations: the ImageNet mean / std of the official code, or x * 2 / 255 - 1 (its
# `--sat_preprocessing`, main.py `normalize_features`, used by the released SAT EfficientNets).
NORMALIZATIONS = {"mean_std": (MEAN_RGB, STDDEV_RGB), "symmetric": ((127.5,) * 3, (127.5,) * 3)}


def build(
    name,
    *,
    num_classes,
    act,
    input_shape=None,
    dropout_rate=None,
    drop_connect_rate=0.2,
    normalization="mean_std",
    bn_epsilon=BN_EPSILON,
):
    """Builds an EfficientNet from `CONFIGS`.

    Args:
        name: A key of `CONFIGS`.
        num_classes: Number of logits.
        act: Activation factory (from `sat_tf.activations.get`), called once per activation.
        input_shape: (H, W, C) of the pixel input; defaults to the native resolution.
        dropout_rate: Dropout before the classifier; defaults to the model's own.
        drop_connect_rate: Drop rate of the last block's branch (1 - official survival_prob).
        normalization: "mean_std" (ImageNet mean / std) or "symmetric" (x * 2 / 255 - 1, the
            official `--sat_preprocessing` of the released SAT EfficientNets).
        bn_epsilon: BatchNorm epsilon (the released SAT EfficientNets are evaluated with 1e-5).

    Returns:
        A `keras.Model` mapping [0, 255] pixels to float32 logits.
    """
    width, depth, resolution, default_dropout = CONFIGS[name]
    inputs = common.pixel_input(input_shape or (resolution, resolution, 3))
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"`normalization` must be one of {', '.join(NORMALIZATIONS)}. "
            f"Received: normalization={normalization!r}"
        )
    x = common.normalize(inputs, *NORMALIZATIONS[normalization])
    x = keras.layers.Conv2D(
        round_filters(32, width),
        3,
        strides=2,
        padding="same",
        use_bias=False,
        kernel_initializer=_conv_init(),
        name="stem_conv",
    )(x)
    x = act(name="stem_act")(_bn(x, "stem_bn", bn_epsilon))
    specs = list(_block_specs(width, depth))
    for index, (filters, kernel, expand, stride) in enumerate(specs):
        drop_rate = drop_connect_rate * index / len(specs)
        x = _mbconv(
            x, filters, kernel, expand, stride, act, drop_rate, f"block{index + 1}", bn_epsilon
        )
    x = _conv(x, round_filters(1280, width), "head_conv")
    x = act(name="head_act")(_bn(x, "head_bn", bn_epsilon))
    dense_init = keras.initializers.VarianceScaling(1 / 3, mode="fan_out", distribution="uniform")
    dropout = default_dropout if dropout_rate is None else dropout_rate
    logits = common.classifier(x, num_classes, initializer=dense_init, dropout_rate=dropout)
    return keras.Model(inputs, logits, name=name)
