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


def cifar_test_root(shared_data, scratch):
    """The CIFAR-10 test JPEG folder: /tmp/sat_tf_cache's, or extracted from `shared_data`'s
    archive into `scratch` (a pytest temporary folder, one per worker); None without either."""
    root = pathlib.Path("/tmp/sat_tf_cache/cifar10-jpeg/test")
    if root.is_dir():
        return root
    archive = pathlib.Path(shared_data, "cifar10-jpeg.tar.gz")
    if not archive.is_file():
        return None
    import tarfile

    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/test/" in m.name]
        tar.extractall(scratch, members=members, filter="data")
    return pathlib.Path(scratch, "cifar10-jpeg", "test")


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
