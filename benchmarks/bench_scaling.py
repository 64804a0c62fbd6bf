"""Sections 4-5 of `make bench`: input pipeline against the step, and how the step scales.

4. Images/s of the 224-px TFRecord training pipeline (`pipeline.py`'s Imagenette TFRecords)
   against the images/s the ResNet-50 PGD-1 step consumes; timed in the same rounds as the
   ResNet-50 steps of section 1 (`pipeline_candidate`).
5. PGD-1 step time against batch size, against replicas (MirroredStrategy over 1 and 2
   logical CPU devices; the 2-worker run is in `bench_workers.py`) and against image size.
   With a GPU: ResNet-50, 224 px, batch 128, mixed precision, images/s and PGD-1 / clean.

`run_all.py` calls these.
"""

import os

import common
import keras
import numpy as np
import tensorflow as tf

from sat_tf import distribute


def pipeline_candidate(args):
    """A callable pulling `pipeline_batches` training batches of 64; returns [wall, CPU] s.

    Batches buffered while a model step ran would come free, so each call first pulls
    `pipeline_skip` batches untimed. `timed_pulls` records the timed part of each call.
    """
    import pipeline

    from sat_tf import data

    records = pipeline.imagenette_tfrecords(args.cache_dir)
    dataset = data.build_dataset(
        os.path.join(records, "train-*"), training=True, global_batch_size=64, image_size=224
    )
    iterator = iter(dataset)

    def pull():
        for _ in range(args.pipeline_skip):
            next(iterator)
        start = common.clock()
        for _ in range(args.pipeline_batches):
            images, _ = next(iterator)
        images.numpy()
        return common.elapsed(start)

    return pull


def timed_pulls(pull, rounds):
    """Adapter for `common.interleave`: a callable whose own timing is recorded in `rounds`."""

    def call():
        rounds.append(pull())

    return call


def pipeline_text(args, samples, pulls):
    """Section 4 from the ResNet-50 rounds: pipeline images/s / PGD-1 images/s."""
    pulls = np.array(pulls[-len(samples["pgd1"]) :])  # Drop the warm-up round.
    images = 64 * args.pipeline_batches
    per_image = pulls / images
    step_per_image = samples["pgd1"] / args.large_batch_size
    wall, cpu = (float(np.median(step_per_image[:, i] / per_image[:, i])) for i in (0, 1))
    rate = images / float(np.median(pulls[:, 0]))
    consumed = args.large_batch_size / float(np.median(samples["pgd1"][:, 0]))
    row = (
        f"{rate:.0f}",
        f"{consumed:.2f}",
        f"**{wall:.0f}x**",
        f"{cpu:.0f}x",
        common.goal_cell(
            common.GOAL_PIPELINE_OVER_STEP, (wall, cpu), at_most=False, digits=0, unit="x"
        ),
    )
    header = (
        "pipeline images/s (224 px, batch 64)",
        f"ResNet-50 PGD-1 step images/s (batch {args.large_batch_size})",
        "ratio wall",
        "CPU",
        "goal",
    )
    return common.table(header, [row])


def batch_scaling(args, cache):
    size, sizes = args.small_image_size, args.scaling_batch_sizes
    candidates = {b: cache.step("resnet20", size, b, num_steps=1) for b in sizes}
    samples = common.interleave(candidates, repeats=args.repeats)
    base = sizes[0]
    rows = []
    for b in sizes:
        per_image = common.ratio(samples[b] / b, samples[base] / base)
        ms = common.median_ms(samples[b])[0]
        rows.append(
            (b, f"{ms:.0f}", f"{b / ms * 1e3:.0f}", f"{per_image[0]:.2f}", f"{per_image[1]:.2f}")
        )
    header = ("batch", "PGD-1 step ms", "images/s", f"time per image / batch {base} wall", "CPU")
    return samples, common.table(header, rows)


def image_scaling(args, cache):
    sizes, batch = args.scaling_image_sizes, args.scaling_image_batch
    candidates = {s: cache.step("resnet20", s, batch, num_steps=1) for s in sizes}
    samples = common.interleave(candidates, repeats=args.repeats)
    base = sizes[0]
    rows = []
    for s in sizes:
        pixels = (s / base) ** 2
        per_pixel = common.ratio(samples[s] / pixels, samples[base])
        rows.append(
            (
                f"{s} px",
                f"{common.median_ms(samples[s])[0]:.0f}",
                f"{pixels:.0f}x",
                f"{per_pixel[0]:.2f}",
                f"{per_pixel[1]:.2f}",
            )
        )
    slope, _, r2 = common.linear_fit(
        [s * s for s in sizes], [common.median_ms(samples[s])[0] for s in sizes]
    )
    header = (
        f"resnet20 PGD-1, batch {batch}",
        "step ms",
        "pixels",
        f"time per pixel / {base} px wall",
        "CPU",
    )
    text = common.table(header, rows)
    text += f"\n\nStep time against pixel count: linear fit R^2 = {r2:.3f}."
    return samples, text


def mirrored_step(devices, args):
    """A PGD-1 step of resnet20 under MirroredStrategy over `devices`, global batch fixed: the
    step of `sat_tf.distribute.train`."""
    strategy = tf.distribute.MirroredStrategy(devices)
    size, batch = args.small_image_size, args.small_batch_size
    images, labels = common.random_batch(batch, size)
    with strategy.scope():
        model = common.build_model("resnet20", image_size=size, num_steps=1)
    dataset_fn = common.repeating_dataset_fn(images, labels, batch)
    distribute.build_variables(model, strategy, dataset_fn)
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    step = distribute.make_step(model, strategy)
    return lambda: step(iterator)["loss"].numpy()


def replica_scaling(args):
    """MirroredStrategy over 1 vs 2 logical CPU devices (set up by run_all), same batch."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < 2:
        return None, "Fewer than 2 logical CPU devices: run through run_all.py."
    candidates = {1: mirrored_step(devices[:1], args), 2: mirrored_step(devices[:2], args)}
    samples = common.interleave(candidates, repeats=args.repeats)
    wall, cpu = common.ratio(samples[2], samples[1])
    row = (
        "MirroredStrategy, 2 logical CPU devices / 1",
        f"{common.median_ms(samples[1])[0]:.0f}",
        f"{common.median_ms(samples[2])[0]:.0f}",
        f"{wall:.2f}",
        f"{cpu:.2f}",
    )
    return samples, row


def gpu_rows(args):
    """ResNet-50, 224 px, mixed precision: images/s of clean and PGD-1 steps, and their ratio."""
    name, size, batch = args.gpu_model, args.gpu_image_size, args.gpu_batch_size
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        candidates = {
            "clean": common.step_callable(name, image_size=size, batch_size=batch),
            "pgd1": common.step_callable(name, image_size=size, batch_size=batch, num_steps=1),
        }
        samples = common.interleave(candidates, repeats=args.repeats, calls=5)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    wall, cpu = common.ratio(samples["pgd1"], samples["clean"])
    rate = {k: batch / common.median_ms(s)[0] * 1e3 for k, s in samples.items()}
    row = (
        common.machine_info()["gpu"],
        f"{rate['clean']:.0f}",
        f"{rate['pgd1']:.0f}",
        f"**{wall:.2f}**",
        f"{cpu:.2f}",
        common.goal_cell(common.GOAL_PGD1_OVER_CLEAN, (wall, cpu)),
    )
    header = (
        "GPU",
        f"{name} {size} px clean images/s (batch {batch}, mixed_float16)",
        "PGD-1 images/s",
        "PGD-1 / clean wall",
        "CPU",
        "goal",
    )
    return samples, common.table(header, [row])


def add_arguments(parser):
    parser.add_argument("--cache-dir", default="/tmp/sat_tf_cache", help="Imagenette TFRecords")
    parser.add_argument("--pipeline-batches", type=int, default=20, help="timed batches of 64")
    # Measured: after a 12 s pause the first ~8-10 batches come from buffers (tens of ms
    # each), then the steady state (~140 ms per batch on 2 loaded cores).
    parser.add_argument("--pipeline-skip", type=int, default=10, help="untimed batches first")
    parser.add_argument("--scaling-batch-sizes", type=int, nargs="+", default=(8, 16, 32, 64))
    parser.add_argument("--scaling-image-sizes", type=int, nargs="+", default=(32, 64, 128))
    parser.add_argument("--scaling-image-batch", type=int, default=8)
    parser.add_argument("--gpu-batch-size", type=int, default=128)
    parser.add_argument("--gpu-model", default="resnet50")
    parser.add_argument("--gpu-image-size", type=int, default=224)
