"""What an evaluation has found so far, on disk, so that a killed evaluation picks up where it was.

One `.npz` file, rewritten atomically (`sat_tf.atomic`) after every batch, holds per job (one
attack at one epsilon, `sat_tf.passes`) the per-example record `fooled_by`, the position
(pass, batches done), the seconds spent and the batches run, plus a fingerprint: digests of the
model weights and of the examples, the attacks and every setting that changes a result (seed,
batch size, ...). Opening the file for an evaluation with another fingerprint refuses with one
line naming what changed, unless `discard_state=True` (tools/eval.py: --discard_state) starts
afresh.
"""

import hashlib
import io
import json

import numpy as np

from sat_tf import atomic

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
    def open(cls, path, num_jobs, num_examples, *, discard_state=False, **evaluation):
        """The state at `path` if it belongs to this evaluation, a fresh one otherwise.

        Args:
            path: The state file (a `Path`), or None for a state in memory only.
            num_jobs: Attacks (at each epsilon) of the evaluation.
            num_examples: Its examples.
            discard_state: Start afresh even if `path` holds another evaluation's state.
            **evaluation: `fingerprint`'s arguments (only digested when `path` is given).

        Raises:
            StateMismatchError: `path` holds another evaluation's state (and not
                `discard_state`).
        """
        if path is None:
            return cls(None, {}, num_jobs, num_examples)
        state = cls(path, fingerprint(**evaluation), num_jobs, num_examples)
        if discard_state or not path.exists():
            return state
        hint = "start afresh with --discard_state (discard_state=True), or use another --output_dir"
        try:
            with np.load(path, allow_pickle=False) as saved:
                arrays = {name: saved[name] for name in saved.files}
            saved_fingerprint = json.loads(str(arrays["fingerprint"]))
            shapes_ok = arrays["fooled_by"].shape == state.fooled_by.shape
        except (OSError, ValueError, KeyError) as error:
            raise StateMismatchError(
                f"{path} is not a readable sat_tf evaluation state ({error}); {hint}."
            ) from None
        changed = differences(saved_fingerprint, state.fingerprint)
        if changed or not shapes_ok:
            what = "; ".join(changed) or "the number of attacks or examples"
            raise StateMismatchError(
                f"{path} holds an unfinished evaluation of something else: {what} changed; "
                f"rerun the same command to resume it, or {hint}."
            )
        state.fooled_by[:] = arrays["fooled_by"]
        state.position[:] = arrays["position"]
        state.seconds[:] = arrays["seconds"]
        state.batches[:] = arrays["batches"]
        return state

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
        np.savez(
            buffer,
            fingerprint=np.array(json.dumps(self.fingerprint)),
            fooled_by=self.fooled_by,
            position=self.position,
            seconds=self.seconds,
            batches=self.batches,
        )
        atomic.atomic_write(self.path, buffer.getvalue())
