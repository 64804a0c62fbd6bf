"""`sat_tf.saving`: hostile `.keras` files are refused within a fixed memory and time budget, and
a file that asks to run code is refused with what was refused and why."""

import json
import time
import tracemalloc
import zipfile

import keras
import pytest

from sat_tf import saving


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="relu")(inputs))
    path = tmp_path_factory.mktemp("small") / "small.keras"
    model.save(path)
    return path


def copy_keras(source, target, *, replace=None, compression=zipfile.ZIP_STORED):
    """Copies a .keras zip; `replace[name]` is bytes, or a callable writing into an open member."""
    replace = replace or {}
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", compression) as new:
        for name in old.namelist():
            payload = replace.get(name, old.read(name))
            if callable(payload):
                with new.open(name, "w", force_zip64=True) as member:
                    payload(member)
            else:
                new.writestr(name, payload)
    return target


def checked(path):
    """`saving.load_model(path)`'s error, the peak Python memory and the time it took."""
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(saving.ModelFileError) as info:
        saving.load_model(path)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message, peak, seconds


def test_padded_metadata_is_refused_without_reading_it(small, tmp_path):
    # A valid JSON object padded with 8 MiB of spaces (the reported file had 1.5 GB): it still
    # parses, so only a size limit stops it; reading it whole would allocate its full size.
    metadata = json.loads(zipfile.ZipFile(small).read("metadata.json"))
    padded = json.dumps(metadata).encode()[:-1] + b" " * (8 * 2**20) + b"}"
    path = copy_keras(
        small, tmp_path / "padded.keras", replace={"metadata.json": padded}, compression=8
    )
    message, peak, seconds = checked(path)
    assert "metadata.json declares 8 MiB" in message and "refused" in message, message
    assert peak < 2**20, f"the check allocated {peak / 2**20:.1f} MiB"
    assert seconds < 2


def test_weights_bomb_is_refused_before_decompressing(small, tmp_path, monkeypatch):
    # 80 MiB of zeros deflated to ~80 KB: 1000x, refused from the zip directory alone.
    def zeros(member):
        for _ in range(80):
            member.write(bytes(2**20))

    path = copy_keras(
        small, tmp_path / "bomb.keras", replace={"model.weights.h5": zeros}, compression=8
    )
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(
        zipfile.ZipFile,
        "open",
        lambda self, name, *a, **k: (
            opened.append(getattr(name, "filename", name)) or real_open(self, name, *a, **k)
        ),
    )
    message, _, seconds = checked(path)
    assert "model.weights.h5 declares 80 MiB" in message, message
    assert "decompression bomb" in message
    assert "model.weights.h5" not in opened  # not even the CRC check read it
    assert seconds < 2


def test_under_declared_json_member_is_read_only_up_to_the_limit(small, tmp_path, monkeypatch):
    # A directory could lie small; the read itself stops at the limit.
    monkeypatch.setitem(saving.MAX_JSON_BYTES, "config.json", 64)
    message, _, _ = checked(small)
    assert "config.json declares" in message or "config.json is over" in message, message


def test_function_from_another_module_is_refused_as_code(small, tmp_path):
    config = json.loads(zipfile.ZipFile(small).read("config.json"))
    config["config"]["layers"][1]["config"]["activation"] = {
        "module": "os",
        "class_name": "function",
        "config": "system",
        "registered_name": "function",
    }
    path = copy_keras(small, tmp_path / "evil.keras", replace={"config.json": json.dumps(config)})
    message, _, _ = checked(path)
    assert "os.system" in message and "refused" in message and "run commands" in message
    assert "upgrade" not in message


def test_lambda_is_refused_without_suggesting_unsafe_loading(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2, output_shape=(4,))(inputs))
    model.save(tmp_path / "lambda.keras")
    message, _, _ = checked(tmp_path / "lambda.keras")
    assert "contains code (a Python lambda)" in message and "refused" in message, message
    assert "safe_mode=False" not in message


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]"])
def test_config_that_is_not_a_json_object(small, tmp_path, payload):
    path = copy_keras(small, tmp_path / "odd.keras", replace={"config.json": payload})
    message, _, _ = checked(path)
    assert "config.json is not a JSON object" in message, message


def test_a_good_file_still_loads(small):
    assert saving.load_model(small).output_shape == (None, 2)
