"""`sat_tf.saving`: hostile `.keras` files are refused within a fixed memory and time budget, and
a file that asks to run code is refused with what was refused and why."""

import json
import struct
import time
import tracemalloc
import zipfile
import zlib

import keras
import pytest

from sat_tf import saving

pytestmark = pytest.mark.backends


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


def raw_zip(path, members):
    """Writes a zip of `members`, (name, deflated bytes, crc32, size) each, without compressing
    anything: a test can declare gigabytes in a few megabytes and a fraction of a second."""
    local, central = [], []
    offset = 0
    for name, data, crc, size in members:
        encoded, fields = name.encode(), (8, 0, 0, crc, len(data), size, len(name.encode()), 0)
        header = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, *fields) + encoded
        local.append(header + data)
        extra = struct.pack("<3H2L", 0, 0, 0, 0, offset)  # comment, disk, attributes, offset
        central.append(struct.pack("<4s6H3L2H", b"PK\x01\x02", 20, 20, 0, *fields) + extra)
        central[-1] += encoded
        offset += len(local[-1])
    directory = b"".join(central)
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory), offset, 0
    )
    with open(path, "wb") as f:
        f.write(b"".join(local) + directory + end)
    return path


def deflated(payload):
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(payload) + compressor.flush()


def deflated_zeros(size):
    """`size` zero bytes deflated, and their CRC, computed a chunk at a time."""
    compressor, crc, parts, left = zlib.compressobj(9, zlib.DEFLATED, -15), 0, [], size
    chunk = bytes(2**20)
    while left:
        piece = chunk[: min(left, len(chunk))]
        parts.append(compressor.compress(piece))
        crc, left = zlib.crc32(piece, crc), left - len(piece)
    return b"".join(parts) + compressor.flush(), crc


def keras_members(small):
    with zipfile.ZipFile(small) as archive:
        return [
            (
                name,
                deflated(archive.read(name)),
                zipfile.crc32(archive.read(name)) & 0xFFFFFFFF,
                archive.getinfo(name).file_size,
            )
            for name in archive.namelist()
        ]


def test_many_members_just_under_the_bomb_floor_are_refused_from_the_directory(small, tmp_path):
    # 100 members of just under 64 MiB of zeros each: none is a bomb alone, together they are
    # 6.4 GB to decompress for the CRC pass (13 s), from a 6 MB file.
    data, crc = deflated_zeros(saving.BOMB_FLOOR_BYTES - 1)
    padding = [(f"assets/{i}", data, crc, saving.BOMB_FLOOR_BYTES - 1) for i in range(100)]
    path = raw_zip(tmp_path / "many.keras", keras_members(small) + padding)
    start = time.perf_counter()
    with pytest.raises(saving.ModelFileError) as info:
        saving.check_file(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert "its 103 members declare 6400 MiB but store" in message, message
    assert "decompression bomb" in message and "Re-export the model" in message
    assert time.perf_counter() - start < 2


def test_members_declaring_more_than_the_budget_are_refused(small, tmp_path, monkeypatch):
    # Stored (uncompressed), as Keras writes them: the bomb rule does not apply, the total does.
    monkeypatch.setattr(saving, "MAX_TOTAL_BYTES", 2**20)
    stored = zipfile.ZipFile(tmp_path / "big.keras", "w")
    with zipfile.ZipFile(small) as archive:
        for name in archive.namelist():
            stored.writestr(name, archive.read(name))
    stored.writestr("assets/big", bytes(2**20))
    stored.close()
    with pytest.raises(saving.ModelFileError) as info:
        saving.check_file(tmp_path / "big.keras")
    message = str(info.value)
    assert "its 4 members declare 1 MiB in all" in message, message
    assert "more than the 1 MiB a .keras file of this project may hold" in message, message


def test_too_many_members_are_refused_before_any_is_read(small, tmp_path):
    members = keras_members(small)
    tiny = deflated(b"x")
    padding = [(f"assets/{i}", tiny, zipfile.crc32(b"x"), 1) for i in range(saving.MAX_MEMBERS)]
    path = raw_zip(tmp_path / "crowded.keras", members + padding)
    with pytest.raises(saving.ModelFileError) as info:
        saving.check_file(path)
    message = str(info.value)
    count = len(members) + saving.MAX_MEMBERS
    assert f"{path} holds {count} members (a .keras file has 3, plus" in message, message


def test_real_files_are_far_inside_the_limits(small):
    # A Keras file has metadata.json, config.json and model.weights.h5 (plus its assets).
    assert len(zipfile.ZipFile(small).namelist()) == 3 <= saving.MAX_MEMBERS // 100
    # The zoo's largest classifier (efficientnet_l1, 272.6 M parameters, tests/test_models.py)
    # in float32 with two optimizer slots and an EMA copy, all saved: under the total budget.
    assert saving.MAX_TOTAL_BYTES > 272_630_564 * 4 * 4


def test_a_config_nested_too_deeply_is_refused_in_one_line(small, tmp_path):
    path = copy_keras(small, tmp_path / "deep.keras", replace={"config.json": b"[" * 100_000})
    message, _, _ = checked(path)
    assert "config.json is not a JSON object" in message, message
