"""Writes tests/data/backends/reference.npz: what the TensorFlow backend computes on one trained
model, for tests/test_backends.py to check every other backend against.

The model is cifar_relu.keras here, a copy of results/reference_autoattack/model.keras
(small_cnn, ReLU, PGD-trained by sat_tf on CIFAR-10 at epsilon 8; its training command is in that
folder's README). The images are the first
`--per_class` CIFAR-10 test JPEGs of each class of ../shared/data/cifar10-jpeg.tar.gz, interleaved
by class and decoded with Pillow (the test decodes them the same way, so no pixel is stored here).
Run it under the TensorFlow backend from the repository root:

    KERAS_BACKEND=tensorflow python tests/data/backends/make_reference.py

Recorded: logits; the per-example cross-entropy and its input gradient; PGD-10 (epsilon 8, step 2,
seed 0, keyed random start); and the adversarial images of APGD-CE, APGD-T, FAB-T and Square with
small budgets (seed 0), with the per-example verdicts they give.
"""

import argparse
import os
import pathlib
import sys
import tarfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from tests.data.backends.budgets import ATTACKS, EPSILON, PGD, cifar_images  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache_dir", default="/tmp/sat_tf_cache")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("reference.npz")))
    args = parser.parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        raise SystemExit("Run under KERAS_BACKEND=tensorflow: this records TensorFlow's numbers.")
    from sat_tf import attacks, autoattack

    archive = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    root = pathlib.Path(args.cache_dir) / "cifar10-jpeg" / "test"
    if not root.is_dir():
        with tarfile.open(archive) as tar:
            tar.extractall(args.cache_dir, filter="data")
    images, labels = cifar_images(root)
    model = keras.saving.load_model(pathlib.Path(__file__).with_name("cifar_relu.keras"))
    x = keras.ops.convert_to_tensor(images)
    out = {"labels": labels, "logits": keras.ops.convert_to_numpy(model(x, training=False))}
    losses, gradient = attacks.input_gradient(model, x, labels)
    out["losses"], out["gradient"] = map(keras.ops.convert_to_numpy, (losses, gradient))
    out["pgd"] = keras.ops.convert_to_numpy(attacks.pgd(model, x, labels, seed=0, **PGD))
    functions = {
        "apgd-ce": autoattack.apgd,
        "apgd-t": autoattack.apgd,
        "fab-t": autoattack.fab_targeted,
        "square": autoattack.square,
    }
    for name, kwargs in ATTACKS.items():
        adv = keras.ops.convert_to_numpy(
            functions[name](model, x, labels, epsilon=EPSILON, **kwargs)
        )
        predicted = np.argmax(keras.ops.convert_to_numpy(model(adv, training=False)), -1)
        out[name] = adv
        out[f"{name}_robust"] = predicted == labels
        print(f"{name}: robust {out[f'{name}_robust'].mean():.3f}")
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
