"""Wall time of one `sat_tf.evaluation.evaluate` call on real images, to compare two checkouts.

Loads a .keras classifier and the first --per-class images of each class folder of
--images (e.g. the CIFAR-10 JPEG copy's test split), then times `evaluate` --repeats times in
this process (the first call includes tracing). To compare with another commit, run the same
command with that checkout first on the path:

    python benchmarks/bench_evaluation.py --model=runs/study_silu/model.keras \
        --images=/tmp/sat_tf_cache/cifar10-jpeg/test
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_evaluation.py ...  # same flags

Prints one JSON line: the sat_tf file used, seconds per call, the machine, its load average at
the end, and the accuracy of each row.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import sat_tf  # noqa: E402
from sat_tf import evaluation  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a .keras classifier taking pixels")
    parser.add_argument("--images", required=True, help="a folder of <class>/<image> files")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--attacks", default="clean,pgd-10,autoattack-fast")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model = keras.saving.load_model(args.model)
    classes = sorted(p for p in Path(args.images).iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted(c.iterdir())[: args.per_class]]
    images = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) for f, _ in files])
    labels = np.array([i for _, i in files], np.int32)
    seconds, rows = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        results = evaluation.evaluate(
            model,
            (images, labels),
            attacks=args.attacks.split(","),
            epsilons=[args.epsilon],
            batch_size=args.batch_size,
            checks=False,
            verbose=0,
        )
        seconds.append(round(time.perf_counter() - start, 1))
        rows = {row.attack: row.accuracy for row in results.rows}
    report = {"sat_tf": sat_tf.__file__, "examples": len(labels), "seconds": seconds}
    report |= {
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        "load_average": [round(v, 1) for v in os.getloadavg()],
        "versions": f"Python {platform.python_version()}, Keras {keras.__version__}",
    }
    print(json.dumps(report | {"accuracy": rows}))


if __name__ == "__main__":
    main()
