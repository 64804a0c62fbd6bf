"""Images/s of the 224-px training input pipeline, on Imagenette TFRecords built in a cache dir.

Extracts ../shared/data/imagenette-224.tar (train: 2,000 JPEGs of 10 classes) once into
`--cache_dir`, converts it with tools/build_tfrecords.py (real ImageNet labels from the synsets
file), then times `sat_tf.data.build_dataset(training=True)`: Inception crop fused with JPEG
decoding, flip, resize to 224, shuffle, batch. The first `--warmup` batches are not timed.

  python benchmarks/pipeline.py --cache_dir=/tmp/sat_tf_cache
"""

import dataclasses
import importlib.util
import os
import pathlib
import platform
import tarfile
import time

from absl import app, flags

from sat_tf import data

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

flags.DEFINE_string(
    "cache_dir", "/tmp/sat_tf_cache", "Where the extracted images and TFRecords go."
)
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_integer("image_size", 224, "Output side in pixels.")
flags.DEFINE_integer("num_batches", 60, "Timed batches.")
flags.DEFINE_integer("warmup", 10, "Untimed batches first.")


@dataclasses.dataclass(frozen=True)
class Config:
    cache_dir: str
    batch_size: int = 64
    image_size: int = 224
    num_batches: int = 60
    warmup: int = 10


def imagenette_tfrecords(cache_dir):
    """Builds (once) the Imagenette train TFRecords; returns their folder."""
    images, records = os.path.join(cache_dir, "imagenette-224"), os.path.join(cache_dir, "tfr")
    if not os.path.isdir(images):
        with tarfile.open(SHARED / "imagenette-224.tar") as tar:
            tar.extractall(cache_dir, filter="data")
    spec = importlib.util.spec_from_file_location(
        "build_tfrecords", ROOT / "tools" / "build_tfrecords.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.build(
        tool.Config(
            output_dir=records,
            input_dir=images,
            split="train",
            labels_file=str(SHARED / "imagenet_synsets.txt"),
            num_shards=8,
            num_workers=os.cpu_count() or 1,
        )
    )
    return records


def measure(config):
    """Returns images/s over `num_batches` batches after `warmup`."""
    records = imagenette_tfrecords(config.cache_dir)
    dataset = data.build_dataset(
        os.path.join(records, "train-*"),
        training=True,
        global_batch_size=config.batch_size,
        image_size=config.image_size,
    )
    iterator = iter(dataset)
    for _ in range(config.warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(config.num_batches):
        images, _ = next(iterator)
    images.numpy()
    return config.num_batches * config.batch_size / (time.perf_counter() - start)


def main(argv):
    del argv
    f = flags.FLAGS
    config = Config(f.cache_dir, f.batch_size, f.image_size, f.num_batches, f.warmup)
    rate = measure(config)
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"{rate:.0f} images/s ({config.image_size} px training pipeline, batch "
        f"{config.batch_size}, {config.num_batches} timed after {config.warmup} untimed; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, load "
        f"average (1/5/15 min) {load})"
    )


if __name__ == "__main__":
    app.run(main)
