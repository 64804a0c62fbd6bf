"""The images and attack budgets shared by make_reference.py and tests/test_backends.py."""

import pathlib

import numpy as np

PER_CLASS = 4  # 40 images: seconds per attack on a CPU under either backend
EPSILON = 8.0  # pixels (8/255), the model's training radius
PGD = {"epsilon": EPSILON, "step_size": 2.0, "num_steps": 10}
ATTACKS = {
    "apgd-ce": {"num_steps": 10, "loss": "ce", "seed": 0},
    "apgd-t": {"num_steps": 10, "loss": "dlr", "targeted": True, "target_classes": 3, "seed": 0},
    "fab-t": {"num_steps": 10, "target_classes": 3},
    "square": {"num_queries": 100, "seed": 0},
}


def cifar_images(test_root, per_class=PER_CLASS):
    """The first `per_class` test JPEGs of each class, interleaved by class, decoded by Pillow:
    (float32 [N, 32, 32, 3] in [0, 255], int32 [N])."""
    from PIL import Image

    classes = sorted(p.name for p in pathlib.Path(test_root).iterdir())
    images, labels = [], []
    for index in range(per_class):
        for label, name in enumerate(classes):
            with Image.open(pathlib.Path(test_root, name, f"{index:04d}.jpg")) as image:
                images.append(np.asarray(image.convert("RGB"), np.float32))
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.int32)
