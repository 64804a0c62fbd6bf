"""RobustBench protocol: epsilon units, the [0, 1] wrapper, data selection, the result file, CLI.

References are hand-computed: a linear model whose robust accuracy under an L-inf ball is known in
closed form, synthetic image folders and TFRecords with known colours and labels, and the
field formats of RobustBench's model_info files (e.g. model_info/cifar10/Linf/
Rice2020Overfitting.json: "eps": "8/255", "clean_acc": "85.34").
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import HAS_TENSORFLOW, needs_tensorflow

from sat_tf import activations, autoattack, robustbench

# The protocol runs under every backend; its data loaders are tf.data (need TensorFlow).
pytestmark = pytest.mark.backends
if HAS_TENSORFLOW:
    import tensorflow as tf

    from sat_tf.data import robustbench_data

ROOT = Path(__file__).resolve().parents[1]
ROBUSTBENCH_FIELDS = (
    "link",
    "name",
    "authors",
    "additional_data",
    "number_forward_passes",
    "dataset",
    "venue",
    "architecture",
    "eps",
    "clean_acc",
    "reported",
    "autoattack_acc",
)


def test_epsilons_map_from_the_unit_range_to_pixels():
    assert robustbench.to_pixels("8/255") == 8.0
    assert robustbench.to_pixels("4/255") == 4.0
    assert robustbench.to_pixels(8 / 255) == pytest.approx(8.0, abs=1e-9)
    assert robustbench.PROTOCOLS["cifar10"].epsilon_pixels == 8.0
    assert robustbench.PROTOCOLS["imagenet"].epsilon_pixels == 4.0
    assert robustbench.PROTOCOLS["cifar10"].num_examples == 10_000
    assert robustbench.PROTOCOLS["imagenet"].num_examples == 5_000


def mean_threshold_model():
    """Class 0 iff the mean pixel exceeds 127.99; an L-inf attack of radius e lowers it by e.

    logit_0 = mean(x) - 128, logit_k = -0.01 k for k = 1..9, so an image of constant value
    128 + d is correct iff d > -0.01, and stays correct under every perturbation of radius e iff
    d - e > -0.01.
    """
    inputs = keras.Input((4, 4, 3))
    means = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(10)
    outputs = dense(means)
    kernel = np.zeros((3, 10), np.float32)
    kernel[:, 0] = 1 / 3
    dense.set_weights([kernel, np.array([-128.0] + [-0.01 * k for k in range(1, 10)], np.float32)])
    return keras.Model(inputs, outputs)


def constant_images(values):
    return np.stack([np.full((4, 4, 3), v, np.uint8) for v in values])


@pytest.mark.parametrize(
    "dataset, robust_percent",
    # d = -28 (wrong), 3, 6, 12, four images each: 12/16 clean; robust when d > 8 (cifar10:
    # 8/255 = 8 pixels) or d > 4 (imagenet: 4/255 = 4 pixels).
    [("cifar10", "25.00"), ("imagenet", "50.00")],
)
def test_protocol_on_a_model_with_known_robust_accuracy(dataset, robust_percent):
    values = [100] * 4 + [131] * 4 + [134] * 4 + [140] * 4 + [100] * 4  # The last 4: not used.
    labels = np.zeros(len(values), np.int32)
    result = robustbench.benchmark(
        mean_threshold_model(),
        constant_images(values),
        labels,
        leaderboard=dataset,
        num_examples=16,
        version="fast",
        batch_size=16,
        model_info={"architecture": "linear", "name": "A test"},
        source="synthetic",
    )
    assert result.num_examples == 16
    assert result.clean_accuracy == 0.75  # 12 / 16; all 20 would give 12 / 20.
    assert f"{100 * result.robust_accuracy:.2f}" == robust_percent
    stages = list(result.stages.values())
    assert list(result.stages) == ["clean", "apgd-ce", "apgd-t", "square"]
    assert stages == sorted(stages, reverse=True)

    entry = result.model_info_entry()
    assert list(entry)[: len(ROBUSTBENCH_FIELDS)] == list(ROBUSTBENCH_FIELDS)
    assert entry["dataset"] == dataset
    assert entry["eps"] == {"cifar10": "8/255", "imagenet": "4/255"}[dataset]
    assert entry["clean_acc"] == "75.00" and entry["autoattack_acc"] == robust_percent
    for key in ("clean_acc", "autoattack_acc"):
        assert re.fullmatch(r"\d{1,3}\.\d\d", entry[key])
    assert entry["architecture"] == "linear" and entry["name"] == "A test"
    assert entry["additional_data"] is False and entry["number_forward_passes"] == 1
    ours = entry["sat_tf"]
    assert ours["num_examples"] == 16 and ours["autoattack_version"] == "fast"
    assert ours["epsilon_pixels"] == {"cifar10": 8.0, "imagenet": 4.0}[dataset]
    assert any("first 16" in d for d in ours["deviations"])
    assert any("not the reference PyTorch code" in d for d in ours["deviations"])
    assert ours["attack"] == autoattack.describe("fast") and "FAB-T" not in ours["attack"]
    json.dumps(entry)  # Serializable as is.

    card = result.card_entry("cmd")
    assert card["protocol"] == "robustbench" and card["num_examples"] == 16
    assert card["rows"][0]["attack"] == "autoattack-fast"
    assert card["rows"][0]["accuracy"] == result.robust_accuracy
    assert card["threat_model"]["epsilon"]["pixels"] == ours["epsilon_pixels"]


def test_evaluate_refuses_what_would_misstate_the_protocol():
    model, images = mean_threshold_model(), constant_images([140] * 4)
    labels = np.zeros(4, np.int32)

    def run(x=images, **kwargs):
        options = dict(leaderboard="cifar10", num_examples=4, version="fast") | kwargs
        return robustbench.benchmark(model, x, labels, **options)

    with pytest.raises(ValueError, match="leaderboard must be one of"):
        run(leaderboard="mnist")
    with pytest.raises(ValueError, match="num_examples"):
        run(num_examples=5)  # More than the images given.
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run(x=images.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="measured"):
        run(model_info={"clean_acc": "99.00"})
    with pytest.raises(ValueError, match="version"):
        run(version="plus")


def test_unit_interval_model_matches_the_model_on_pixels_and_reloads_safely(tmp_path):
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs))
    x = activations.get("smooth_relu")()(x)  # A sat_tf layer inside: must load in safe mode.
    outputs = keras.layers.Dense(5)(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    pixels = np.random.RandomState(0).uniform(0, 255, (3, 6, 6, 3)).astype(np.float32)

    wrapped = robustbench.unit_interval_model(model)
    expected = keras.ops.convert_to_numpy(model(pixels))
    got = keras.ops.convert_to_numpy(wrapped(pixels / 255))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert "Lambda" not in wrapped.to_json() and "Rescaling" in wrapped.to_json()
    wrapped.save(tmp_path / "unit.keras")
    loaded = keras.saving.load_model(tmp_path / "unit.keras", safe_mode=True)
    got = keras.ops.convert_to_numpy(loaded(pixels / 255))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@needs_tensorflow
def test_read_image_ids_checks_the_list(tmp_path):
    good = tmp_path / "ids.txt"
    text = "n01440764/ILSVRC2012_val_00000293.JPEG\nn01443537/ILSVRC2012_val_00000236.JPEG"
    good.write_text(text)  # RobustBench's file has no final newline.
    ids, sha256 = robustbench_data.read_image_ids(good)
    assert ids == text.split("\n")
    assert sha256 == hashlib.sha256(text.encode()).hexdigest()
    (tmp_path / "bad.txt").write_text(text + "\nILSVRC2012_val_00000001.JPEG\n")
    with pytest.raises(ValueError, match="line 3"):
        robustbench_data.read_image_ids(tmp_path / "bad.txt")
    (tmp_path / "twice.txt").write_text(text + "\n" + text.split("\n")[0])
    with pytest.raises(ValueError, match="more than once"):
        robustbench_data.read_image_ids(tmp_path / "twice.txt")


SYNSETS = ("n00000003", "n00000001", "n00000002")  # Sorted order: 0001 -> 0, 0002 -> 1, 0003 -> 2.


@pytest.fixture
def tiny_imagenet(tmp_path):
    """Six constant-colour JPEGs in <root>/validation/<synset>/; colour 40 * number."""
    files = {}
    for number in range(1, 7):
        synset = SYNSETS[number % 3]
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        folder = tmp_path / "validation" / synset
        folder.mkdir(parents=True, exist_ok=True)
        image = tf.fill([12, 20, 3], tf.constant(40 * number, tf.uint8))
        data = tf.io.encode_jpeg(image, quality=100).numpy()
        (folder / name).write_bytes(data)
        files[f"{synset}/{name}"] = data
    return tmp_path, files


# Selected in this order: images 6, 5, 1 (RobustBench's order is the file's order).
IDS = [
    "n00000003/ILSVRC2012_val_00000006.JPEG",
    "n00000002/ILSVRC2012_val_00000005.JPEG",
    "n00000001/ILSVRC2012_val_00000001.JPEG",
]
EXPECTED_LABELS = [2, 1, 0]
EXPECTED_COLOURS = [240, 200, 40]


def check_selection(images, labels):
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(labels, EXPECTED_LABELS)
    for image, colour in zip(images, EXPECTED_COLOURS, strict=True):
        assert np.abs(image.astype(int) - colour).max() <= 2  # JPEG rounding only.


@needs_tensorflow
def test_imagenet_subset_from_a_folder(tiny_imagenet):
    root, _ = tiny_imagenet
    images, labels = robustbench_data.imagenet_from_folder(
        root, IDS, split="validation", image_size=8
    )
    check_selection(images, labels)
    with pytest.raises(FileNotFoundError, match="1 of 4 images missing"):
        robustbench_data.imagenet_from_folder(
            root, IDS + ["n00000001/x.JPEG"], split="validation", image_size=8
        )


def bytes_feature(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def write_records(path, files, synset_override=None):
    """ImageNet-format records in a scrambled order, labels 1-based, some with a directory."""
    with tf.io.TFRecordWriter(str(path)) as writer:
        for key in sorted(files, reverse=True):
            synset, name = key.split("/")
            feature = {
                "image/encoded": [files[key]],
                "image/filename": [f"val/{name}".encode() if "5" in name else name.encode()],
                "image/class/synset": [(synset_override or synset).encode()],
            }
            example = {k: bytes_feature(v) for k, v in feature.items()}
            label = sorted(SYNSETS).index(synset) + 1
            example["image/class/label"] = tf.train.Feature(
                int64_list=tf.train.Int64List(value=[label])
            )
            record = tf.train.Example(features=tf.train.Features(feature=example))
            writer.write(record.SerializeToString())


@needs_tensorflow
def test_imagenet_subset_from_tfrecords(tiny_imagenet, tmp_path):
    _, files = tiny_imagenet
    write_records(tmp_path / "validation-00000-of-00001", files)
    pattern = str(tmp_path / "validation-*")
    check_selection(*robustbench_data.imagenet_from_tfrecord(pattern, IDS, image_size=8))
    with pytest.raises(FileNotFoundError, match="3 of 4 images found"):
        robustbench_data.imagenet_from_tfrecord(pattern, IDS + ["n00000001/x.JPEG"], image_size=8)
    with pytest.raises(FileNotFoundError, match="0 of 1 images found"):
        robustbench_data.imagenet_from_tfrecord(pattern, ["n00000001/x.JPEG"], image_size=8)
    write_records(tmp_path / "wrong-00000-of-00001", files, synset_override="n00000009")
    with pytest.raises(ValueError, match="synset"):
        robustbench_data.imagenet_from_tfrecord(str(tmp_path / "wrong-*"), IDS, image_size=8)


@needs_tensorflow
def test_cifar10_from_tfds_restores_the_original_test_order():
    tfds = pytest.importorskip("tensorflow_datasets")
    order = [3, 0, 4, 1, 2]  # TFDS's stored order is hashed; "id" numbers the original order.

    def as_dataset(self, split, **kwargs):
        del self, split, kwargs
        return tf.data.Dataset.from_tensor_slices(
            {
                "id": [f"test_{i:05d}" for i in order],
                "image": np.stack([np.full((32, 32, 3), i, np.uint8) for i in order]),
                "label": np.array(order, np.int64),
            }
        )

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        images, labels = robustbench_data.cifar10_from_tfds(num_examples=4)
    np.testing.assert_array_equal(labels, [0, 1, 2, 3])
    np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 1, 2, 3])


@pytest.mark.slow
@needs_tensorflow
def test_eval_tool_robustbench_end_to_end_and_resumed_after_a_kill(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}

    def tool(name, *args):
        return subprocess.run(
            [sys.executable, f"tools/{name}.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    run = tmp_path / "run"
    trained = tool("train", "--flagfile=configs/demo_smoke.cfg", f"--model_dir={run}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = tmp_path / "eval"
    args = [f"--model_dir={run}", "--protocol=robustbench", f"--output_dir={out}"]
    # 40 examples in batches of 4: a chunk (8 batches) of 32, then one of 8.
    args += ["--num_examples=40", "--autoattack_version=fast", "--batch_size=4", "--deterministic"]
    done = tool("eval", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Work ahead: 40 examples" in done.stdout and "Examples 32 of 40 done" in done.stdout

    name = "robustbench_cifar10_Linf"
    entry = json.loads((out / f"{name}.json").read_text())
    assert set(ROBUSTBENCH_FIELDS) <= set(entry)
    assert entry["eps"] == "8/255" and entry["sat_tf"]["num_examples"] == 40
    assert entry["sat_tf"]["autoattack_version"] == "fast"
    assert entry["architecture"] == "small_cnn (silu)"
    # Reference: the saved model's accuracy on the first 40 demo test digits, computed here.
    from sat_tf.data import demo

    images, labels = demo.arrays("test")
    model = keras.saving.load_model(run / "model.keras", safe_mode=True)
    correct = np.argmax(model.predict(images[:40], verbose=0), axis=1) == labels[:40]
    assert entry["clean_acc"] == f"{100 * correct.mean():.2f}"
    assert float(entry["autoattack_acc"]) <= float(entry["clean_acc"])
    card = json.loads((run / "robustness_card.json").read_text())
    last = card["evaluations"][-1]
    assert last["protocol"] == "robustbench" and last["num_examples"] == 40
    assert "--protocol=robustbench" in last["command"]

    # A SAT-only flag is refused before any work: the tool's flags parsed as tools/eval.py
    # parses them, in this process (the tool's exit on a refusal is checked below, --seed=1).
    from absl import flags

    from sat_tf import config as config_lib
    from sat_tf import evalrun

    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values, config_lib.EvalConfig)
    flag_values(["eval.py", *args, "--epsilons=4"])
    with pytest.raises(evalrun.EvalError, match="cannot be used with --protocol=robustbench"):
        evalrun.run(config_lib.from_flags(flag_values, config_lib.EvalConfig))

    # Killed once AutoAttack has saved a batch, then the same command: the same numbers.
    # (--noprogress: no up-front timing of a batch; the resume line is still printed.)
    killed_out = tmp_path / "killed"
    state = killed_out / f"{name}_state.npz"
    again = [a.replace(str(out), str(killed_out)) for a in args] + ["--noprogress"]
    child = subprocess.Popen(
        [sys.executable, "tools/eval.py", *again],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while child.poll() is None:
        try:
            with np.load(state) as saved:
                attacking = saved["position"][0][0] >= 1
        except (OSError, ValueError, KeyError):  # not written yet
            attacking = False
        if attacking:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)  # poll, but leave the CPU to the child
    assert child.wait() == -signal.SIGKILL, "the evaluation ended before it could be killed"
    with np.load(state) as saved:
        assert saved["position"][0][0] < 4 and saved["batches"][0] > 0

    changed = tool("eval", *again, "--seed=1")
    assert changed.returncode != 0 and "the seed (0 -> 1)" in changed.stderr
    assert "--discard_state" in changed.stderr and state.exists()  # refused; nothing lost

    resumed = tool("eval", *again)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming {state}" in resumed.stdout
    assert not state.exists()  # finished: the next run starts afresh
    other = json.loads((killed_out / f"{name}.json").read_text())
    for key in ("clean_acc", "autoattack_acc"):
        assert other[key] == entry[key]
    assert other["sat_tf"]["stages"] == entry["sat_tf"]["stages"]
    records = [np.load(d / f"{name}_per_example.npz") for d in (out, killed_out)]
    np.testing.assert_array_equal(records[0]["fooled_by"], records[1]["fooled_by"])


@needs_tensorflow
def test_an_ids_file_that_is_not_the_list_is_one_line_and_read_no_further(tmp_path):
    from sat_tf.data import robustbench_data

    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(robustbench_data.MAX_IDS_BYTES + 10)  # sparse: no disk, but 16 MiB + 10
    with pytest.raises(ValueError, match="holds more than 16 MiB"):
        robustbench_data.read_image_ids(huge)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00n01440764/x.JPEG")
    with pytest.raises(ValueError, match="is not a text file of ids"):
        robustbench_data.read_image_ids(binary)
