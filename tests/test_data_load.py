"""load(spec): the demo digits, image folders, TFDS errors, spec errors."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.datasets import load_digits

from sat_tf import data
from sat_tf.data import demo


def test_demo_split_is_an_exact_partition_of_the_digits():
    digits = load_digits()
    train_x, train_y = demo.arrays("train", image_size=8)
    test_x, test_y = demo.arrays("test", image_size=8)
    assert len(train_y) == 1437 and len(test_y) == 360
    assert train_x.shape == (1437, 8, 8, 3) and np.all(train_x[..., 0] == train_x[..., 2])
    # Together the splits are the 1,797 digits scaled from 0..16 to 0..255, each exactly once.
    ours = np.concatenate([train_x[..., 0], test_x[..., 0]]).reshape(1797, -1)
    ours = np.column_stack([ours, np.concatenate([train_y, test_y])])
    reference = np.column_stack([digits.data * 255 / 16, digits.target])
    np.testing.assert_allclose(np.unique(ours, axis=0), np.unique(reference, axis=0), atol=1e-4)
    np.testing.assert_array_equal(demo.arrays("test", 8)[1], test_y)  # fixed split


def test_load_demo_train_and_padded_eval():
    train = data.load("demo", split="train", global_batch_size=32)
    assert (train.num_examples, train.num_classes, train.image_size) == (1437, 10, 16)
    assert train.training and train.steps_per_epoch == 1437 // 32
    images, labels = next(iter(train.dataset))
    assert images.shape == (32, 16, 16, 3) and images.dtype == tf.float32
    assert labels.dtype == tf.int32 and labels.numpy().min() >= 0 and labels.numpy().max() <= 9
    assert float(tf.reduce_min(images)) >= 0 and float(tf.reduce_max(images)) <= 255
    test = data.load("demo", split="test", global_batch_size=64, pad_final_batch=True)
    assert not test.training and test.steps_per_epoch == 6
    batches = list(test.dataset)
    assert len(batches) == 6 and all(b[0].shape[0] == 64 for b in batches)
    weights = np.concatenate([b[2].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])[weights == 1]
    np.testing.assert_array_equal(labels, demo.arrays("test")[1])


def test_unknown_scheme_lists_the_valid_ones():
    for spec in ["imagenet", "s3:bucket", "demo:extra", "tfds:"]:
        with pytest.raises(ValueError, match="tfrecord:<pattern>, tfds:<name>, folder:<dir>, demo"):
            data.load(spec, split="train", global_batch_size=8)


def test_tfds_without_download_explains_the_fix(tmp_path):
    with pytest.raises(RuntimeError, match=r"not prepared.*no internet.*tfds build cifar10"):
        data.load(
            "tfds:cifar10",
            split="train",
            global_batch_size=8,
            data_dir=str(tmp_path),
            download=False,
        )
    with pytest.raises(RuntimeError, match="ILSVRC2012_img_train.tar"):
        data.load(
            "tfds:imagenet2012",
            split="train",
            global_batch_size=8,
            data_dir=str(tmp_path),
            download=False,
        )


def _image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(path)


def test_folder_labels_are_sorted_class_folders(tmp_path):
    for split, classes in [("train", ["b", "a", "c"]), ("val", ["c", "a"])]:  # val lacks "b"
        for c in classes:
            for i in range(2):
                _image(tmp_path / split / c / f"{i}.png", 50 * "abc".index(c) + 10)
    loaded = data.load(f"folder:{tmp_path}", split="val", global_batch_size=3, image_size=8)
    assert (loaded.num_examples, loaded.num_classes) == (4, 3)
    images, labels = [
        np.concatenate(t)
        for t in zip(*[(x.numpy(), y.numpy()) for x, y in loaded.dataset], strict=True)
    ]
    assert sorted(labels.tolist()) == [0, 0, 2, 2]
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), 50 * labels + 10, atol=1)
    train = data.load(
        f"folder:{tmp_path}", split="train", global_batch_size=2, image_size=8, repeat=False
    )
    assert sorted(np.concatenate([y.numpy() for _, y in train.dataset]).tolist()) == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]


def test_folder_bad_image_is_named_by_path(tmp_path):
    _image(tmp_path / "train" / "a" / "ok.png", 1)
    (tmp_path / "train" / "a" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 20)
    loaded = data.load(f"folder:{tmp_path}", split="train", global_batch_size=1, training=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="zz_broken.jpg"):
        list(loaded.dataset)
    skipping = data.load(
        f"folder:{tmp_path}",
        split="train",
        global_batch_size=1,
        training=False,
        skip_corrupt=True,
    )
    assert len(list(skipping.dataset)) == 1 and int(skipping.skipped.numpy()) == 1
    with pytest.raises(FileNotFoundError, match="test"):
        data.load(f"folder:{tmp_path}", split="test", global_batch_size=1)


def test_tfrecord_spec_with_split_placeholder(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(buffer, "PNG")
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buffer.getvalue()])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[5])),
    }
    record = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
    with tf.io.TFRecordWriter(str(tmp_path / "records-validation.tfr")) as writer:
        writer.write(record)
    loaded = data.load(
        f"tfrecord:{tmp_path}/records-{{split}}.tfr",
        split="validation",
        global_batch_size=2,
        num_classes=10,
    )
    assert loaded.num_examples is None and loaded.num_classes == 10
    assert [y.numpy().tolist() for _, y in loaded.dataset] == [[4]]  # label_offset=1
    with pytest.raises(FileNotFoundError, match="records-train.tfr"):
        data.load(f"tfrecord:{tmp_path}/records-{{split}}.tfr", split="train", global_batch_size=2)


def test_distribute_datasets_from_function_feeds_both_replicas():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def dataset_fn(context):
        return data.load("demo", split="test", global_batch_size=8, input_context=context).dataset

    dist = strategy.distribute_datasets_from_function(dataset_fn)
    images, labels = next(iter(dist))
    per_replica = strategy.experimental_local_results(labels)
    assert len(per_replica) == 2 and all(t.shape == (4,) for t in per_replica)


def test_folder_eval_order_takes_the_classes_in_turn(tmp_path):
    # Unequal classes: a has 3 images, b 1, c 2. Eval reads a0 b0 c0 a1 c1 a2, so that the first
    # batches (e.g. --eval_examples) see every class, and each class keeps its file order.
    for c, count in (("a", 3), ("b", 1), ("c", 2)):
        for i in range(count):
            _image(tmp_path / "val" / c / f"{i}.png", 40 * i + 10 * "abc".index(c) + 5)
    loaded = data.load(
        f"folder:{tmp_path}", split="val", global_batch_size=2, image_size=8, training=False
    )
    batches = list(loaded.dataset.as_numpy_iterator())
    images, labels = [np.concatenate(t) for t in zip(*batches, strict=True)]
    assert labels.tolist() == [0, 1, 2, 0, 2, 0]
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), [5, 15, 25, 45, 65, 85], atol=1)


def test_folder_skips_hidden_files_and_folders(tmp_path):
    # Jupyter leaves .ipynb_checkpoints/ in a split, macOS leaves ._x.png beside each image.
    for split in ("train", "validation"):
        for c in ("a", "b"):
            _image(tmp_path / split / c / "0.png", 100 * "ab".index(c) + 10)
    _image(tmp_path / "validation" / ".ipynb_checkpoints" / "0.png", 250)
    (tmp_path / "validation" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    loaded = data.load(
        f"folder:{tmp_path}", split="validation", global_batch_size=4, image_size=8, num_classes=2
    )
    images, labels = next(iter(loaded.dataset))
    assert (loaded.num_examples, loaded.num_classes) == (2, 2)
    np.testing.assert_allclose(images.numpy().mean(axis=(1, 2, 3)), 100 * labels + 10, atol=1)


def test_folder_class_folders_that_differ_between_splits_are_named(tmp_path):
    for split, classes in [("train", ["a", "b"]), ("validation", ["a", "b", "cats2"])]:
        for c in classes:
            _image(tmp_path / split / c / "0.png", 10)
    with pytest.raises(ValueError) as info:
        data.load(f"folder:{tmp_path}", split="validation", global_batch_size=2, num_classes=2)
    message = str(info.value)
    assert "3 class folders over its splits, more than num_classes=2" in message, message
    assert "only in validation/: cats2" in message and "only in train/" not in message
