"""Loading `.keras` files safely, with errors that say what is wrong with the file.

`keras.saving.load_model(path, safe_mode=True)` already refuses to run code from a file (Lambda
layers, pickled functions), but its errors for a damaged or foreign file are misleading: a
truncated zip is "File not found", a file from a newer Keras fails deep in deserialization.
`load_model` checks the archive first and names the file, the Keras versions and the fix.
"""

import json
import zipfile
from pathlib import Path

import keras

_MEMBERS = ("metadata.json", "config.json")


class ModelFileError(ValueError):
    """A `.keras` file that is missing, damaged, from an incompatible Keras, or unsafe."""


def check_file(path):
    """Checks a `.keras` archive without loading it; returns the Keras version that wrote it.

    Raises:
        ModelFileError: the file is missing, is not a complete `.keras` archive, or was written
            by another major version of Keras.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist; give the path of a .keras model file.")
    try:
        with zipfile.ZipFile(path) as archive:
            missing = [name for name in _MEMBERS if name not in archive.namelist()]
            damaged = archive.testzip()  # CRC of every member: catches truncated weights
            metadata = {} if missing else json.loads(archive.read("metadata.json"))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
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
    return saved


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
        first = str(error).splitlines()[0][:300]
        unsafe = "safe_mode" in str(error) or "Lambda" in str(error)
        fix = (
            "It contains code (e.g. a Lambda layer), which sat_tf never loads; rebuild the "
            "model from layers with get_config."
            if unsafe
            else "If it was saved by a newer Keras, upgrade keras; otherwise re-export it."
        )
        raise ModelFileError(f"{path} could not be loaded ({versions}): {first}. {fix}") from None
