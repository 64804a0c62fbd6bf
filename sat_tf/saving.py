"""Loading `.keras` files safely, with errors that say what is wrong with the file.

`keras.saving.load_model(path, safe_mode=True)` already refuses to run code from a file (Lambda
layers, pickled functions), but its errors for a damaged or foreign file are misleading: a
truncated zip is "File not found", a file from a newer Keras fails deep in deserialization.
`load_model` checks the archive first and names the file, the Keras versions and the fix.

The check runs within a fixed memory and time budget whatever the file declares: before anything
is decompressed, the zip directory alone must show at most `MAX_MEMBERS` members declaring at most
`MAX_TOTAL_BYTES` in all, and no member, nor all of them together, may declare more than
`MAX_EXPANSION` times what it stores beyond `BOMB_FLOOR_BYTES` (a decompression bomb). The CRC
pass then reads at most `MAX_TOTAL_BYTES`, and the JSON members are read with a size limit (never
whole). Its config is scanned for objects from outside Keras and sat_tf before Keras sees it.
"""

import json
import zipfile
from pathlib import Path

import keras

_MEMBERS = ("metadata.json", "config.json")
# Keras writes ~100 bytes of metadata; the largest config in the zoo (efficientnet_b7) is well
# under 1 MiB. The limits leave room for any real model and refuse padded files before reading.
MAX_JSON_BYTES = {"metadata.json": 2**20, "config.json": 64 * 2**20}
# Keras stores members uncompressed (ratio ~1) and DEFLATE cannot exceed ~1032:1, so a member
# over the floor that expands more than MAX_EXPANSION times is a bomb (Keras's own guard uses
# the same ratio with a 4 GiB floor; ours is lower because the CRC check reads every member).
BOMB_FLOOR_BYTES = 64 * 2**20
MAX_EXPANSION = 100
# A Keras file has 3 members (metadata.json, config.json, model.weights.h5) plus one per asset.
MAX_MEMBERS = 1_000
# The zoo's largest classifier, efficientnet_l1 (272.6 M parameters), is 1.1 GB of float32
# weights, 4.4 GB with two optimizer slots and an EMA copy saved too.
MAX_TOTAL_BYTES = 8 * 2**30
# Module roots a config may name; anything else (os, subprocess, ...) is code, not a layer.
SAFE_MODULES = ("keras", "sat_tf")


class ModelFileError(ValueError):
    """A `.keras` file that is missing, damaged, from an incompatible Keras, or unsafe."""


def check_file(path):
    """Checks a `.keras` archive without loading it; returns the Keras version that wrote it.

    Reads at most `MAX_JSON_BYTES` of each JSON member and streams the CRC check, so a padded
    or bomb file costs a bounded amount of memory and is refused before it is decompressed.

    Raises:
        ModelFileError: the file is missing, is not a complete `.keras` archive, declares
            oversized or bomb members, names code to import, or was written by another major
            version of Keras.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist; give the path of a .keras model file.")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            missing = [name for name in _MEMBERS if name not in names]
            _check_sizes(path, archive)
            damaged = archive.testzip()  # CRC of every member: catches truncated weights
            if not (missing or damaged):
                metadata = _read_json(path, archive, "metadata.json")
                config = _read_json(path, archive, "config.json")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        if isinstance(error, ModelFileError):
            raise
        raise ModelFileError(
            f"{path} is not a readable .keras file ({error}); it may be truncated or "
            "corrupt. Copy it again or re-export it from its training run."
        ) from None
    if missing or damaged:
        what = f"missing {', '.join(missing)}" if missing else f"corrupt member {damaged}"
        raise ModelFileError(
            f"{path} is an incomplete .keras file ({what}). Copy it again or re-export it "
            "from its training run."
        )
    saved = str(metadata.get("keras_version", "unknown"))
    installed = keras.__version__
    if saved.split(".")[0] != installed.split(".")[0]:
        raise ModelFileError(
            f"{path} was saved by Keras {saved}, this is Keras {installed}: a different major "
            f"version whose format this Keras does not read. Install keras=={saved} (or re-save "
            "the model with this version)."
        )
    _check_no_code(path, config)
    return saved


def _check_sizes(path, archive):
    """Refuses too many members, oversized ones and decompression bombs from the zip directory
    alone (before the CRC pass reads them)."""
    members = archive.infolist()
    if len(members) > MAX_MEMBERS:
        raise ModelFileError(
            f"{path} holds {len(members)} members (a .keras file has 3, plus one per asset; at "
            f"most {MAX_MEMBERS} are read): refused without reading them. The file was padded "
            "or damaged: re-export it from its training run."
        )
    for info in members:
        limit = MAX_JSON_BYTES.get(info.filename)
        if limit is not None and info.file_size > limit:
            raise ModelFileError(
                f"{path}: {info.filename} declares {info.file_size / 2**20:.0f} MiB (a .keras "
                f"file's is at most {limit // 2**20} MiB); refused without reading it. The file "
                "was padded or damaged: re-export it from its training run."
            )
        if info.file_size > BOMB_FLOOR_BYTES and info.file_size > MAX_EXPANSION * max(
            info.compress_size, 1
        ):
            raise ModelFileError(
                f"{path}: {info.filename} declares {info.file_size / 2**20:.0f} MiB but stores "
                f"{info.compress_size / 2**20:.2f} MiB (more than {MAX_EXPANSION}x): refused as "
                "a decompression bomb without decompressing it. Re-export the model."
            )
    declared = sum(info.file_size for info in members)
    stored = sum(info.compress_size for info in members)
    if declared > MAX_TOTAL_BYTES:
        raise ModelFileError(
            f"{path}: its {len(members)} members declare {declared / 2**20:.0f} MiB in all, more "
            f"than the {MAX_TOTAL_BYTES // 2**20} MiB a .keras file of this project may hold: "
            "refused without reading them. Re-export the model."
        )
    if declared > BOMB_FLOOR_BYTES and declared > MAX_EXPANSION * max(stored, 1):
        raise ModelFileError(
            f"{path}: its {len(members)} members declare {declared / 2**20:.0f} MiB but store "
            f"{stored / 2**20:.2f} MiB (more than {MAX_EXPANSION}x together): refused as a "
            "decompression bomb without decompressing it. Re-export the model."
        )


def _read_json(path, archive, name):
    """`name` parsed as a JSON object, reading at most its size limit."""
    limit = MAX_JSON_BYTES[name]
    with archive.open(name) as member:
        payload = member.read(limit + 1)
    if len(payload) > limit:  # the directory under-declared the size
        raise ModelFileError(f"{path}: {name} is over {limit // 2**20} MiB; refused.")
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        value = None
    if not isinstance(value, dict):
        raise ModelFileError(
            f"{path}: {name} is not a JSON object; the file is damaged. Re-export it."
        )
    return value


def _check_no_code(path, config):
    """Refuses a config that names a lambda or an object from outside Keras and sat_tf."""
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            module = node.get("module")
            name = node.get("class_name")
            if name == "__lambda__" or (
                isinstance(module, str) and module.split(".")[0] not in SAFE_MODULES
            ):
                if name == "function" and isinstance(node.get("config"), str):
                    name = node["config"]  # a function is named by its config: os.system
                what = "a Python lambda" if name == "__lambda__" else f"{module}.{name}"
                raise ModelFileError(unsafe_message(path, what))
            stack.extend(node.values())


def unsafe_message(path, what):
    """The one line for a file that asks to run code when it is loaded."""
    return (
        f"{path} contains code ({what}), not only Keras and sat_tf objects: refused, because "
        "loading it would let the file run commands on this machine (sat_tf always loads with "
        "Keras's safe_mode). Load only models you trained, or rebuild this one from layers."
    )


def load_model(path):
    """Loads a `.keras` model with `safe_mode=True` after checking the file (`check_file`).

    Args:
        path: A `.keras` file written by `model.save`.

    Returns:
        The `keras.Model` (sat_tf's layers are registered by importing sat_tf).

    Raises:
        ModelFileError: naming the file and the fix, for a missing, damaged, newer-major-version
            or unsafe (Lambda, pickled code) file.
    """
    import sat_tf  # noqa: F401  registers sat_tf's serializable layers

    versions = f"saved by Keras {check_file(path)}, this is Keras {keras.__version__}"
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # Keras raises TypeError/ValueError/KeyError/... for bad configs
        if "safe_mode" in str(error) or "Lambda" in str(error):
            raise ModelFileError(unsafe_message(path, "code (e.g. a Lambda layer)")) from None
        first = str(error).splitlines()[0][:300]
        fix = "If it was saved by a newer Keras, upgrade keras; otherwise re-export it."
        raise ModelFileError(f"{path} could not be loaded ({versions}): {first}. {fix}") from None
