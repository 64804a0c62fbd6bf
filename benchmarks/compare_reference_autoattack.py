"""Standard AutoAttack: ours against the reference code (fra31/auto-attack), same model and images.

The reference is PyPI's `pyautoattack` 0.2.0, which packages fra31/auto-attack (PyTorch). It runs
on a PyTorch twin of our Keras CNN (`small_cnn`: same layers, weights copied, logits checked equal
within 1e-4 before anything runs); ours runs `sat_tf.autoattack.auto_attack(version="standard")` on
the Keras model. Both get the same CIFAR-10 test images (the first `--per-class` JPEGs of every
class of `../shared/data/cifar10-jpeg.tar.gz`, interleaved by class), L-inf, epsilon 8/255.

Runs in chunks of `--chunk` images and writes every finished chunk to `--out` (JSON), so an
interrupted run resumes where it stopped: rerun the same command. Needs the bench extras:

    pip install -r requirements-bench.txt   # torch (CPU build) and pyautoattack
    python benchmarks/compare_reference_autoattack.py --model=runs/cifar_relu_eps8/model.keras \
        --out=benchmarks/reference_autoattack.json --per-class=100
    python benchmarks/compare_reference_autoattack.py --out=benchmarks/reference_autoattack.json \
        --report   # prints the Markdown table

`--side=reference` / `--side=ours` runs one side only (to run the two in parallel, one thread each).
"""

import argparse
import fcntl
import json
import logging
import os
import re
import sys
import tarfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")


def cifar10_test_images(per_class, cache_dir, archive):
    """The first `per_class` test JPEGs of each class, interleaved: ([N, 32, 32, 3] uint8, [N])."""
    import tensorflow as tf

    root = os.path.join(cache_dir, "cifar10-jpeg", "test")
    if not os.path.isdir(root):
        with tarfile.open(archive) as tar:
            tar.extractall(cache_dir, filter="data")
    classes = sorted(os.listdir(root))
    images, labels = [], []
    for index in range(per_class):
        for label, name in enumerate(classes):
            path = os.path.join(root, name, f"{index:04d}.jpg")
            images.append(tf.io.decode_jpeg(tf.io.read_file(path), channels=3).numpy())
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.int64)


def torch_twin(keras_model):
    """A PyTorch copy of a `small_cnn` (ReLU) taking NCHW [0, 1] images; weights copied."""
    import torch
    from torch import nn

    layers, channels = [], 3
    for i in (1, 2, 3):
        conv = keras_model.get_layer(f"conv{i}")
        bn = keras_model.get_layer(f"bn{i}")
        kernel = conv.get_weights()[0]  # [kh, kw, in, out]
        torch_conv = nn.Conv2d(
            channels, kernel.shape[3], 3, stride=conv.strides[0], padding=1, bias=False
        )
        torch_conv.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        torch_bn = nn.BatchNorm2d(kernel.shape[3], eps=bn.epsilon)
        gamma, beta, mean, var = bn.get_weights()
        for name, value in zip(
            ("weight", "bias", "running_mean", "running_var"), (gamma, beta, mean, var), strict=True
        ):
            getattr(torch_bn, name).data = torch.from_numpy(value.copy())
        layers += [torch_conv, torch_bn, nn.ReLU()]
        channels = kernel.shape[3]
    kernel, bias = keras_model.layers[-1].get_weights()
    dense = nn.Linear(kernel.shape[0], kernel.shape[1])
    dense.weight.data = torch.from_numpy(kernel.T.copy())
    dense.bias.data = torch.from_numpy(bias.copy())

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.dense = dense

        def forward(self, x):  # [0, 1] -> [-1, 1], as small_cnn's Rescaling does to [0, 255].
            h = self.features(x * 2.0 - 1.0)
            return self.dense(h.mean(dim=(2, 3)))

    return Twin().eval()


class _StageLog(logging.Handler):
    """Collects pyautoattack's 'robust accuracy after APGD-CE: 41.20% ...' lines."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.after = {}

    def emit(self, record):
        found = re.match(r"robust accuracy after (\S+): ([\d.]+)%", record.getMessage())
        if found:
            self.after[found.group(1).lower()] = float(found.group(2)) / 100.0


def run_reference(twin, x, y, epsilon, attacks=None):
    import torch
    from pyautoattack import AutoAttack

    log = _StageLog()
    logger = logging.getLogger("auto-attack")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(log)
    try:
        if attacks is None:
            adversary = AutoAttack(twin, eps=epsilon / 255.0, version="standard", seed=0)
        else:  # "custom" keeps the constructor's 5 APGD restarts; standard uses 1.
            adversary = AutoAttack(
                twin, eps=epsilon / 255.0, version="custom", attacks=list(attacks), seed=0
            )
            adversary.apgd.n_restarts = 1
        images = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0).contiguous()
        labels = torch.from_numpy(y)
        x_adv, _ = adversary.run_standard_evaluation(images, labels, batch_size=len(y))
        with torch.no_grad():
            robust = (twin(x_adv).argmax(1) == labels).numpy()
            clean = (twin(images).argmax(1) == labels).numpy()
    finally:
        logger.removeHandler(log)
    counts = {"clean": int(clean.sum())}
    last = counts["clean"]
    for stage in (
        attacks or STAGES
    ):  # Stages skipped once nothing is left robust keep the last count.
        last = counts[stage] = int(round(log.after[stage] * len(y))) if stage in log.after else last
    return robust, counts


def run_ours(model, x, y, epsilon, attacks=None):
    from sat_tf import autoattack

    result = autoattack.auto_attack(
        model,
        x.astype(np.float32),
        y,
        epsilon=epsilon,
        version="standard",
        attacks=attacks,
        batch_size=len(y),
    )
    counts = {name: int(round(value * len(y))) for name, value in result.stages.items()}
    return result.robust, counts


def _load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"chunks": {}}


def _save(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def report(data):
    """Markdown table: robust accuracy and per-stage robust counts, both sides, and run times."""
    stages = tuple(data.get("attacks") or STAGES)
    rows, agree = [], None
    totals = {}
    for side in ("reference", "ours"):
        chunks = [c[side] for c in data["chunks"].values() if side in c]
        if not chunks:
            continue
        n = sum(len(c["robust"]) for c in chunks)
        counts = {s: sum(c["counts"][s] for c in chunks) for s in ("clean",) + stages}
        seconds = sum(c["seconds"] for c in chunks)
        totals[side] = np.concatenate([c["robust"] for c in chunks])
        rows.append(
            f"| {side} | {n} | {100 * counts['clean'] / n:.1f} | {100 * totals[side].mean():.1f} | "
            + " | ".join(str(counts[s]) for s in stages)
            + f" | {seconds / 60:.1f} |"
        )
    both = [k for k, c in data["chunks"].items() if "reference" in c and "ours" in c]
    if both:
        ref = np.concatenate([data["chunks"][k]["reference"]["robust"] for k in both])
        ours = np.concatenate([data["chunks"][k]["ours"]["robust"] for k in both])
        agree = (
            f"On the {len(ref)} images both sides finished: robust {100 * ref.mean():.1f}% "
            f"(reference) vs {100 * ours.mean():.1f}% (ours), difference "
            f"{100 * (ours.mean() - ref.mean()):+.1f} points; the verdicts agree on "
            f"{int((ref == ours).sum())} of {len(ref)} images (robust for one side only: "
            f"{int((ref & ~ours).sum())} reference-only, {int((ours & ~ref).sum())} ours-only)."
        )
    names = " | ".join(f"robust after {s.upper()}" for s in stages)
    header = (
        f"| code | images | clean (%) | robust (%) | {names} | run time (min) |\n"
        + "|---" * (5 + len(stages))
        + "|"
    )
    return "\n".join([header] + rows) + ("\n\n" + agree if agree else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Keras small_cnn (ReLU) .keras file")
    parser.add_argument("--out", required=True, help="JSON results file (resumed if present)")
    parser.add_argument("--per-class", type=int, default=100, help="test images per class")
    parser.add_argument("--chunk", type=int, default=250, help="images per resumable chunk")
    parser.add_argument("--epsilon", type=float, default=8.0, help="L-inf radius in pixels")
    parser.add_argument("--side", choices=("both", "reference", "ours"), default="both")
    parser.add_argument(
        "--attacks", default="", help="comma-separated stages (e.g. fab-t); default: standard"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for each framework")
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    parser.add_argument("--cache-dir", default="/tmp/sat_tf_cache")
    parser.add_argument("--report", action="store_true", help="print the table and exit")
    args = parser.parse_args(argv)
    attacks = tuple(args.attacks.split(",")) if args.attacks else None
    data = _load(args.out)
    if args.report:
        print(report(data))
        return
    import keras
    import tensorflow as tf
    import torch

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    torch.set_num_threads(args.threads)
    model = keras.saving.load_model(args.model)
    twin = torch_twin(model)
    x, y = cifar10_test_images(args.per_class, args.cache_dir, args.data)
    with torch.no_grad():
        theirs = twin(torch.from_numpy(x[:256].transpose(0, 3, 1, 2) / 255.0).float()).numpy()
    gap = float(np.abs(theirs - model(x[:256].astype(np.float32), training=False).numpy()).max())
    if gap > 1e-4:
        sys.exit(f"The PyTorch twin's logits differ from the Keras model's by {gap:.2e} (> 1e-4).")
    data.update(model=args.model, epsilon=args.epsilon, twin_max_logit_gap=gap, attacks=attacks)
    sides = ("reference", "ours") if args.side == "both" else (args.side,)
    for start in range(0, len(y), args.chunk):
        key = str(start)
        rows = slice(start, start + args.chunk)
        for side in sides:
            if side in _load(args.out)["chunks"].get(key, {}):
                continue
            began = time.time()
            if side == "reference":
                robust, counts = run_reference(twin, x[rows], y[rows], args.epsilon, attacks)
            else:
                robust, counts = run_ours(model, x[rows], y[rows], args.epsilon, attacks)
            with open(args.out + ".lock", "w") as lock:  # The other side may write too.
                fcntl.flock(lock, fcntl.LOCK_EX)
                data = _load(args.out)
                data.update(
                    model=args.model, epsilon=args.epsilon, twin_max_logit_gap=gap, attacks=attacks
                )
                data["chunks"].setdefault(key, {})[side] = dict(
                    robust=[bool(r) for r in robust], counts=counts, seconds=time.time() - began
                )
                _save(args.out, data)
            print(f"{side} images {start}-{start + len(robust)}: {counts}", flush=True)
    print(report(_load(args.out)))


if __name__ == "__main__":
    main()
