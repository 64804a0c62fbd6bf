"""The study's test images: the CIFAR-10 copy extracted once, the split cached in a fixed order."""

import hashlib
import sys
import tarfile
from pathlib import Path

import numpy as np

from sat_tf.atomic import atomic_path
from study import paths
from study.protocol import CIFAR10


def ensure_data(config):
    """Extracts the CIFAR-10 JPEG copy into the cache once, if the config's folder is missing."""
    folder = Path(config.dataset.removeprefix("folder:"))
    if folder.is_dir() or not config.dataset.startswith("folder:"):
        return folder
    if not paths.TARBALL.exists():
        sys.exit(f"error: {folder} is missing and {paths.TARBALL} is not there to extract it from.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(paths.TARBALL) as archive:
        archive.extractall(folder.parent, filter="data")
    return folder


def eval_arrays(config, arm=CIFAR10):
    """(images, labels) of the whole test split in the protocol's order; cached as .npz.

    The order does not depend on how the loader reads the folder: the images are sorted by
    (label, SHA-1 of their pixels), then permuted with `subset_seed`. Its first
    `subset_examples` are the subset.
    """
    protocol = arm.protocol
    cache = paths.CACHE / f"{arm.name}-test-p{protocol['version']}.npz"
    if not cache.exists():
        from sat_tf import data, evaluation

        split = data.load(
            config.dataset,
            split=config.resolved_eval_split,
            global_batch_size=500,
            image_size=config.image_size,
            num_classes=config.num_classes,
            augmentation=None,
        )
        images, labels = evaluation.collect(split.dataset)
        images = images.astype(np.uint8)
        digests = [hashlib.sha1(image.tobytes()).hexdigest() for image in images]
        canonical = np.lexsort((np.asarray(digests), labels))
        order = canonical[np.random.default_rng(protocol["subset_seed"]).permutation(len(labels))]
        with atomic_path(cache) as partial, open(partial, "wb") as f:
            np.savez(f, images=images[order], labels=labels[order])
    arrays = np.load(cache)
    return arrays["images"].astype(np.float32), arrays["labels"].astype(np.int32)
