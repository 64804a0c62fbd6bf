"""ImageNet ResNet v1.5 and ResNeXt with a pluggable activation.

Follows the official SAT ResNet (cihangxie/SmoothAdversarialTraining, ResNet/resnet_model.py):
- v1.5: the stride of a bottleneck sits on its 3x3 conv, not on the first 1x1 ("ImageNet in
  1 Hour", Sec. 5.1); strided convs pad explicitly, as the TPU ResNet's `fixed_padding`;
- pixels are mapped to [-1, 1] (x * 2 / 255 - 1) by the first layer, as the official
  `image_preprocess`;
- conv kernels: He init over fan_out; BN momentum 0.9, epsilon 1e-5 (tensorpack defaults); the
  last BN of every residual branch starts with gamma = 0; the classifier is normal(std 0.01);
- ResNeXt (Xie et al. 2017) uses a grouped 3x3 conv of `groups * width_per_group * filters / 64`
  channels, the official code's `ch_factor`.
ResNet-18/34 use torchvision's basic block (two 3x3 convs) with the same conventions.
Parameter counts equal torchvision's (no conv biases), e.g. 25,557,032 for ResNet-50.
"""

import keras

from sat_tf.models import common

NATIVE_SIZE = 224
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
_STAGE_FILTERS = (64, 128, 256, 512)

# name -> (block, blocks per stage, groups, width_per_group)
CONFIGS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext50_32x8d": ("bottleneck", (3, 4, 6, 3), 32, 8),  # the SAT paper's ResNeXt-32x8d
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext152_32x8d": ("bottleneck", (3, 8, 36, 3), 32, 8),
}


def _bn(x, name, zero_gamma=False):
    return common.batch_norm(
        x, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, zero_gamma=zero_gamma, name=name
    )


def _shortcut(x, out_channels, strides, name):
    """Identity, or a strided 1x1 conv + BN where the shape changes (projection, option B)."""
    if x.shape[-1] == out_channels and strides == 1:
        return x
    x = common.conv(x, out_channels, 1, strides=strides, name=f"{name}_proj_conv")
    return _bn(x, f"{name}_proj_bn")


def _basic_block(x, filters, strides, act, name, *, zero_init, **_):
    """Two 3x3 convs; the first carries the stride."""
    shortcut = _shortcut(x, filters, strides, name)
    y = common.conv(x, filters, 3, strides=strides, name=f"{name}_conv1")
    y = act(name=f"{name}_act1")(_bn(y, f"{name}_bn1"))
    y = common.conv(y, filters, 3, name=f"{name}_conv2")
    y = _bn(y, f"{name}_bn2", zero_gamma=zero_init)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return act(name=f"{name}_out")(y)


def _bottleneck_block(x, filters, strides, act, name, *, zero_init, groups, width_per_group):
    """1x1 reduce, 3x3 (grouped for ResNeXt, strided: v1.5), 1x1 expand by 4."""
    width = filters * groups * width_per_group // 64
    shortcut = _shortcut(x, filters * 4, strides, name)
    y = common.conv(x, width, 1, name=f"{name}_conv1")
    y = act(name=f"{name}_act1")(_bn(y, f"{name}_bn1"))
    y = common.conv(y, width, 3, strides=strides, groups=groups, name=f"{name}_conv2")
    y = act(name=f"{name}_act2")(_bn(y, f"{name}_bn2"))
    y = common.conv(y, filters * 4, 1, name=f"{name}_conv3")
    y = _bn(y, f"{name}_bn3", zero_gamma=zero_init)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return act(name=f"{name}_out")(y)


_BLOCKS = {"basic": _basic_block, "bottleneck": _bottleneck_block}


def build(name, *, num_classes, act, input_shape=None, zero_init_residual=True):
    """Builds a ResNet / ResNeXt from `CONFIGS`.

    Args:
        name: A key of `CONFIGS`.
        num_classes: Number of logits.
        act: Activation factory (from `sat_tf.activations.get`), called once per activation.
        input_shape: (H, W, C) of the pixel input; defaults to (224, 224, 3).
        zero_init_residual: Start the last BN of each residual branch with gamma = 0.

    Returns:
        A `keras.Model` mapping [0, 255] pixels to float32 logits.
    """
    block_type, depths, groups, width_per_group = CONFIGS[name]
    block = _BLOCKS[block_type]
    inputs = common.pixel_input(input_shape or (NATIVE_SIZE, NATIVE_SIZE, 3))
    x = common.normalize(inputs, mean=(127.5,) * 3, std=(127.5,) * 3)  # x * 2 / 255 - 1
    x = common.conv(x, 64, 7, strides=2, name="stem_conv")
    x = act(name="stem_act")(_bn(x, "stem_bn"))
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, (filters, depth) in enumerate(zip(_STAGE_FILTERS, depths, strict=True)):
        for i in range(depth):
            x = block(
                x,
                filters,
                2 if stage > 0 and i == 0 else 1,
                act,
                f"stage{stage + 1}_block{i + 1}",
                zero_init=zero_init_residual,
                groups=groups,
                width_per_group=width_per_group,
            )
    logits = common.classifier(x, num_classes)
    return keras.Model(inputs, logits, name=name)
