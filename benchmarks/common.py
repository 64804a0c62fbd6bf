"""Shared benchmark helpers: interleaved timing, compiled train steps, machine info, Markdown.

The machines these run on are shared and noisy, so every figure is a ratio of two things
measured side by side: the candidates run in turn (A B A B ...) after an untimed warm-up,
so drifting background load hits all of them alike, and each ratio is the median of the
per-round ratios. Wall time and this process's CPU time (all its threads) are both kept:
other jobs inflate wall time but not our CPU time, so a CPU ratio that agrees with the wall
ratio says the load did not bias it.
"""

import datetime
import json
import os
import platform
import re
import subprocess
import time
from importlib import metadata

import keras
import numpy as np
import tensorflow as tf

from sat_tf import _keras_compat as compat
from sat_tf import models
from sat_tf.adversarial import AdversarialModel

NUM_CLASSES = 10
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# The goals, one per ratio; every table's "goal" column and verdict reads them from here.
# Adversarial (PGD-1) train step / clean train step, same model and batch: at most. Sections 1
# and 2, the GPU rows of section 5, `bench_overhead.py --fit`.
GOAL_PGD1_OVER_CLEAN = 1.6
# PGD-1 train step with a smooth activation / the same step with ReLU: at most. Section 2, and
# SiLU in `bench_overhead.py --fit`.
GOAL_SMOOTH_OVER_RELU = 1.05
# One activation layer alone, forward + backward, / ReLU's: at most. Section 2's layer profile.
GOAL_LAYER_OVER_RELU = 2.0
# PGD-1 step through the custom loop `sat_tf.distribute.train` / through `fit`: at most.
# `bench_overhead.py --fit`.
GOAL_LOOP_OVER_FIT = 1.05
# ART's PGD-1 adversarial training time / ours, same model, data and attack: at least. Section 3.
GOAL_TRAINING_SPEEDUP = 5.0
# ART's attack time / ours (PGD-10, APGD-CE-100), same model and images: at least. Section 3.
GOAL_ATTACK_SPEEDUP = 6.0
# Input pipeline images/s / ResNet-50 PGD-1 step images/s: at least. Section 4.
GOAL_PIPELINE_OVER_STEP = 2.0


def clock():
    """(wall, process CPU) seconds, both monotonic."""
    return time.perf_counter(), time.process_time()


def elapsed(start, divisor=1):
    """[wall, CPU] seconds since `start` (a `clock()`), divided by `divisor`."""
    return [(e - s) / divisor for e, s in zip(clock(), start, strict=True)]


def interleave(candidates, *, repeats, warmup=1, calls=1):
    """Times each zero-argument callable in turn (A B A B ...), round after round.

    Args:
        candidates: {name: callable}; each call must finish its work before returning
            (e.g. end with `.numpy()`), so that the clock sees it.
        repeats: Timed rounds.
        warmup: Untimed rounds first (tracing, allocator and cache warm-up).
        calls: Calls per timing, whose mean is one sample.

    Returns:
        {name: array (repeats, 2)} of (wall, CPU) seconds per call.
    """
    samples = {name: [] for name in candidates}
    names = list(candidates)
    for round_index in range(warmup + repeats):
        # Rotate the order each round, so that no candidate always follows the same one.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            for _ in range(calls):
                candidates[name]()
            seconds = elapsed(start, calls)
            if round_index >= warmup:
                samples[name].append(seconds)
    return {name: np.array(values) for name, values in samples.items()}


def ratio(top, bottom):
    """(wall, CPU) medians of the per-round ratios top / bottom."""
    return tuple(float(np.median(top[:, i] / bottom[:, i])) for i in (0, 1))


def span(values, digits=2, unit=""):
    """'lo-hi' of `values` printed with `digits` decimals; one value where both ends print alike."""
    lo, hi = (f"{v:.{digits}f}{unit}" for v in (min(values), max(values)))
    return lo if lo == hi else f"{lo}-{hi}"


def spread(top, bottom):
    """'lo-hi' of the per-round wall ratios top / bottom: how much the load moved them."""
    return span(top[:, 0] / bottom[:, 0])


def median_ms(samples):
    """(wall, CPU) median milliseconds per call."""
    return tuple(1e3 * float(np.median(samples[:, i])) for i in (0, 1))


def linear_fit(x, y):
    """Least-squares line y = slope * x + intercept; returns (slope, intercept, R^2)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    r2 = 1.0 - residual @ residual / max(((y - y.mean()) ** 2).sum(), 1e-30)
    return float(slope), float(intercept), float(r2)


def synthetic_data(n, image_size, seed=0, *, separable=False):
    """`n` float32 [0, 255] images and int32 labels (NumPy), the benchmarks' one data source.

    Uniform noise with random labels for timing; with `separable`, 10 classes that can be learnt
    (a fixed random prototype image per class plus Gaussian noise), where accuracy matters.
    """
    shape = (n, image_size, image_size, 3)
    if separable:
        protos = np.random.default_rng(123).uniform(40, 215, (NUM_CLASSES, *shape[1:]))
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, NUM_CLASSES, n)
        images = np.clip(protos[labels] + rng.normal(0, 40, shape), 0, 255)
        return images.astype(np.float32), labels.astype(np.int32)
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, shape).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, n).astype("int32")
    return images, labels


def random_batch(batch_size, image_size, seed=0):
    """A fixed batch of `synthetic_data` as tensors."""
    images, labels = synthetic_data(batch_size, image_size, seed)
    return tf.constant(images), tf.constant(labels)


def repeating_dataset_fn(images, labels, global_batch_size):
    """`dataset_fn(input_context)` repeating one batch, for `distribute_datasets_from_function`."""

    def dataset_fn(context):
        per_replica = context.get_per_replica_batch_size(global_batch_size)
        dataset = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
        return dataset.batch(per_replica, drop_remainder=True).prefetch(2)

    return dataset_fn


def build_model(name, *, image_size, activation="relu", num_steps=0, **attack):
    """A compiled classifier (`num_steps=0`) or `AdversarialModel` with PGD-`num_steps`.

    The attack defaults to the paper's training attack, epsilon = step = 4 pixels, random
    start, 20% of examples starting from the clean image (official SAT code).
    """
    keras.utils.set_random_seed(0)
    model = models.build(
        name,
        num_classes=NUM_CLASSES,
        activation=activation,
        input_shape=(image_size, image_size, 3),
    )
    if num_steps:
        attack = {"epsilon": 4.0, "step_size": 4.0, **attack}
        model = AdversarialModel(model, num_steps=num_steps, **attack)
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def compiled_step(model, images, labels):
    """A zero-argument callable running `model.train_step` once, compiled as `fit` does.

    The model's optimizer and metric variables are built first from the batch's spec (as `fit`
    does), so the `tf.function` creates none.
    """
    spec = (tf.TensorSpec.from_tensor(images), tf.TensorSpec.from_tensor(labels))
    compat.symbolic_build(model, spec)
    step = tf.function(lambda x, y: model.train_step((x, y))["loss"])
    return lambda: step(images, labels).numpy()


def step_callable(name, *, image_size, batch_size, **kwargs):
    """`compiled_step` of a fresh `build_model(...)` on a fixed random batch."""
    model = build_model(name, image_size=image_size, **kwargs)
    return compiled_step(model, *random_batch(batch_size, image_size))


class StepCache:
    """`step_callable`s by configuration, so that sections share traced steps."""

    def __init__(self):
        self._steps = {}

    def step(self, name, image_size, batch_size, **kwargs):
        key = (name, image_size, batch_size, tuple(sorted(kwargs.items())))
        if key not in self._steps:
            self._steps[key] = step_callable(
                name, image_size=image_size, batch_size=batch_size, **kwargs
            )
        return self._steps[key]


def package_version(package):
    """The installed version of `package`, or 'absent'."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.*)", f.read())
        return found.group(1).strip() if found else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def _git_commit():
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info():
    """What a reader needs to place the numbers: machine, load, versions, date."""
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} logical CPUs",
        "gpu": ", ".join(
            tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus
        )
        or "none",
        "load": " / ".join(f"{v:.1f}" for v in os.getloadavg()),
        "versions": (
            f"Python {platform.python_version()}, TensorFlow {tf.__version__}, "
            f"Keras {keras.__version__}, NumPy {np.__version__}, "
            f"ART {package_version('adversarial-robustness-toolbox')}, "
            f"CleverHans {package_version('cleverhans')}"
        ),
        "commit": _git_commit(),
    }


def machine_line():
    """One line of `machine_info`, for scripts that print their own tables."""
    info = machine_info()
    return f"{info['cpu']}; GPU {info['gpu']}; load {info['load']}; {info['versions']}"


def table(header, rows):
    """A Markdown table from a header tuple and rows of cells (str() of each)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(values, goal, *, at_most=True, digits=2, names=("wall", "CPU")):
    """'met' / '**MISSED**': each of `values` (named by `names`) against `goal`.

    Each value is judged as printed, rounded to `digits` decimals, so that a verdict never
    contradicts the number beside it. Where the values disagree, says which met the goal.
    """
    met = [(round(v, digits) <= goal) if at_most else (round(v, digits) >= goal) for v in values]
    if all(met):
        return "met"
    if not any(met):
        return "**MISSED**"
    hit = " and ".join(n for n, m in zip(names, met, strict=True) if m)
    miss = " and ".join(n for n, m in zip(names, met, strict=True) if not m)
    return f"met by {hit}, **missed by {miss}**"


def goal_cell(goal, values, *, at_most=True, digits=2, unit="", names=("wall", "CPU")):
    """A table's goal column: '<= 1.6: met' (or '>= 6x: **MISSED**'), judged by `verdict`."""
    judged = verdict(values, goal, at_most=at_most, digits=digits, names=names)
    return f"{'<=' if at_most else '>='} {goal:g}{unit}: {judged}"


def rewrite_between_markers(path, body):
    """Replaces the text between BEGIN and END in `path` (appends both if absent)."""
    with open(path) as f:
        text = f.read()
    block = f"{BEGIN}\n{body.strip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def dump_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)
