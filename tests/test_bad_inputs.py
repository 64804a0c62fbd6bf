"""The bad-input matrix (docs/reliability.md): each bad flag, data file, model file or serving
request gives one clear error naming the thing and the fix, before any training, and damages
nothing written.

Most cases call `sat_tf.training.run` in-process against ONE finished run with `overwrite=True`,
the most dangerous setting (it clears a finished run): a bad input must be refused before that
happens, so the run's files keep their bytes and mtimes. docs/reliability.md lists the matrix.
"""

import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from sat_tf import callbacks, export, preflight, rundir, saving, training
from sat_tf.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# configs/demo_smoke.cfg as a TrainConfig (2 steps of small_cnn on the built-in digits).
SMOKE = dict(
    dataset="demo",
    model="small_cnn",
    activation="silu",
    num_classes=10,
    image_size=16,
    global_batch_size=16,
    epochs=1,
    steps_per_epoch=2,
    eval_examples=32,
    epsilon=16.0,
    step_size=16.0,
    eval_epsilon=16.0,
    eval_step_size=4.0,
    eval_num_steps=2,
    base_learning_rate=0.4,
    lr_schedule="cosine",
    weight_decay=5e-4,
    checkpoint_every_steps=1,
)


def smoke(model_dir, **overrides):
    return TrainConfig(model_dir=str(model_dir), **{**SMOKE, **overrides})


def snapshot(directory):
    """{relative path: (size, mtime_ns, sha1)} of every file under `directory`."""
    return {
        str(p.relative_to(directory)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha1(p.read_bytes()).hexdigest(),
        )
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("finished") / "run"
    training.run(smoke(model_dir))
    return model_dir


def refused(finished, match, **overrides):
    """Runs with `overrides` and overwrite=True into the finished run; asserts the error, its
    speed (before any training) and that no file of the finished run changed."""
    before = snapshot(finished)
    start = time.time()
    with pytest.raises((training.RunError, ValueError)) as info:
        training.run(smoke(finished, overwrite=True, **overrides))
    assert time.time() - start < 20, "the error came after expensive work"
    assert snapshot(finished) == before
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for part in [match] if isinstance(match, str) else match:
        assert part in message, message
    return message


# --- flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(model="resnet9000"), ["--model=resnet9000", "Valid names:", "small_cnn"]),
        (dict(activation="relu7"), ["--activation=relu7", "relu7"]),
        (dict(strategy="gpu_magic"), ["--strategy=gpu_magic", "choose one of default"]),
        (dict(epsilon=-1.0), ["--epsilon=-1.0 is invalid", "[0, 255]"]),
        (dict(step_size=0.0), ["--step_size=0.0 is invalid", "> 0"]),
        (dict(step_size=-4.0), ["--step_size=-4.0 is invalid", "> 0"]),
        (dict(num_steps=-1), ["--num_steps=-1 is invalid", ">= 0"]),
        (dict(image_size=4), ["--image_size=4 is invalid", "at least 8"]),
        (
            dict(model="resnet18", image_size=16),
            ["--image_size=16", "resnet18", "Use --image_size=32"],
        ),
        (dict(model="efficientnet_b0", image_size=24), ["--model=efficientnet_b0", "32"]),
        (dict(global_batch_size=15, strategy="mirrored"), ["--global_batch_size=15", "2 replicas"]),
        # Flags that cannot fit, refused before the data or the run folder is touched.
        (
            dict(global_batch_size=2000),
            ["--global_batch_size=2000 is larger than the 1437 examples", "Use 1437 or less"],
        ),
        (dict(global_batch_size=10**6), ["--global_batch_size=1000000 is invalid", "65536"]),
        (dict(num_classes=10**8), ["--num_classes=100000000 is invalid", "100000"]),
        (dict(image_size=20000), ["--image_size=20000 is invalid", "4096"]),
        (dict(image_size=257), ["--image_size=257 is too large for --dataset=demo", "256"]),
        (dict(epsilon=float("inf")), ["--epsilon=inf is invalid", "[0, 255]"]),
        (dict(epsilon=float("nan")), ["--epsilon=nan is invalid", "[0, 255]"]),
        (dict(step_size=float("inf")), ["--step_size=inf is invalid", "finite"]),
        (dict(base_learning_rate=float("nan")), ["--base_learning_rate=nan is invalid", "finite"]),
        (dict(decay_epochs=(1.0, float("inf"))), ["--decay_epochs=1.0,inf is invalid", "finite"]),
        (dict(seed=-1), ["--seed=-1 is invalid", "4294967295"]),
    ],
)
def test_bad_flag_is_refused_before_any_work(finished, overrides, match):
    refused(finished, match, **overrides)


def test_replica_check_uses_the_two_logical_cpus():
    # The case above relies on conftest's 2 logical CPU devices: MirroredStrategy must see 2.
    assert tf.distribute.MirroredStrategy().num_replicas_in_sync == 2


@pytest.mark.slow
def test_small_image_minimum_matches_the_models_downsampling():
    # Independent reference: build each family at 64 px and measure its smallest feature map
    # (BatchNorm outputs: every conv of the trunk has one, the 1x1 squeeze-excite convs do not).
    for name, factor in (("resnet18", 32), ("efficientnet_b0", 32), ("resnet20", 4)):
        model = training.models.build(name, num_classes=10, input_shape=(64, 64, 3))
        sides = [
            layer.output.shape[1]
            for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        assert 64 // min(sides) == factor
        assert preflight.min_image_size(name) == max(factor, 8)


def test_unwritable_model_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(training.RunError, match="is not writable.*choose another --model_dir"):
        training.run(smoke(blocker / "run"))
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_model_dir(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(training.RunError, match="is not writable"):
            training.run(smoke(tmp_path / "run"))
    finally:
        tmp_path.chmod(0o755)


def test_disk_full_is_refused_at_start(finished, monkeypatch):
    usage = shutil.disk_usage(finished)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=50 * 2**20))
    refused(finished, ["has only 50 MiB free", "Free some space"])


def test_config_change_in_an_unfinished_run_is_refused(tmp_path):
    model_dir = tmp_path / "run"
    rundir.record(model_dir, *rundir.TRAINING_FILES)  # an unfinished run of ours
    (model_dir / "config.json").write_text(json.dumps(dataclasses.asdict(smoke(model_dir))))
    before = snapshot(model_dir)
    with pytest.raises(training.RunError, match=r"other settings \(--epsilon\)"):
        training.run(smoke(model_dir, epsilon=8.0))
    assert snapshot(model_dir) == before


# --- data ------------------------------------------------------------------------------------


def jpeg(value=100, size=(20, 20)):
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def example(encoded, label):
    """An ImageNet-format record (1-based label); `encoded=None` leaves out image/encoded."""
    feature = {"image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}
    if encoded is not None:
        feature["image/encoded"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_records(path, records):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return path


def bomb():
    """A real 16x16 JPEG whose SOF header claims 60000x60000 pixels (3.6e9 > MAX_PIXELS)."""
    data = bytearray(jpeg(size=(16, 16)))
    sof = data.find(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    return bytes(data)


BAD_RECORDS = {
    "missing image/encoded": (example(None, 1), "has no image bytes"),
    "zero-byte image": (example(b"", 1), "has no image bytes"),
    "non-image payload": (example(b"<html>not an image</html>", 1), "is not a JPEG or PNG"),
    "label out of range": (example(jpeg(), 11), "label 10 (after label_offset)"),
    "decompression bomb": (example(bomb(), 1), "60000x60000 pixels"),
    "not an Example": (b"\x00garbage", "could not be decoded"),
}


@pytest.fixture(scope="module")
def good_records(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.tfrecord"
    return write_records(path, [example(jpeg(10 * i), i % 10 + 1) for i in range(24)])


def data_overrides(train_files, good_records):
    return dict(
        dataset=f"tfrecord:{good_records}",
        train_files=str(train_files),
        eval_files=str(good_records),
        augmentation="none",
    )


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_is_named_before_training(finished, good_records, tmp_path, case):
    record, reason = BAD_RECORDS[case]
    good = [example(jpeg(), 2)] * 3
    path = write_records(tmp_path / "train-bad.tfrecord", [*good, record, *good])
    message = refused(finished, reason, **data_overrides(path, good_records))
    assert "train-bad.tfrecord (record 3)" in message and "Fix or remove that file" in message


def test_bad_record_met_during_training_is_named(good_records, tmp_path, monkeypatch):
    # A bad record beyond the first batch (e.g. deep in an ImageNet shard) is met inside fit:
    # the same one-line error, and the run stays resumable. Skipping the first-batch probe
    # puts this small file's bad record there.
    monkeypatch.setattr(training, "check_first_batches", lambda *args: None)
    path = write_records(tmp_path / "train-late.tfrecord", [example(jpeg(), 2)] * 3 + [bomb()])
    with pytest.raises(training.RunError) as info:
        training.run(smoke(tmp_path / "run", **data_overrides(path, good_records)))
    message = str(info.value)
    assert "train-late.tfrecord (record 3) could not be decoded" in message, message
    assert "re-run the same command to resume" in message and len(message.splitlines()) == 1
    assert not (tmp_path / "run" / "model.keras").exists()


def test_truncated_tfrecord(finished, good_records, tmp_path):
    path = write_records(tmp_path / "cut.tfrecord", [example(jpeg(), 1)] * 6)
    path.write_bytes(path.read_bytes()[:-100])
    refused(finished, "cut.tfrecord is truncated or corrupt", **data_overrides(path, good_records))


def test_empty_tfrecord(finished, good_records, tmp_path):
    path = write_records(tmp_path / "empty.tfrecord", [])
    refused(finished, ["empty", "empty.tfrecord"], **data_overrides(path, good_records))


def test_pattern_matching_nothing(finished, good_records, tmp_path):
    pattern = tmp_path / "nothing-*"
    refused(
        finished, ["No TFRecord files match", "nothing-*"], **data_overrides(pattern, good_records)
    )


def test_decoding_limit_is_below_what_a_bomb_would_allocate():
    # The limit is Pillow's decompression-bomb threshold; decoding at it is about 268 MB of
    # uint8 RGB, while the crafted header above would need 10.8 GB.
    from sat_tf.data import preprocessing

    assert preprocessing.MAX_PIXELS == Image.MAX_IMAGE_PIXELS
    assert preprocessing.MAX_PIXELS * 3 < 300e6 < 60000 * 60000 * 3


# --- model files -----------------------------------------------------------------------------


def rewrite_keras(source, target, **edits):
    """Copies a .keras zip, replacing members with `edits[name](json dict) -> json dict`."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            payload = old.read(name)
            edit = edits.get(name.replace(".json", ""))
            if edit:
                payload = json.dumps(edit(json.loads(payload))).encode()
            new.writestr(name, payload)
    return target


def test_keras_file_from_a_newer_major_version(finished, tmp_path):
    path = rewrite_keras(
        finished / "model.keras",
        tmp_path / "future.keras",
        metadata=lambda meta: {**meta, "keras_version": "4.0.0"},
    )
    with pytest.raises(saving.ModelFileError, match=r"saved by Keras 4\.0\.0.*Install keras==4"):
        saving.load_model(path)
    refused(finished, ["--init_from=", "Keras 4.0.0"], init_from=str(path))


def test_keras_file_with_an_unknown_class(finished, tmp_path):
    def future_class(config):
        return {**config, "module": "keras.future", "class_name": "FutureModel"}

    path = rewrite_keras(finished / "model.keras", tmp_path / "odd.keras", config=future_class)
    with pytest.raises(saving.ModelFileError, match=r"odd.keras could not be loaded.*upgrade"):
        saving.load_model(path)


@pytest.mark.parametrize("cut", [0, 100, 0.5, -10])
def test_corrupt_keras_file(finished, tmp_path, cut):
    payload = (finished / "model.keras").read_bytes()
    end = int(cut * len(payload)) if isinstance(cut, float) else cut
    path = tmp_path / "cut.keras"
    path.write_bytes(payload[:end] if end else b"")
    with pytest.raises(saving.ModelFileError, match=r"cut.keras .*(truncated|incomplete)"):
        saving.load_model(path)


def test_keras_file_with_code_is_refused(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(saving.ModelFileError, match="contains code"):
        saving.load_model(tmp_path / "lambda.keras")


def test_checkpoint_of_another_architecture(finished, tmp_path):
    model_dir = tmp_path / "other"
    shutil.copytree(finished / "checkpoints", model_dir / "checkpoints")
    shutil.copy(finished / rundir.MANIFEST, model_dir)
    before = snapshot(model_dir)
    with pytest.raises(training.RunError) as info:
        training.run(smoke(model_dir, model="resnet20"))
    message = str(info.value)
    assert "written by another model" in message and "small_cnn" in message, message
    assert "resnet20" in message and "Use a new --model_dir" in message
    assert snapshot(model_dir) == before  # no config.json, no new checkpoint


def test_checkpoint_without_signature_still_refused(finished, tmp_path):
    # Checkpoints from before model_signature.json existed: TensorFlow's own check, reworded.
    model_dir = tmp_path / "legacy"
    shutil.copytree(finished / "checkpoints", model_dir / "checkpoints")
    shutil.copy(finished / rundir.MANIFEST, model_dir)
    (model_dir / "checkpoints" / callbacks.SIGNATURE).unlink()
    with pytest.raises(training.RunError, match="does not fit this model.*Use a new --model_dir"):
        training.run(smoke(model_dir, num_classes=7))


def test_deeper_checkpoint_into_shallower_model_is_not_partially_restored(tmp_path):
    # TensorFlow matches by position: without the signature a resnet56 checkpoint would start
    # filling a resnet20. The signature check refuses before any variable is assigned.
    config = smoke(tmp_path, model="resnet56")
    deep = training.build_model(config, 2)
    saver = callbacks.Checkpointer(tmp_path / "ckpt")
    saver.set_model(deep)
    saver.save()
    shallow = training.build_model(dataclasses.replace(config, model="resnet20"), 2)
    weights = [v.numpy().copy() for v in shallow.weights]
    with pytest.raises(ValueError, match=r"written by another model.*\(resnet56\).*\(resnet20\)"):
        callbacks.Checkpointer(tmp_path / "ckpt").restore(shallow)
    for before, variable in zip(weights, shallow.weights, strict=True):
        np.testing.assert_array_equal(before, variable.numpy())


# --- serving ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(finished, tmp_path_factory):
    classifier = saving.load_model(finished / "model.keras")
    path = export.export_saved_model(
        classifier, tmp_path_factory.mktemp("export"), image_size=16, central_crop=False
    )
    return tf.saved_model.load(str(path))


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (np.zeros((2, 16, 16, 3), np.int32), "expected to be a float tensor"),
        (np.zeros((2, 16, 16, 3), np.float64), "expected to be a float tensor"),
        (np.zeros((16, 16, 3), np.float32), "images|rank|shape"),
        (np.zeros((2, 16, 16, 1), np.float32), "images|shape"),
        (np.zeros((2, 16, 16, 4), np.float32), "images|shape"),
        (np.zeros((2, 32, 32, 3), np.float32), "images|shape"),
    ],
    ids=["int32", "float64", "rank3", "1-channel", "4-channel", "32px"],
)
def test_serving_default_rejects_wrong_requests(served, images, match):
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError), match=match):
        served.signatures["serving_default"](images=tf.constant(images))


def test_serving_default_accepts_the_right_request(served):
    out = served.signatures["serving_default"](images=tf.zeros([2, 16, 16, 3]))
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "has no image bytes"),
        (b"GIF89a....", "is not a JPEG or PNG"),
        (bomb(), "60000x60000"),
    ],
    ids=["empty", "gif", "bomb"],
)
def test_serving_bytes_rejects_bad_images_before_decoding(served, payload, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        served.signatures["serving_bytes"](image_bytes=tf.constant([jpeg(), payload]))


def test_serving_bytes_rejects_wrong_dtype(served):
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a string tensor"):
        served.signatures["serving_bytes"](image_bytes=tf.zeros([2]))


# --- safety ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "activation"),
    [
        ("small_cnn", "smooth_relu"),
        ("resnet20", "softplus"),
        ("preact_resnet18", "elu"),
        pytest.param("resnet18", "gelu", marks=pytest.mark.slow),
        pytest.param("efficientnet_b0", "silu", marks=pytest.mark.slow),
    ],
)
def test_every_model_family_round_trips_in_safe_mode(tmp_path, name, activation):
    model = training.models.build(
        name, num_classes=3, activation=activation, input_shape=(32, 32, 3)
    )
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model._flatten_layers())
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-5)


def test_the_trained_run_loads_in_safe_mode(finished):
    keras.saving.load_model(finished / "model.keras", safe_mode=True)
    with zipfile.ZipFile(finished / "model.keras") as archive:
        assert "Lambda" not in archive.read("config.json").decode()


def test_no_unsafe_loading_or_code_execution_in_library_or_tools():
    # Static audit: nothing turns safe_mode off; no eval/exec/pickle on inputs.
    sources = [*ROOT.glob("tools/*.py"), *ROOT.glob("sat_tf/**/*.py"), *ROOT.glob("study/*.py")]
    for path in sources:
        text = path.read_text()
        for banned in ("safe_mode=False", "enable_unsafe_deserialization", "pickle.load", "exec("):
            assert banned not in text, f"{path}: {banned}"
        assert "eval(" not in text.replace("_eval(", "").replace(".eval(", ""), path
    # Keras 3's load_model defaults to safe_mode=True; the audit above bans turning it off.
    import inspect

    assert inspect.signature(keras.saving.load_model).parameters["safe_mode"].default is True


def test_flagfile_values_are_data_not_code(tmp_path, monkeypatch):
    # tools/train.py's main, in this process (no TensorFlow start of its own): its flags parsed
    # from the flagfile into fresh FlagValues, as app.run would parse them into flags.FLAGS.
    import importlib.util

    from absl import flags

    from sat_tf import config as config_lib

    marker = tmp_path / "pwned"
    flagfile = tmp_path / "evil.cfg"
    flagfile.write_text(
        f"--flagfile={ROOT / 'configs/demo_smoke.cfg'}\n"
        f"--model=__import__('os').system('touch {marker}')\n"
    )
    spec = importlib.util.spec_from_file_location("train_tool", ROOT / "tools" / "train.py")
    train_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tool)
    monkeypatch.chdir(ROOT)  # the flagfiles' own paths are relative to the checkout
    fresh = flags.FlagValues()
    config_lib.define_flags(fresh)
    argv = fresh(["tools/train.py", f"--flagfile={flagfile}", f"--model_dir={tmp_path}/r"])
    monkeypatch.setattr(flags, "FLAGS", fresh)
    with pytest.raises(SystemExit) as info:
        train_tool.main(argv)
    # A string exit code: Python prints it as the one line on stderr and exits with status 1.
    assert isinstance(info.value.code, str) and "Unknown model" in info.value.code
    assert info.value.code.startswith("error: ") and len(info.value.code.splitlines()) == 1
    assert not marker.exists()
