"""A run folder is ours only when it says so: the manifest, the lock, and writes that fail cleanly.

- The manifest `.sat_tf_run.json` lists the names a run writes into its `model_dir` (written
  before the first of them). A non-empty folder without it is not a run of ours: nothing is
  written into it, and `--overwrite` removes only what the manifest lists.
- The lock `.sat_tf_run.lock`: training, evaluation and export hold an exclusive advisory lock
  (`fcntl.flock`) on it while they write into the run; the file holds the holder's pid, host and
  start time, so a second process is told who has the run. The kernel drops the lock when the
  holder dies, so a lock left behind by a killed process is taken over, never waited for.
- `RunWriteError`: a write that fails (disk full, read-only folder) becomes one line saying what
  could not be written, where, what is kept and how to resume.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from sat_tf.atomic import write_json

MANIFEST = ".sat_tf_run.json"
LOCK = ".sat_tf_run.lock"
FORMAT = "sat_tf.run/1"

# The layout of a run folder: every name a tool writes into `model_dir`, in one place.
CONFIG = "config.json"  # the run's flags (`sat_tf.config.TrainConfig`)
FINAL_MODEL = "model.keras"  # the classifier; written last, so its presence means finished
RESULTS = "results.json"  # the final training results
CARD = "robustness_card.json"  # threat model, recipe, evaluations (`sat_tf.card`)
CHECKPOINTS = "checkpoints"  # model + optimizer state, to resume training
LOGS = "logs"  # TensorBoard
EVAL = "eval"  # tools/eval.py's reports (default --output_dir)
EXPORT = "export"  # tools/export.py's SavedModels (default --export_dir)
TRAINING_FILES = (CONFIG, CHECKPOINTS, LOGS, CARD, FINAL_MODEL, RESULTS)  # tools/train.py
IMPORTED_FILES = (CONFIG, CARD, FINAL_MODEL)  # tools/import_official.py
# What `--overwrite` removes of a finished run before training it again.
REPLACED_FILES = (CHECKPOINTS, FINAL_MODEL, RESULTS, CONFIG, CARD)
# What `--overwrite` may remove inside a listed `checkpoints/` (TensorFlow's CheckpointManager
# files and our signature); anything else a user put there stays.
CHECKPOINT_FILES = ("checkpoint", "ckpt-*", "model_signature.json*", ".partial-*")


class RunDirError(Exception):
    """A run folder that is not ours, is in use, or holds an unreadable config."""


class RunWriteError(Exception):
    """A write into a run that failed; the message says what is kept and how to resume."""


def _hidden_ours(name):
    return name in (MANIFEST, LOCK) or name.startswith(".write_probe")


def check_ours(model_dir, flag="--model_dir"):
    """Raises `RunDirError` when `model_dir` holds files but no manifest (not a run of ours)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or (model_dir / MANIFEST).exists() or _older_run(model_dir):
        return
    foreign = sorted(p.name for p in model_dir.iterdir() if not _hidden_ours(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RunDirError(
            f"{flag}={model_dir} is not empty and is not a sat_tf run (no {MANIFEST}; it holds "
            f"{shown}): nothing was written there. Use a new or empty {flag}."
        )


# Keys every sat_tf config.json has: a folder whose config has them is a run without a manifest
# (it gets one when it is next trained), not a user's folder.
OLDER_RUN_KEYS = {"model_dir", "model", "activation", "epsilon", "step_size", "num_steps"}


def _older_run(model_dir):
    try:
        config = json.loads((Path(model_dir) / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and set(config) >= OLDER_RUN_KEYS


def listed(model_dir):
    """The names the manifest of `model_dir` lists (empty when there is none)."""
    path = Path(model_dir) / MANIFEST
    if not path.exists():
        return []
    try:
        manifest = json.loads(path.read_text())
        return [str(name) for name in manifest["files"]]
    except (ValueError, KeyError, TypeError) as error:
        raise RunDirError(
            f"{path} is damaged ({error}); it says which files are the run's. Restore it, or use "
            "a new --model_dir."
        ) from None


def record(model_dir, *names):
    """Adds `names` (files or folders directly in `model_dir`) to its manifest, atomically."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    known = set(listed(model_dir))
    if known >= set(names) and (model_dir / MANIFEST).exists():
        return  # nothing new: the file is not touched
    names = sorted(known | set(names))
    write_json(model_dir / MANIFEST, {"format": FORMAT, "files": names})


def remove_listed(model_dir, names):
    """Removes those of `names` that the manifest lists; inside `checkpoints/`, only
    `CHECKPOINT_FILES`. Returns what was removed."""
    model_dir = Path(model_dir)
    ours = set(listed(model_dir))
    removed = []
    for name in names:
        path = model_dir / name
        if name not in ours or not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and name == CHECKPOINTS:
            for pattern in CHECKPOINT_FILES:
                for item in path.glob(pattern):
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
            with contextlib.suppress(OSError):  # kept when a user file is left inside
                path.rmdir()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(name)
    return removed


def read_config(model_dir):
    """The run's `config.json` as a dict, {} when absent; `RunDirError` when unreadable."""
    path = Path(model_dir) / CONFIG
    return read_json_object(path) if path.exists() else {}


def read_json_object(path):
    """The JSON object in `path` as a dict; `RunDirError` naming the file when it is not one."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        config = error
    if not isinstance(config, dict):
        what = f"not valid JSON ({config})" if isinstance(config, Exception) else "not an object"
        raise RunDirError(
            f"{path} is {what}; it is written by tools/train.py as a JSON object of the run's "
            "flags. Restore it from a copy, or use a new --model_dir."
        )
    return config


@contextlib.contextmanager
def locked(model_dir, purpose):
    """Holds the exclusive lock of `model_dir` (created if needed) for `purpose` ("training").

    Raises:
        RunDirError: another live process holds it (naming its pid, host and purpose).
        RunWriteError: the lock file cannot be created (read-only folder, disk full).
    """
    model_dir = Path(model_dir)
    path = model_dir / LOCK
    while True:
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")  # noqa: SIM115  (held for the whole block)
        except OSError as error:  # a read-only folder: say so before any work
            raise write_failure(
                f"the lock file {LOCK}",
                model_dir,
                "everything, unchanged",
                f"re-run {purpose}",
                error,
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise RunDirError(
                f"--model_dir={model_dir} is in use: {holder} holds {path}. Wait for it to "
                "finish or stop it (a lock left by a process that died is taken over)."
            ) from None
        # The previous holder may have removed the file between our open and flock: then we
        # hold a lock on an orphan, so try again on the file now at `path`.
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    handle.seek(0)
    previous = handle.read().strip()
    if previous:  # the file outlived its holder: killed before it could remove it
        print(f"Taking over the stale lock {path} of {previous}: no longer running.", flush=True)
    handle.seek(0)
    handle.truncate()
    host = socket.gethostname()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    handle.write(f"pid {os.getpid()} on host {host} ({purpose}, since {started})")
    handle.flush()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the unlock: a waiter then retries on a fresh file
        handle.close()


def check_writable(directory, what):
    """Raises `RunWriteError` unless a file can be created in `directory` (made if missing):
    called before long work whose results go there."""
    directory = Path(directory)
    probe = directory / f".write_probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise write_failure(
            what, directory, "everything, unchanged: nothing was run", "re-run", error
        ) from None


def write_failure(what, where, kept, resume, error):
    """The one-line `RunWriteError` for a failed write of `what` into `where`.

    Args:
        what: What could not be written ("checkpoint ckpt-6").
        where: The folder.
        kept: What is still on disk and usable.
        resume: What to do once the cause is fixed ("re-run the same command to resume").
        error: The `OSError` or TensorFlow error that stopped the write.
    """
    text = str(getattr(error, "strerror", None) or getattr(error, "message", None) or error)
    reason = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
    code = getattr(error, "errno", None)
    if code == errno.ENOSPC or "No space left" in text:
        fix = "Free some space"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM) or "Read-only" in text:
        fix = "Make it writable"
    else:
        fix = "Fix the cause"
    return RunWriteError(
        f"Could not write {what} in {where} ({reason}). Kept: {kept}. {fix}, then {resume}."
    )
