"""The official SAT ResNet / ResNeXt checkpoints (Tensorpack, NCHW) onto `sat_tf.models.resnet`.

Variable names follow cihangxie/SmoothAdversarialTraining ResNet/resnet_model.py: `conv0` (stem,
line 187), `group{g}/block{i}/conv{1,2,3}` and `convshortcut` (lines 106, 153-162, 173-176), each
with Tensorpack's `W` kernel and `bn/{gamma,beta,mean/EMA,variance/EMA}`, the classifier
`linear/{W,b}` (line 194), and for SmoothReLU a raw `smoothrelu_beta` of shape [1] in the scope of
every activation (line 49: inside each conv's scope for the conv + BN + activation, and in the
block's scope for the block output, line 168). The official architecture equals the zoo's (stride
on the 3x3, `fixed_padding` before strided convs, SAME max pool, BN epsilon 1e-5), so no builder
option is needed. Kernels are [kh, kw, in, out] in both data formats, so NCHW changes no weight.

The official evaluation reads images with OpenCV (BGR) and feeds them to the first conv in that
order (adv_model.py `image_preprocess`, where the RGB flip is commented out); the import reverses
the input-channel axis of `conv0/W`, so the Keras model takes RGB like every sat_tf model. The
scaling (x * 2 / 255 - 1, adv_model.py line 236) is the zoo ResNet's own first layer.
"""

import re

from sat_tf.models import resnet as zoo
from sat_tf.pretrained import bundle

FAMILY = "resnet"
BUILD_OPTIONS = {}
# Names of the official `--activation-name` (resnet_model.py line 74) -> sat_tf.activations names.
ACTIVATIONS = {
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "softplus": "softplus",
    "elu": "elu",
    "gelu": "gelu",
    "smoothrelu": "smooth_relu",
    "mish": "mish",
}
BETA = "smoothrelu_beta"
_CONV2 = "group0/block0/conv2/W"  # the grouped 3x3 kernel: [3, 3, width / groups, width]
_BLOCK = re.compile(r"^group(\d)/block(\d+)/conv1/W$")
# Variables of training, not of the network: momentum slots (tensorpack's MomentumOptimizer), the
# step counter and learning rate (imagenet_utils.py line 197), and Tensorpack's moving averages of
# the training summaries (add_moving_summary, under EMA/).
NOT_MODEL = re.compile(r"(/Momentum$|^global_step$|^learning_rate$|^EMA/)")
_BN = {
    "gamma": "gamma",
    "beta": "beta",
    "moving_mean": "mean/EMA",
    "moving_variance": "variance/EMA",
}


def not_model(name, used):
    """Whether an unused checkpoint variable is training state rather than a network weight."""
    del used
    return bool(NOT_MODEL.search(name))


def has_moving_average(shapes):
    """Tensorpack ResNets keep no moving average of the weights (BN's mean/EMA is a statistic)."""
    del shapes
    return False


def matches(shapes):
    """Whether the checkpoint's variables are the official ResNet's."""
    return "conv0/W" in shapes and "linear/W" in shapes


def head(shapes):
    """The name of the classifier kernel, [features, classes]."""
    del shapes
    return "linear/W"


def infer(shapes):
    """(zoo arch name, activation or None, num_classes) from names and shapes.

    Depth from the block count per group, ResNeXt groups and width from the grouped 3x3 kernel
    of the first block ([3, 3, width / groups, width]), SmoothReLU from its beta variables.
    """
    counts = [0, 0, 0, 0]
    for name in shapes:
        found = _BLOCK.match(name)
        if found and int(found.group(1)) < 4:
            counts[int(found.group(1))] += 1
    conv2 = shapes.get(_CONV2)
    if conv2 is None or 0 in counts:
        raise ValueError("group0..group3 blocks are missing: not a complete ResNet checkpoint")
    if len(conv2) != 4 or conv2[:2] != (3, 3) or 0 in conv2 or conv2[3] % conv2[2]:
        raise ValueError(
            f"{_CONV2} {list(conv2)} is not a grouped 3x3 kernel [3, 3, width / groups, width]; "
            f"{bundle.DAMAGED}"
        )
    width = conv2[3]
    groups = width // conv2[2]
    width_per_group = width // groups
    depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}.get(tuple(counts))
    if depth is None:
        raise ValueError(f"blocks per group {tuple(counts)} match no ResNet-50/101/152")
    if groups == 1 and width_per_group == 64:
        arch = f"resnet{depth}"
    else:
        arch = f"resnext{depth}_{groups}x{width_per_group}d"
    if arch not in zoo.CONFIGS:
        raise ValueError(
            f"{arch} (depth {depth}, {groups} groups of {width_per_group}) is not in the zoo"
        )
    activation = "smooth_relu" if any(n.endswith("/" + BETA) for n in shapes) else None
    kernel = shapes[head(shapes)]
    if len(kernel) != 2 or 0 in kernel:
        raise ValueError(
            f"{head(shapes)} {list(kernel)} is not a [features, classes] kernel; {bundle.DAMAGED}"
        )
    return arch, activation, kernel[1]


def _scope(layer_name):
    """The official variable scope of a zoo layer, and the role of the layer in it."""
    if layer_name.startswith("stem_"):
        return "conv0", layer_name[len("stem_") :]
    if layer_name == "logits":
        return "linear", "dense"
    found = re.match(r"^stage(\d)_block(\d+)_(.+)$", layer_name)
    if not found:
        return None, None
    stage, block, role = found.groups()
    scope = f"group{int(stage) - 1}/block{int(block) - 1}"
    if role.startswith("proj_"):
        return f"{scope}/convshortcut", role[len("proj_") :]
    if role == "out":
        return scope, "act"
    found = re.match(r"^(conv|bn|act)(\d)$", role)
    return (f"{scope}/conv{found.group(2)}", found.group(1)) if found else (None, None)


def assignments(model, *, moving_average=False):
    """Yields (model variable, checkpoint name, transform) for every weight of `model`.

    `transform` is None, "bgr_to_rgb" (reverse the kernel's input channels) or "scalar"
    (SmoothReLU's [1]-shaped raw beta onto the layer's scalar `b`: beta = b^2 in both).
    """
    del moving_average
    for layer in model.layers:
        if not layer.weights:
            continue
        scope, role = _scope(layer.name)
        for variable in layer.weights:
            if scope is None:
                yield variable, None, None
            elif role == "conv":
                yield variable, f"{scope}/W", "bgr_to_rgb" if scope == "conv0" else None
            elif role == "bn":
                yield variable, f"{scope}/bn/{_BN.get(variable.name, variable.name)}", None
            elif role == "act":
                yield variable, f"{scope}/{BETA}", "scalar"
            elif role == "dense":
                yield variable, f"linear/{'W' if variable.name == 'kernel' else 'b'}", None
            else:
                yield variable, None, None
