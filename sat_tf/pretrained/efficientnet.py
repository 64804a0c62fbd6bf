"""The official SAT EfficientNet checkpoints (tensorflow/tpu code) onto the zoo EfficientNet.

Variable names follow cihangxie/SmoothAdversarialTraining EfficientNet/efficientnet_model.py, whose
TF1 layers take their names at first call within each scope: `<model>/stem/conv2d` and
`tpu_batch_normalization` (lines 640-642), per block `<model>/blocks_<i>/` an expansion
`conv2d` + `tpu_batch_normalization` when the expand ratio is not 1 (line 374), `depthwise_conv2d`
and the next BN (line 377), `se/conv2d` and `se/conv2d_1` with biases (lines 381, 318), the
projection conv and the last BN (line 386); `<model>/head/conv2d`, its BN and `dense` (lines
680-682, 607). The model name prefix gives the variant (`efficientnet-b0` .. `efficientnet-bL1`).

The released models are evaluated with `--sat_preprocessing=True` (x * 2 / 255 - 1 instead of the
ImageNet mean / std, main.py `normalize_features`) and `--batch_norm_epsilon=1e-5` (README): the
import builds the zoo model with `normalization="symmetric"` and `bn_epsilon=1e-5`. Images come
from TFRecords decoded as RGB, as sat_tf's. With `--moving_average_decay` > 0 the evaluation
restores every weight and BN statistic from its `/ExponentialMovingAverage` shadow (main.py lines
409-412, 492-494, utils.py `get_ema_vars`); the README uses the raw weights (decay 0) for every
released model except EfficientNet-L1-Enhanced.
"""

import re

from sat_tf.models import efficientnet as zoo
from sat_tf.pretrained import bundle

FAMILY = "efficientnet"
BUILD_OPTIONS = {"normalization": "symmetric", "bn_epsilon": 1e-5}
EMA = "/ExponentialMovingAverage"
_BN_NAMES = ("tpu_batch_normalization", "batch_normalization")
# Training state: RMSProp / momentum slots, the step counter.
_NOT_MODEL = re.compile(r"(/RMSProp(_1)?$|/Momentum$|^global_step$)")
_BN = ("gamma", "beta", "moving_mean", "moving_variance")


def matches(shapes):
    """Whether the variables are the tensorflow/tpu EfficientNet's (`efficientnet-*/` scopes)."""
    return any(name.startswith("efficientnet-") for name in shapes)


def has_moving_average(shapes):
    return any(name.endswith(EMA) for name in shapes)


def not_model(name, used):
    """Training state, or the weights not chosen (raw when the shadows are used, or vice versa)."""
    if _NOT_MODEL.search(name):
        return True
    base = name[: -len(EMA)] if name.endswith(EMA) else name + EMA
    return base in used


def _prefix(shapes):
    return sorted({n.split("/", 1)[0] for n in shapes if n.startswith("efficientnet-")})


def head(shapes):
    """The name of the classifier kernel, [features, classes]."""
    return f"{_prefix(shapes)[0]}/head/dense/kernel"


def infer(shapes):
    """(zoo arch, activation, num_classes): the variant from the name prefix (efficientnet-b3)."""
    prefixes = _prefix(shapes)
    if len(prefixes) != 1:
        raise ValueError(f"expected one efficientnet-* scope, found {prefixes}")
    arch = prefixes[0].replace("-bL1", "-l1").replace("-", "_")
    if arch not in zoo.CONFIGS:
        raise ValueError(f"{prefixes[0]} is not in the zoo ({', '.join(zoo.CONFIGS)})")
    dense = shapes.get(head(shapes))
    if dense is None:
        raise ValueError(f"{head(shapes)} is missing")
    if len(dense) != 2 or 0 in dense:
        raise ValueError(
            f"{head(shapes)} {list(dense)} is not a [features, classes] kernel; {bundle.DAMAGED}"
        )
    return arch, "silu", dense[1]  # the official relu_fn default: tf.nn.swish


def _bn_name(index):
    return "tpu_batch_normalization" + (f"_{index}" if index else "")


def _scope(layer_name, expands):
    """(official scope, kind) of a zoo layer, where kind is conv, bn or dense."""
    if layer_name in ("stem_conv", "head_conv"):
        return f"{layer_name[:4]}/conv2d", "conv"
    if layer_name in ("stem_bn", "head_bn"):
        return f"{layer_name[:4]}/{_bn_name(0)}", "bn"
    if layer_name == "logits":
        return "head/dense", "dense"
    found = re.match(r"^block(\d+)_(.+)$", layer_name)
    if not found:
        return None, None
    index, role = int(found.group(1)) - 1, found.group(2)
    scope = f"blocks_{index}"
    shift = 1 if expands[index] else 0
    table = {
        "expand_conv": ("conv2d", "conv"),
        "expand_bn": (_bn_name(0), "bn"),
        "dwconv": ("depthwise_conv2d", "conv"),
        "dw_bn": (_bn_name(shift), "bn"),
        "se_reduce": ("se/conv2d", "conv"),
        "se_expand": ("se/conv2d_1", "conv"),
        "project_conv": ("conv2d_1" if shift else "conv2d", "conv"),
        "project_bn": (_bn_name(1 + shift), "bn"),
    }
    if role not in table:
        return None, None
    name, kind = table[role]
    return f"{scope}/{name}", kind


def assignments(model, *, moving_average=False):
    """Yields (model variable, checkpoint name, transform) for every weight of `model`.

    `transform` is "squeeze" for BatchNorm vectors (tf-keras 2.x writes them as [1, 1, 1, 1, C]
    where TF1 wrote [C]); conv, depthwise (both [k, k, in, out]) and dense kernels are copied.
    """
    prefix = model.name.replace("efficientnet_l1", "efficientnet-bL1").replace("_", "-")
    blocks = sorted(
        {int(m.group(1)) for m in (re.match(r"^block(\d+)_", x.name) for x in model.layers) if m}
    )
    names = {layer.name for layer in model.layers}
    expands = [f"block{b}_expand_conv" in names for b in blocks]
    suffix = EMA if moving_average else ""
    for layer in model.layers:
        if not layer.weights:
            continue
        scope, kind = _scope(layer.name, expands)
        for variable in layer.weights:
            if scope is None:
                yield variable, None, None
                continue
            leaf = variable.name
            if kind == "conv" and "depthwise" in scope:
                leaf = "depthwise_kernel"
            elif kind == "bn" and leaf not in _BN:
                yield variable, None, None
                continue
            transform = "squeeze" if kind == "bn" else None
            yield variable, f"{prefix}/{scope}/{leaf}{suffix}", transform
