"""A sat_tf classifier as the `torch.nn.Module` PyTorch's robustness tools attack.

fra31/auto-attack (PyPI `pyautoattack`), RobustBench's `benchmark` and torchattacks expect a
module taking NCHW float images in [0, 1] and returning logits. A sat_tf model takes NHWC pixels
in [0, 255]. Under `KERAS_BACKEND=torch` a Keras model is itself a `torch.nn.Module` whose
weights are torch tensors, so the wrapper only transposes and scales: the tools attack the very
same weights, with gradients through the same layers, and nothing is copied.

    import os; os.environ["KERAS_BACKEND"] = "torch"
    import keras, sat_tf
    from pyautoattack import AutoAttack

    model = keras.saving.load_model("runs/cifar/model.keras")
    module = sat_tf.torch_module(model)                    # NCHW [0, 1] -> logits
    adversary = AutoAttack(module, norm="Linf", eps=8 / 255, version="standard")
    x_adv = adversary.run_standard_evaluation(x_test, y_test, bs=256)  # torch tensors
"""

import torch

from sat_tf import backend


class TorchClassifier(torch.nn.Module):
    """`model` (NHWC pixels in [0, 255] -> logits) as a module of NCHW images in [0, 1].

    Runs the model in inference mode (`training=False`: BatchNorm's moving statistics, no
    dropout) whatever the module's train or eval mode, and returns float32 logits (also under a
    mixed precision policy).

    Attributes:
        model: The wrapped Keras model; its variables are this module's parameters.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        pixels = images.permute(0, 2, 3, 1) * 255.0
        return self.model(pixels, training=False).float()


def torch_module(model):
    """`model` wrapped as a `TorchClassifier` (NCHW [0, 1] in, logits out), in eval mode.

    Raises:
        RuntimeError: when Keras runs another backend than PyTorch (only there is a Keras model
            a `torch.nn.Module` with torch weights).
    """
    if backend.NAME != "torch":
        raise RuntimeError(
            "sat_tf.torch_module needs KERAS_BACKEND=torch (set before importing keras): only "
            f"there is a Keras model a torch.nn.Module; Keras runs {backend.NAME!r}. The .keras "
            "file loads the same under every backend."
        )
    return TorchClassifier(model).eval()
