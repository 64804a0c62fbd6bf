"""Building blocks shared by the model families: input normalisation, padded convs, BN, the head.

Every family takes pixels in [0, 255] and normalises them in its first layer, computed in float32
so that pixel-unit perturbations are not rounded away under a float16 policy.
"""

import keras


def pixel_input(input_shape):
    """The model input: float pixels in [0, 255], NHWC."""
    return keras.Input(shape=tuple(input_shape), name="pixels")


def normalize(x, mean, std):
    """Maps pixels to (x - mean) / std per channel, with `mean` and `std` in pixel units.

    A `Rescaling` layer with per-channel scale and offset: serializable and safe to load, unlike a
    `Lambda`. Pinned to float32: under a float16 policy the raw pixels (up to 255) would otherwise
    be cast first, and float16 has a spacing of 0.125 there.
    """
    scale = [1.0 / s for s in std]
    offset = [-m / s for m, s in zip(mean, std, strict=True)]
    return keras.layers.Rescaling(scale, offset, dtype="float32", name="normalize")(x)


def he_fan_out():
    """He init over fan_out, as the official SAT ResNet (variance_scaling(2.0, mode='fan_out'))."""
    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="truncated_normal")


def conv(x, filters, kernel_size, *, strides=1, groups=1, name, initializer=None):
    """Bias-free conv; strided convs pad explicitly by (k - 1) // 2 before, the rest after.

    The official SAT ResNet pads like the TPU ResNet's `fixed_padding`, so the output does not
    depend on the parity of the input size (TF's "same" pads asymmetrically, (0, 1) for 3x3/2).
    The same padding is PyTorch's `padding=k // 2`, as in the CIFAR reference code.
    """
    padding = "same"
    if strides > 1:
        total = kernel_size - 1
        if total:
            pad = (total // 2, total - total // 2)
            x = keras.layers.ZeroPadding2D((pad, pad), name=f"{name}_pad")(x)
        padding = "valid"
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        groups=groups,
        use_bias=False,
        kernel_initializer=initializer or he_fan_out(),
        name=name,
    )(x)


def batch_norm(x, *, momentum, epsilon, zero_gamma=False, name):
    """BatchNorm; `zero_gamma` starts a residual branch at zero (Goyal et al. 2017, Sec. 5.1)."""
    return keras.layers.BatchNormalization(
        momentum=momentum,
        epsilon=epsilon,
        gamma_initializer="zeros" if zero_gamma else "ones",
        name=name,
    )(x)


def classifier(x, num_classes, *, initializer=None, dropout_rate=0.0):
    """Global average pool, optional dropout, and a float32 Dense giving the logits.

    The Dense layer runs in float32 under mixed precision, so losses and attacks see float32
    logits. Default kernel init is normal(std 0.01), as in the official SAT ResNet ("ImageNet in
    1 Hour", Sec. 5.1).
    """
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout_rate:
        x = keras.layers.Dropout(dropout_rate, name="head_dropout")(x)
    return keras.layers.Dense(
        num_classes,
        kernel_initializer=initializer or keras.initializers.RandomNormal(stddev=0.01),
        dtype="float32",
        name="logits",
    )(x)
