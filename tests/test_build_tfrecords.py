"""tools/build_tfrecords.py: record format, labels, re-encoding, atomic resume, real Imagenette."""

import importlib.util
import json
import os
import pathlib
import tarfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from sat_tf import data

TOOL = pathlib.Path(__file__).resolve().parents[1] / "tools" / "build_tfrecords.py"
_spec = importlib.util.spec_from_file_location("build_tfrecords", TOOL)
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

KEYS = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/class/synset": tf.io.FixedLenFeature([], tf.string),
    "image/filename": tf.io.FixedLenFeature([], tf.string),
}


def save(path, mode, fmt):
    array = np.random.default_rng(len(str(path))).integers(0, 256, (20, 28, 3), np.uint8)
    image = Image.fromarray(array).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)


@pytest.fixture
def folder(tmp_path):
    """train/<class>/: RGB JPEG, CMYK JPEG, greyscale JPEG, PNG (named .JPEG, as in ImageNet)."""
    root = tmp_path / "in"
    for name in ["dog", "cat", "zebra"]:
        save(root / "train" / name / "a.jpg", "RGB", "JPEG")
        save(root / "train" / name / "b.JPEG", "CMYK", "JPEG")
        save(root / "train" / name / "c.jpeg", "L", "JPEG")
        save(root / "train" / name / "d.JPEG", "RGBA", "PNG")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def read_records(output_dir, split="train"):
    files = sorted(tf.io.gfile.glob(os.path.join(output_dir, f"{split}-*")))
    return [tf.io.parse_single_example(r, KEYS) for r in tf.data.TFRecordDataset(files)]


def config(folder, out, **overrides):
    return tool.Config(output_dir=str(out), input_dir=str(folder), num_shards=3, **overrides)


def test_records_have_standard_format_and_default_labels(folder, tmp_path):
    info = tool.build(config(folder, tmp_path / "out", num_workers=2))
    assert info == {"num_examples": 12, "num_classes": 3, "label_offset": 1}
    records = read_records(tmp_path / "out")
    assert len(records) == 12
    for r in records:
        synset = r["image/class/synset"].numpy().decode()
        # Default: 1 + index among the sorted folders cat, dog, zebra (0 is background).
        assert int(r["image/class/label"]) == {"cat": 1, "dog": 2, "zebra": 3}[synset]
        assert r["image/format"].numpy() == b"JPEG"
        encoded = r["image/encoded"].numpy()
        assert encoded[:3] == b"\xff\xd8\xff"  # PNG data re-encoded as JPEG
        height, width, channels = tf.image.extract_jpeg_shape(encoded).numpy()
        assert (height, width) == (20, 28) == (int(r["image/height"]), int(r["image/width"]))
        # CMYK and PNG become RGB; greyscale JPEGs are kept as they are.
        grey = r["image/filename"].numpy() == b"c.jpeg"
        assert channels == (1 if grey else 3)


def test_labels_file_gives_line_numbers(folder, tmp_path):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("zebra  a striped horse\nmouse\ncat\ndog\n")
    tool.build(config(folder, tmp_path / "out", labels_file=str(labels_file)))
    pairs = {
        (r["image/class/synset"].numpy(), int(r["image/class/label"]))
        for r in read_records(tmp_path / "out")
    }
    assert pairs == {(b"zebra", 1), (b"cat", 3), (b"dog", 4)}
    bad = tmp_path / "bad.txt"
    bad.write_text("cat\n")
    with pytest.raises(ValueError, match="zebra"):
        tool.build(config(folder, tmp_path / "out2", labels_file=str(bad)))


def test_interrupted_run_resumes_without_rewriting_finished_shards(folder, tmp_path):
    out = tmp_path / "out"
    tool.build(config(folder, out))
    shards = sorted(out.glob("train-*"))
    assert [s.name for s in shards] == [f"train-{i:05d}-of-00003" for i in range(3)]
    stamps = {s: s.stat().st_mtime_ns for s in shards}
    shards[1].unlink()  # as if the run had stopped before renaming shard 1
    (out / ".train-00001-of-00003.tmp-999").write_bytes(b"half a shard")
    tool.build(config(folder, out))
    assert shards[0].stat().st_mtime_ns == stamps[shards[0]]
    assert shards[2].stat().st_mtime_ns == stamps[shards[2]]
    assert len(read_records(out)) == 12


def test_pipeline_reads_tool_output_with_counts(folder, tmp_path):
    tool.build(config(folder, tmp_path / "out"))
    loaded = data.load(
        f"tfrecord:{tmp_path / 'out'}",
        split="train",
        global_batch_size=4,
        image_size=8,
        training=False,
    )
    assert loaded.num_examples == 12 and loaded.num_classes == 3 and loaded.steps_per_epoch == 3
    labels = np.concatenate([y.numpy() for _, y in loaded.dataset])
    np.testing.assert_array_equal(np.bincount(labels), [4, 4, 4])


def test_unreadable_image_is_named(folder, tmp_path):
    (folder / "train" / "cat" / "e.jpg").write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(ValueError, match="e.jpg"):
        tool.build(config(folder, tmp_path / "out"))


def _imagenette_subset(shared_data, root, per_class=3):
    """Extracts a few val images per wnid, including at least two greyscale JPEGs."""
    counts, greys = {}, 0
    with tarfile.open(shared_data / "imagenette-224.tar") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or parts[1] != "val":
                continue
            payload = tar.extractfile(member).read()
            grey = tf.image.extract_jpeg_shape(payload).numpy()[2] == 1
            if counts.get(parts[2], 0) >= per_class and not (grey and greys < 2):
                continue
            counts[parts[2]] = counts.get(parts[2], 0) + 1
            greys += int(grey)
            path = root / "val" / parts[2] / parts[3]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)
            if len(counts) == 10 and min(counts.values()) >= per_class and greys >= 2:
                break
    return counts, greys


@pytest.mark.data
def test_real_imagenette_labels_match_synsets(shared_data, tmp_path):
    counts, greys = _imagenette_subset(shared_data, tmp_path / "in")
    assert len(counts) == 10 and greys >= 2
    synsets = shared_data / "imagenet_synsets.txt"
    line = {w.split()[0]: i + 1 for i, w in enumerate(synsets.read_text().splitlines())}
    info = tool.build(
        tool.Config(
            output_dir=str(tmp_path / "out"),
            input_dir=str(tmp_path / "in"),
            split="val",
            labels_file=str(synsets),
            num_shards=2,
            num_workers=2,
        )
    )
    assert info["num_classes"] == 1000 and info["num_examples"] == sum(counts.values())
    records = read_records(tmp_path / "out", "val")
    for r in records:
        assert int(r["image/class/label"]) == line[r["image/class/synset"].numpy().decode()]
    expected = sorted(line[w] - 1 for w, n in counts.items() for _ in range(n))
    loaded = data.load(
        f"tfrecord:{tmp_path / 'out'}", split="val", global_batch_size=8, image_size=64
    )
    batches = list(loaded.dataset)
    assert sorted(np.concatenate([b[1].numpy() for b in batches]).tolist()) == expected
    assert all(b[0].shape[1:] == (64, 64, 3) for b in batches)  # greyscale JPEGs included
    assert loaded.num_classes == 1000


def test_json_info_is_written_atomically(folder, tmp_path):
    tool.build(config(folder, tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "train.json").read_text())["num_examples"] == 12
    assert not list((tmp_path / "out").glob(".partial-*"))


def _tiny_tfds_builder():
    """A TFDS builder that needs no download: 9 train and 5 test 12x12 images, 3 classes."""
    import tensorflow_datasets as tfds

    class TinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(12, 12, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(9), "test": self._generate_examples(5)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((12, 12, 3), 20 * i, np.uint8), "label": i % 3}

    return TinyImages


def test_tfds_dataset_through_pipeline_and_tool(tmp_path):
    _tiny_tfds_builder()  # registers "tiny_images"
    tfds_dir = str(tmp_path / "tfds")
    test = data.load(
        "tfds:tiny_images", split="test", global_batch_size=2, image_size=8, data_dir=tfds_dir
    )
    assert (test.num_examples, test.num_classes) == (5, 3)
    batches = list(test.dataset)
    labels = np.concatenate([b[1].numpy() for b in batches])
    brightness = np.concatenate([b[0].numpy().mean(axis=(1, 2, 3)) for b in batches])
    # Example i has brightness 20 i and label i % 3 (PNG in TFDS: lossless).
    np.testing.assert_allclose(sorted(brightness), [0, 20, 40, 60, 80], atol=1e-3)
    np.testing.assert_array_equal(labels, (np.round(brightness / 20).astype(int)) % 3)
    out = tmp_path / "tfr"
    config = tool.Config(
        output_dir=str(out), split="train", from_tfds="tiny_images", data_dir=tfds_dir, num_shards=2
    )
    assert tool.build(config) == {"num_examples": 9, "num_classes": 3, "label_offset": 1}
    train = data.load(
        f"tfrecord:{out}", split="train", global_batch_size=9, image_size=8, training=False
    )
    assert sorted(np.concatenate([y.numpy() for _, y in train.dataset]).tolist()) == [
        0,
        0,
        0,
        1,
        1,
        1,
        2,
        2,
        2,
    ]
