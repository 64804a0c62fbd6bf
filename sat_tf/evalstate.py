"""What an evaluation has found so far, on disk, so that a killed evaluation picks up where it was.

One `.npz` file, rewritten atomically (`sat_tf.atomic`) after every batch, holds per job (one
attack at one epsilon, `sat_tf.passes`) the per-example record `fooled_by`, the position
(pass, batches done), the seconds spent and the batches run, plus a fingerprint: digests of the
model weights and of the examples, the attacks and every setting that changes a result (seed,
batch size, op determinism, ...). Opening the file for an evaluation with another fingerprint
refuses with one line naming what changed, unless `discard_state=True` (tools/eval.py:
--discard_state) starts afresh.

A state is resumed only when it is whole, unedited and in range, so that a result is what was
computed or nothing: the file must hold exactly the expected members, each stored uncompressed
with the size its shape needs (checked from the zip directory, before anything is read, so a
deflate bomb costs nothing); a sha256 `digest` over the fingerprint and every record must match
(it catches damage and hand edits; it is not a signature: code that recomputes it can forge a
state, as anyone who can write the file can also change the code that reads it); and every value
must be possible for the evaluation's jobs (`fooled_by` names a pass already run, positions
within the passes and batches).
"""

import hashlib
import io
import json
import math
import zipfile

import numpy as np

from sat_tf import atomic

# The members of a state file, with their dtype and their number of dimensions.
_MEMBERS = {
    "fingerprint": ("<U", 0),
    "fooled_by": ("<i2", 2),
    "position": ("<i8", 2),
    "seconds": ("<f8", 1),
    "batches": ("<i8", 1),
    "digest": ("<U", 0),
}
_RECORDS = ("fooled_by", "position", "seconds", "batches")  # the per-job records, in that order
_HEADER_BYTES = 256  # an .npy header (magic, version, dict, padding): 128 bytes, room for more
_TEXT_BYTES = 4 * 2**16  # the fingerprint and digest members: JSON text, 4 bytes a character

# Names of the fingerprint's parts in error messages.
_PARTS = {
    "model": "the model weights",
    "examples": "the examples",
    "attacks": "the attacks",
    "seed": "the seed",
    "batch_size": "the batch size",
    "surrogate": "the surrogate model's weights",
}


class StateMismatchError(ValueError):
    """The state file on disk belongs to another evaluation (or is not a state file)."""


def weights_digest(model):
    """sha256 over every weight's path, shape, dtype and bytes, in the model's order."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(weight.numpy())
        digest.update(f"{weight.path}:{value.shape}:{value.dtype};".encode())
        digest.update(value.tobytes())
    return "sha256 " + digest.hexdigest()[:16]


def examples_digest(images, labels):
    """The examples' count and a sha256 of their pixels (as stored) and labels (int32)."""
    digest = hashlib.sha256()
    images = np.ascontiguousarray(images)
    digest.update(f"{images.dtype}{images.shape};".encode())
    digest.update(images.tobytes())
    digest.update(np.ascontiguousarray(labels, np.int32).tobytes())
    return f"{len(labels)} examples, sha256 {digest.hexdigest()[:16]}"


def fingerprint(*, model, images, labels, attacks, seed, batch_size, **settings):
    """The fingerprint of an evaluation: a flat dict of JSON values (a model among `settings`,
    such as a transfer attack's surrogate, by its weights' digest)."""
    settings = {
        name: weights_digest(value) if hasattr(value, "weights") else value
        for name, value in settings.items()
    }
    found = {
        "model": weights_digest(model),
        "examples": examples_digest(images, labels),
        "attacks": "; ".join(attacks),
        "seed": int(seed),
        "batch_size": int(batch_size),
    }
    return found | {name: value for name, value in sorted(settings.items())}


def _short(value, width=60):
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def differences(saved, wanted):
    """What changed between two fingerprints, in words ("the seed (0 -> 1)")."""
    found = []
    for key in dict.fromkeys([*wanted, *saved]):
        if saved.get(key) != wanted.get(key):
            name = _PARTS.get(key, f"the setting {key}")
            found.append(f"{name} ({_short(saved.get(key))} -> {_short(wanted.get(key))})")
    return found


def digest(fingerprint, arrays):
    """sha256 over the fingerprint and the records (dtype, shape and bytes of each)."""
    found = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode())
    for name in _RECORDS:
        value = np.ascontiguousarray(arrays[name])
        found.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        found.update(value.tobytes())
    return "sha256 " + found.hexdigest()


def _member_bytes(name, num_jobs, num_examples):
    """The largest size an uncompressed member of a state of this shape can have."""
    items = {"fooled_by": 2 * num_jobs * num_examples, "position": 16 * num_jobs}
    items |= {"seconds": 8 * num_jobs, "batches": 8 * num_jobs}
    return _HEADER_BYTES + items.get(name, _TEXT_BYTES)


def _read(path, num_jobs, num_examples):
    """The arrays of the state file at `path`, read only after the zip directory shows the
    expected members at sizes their shapes allow; ValueError naming what is wrong."""
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: info for info in archive.infolist()}
        expected = {f"{name}.npy" for name in _MEMBERS}
        if set(entries) != expected:
            raise ValueError(f"members {sorted(entries)}, not {sorted(expected)}")
        for name in _MEMBERS:
            info = entries[f"{name}.npy"]
            limit = _member_bytes(name, num_jobs, num_examples)
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > limit:
                raise ValueError(f"member {name} holds {info.file_size} bytes (at most {limit})")
        arrays = {}
        for name, (dtype, ndim) in _MEMBERS.items():
            with archive.open(f"{name}.npy") as member:
                value = np.lib.format.read_array(member, allow_pickle=False)
            if not value.dtype.str.startswith(dtype) or value.ndim != ndim:
                raise ValueError(f"{name} is {value.dtype} with {value.ndim} dimensions")
            arrays[name] = value
    return arrays


def _out_of_range(arrays, passes, batch_size):
    """What in the records no evaluation with these jobs could have written, or ""."""
    fooled_by, position = arrays["fooled_by"], arrays["position"]
    num_examples = fooled_by.shape[1]
    most_batches = math.ceil(num_examples / max(1, batch_size))
    for j, count in enumerate(passes):
        at, done = (int(v) for v in position[j])
        if not (0 <= at <= count and 0 <= done <= most_batches) or (at == count and done):
            return f"position {[at, done]} of attack {j} (it has {count} passes)"
        row = fooled_by[j]
        if row.size and (row.min() < -1 or row.max() > min(at, count - 1)):
            return f"fooled_by of attack {j} names pass {int(row.max())} or {int(row.min())}"
    seconds, batches = arrays["seconds"], arrays["batches"]
    if not np.all(np.isfinite(seconds)) or np.any(seconds < 0) or np.any(batches < 0):
        return "negative or non-finite seconds or batches"
    return ""


class EvaluationState:
    """Per job: `fooled_by` [N], `position` (pass, batches done), `seconds`, `batches` run.

    A job is done when its position's pass equals its number of passes. With `path=None` the
    state lives in memory only (an evaluation that cannot be resumed).
    """

    def __init__(self, path, fingerprint, num_jobs, num_examples):
        self.path, self.fingerprint = path, dict(fingerprint)
        self.fooled_by = np.full([num_jobs, num_examples], -1, np.int16)
        self.position = np.zeros([num_jobs, 2], np.int64)
        self.seconds = np.zeros([num_jobs], np.float64)
        self.batches = np.zeros([num_jobs], np.int64)

    @classmethod
    def open(cls, path, passes, num_examples, *, discard_state=False, **evaluation):
        """The state at `path` if it belongs to this evaluation, a fresh one otherwise.

        Args:
            path: The state file (a `Path`), or None for a state in memory only.
            passes: The number of passes of each job (attack at one epsilon), in order.
            num_examples: Its examples.
            discard_state: Start afresh even if `path` holds another evaluation's state.
            **evaluation: `fingerprint`'s arguments (only digested when `path` is given).

        Raises:
            StateMismatchError: `path` holds another evaluation's state (and not
                `discard_state`), or a state that is damaged, edited or out of range.
        """
        num_jobs = len(passes)
        if path is None:
            return cls(None, {}, num_jobs, num_examples)
        state = cls(path, fingerprint(**evaluation), num_jobs, num_examples)
        if discard_state or not path.exists():
            return state
        hint = "start afresh with --discard_state (discard_state=True), or use another --output_dir"
        try:
            arrays = _read(path, num_jobs, num_examples)
            saved_fingerprint = json.loads(str(arrays["fingerprint"]))
            if not isinstance(saved_fingerprint, dict):
                raise ValueError("its fingerprint is not a JSON object")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            raise StateMismatchError(
                f"{path} is not a readable sat_tf evaluation state ({reason}); {hint}."
            ) from None
        changed = differences(saved_fingerprint, state.fingerprint)
        if changed:
            raise StateMismatchError(
                f"{path} holds an unfinished evaluation of something else: {'; '.join(changed)} "
                f"changed; rerun the same command to resume it, or {hint}."
            )
        for name in _RECORDS:
            if arrays[name].shape != getattr(state, name).shape:
                raise StateMismatchError(
                    f"{path} is not a readable sat_tf evaluation state ({name} has shape "
                    f"{arrays[name].shape}, not {getattr(state, name).shape}); {hint}."
                )
        problem = ""
        if str(arrays["digest"]) != digest(saved_fingerprint, arrays):
            problem = "its digest does not match its records"
        problem = problem or _out_of_range(arrays, passes, state.fingerprint["batch_size"])
        if problem:
            raise StateMismatchError(
                f"{path} was edited or damaged ({problem}): its records cannot be trusted; {hint}."
            )
        for name in _RECORDS:
            getattr(state, name)[:] = arrays[name]
        return state

    @property
    def evaluation_id(self):
        """A short digest of the fingerprint naming this evaluation (None without a file): the
        card keeps one entry per id, so recording a finished evaluation again replaces it."""
        if self.path is None:
            return None
        text = json.dumps(self.fingerprint, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def record(self, job, position, seconds):
        """Job `job` reached `position` after `seconds` more; written to disk at once."""
        self.position[job] = position
        self.seconds[job] += seconds
        self.batches[job] += position[1] > 0
        self.save()

    def save(self):
        if self.path is None:
            return
        buffer = io.BytesIO()
        records = {name: getattr(self, name) for name in _RECORDS}
        np.savez(
            buffer,
            fingerprint=np.array(json.dumps(self.fingerprint)),
            digest=np.array(digest(self.fingerprint, records)),
            **records,
        )
        atomic.atomic_write(self.path, buffer.getvalue())
