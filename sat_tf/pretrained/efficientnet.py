"""The official SAT EfficientNet checkpoints (tensorflow/tpu code): recognised, not yet mapped."""

FAMILY = "efficientnet"
BUILD_OPTIONS = {}


def matches(shapes):
    """Whether the variables are the tensorflow/tpu EfficientNet's (`efficientnet-*/` scopes)."""
    return any(name.startswith("efficientnet-") for name in shapes)


def has_moving_average(shapes):
    return any(name.endswith("/ExponentialMovingAverage") for name in shapes)


def not_model(name, used):
    del name, used
    return False


def infer(shapes):
    del shapes
    raise ValueError(
        "an EfficientNet checkpoint: its import is not implemented yet (ResNet/ResNeXt only)"
    )


def assignments(model, *, moving_average=False):
    del model, moving_average
    return iter(())
