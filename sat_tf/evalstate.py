"""What an evaluation has found so far, on disk, so that a killed evaluation picks up where it was.

One `.npz` file, rewritten atomically (`sat_tf.atomic`) after every batch, holds per job (one
attack at one epsilon, `sat_tf.passes`) the per-example record `fooled_by`, the position in the
current chunk (pass, batches done), the seconds spent and the batches run; the digest of every
example read so far (`sat_tf.examples.digests`) and the `cursor`: the examples of finished chunks
and whether the last chunk is done. A fingerprint holds digests of the model weights, the attacks
and their passes, and every setting that changes a result (seed, batch and chunk size, shard,
op determinism, ...). Opening the file for an evaluation with another fingerprint refuses with
one line naming what changed, unless `discard_state=True` (tools/eval.py: --discard_state) starts
afresh; the examples are checked as they are read again (`admit`), one chunk at a time.

A state is resumed only when it is whole, unedited and in range, so that a result is what was
computed or nothing: the file must hold exactly the expected members, each stored uncompressed
(checked from the zip directory, before anything is read, so a deflate bomb costs nothing); a
sha256 `digest` over the fingerprint and every record must match (it catches damage and hand
edits; it is not a signature: code that recomputes it can forge a state, as anyone who can write
the file can also change the code that reads it); and every value must be possible for the
evaluation's jobs (`fooled_by` names a pass already run, positions within the passes and
batches, the cursor within the examples).
"""

import hashlib
import io
import json
import math
import zipfile

import keras
import numpy as np

from sat_tf import atomic
from sat_tf.examples import examples_digest

# The members of a state file, with their dtype and their number of dimensions.
_MEMBERS = {
    "fingerprint": ("<U", 0),
    "fooled_by": ("<i2", 2),
    "position": ("<i8", 2),
    "seconds": ("<f8", 1),
    "batches": ("<i8", 1),
    "example_digests": ("<u8", 1),
    "labels": ("<i4", 1),
    "cursor": ("<i8", 1),
    "digest": ("<U", 0),
}
# The records, in the digest's order.
_RECORDS = (
    "fooled_by",
    "position",
    "seconds",
    "batches",
    "example_digests",
    "labels",
    "cursor",
)
_HEADER_BYTES = 256  # an .npy header (magic, version, dict, padding): 128 bytes, room for more
_TEXT_BYTES = 4 * 2**16  # the fingerprint and digest members: JSON text, 4 bytes a character

# Names of the fingerprint's parts in error messages.
_PARTS = {
    "model": "the model weights",
    "examples": "the examples",
    "num_examples": "the number of examples",
    "chunk_size": "the chunk size",
    "shard": "the shard",
    "passes": "the attacks' passes",
    "attacks": "the attacks",
    "seed": "the seed",
    "batch_size": "the batch size",
    "surrogate": "the surrogate model's weights",
    "backend": "the Keras backend",
}


class StateMismatchError(ValueError):
    """The state file on disk belongs to another evaluation (or is not a state file)."""


def weights_digest(model):
    """sha256 over every weight's path, shape, dtype and bytes, in the model's order."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{weight.path}:{value.shape}:{value.dtype};".encode())
        digest.update(value.tobytes())
    return "sha256 " + digest.hexdigest()[:16]


def fingerprint(*, model, attacks, passes, seed, batch_size, **settings):
    """The fingerprint of an evaluation: a flat dict of JSON values (a model among `settings`,
    such as a transfer attack's surrogate, by its weights' digest). The examples are not in it:
    they are checked one by one as they are read (`EvaluationState.admit`)."""
    settings = {
        name: weights_digest(value) if hasattr(value, "weights") else value
        for name, value in settings.items()
    }
    found = {
        "model": weights_digest(model),
        "attacks": "; ".join(attacks),
        "passes": [int(p) for p in passes],
        "seed": int(seed),
        "batch_size": int(batch_size),
    }
    return found | {name: value for name, value in sorted(settings.items())}


def identity(fingerprint, example_digests):
    """The evaluation id (`EvaluationState.evaluation_id`) of a fingerprint and its examples:
    the shard left out, so a merge of shards has the id of the run that did all at once."""
    found = {k: v for k, v in fingerprint.items() if k != "shard"}
    found["examples"] = examples_digest(example_digests)
    return hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()[:16]


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
    """The largest size an uncompressed member of a state of this shape can have (num_examples
    None: any number of examples, as far as the file goes)."""
    if num_examples is None and name in ("fooled_by", "example_digests", "labels"):
        return float("inf")
    items = {"fooled_by": 2 * num_jobs * (num_examples or 0), "position": 16 * num_jobs}
    items |= {"seconds": 8 * num_jobs, "batches": 8 * num_jobs, "cursor": 16}
    items |= {"example_digests": 8 * (num_examples or 0), "labels": 4 * (num_examples or 0)}
    return _HEADER_BYTES + items.get(name, _TEXT_BYTES)


def _read(path, num_jobs, num_examples=None):
    """The arrays of the state file at `path`, read only after the zip directory shows the
    expected members, uncompressed, at sizes their shapes allow; ValueError naming what is
    wrong."""
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


def _out_of_range(arrays, passes, batch_size, chunk_size):
    """What in the records no evaluation with these jobs could have written, or ""."""
    fooled_by, position, cursor = arrays["fooled_by"], arrays["position"], arrays["cursor"]
    num_examples = fooled_by.shape[1]
    finished, finished_chunks = int(cursor[0]), int(cursor[1])
    current = num_examples - finished  # the examples of the chunk under way
    if not (0 <= current <= chunk_size and finished_chunks in (0, 1)):
        return f"cursor {cursor.tolist()} with {num_examples} examples read"
    if finished_chunks and current:
        return f"cursor {cursor.tolist()}: finished with {current} examples under way"
    most_batches = math.ceil(chunk_size / max(1, batch_size))
    for j, count in enumerate(passes):
        at, done = (int(v) for v in position[j])
        if not (0 <= at <= count and 0 <= done <= most_batches) or (at == count and done):
            return f"position {[at, done]} of attack {j} (it has {count} passes)"
        if finished_chunks and at != count:
            return f"position {[at, done]} of attack {j} in a finished evaluation"
        for row, last in ((fooled_by[j, :finished], count - 1), (fooled_by[j, finished:], at)):
            if row.size and (row.min() < -1 or row.max() > min(last, count - 1)):
                return f"fooled_by of attack {j} names pass {int(row.max())} or {int(row.min())}"
    seconds, batches = arrays["seconds"], arrays["batches"]
    if not np.all(np.isfinite(seconds)) or np.any(seconds < 0) or np.any(batches < 0):
        return "negative or non-finite seconds or batches"
    return ""


_HINT = "start afresh with --discard_state (discard_state=True), or use another --output_dir"


def load(path, *, num_examples=None):
    """(fingerprint, arrays) of the state at `path`, whole and unedited (`digest` checked);
    StateMismatchError naming the file otherwise."""
    try:
        with zipfile.ZipFile(path) as archive:  # the jobs' count, for the members' bounds
            info = archive.getinfo("fingerprint.npy")
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > _member_bytes(
                "fingerprint", 0, 0
            ):
                raise ValueError(f"member fingerprint holds {info.file_size} bytes")
            with archive.open(info) as member:
                text = np.lib.format.read_array(member, allow_pickle=False)
        saved = json.loads(str(text))
        if not isinstance(saved, dict) or not isinstance(saved.get("passes"), list):
            raise ValueError("its fingerprint is not a JSON object with the attacks' passes")
        num_jobs = len(saved["passes"])
        arrays = _read(path, num_jobs, num_examples)
        n = arrays["fooled_by"].shape[1]
        shapes = {"fooled_by": (num_jobs, n), "position": (num_jobs, 2), "cursor": (2,)}
        shapes |= {"seconds": (num_jobs,), "batches": (num_jobs,)}
        shapes |= {"example_digests": (n,), "labels": (n,)}
        for name, shape in shapes.items():
            if arrays[name].shape != shape:
                raise ValueError(f"{name} has shape {arrays[name].shape}, not {shape}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise StateMismatchError(
            f"{path} is not a readable sat_tf evaluation state ({reason}); {_HINT}."
        ) from None
    if str(arrays["digest"]) != digest(saved, arrays):
        raise StateMismatchError(
            f"{path} was edited or damaged (its digest does not match its records): its records "
            f"cannot be trusted; {_HINT}."
        )
    return saved, arrays


class EvaluationState:
    """Per job: `fooled_by` [N], `position` (pass, batches done in the current chunk), `seconds`,
    `batches` run; per example read so far, its digest; the `cursor`.

    The records grow one chunk at a time (`admit`). The evaluation is done when the cursor says
    so (`finish`). With `path=None` the state lives in memory only (an evaluation that cannot be
    resumed).
    """

    def __init__(self, path, fingerprint, num_jobs):
        self.path, self.fingerprint = path, dict(fingerprint)
        self.fooled_by = np.full([num_jobs, 0], -1, np.int16)
        self.position = np.zeros([num_jobs, 2], np.int64)
        self.seconds = np.zeros([num_jobs], np.float64)
        self.batches = np.zeros([num_jobs], np.int64)
        self.example_digests = np.zeros([0], np.uint64)
        self.labels = np.zeros([0], np.int32)
        self.cursor = np.zeros([2], np.int64)  # examples of finished chunks; 1 once all are

    @classmethod
    def open(cls, path, *, num_examples=None, discard_state=False, **evaluation):
        """The state at `path` if it belongs to this evaluation, a fresh one otherwise.

        Args:
            path: The state file (a `Path`), or None for a state in memory only.
            num_examples: The most examples the evaluation reads (None: all there are).
            discard_state: Start afresh even if `path` holds another evaluation's state.
            **evaluation: `fingerprint`'s arguments, with `chunk_size` among them.

        Raises:
            StateMismatchError: `path` holds another evaluation's state (and not
                `discard_state`), or a state that is damaged, edited or out of range.
        """
        wanted = fingerprint(num_examples=num_examples, **evaluation)
        state = cls(path, wanted, len(wanted["passes"]))
        if path is None or discard_state or not path.exists():
            return state
        saved, arrays = load(path, num_examples=num_examples)
        changed = differences(saved, wanted)
        if changed:
            raise StateMismatchError(
                f"{path} holds an unfinished evaluation of something else: {'; '.join(changed)} "
                f"changed; rerun the same command to resume it, or {_HINT}."
            )
        chunk_size = int(wanted.get("chunk_size") or 1)
        problem = _out_of_range(arrays, wanted["passes"], wanted["batch_size"], chunk_size)
        if problem:
            raise StateMismatchError(
                f"{path} was edited or damaged ({problem}): its records cannot be trusted; {_HINT}."
            )
        for name in _RECORDS:
            setattr(state, name, arrays[name].copy())
        return state

    @property
    def num_examples(self):
        """The examples read so far."""
        return self.fooled_by.shape[1]

    @property
    def finished(self):
        return bool(self.cursor[1])

    @property
    def evaluation_id(self):
        """A short digest of the fingerprint and the examples naming this evaluation (None
        without a file): the card keeps one entry per id, so recording a finished evaluation
        again replaces it."""
        if self.path is None:
            return None
        return identity(self.fingerprint, self.example_digests)

    def admit(self, start, digests, labels):
        """The examples [start, start + n) of a chunk, by their digests (`examples.digests`,
        which cover the labels): those read before must be the same (StateMismatchError naming
        the first that is not); new ones get records."""
        known = self.example_digests[start : start + len(digests)]
        if not np.array_equal(known, digests[: len(known)]):
            first = start + int(np.flatnonzero(known != digests[: len(known)])[0])
            raise StateMismatchError(
                f"{self.path} holds an unfinished evaluation of other examples: example "
                f"{first} of this evaluation's examples is not the one it attacked; rerun with "
                f"the same data to resume it, or {_HINT}."
            )
        new = digests[len(known) :]
        if len(new) and self.finished:
            raise StateMismatchError(
                f"{self.path} holds a finished evaluation of {self.num_examples} examples, but "
                f"more were read; rerun with the same data, or {_HINT}."
            )
        if len(new):
            self.example_digests = np.concatenate([self.example_digests, new])
            self.labels = np.concatenate([self.labels, labels[len(known) :].astype(np.int32)])
            fresh = np.full([len(self.fooled_by), len(new)], -1, np.int16)
            self.fooled_by = np.concatenate([self.fooled_by, fresh], axis=1)

    def check_count(self, count):
        """The examples ran out after `count`: fewer than were read before is another data."""
        if count < self.num_examples:
            raise StateMismatchError(
                f"{self.path} holds an unfinished evaluation of {self.num_examples} examples or "
                f"more, but only {count} were read; rerun with the same data, or {_HINT}."
            )

    def finish_chunk(self, end):
        """Every job is done with the chunk ending at example `end`: the next chunk starts at
        pass 0."""
        self.cursor[0] = end
        self.position[:] = 0
        self.save()

    def finish(self, passes):
        """Every chunk is done: each job at its last pass."""
        self.position[:, 0], self.position[:, 1] = passes, 0
        self.cursor[1] = 1
        self.save()

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
