"""Per-example verdicts of each attack under one Keras backend, and where two backends differ.

The attacks of tests/test_backends.py (PGD-10 and APGD-CE, APGD-T, FAB-T, Square with the small
budgets of tests/data/backends/budgets.py, seed 0, epsilon 8/255) on the first `--per_class`
CIFAR-10 test JPEGs of each class (decoded by Pillow), against the trained small_cnn
tests/data/backends/cifar_relu.keras. Run it once per backend, then compare:

    KERAS_BACKEND=tensorflow python benchmarks/compare_backends.py --per_class=50 --out=/tmp/tf.npz
    KERAS_BACKEND=jax python benchmarks/compare_backends.py --per_class=50 --out=/tmp/jax.npz
    python benchmarks/compare_backends.py --report /tmp/tf.npz /tmp/jax.npz

The report gives, per attack, the robust accuracy under each backend, how many verdicts differ and
the largest difference between the adversarial images.
"""

import argparse
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def record(per_class, out, cache_dir):
    import keras

    from sat_tf import attacks, autoattack
    from tests.data.backends.budgets import ATTACKS, EPSILON, PGD, cifar_images

    images, labels = cifar_images(pathlib.Path(cache_dir) / "cifar10-jpeg" / "test", per_class)
    model = keras.saving.load_model(ROOT / "tests" / "data" / "backends" / "cifar_relu.keras")
    functions = {
        "pgd-10": lambda m, x, y, epsilon, **kw: attacks.pgd(m, x, y, seed=0, **PGD),
        "apgd-ce": autoattack.apgd,
        "apgd-t": autoattack.apgd,
        "fab-t": autoattack.fab_targeted,
        "square": autoattack.square,
    }
    budgets = {"pgd-10": {}, **ATTACKS}
    result = {"labels": labels, "backend": keras.backend.backend()}
    for name, kwargs in budgets.items():
        start = time.perf_counter()
        adv = np.concatenate(
            [
                keras.ops.convert_to_numpy(
                    functions[name](
                        model, images[i : i + 100], labels[i : i + 100], epsilon=EPSILON, **kwargs
                    )
                )
                for i in range(0, len(images), 100)
            ]
        )
        predicted = np.argmax(keras.ops.convert_to_numpy(model.predict(adv, verbose=0)), -1)
        result[name], result[f"{name}_robust"] = adv, predicted == labels
        print(
            f"{name}: robust {result[f'{name}_robust'].mean():.3f} "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    np.savez_compressed(out, **result)


def report(first, second):
    a, b = np.load(first), np.load(second)
    print(
        f"| attack | {a['backend']} robust | {b['backend']} robust | verdicts that differ "
        "| largest image difference (pixels) |"
    )
    print("|---|---|---|---|---|")
    for name in ("pgd-10", "apgd-ce", "apgd-t", "fab-t", "square"):
        ra, rb = a[f"{name}_robust"], b[f"{name}_robust"]
        print(
            f"| {name} | {ra.mean():.1%} | {rb.mean():.1%} | {int((ra != rb).sum())} of "
            f"{len(ra)} | {np.abs(a[name] - b[name]).max():.2g} |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per_class", type=int, default=50)
    parser.add_argument("--out")
    parser.add_argument("--cache_dir", default="/tmp/sat_tf_cache")
    parser.add_argument("--report", nargs=2, metavar="NPZ")
    args = parser.parse_args(argv)
    if args.report:
        report(*args.report)
    else:
        record(args.per_class, args.out, args.cache_dir)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
