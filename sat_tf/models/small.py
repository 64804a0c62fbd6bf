"""`small_cnn`: a three-conv network for the built-in demo and tests; trains in seconds on a CPU.

conv3x3(w) - conv3x3(2w, stride 2) - conv3x3(4w, stride 2), each followed by BN and the
activation, then global average pooling and a float32 Dense. Pixels are mapped to [-1, 1] as the
official SAT ResNet does. Any input size of at least 4x4 works (e.g. 16x16 or 32x32).
"""

import keras

from sat_tf.models import common

NATIVE_SIZE = 32
CONFIGS = {"small_cnn": None}


def build(name, *, num_classes, act, input_shape=None, width=16):
    """Builds `small_cnn`.

    Args:
        name: "small_cnn".
        num_classes: Number of logits.
        act: Activation factory (from `sat_tf.activations.get`), called once per activation.
        input_shape: (H, W, C) of the pixel input; defaults to (32, 32, 3).
        width: Channels of the first conv; the next two have 2x and 4x as many.

    Returns:
        A `keras.Model` mapping [0, 255] pixels to float32 logits.
    """
    if name not in CONFIGS:
        raise ValueError(f"Unknown small model {name!r}. Valid names: {', '.join(CONFIGS)}.")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"`width` must be a positive int. Received: width={width!r}")
    inputs = common.pixel_input(input_shape or (NATIVE_SIZE, NATIVE_SIZE, 3))
    x = common.normalize(inputs, mean=(127.5,) * 3, std=(127.5,) * 3)  # x * 2 / 255 - 1
    for i, (multiple, strides) in enumerate(((1, 1), (2, 2), (4, 2))):
        x = common.conv(x, width * multiple, 3, strides=strides, name=f"conv{i + 1}")
        x = common.batch_norm(x, momentum=0.9, epsilon=1e-5, name=f"bn{i + 1}")
        x = act(name=f"act{i + 1}")(x)
    logits = common.classifier(x, num_classes)
    return keras.Model(inputs, logits, name=name)
