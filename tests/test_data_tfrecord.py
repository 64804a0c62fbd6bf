"""build_dataset on tiny TFRecord fixtures: labels, shapes, sharding, exactness, bad inputs."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from sat_tf.data import parse_example, tfrecord

RNG = np.random.default_rng(0)


def image_bytes(index, fmt="JPEG", mode=None, size=(30, 40)):
    """A small image whose mean brightness encodes `index` (so examples can be told apart)."""
    array = np.full((*size, 3), 10 + 7 * (index % 30), np.uint8)
    image = Image.fromarray(array).convert(mode) if mode else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=95)
    return buffer.getvalue()


def example(encoded, label, bbox=None):
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded or b""])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    for key, value in zip(["ymin", "xmin", "ymax", "xmax"], bbox or [], strict=False):
        feature[f"image/object/bbox/{key}"] = tf.train.Feature(
            float_list=tf.train.FloatList(value=[value])
        )
    if encoded is None:
        del feature["image/encoded"]
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write(path, records):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return str(path)


FORMATS = [("JPEG", None), ("PNG", None), ("JPEG", "CMYK"), ("JPEG", "L"), ("PNG", "L")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 files x 5 records, labels 1..20 (1-based ids), every image format mixed in."""
    root = tmp_path_factory.mktemp("tfr")
    for f in range(4):
        records = []
        for i in range(5):
            uid = f * 5 + i
            fmt, mode = FORMATS[uid % len(FORMATS)]
            records.append(example(image_bytes(uid, fmt, mode), uid + 1))
        write(root / f"train-{f:05d}-of-00004", records)
    return str(root / "train-*")


def labels_of(dataset):
    return np.concatenate([batch[1].numpy() for batch in dataset]).tolist()


def test_parse_example_offset_and_bbox():
    record = example(b"abc", 7, bbox=[0.1, 0.2, 0.3, 0.4])
    for parsed in [
        parse_example(record),
        next(iter(tf.data.Dataset.from_tensors(record).map(parse_example))),
    ]:
        assert parsed["encoded"].numpy() == b"abc" and int(parsed["label"]) == 6
        np.testing.assert_allclose(parsed["bbox"].numpy(), [[0.1, 0.2, 0.3, 0.4]])


def test_to_example_types_each_key_by_the_format():
    # The hand-written record above (example()) is the reference for the two keys it writes.
    values = {"image/encoded": b"abc", "image/class/label": 7}
    assert tfrecord.to_example(values).SerializeToString() == example(b"abc", 7)
    boxes = {"image/object/bbox/ymin": [0.1, 0.5], "image/height": 20, "image/format": b"JPEG"}
    parsed = tf.io.parse_single_example(
        tfrecord.to_example(boxes).SerializeToString(), tfrecord.features(*boxes)
    )
    np.testing.assert_allclose(parsed["image/object/bbox/ymin"].values.numpy(), [0.1, 0.5])
    assert int(parsed["image/height"]) == 20 and parsed["image/format"].numpy() == b"JPEG"
    with pytest.raises(KeyError, match="image/label"):
        tfrecord.to_example({"image/label": 1})


def test_absent_keys_parse_to_their_defaults():
    parsed = tf.io.parse_single_example(example(b"abc", 3), tfrecord.FEATURES)
    assert parsed["image/filename"].numpy() == b"" and int(parsed["image/width"]) == 0
    assert parsed["image/object/bbox/xmax"].values.shape == (0,)


def test_eval_order_labels_shapes_and_pixels(shards):
    dataset = tfrecord.build_dataset(shards, training=False, global_batch_size=6, image_size=8)
    batches = list(dataset)
    assert [len(b[1]) for b in batches] == [6, 6, 6, 2]  # the last partial batch is kept
    assert sorted(labels_of(batches)) == list(range(20))  # label_offset=1 applied
    assert labels_of(dataset) == labels_of(batches)  # deterministic order
    for images, labels in batches:
        assert images.dtype == tf.float32 and labels.dtype == tf.int32
        assert images.shape[1:] == (8, 8, 3)
        # Flat images: every pixel close to the brightness that encodes the example's id.
        np.testing.assert_allclose(
            images.numpy().mean(axis=(1, 2, 3)), 10 + 7 * labels.numpy(), atol=3
        )


def test_label_offset_zero(shards):
    dataset = tfrecord.build_dataset(
        shards, training=False, global_batch_size=20, image_size=8, label_offset=0
    )
    assert sorted(labels_of(dataset)) == list(range(1, 21))


def test_pad_final_batch_weights(shards):
    dataset = tfrecord.build_dataset(
        shards, training=False, global_batch_size=8, image_size=8, pad_final_batch=True
    )
    batches = list(dataset)
    assert all(b[0].shape[0] == 8 and b[2].shape == (8,) for b in batches)
    weights = np.concatenate([b[2].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])
    np.testing.assert_array_equal(weights, [1] * 20 + [0] * 4)
    assert sorted(labels[weights == 1].tolist()) == list(range(20))
    assert np.all(batches[-1][0].numpy()[4:] == 0)


@pytest.mark.parametrize("num_files", [4, 1])  # 1 file < 2 pipelines: record-level sharding
def test_two_input_contexts_disjoint_and_complete(shards, tmp_path, num_files):
    pattern = shards
    if num_files == 1:
        records = [r.numpy() for r in tf.data.TFRecordDataset(tf.io.gfile.glob(shards))]
        pattern = write(tmp_path / "one", records)
    seen = []
    for pid in range(2):
        context = tf.distribute.InputContext(2, pid, 2)
        dataset = tfrecord.build_dataset(
            pattern, training=False, global_batch_size=8, image_size=8, input_context=context
        )
        assert max(len(b[1]) for b in dataset) == 4  # per-replica batch
        seen.append(set(labels_of(dataset)))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(20))
    assert sum(map(len, seen)) == 20


def test_training_shards_files_shuffles_and_repeats(shards):
    contexts = [tf.distribute.InputContext(2, pid, 2) for pid in range(2)]
    kwargs = dict(training=True, global_batch_size=4, image_size=8, repeat=False)
    seen = [labels_of(tfrecord.build_dataset(shards, input_context=c, **kwargs)) for c in contexts]
    assert all(len(s) == 10 for s in seen)  # 2 files of 5 each, batches of 2 per replica
    assert sorted(seen[0] + seen[1]) == list(range(20))
    forever = tfrecord.build_dataset(shards, training=True, global_batch_size=4, image_size=8)
    first = [b[1].numpy().tolist() for b in forever.take(15)]
    assert all(len(b) == 4 for b in first)  # 60 > 20 examples: it repeats, full batches only
    assert sum(first, [])[:20] != list(range(20))


def test_cache_with_cifar_augmentation(shards):
    dataset = tfrecord.build_dataset(
        shards,
        training=True,
        global_batch_size=5,
        image_size=8,
        augmentation="cifar",
        cache=True,
    )
    for images, _ in dataset.take(8):
        assert images.shape == (5, 8, 8, 3) and float(tf.reduce_max(images)) <= 255
    with pytest.raises(ValueError, match="Inception"):
        tfrecord.build_dataset(shards, training=True, global_batch_size=5, image_size=8, cache=True)


def test_pattern_matching_nothing(tmp_path):
    pattern = str(tmp_path / "nothing-*")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        tfrecord.build_dataset(pattern, training=False, global_batch_size=2, image_size=8)


def test_empty_tfrecord_files(shards, tmp_path):
    empty = write(tmp_path / "empty", [])
    with pytest.raises(ValueError, match="empty"):
        tfrecord.build_dataset(empty, training=True, global_batch_size=2, image_size=8)
    dataset = tfrecord.build_dataset(
        f"{empty},{shards}", training=False, global_batch_size=32, image_size=8
    )
    assert sorted(labels_of(dataset)) == list(range(20))


def bad_records():
    good = image_bytes(0)
    bomb = bytearray(good)
    sof = bomb.find(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
    bomb[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    return {
        "missing image/encoded": (example(None, 1), "has no image bytes"),
        "zero-byte image": (example(b"", 1), "has no image bytes"),
        "non-image payload": (example(b"hello, world", 1), "not a JPEG or PNG"),
        "truncated jpeg": (example(good[: len(good) // 2], 1), "could not be decoded"),
        "not an Example": (b"\x00garbage", "could not be decoded"),
        "decompression bomb": (example(bytes(bomb), 1), "60000x60000"),
        "label out of range": (example(good, 1001), r"label 1000 .*num_classes=1000"),
        "background label": (example(good, 0), "label -1"),
    }


@pytest.mark.parametrize("case", sorted(bad_records()))
def test_bad_record_error_names_file_and_record(tmp_path, case):
    record, reason = bad_records()[case]
    good = [example(image_bytes(i), i + 1) for i in range(2)]
    path = write(tmp_path / "bad.tfrecord", [good[0], record, good[1]])
    dataset = tfrecord.build_dataset(
        path, training=False, global_batch_size=4, image_size=8, num_classes=1000
    )
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=rf"bad.tfrecord \(record 1\).*{reason}"
    ):
        list(dataset)


def test_bad_records_are_skipped_and_counted(tmp_path):
    cases = bad_records()
    for n, (record, _) in enumerate(cases.values()):  # good, bad, good in every file
        write(
            tmp_path / f"bad-{n}",
            [example(image_bytes(0), 2 * n + 1), record, example(image_bytes(1), 2 * n + 2)],
        )
    skipped = tf.Variable(0, dtype=tf.int64)
    dataset = tfrecord.build_dataset(
        str(tmp_path / "bad-*"),
        training=False,
        global_batch_size=4,
        image_size=8,
        num_classes=1000,
        skip_corrupt=True,
        skipped=skipped,
    )
    assert sorted(labels_of(dataset)) == list(range(2 * len(cases)))
    assert int(skipped.numpy()) == len(cases)


def test_truncated_tfrecord_file(tmp_path):
    path = write(tmp_path / "cut.tfrecord", [example(image_bytes(i), i + 1) for i in range(3)])
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-40])
    for training in (False, True):
        dataset = tfrecord.build_dataset(
            path, training=training, global_batch_size=1, image_size=8, repeat=False
        )
        with pytest.raises(tf.errors.InvalidArgumentError, match="cut.tfrecord is truncated"):
            list(dataset)
    skipped = tf.Variable(0, dtype=tf.int64)
    dataset = tfrecord.build_dataset(
        path,
        training=False,
        global_batch_size=4,
        image_size=8,
        skip_corrupt=True,
        skipped=skipped,
    )
    assert labels_of(dataset) == [0, 1] and int(skipped.numpy()) == 1


def test_bbox_guides_the_training_crop(tmp_path):
    # Left half dark, right half bright; a box on the right half keeps crops mostly bright.
    array = np.zeros((64, 64, 3), np.uint8)
    array[:, 32:] = 250
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    record = example(buffer.getvalue(), 1, bbox=[0.0, 0.75, 1.0, 1.0])
    path = write(tmp_path / "box.tfrecord", [record] * 40)
    dataset = tfrecord.build_dataset(
        path, training=True, global_batch_size=40, image_size=8, repeat=False
    )
    means = next(iter(dataset))[0].numpy().mean(axis=(1, 2, 3))
    # Every crop covers >= 10% of a box lying in the bright half; the average crop is bright.
    assert means.min() > 0 and means.mean() > 125


def test_a_pattern_matching_nothing_names_the_splits_beside_it(tmp_path):
    for name in ("val-00000-of-00001", "train-00000-of-00002", ".hidden-1", "README"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError) as error:
        tfrecord.list_files(str(tmp_path / "validation-*"))
    message = str(error.value)
    assert "No TFRecord files match" in message and "validation-*" in message
    assert "holds train-*, val-*" in message and "--eval_split=train" in message
    with pytest.raises(FileNotFoundError, match=r"match the pattern '[^']*'\.$"):
        tfrecord.list_files(str(tmp_path / "nowhere" / "x-*"))  # no folder: no hint
