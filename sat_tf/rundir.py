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
- Nothing outside the run folder is changed through it: the lock is opened without following a
  link and must be a file of its own (one name, no hard links); every process that holds the lock
  first checks that the run's folders (`RUN_FOLDERS`, everything under them) and the temporaries of
  atomic writes are no symbolic links (`check_no_links`), and `--overwrite` checks what it removes.
  Write probes get fresh names, created exclusively. The run's small JSON files are read with a
  size limit (`read_json`), and only when they are regular files (a FIFO would block the reader).
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

from sat_tf.atomic import PREFIX, write_json
from sat_tf.examples import Shard

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
RUN_FOLDERS = (CHECKPOINTS, LOGS, EVAL, EXPORT)  # written into in place: never through a link
TRAINING_FILES = (CONFIG, CHECKPOINTS, LOGS, CARD, FINAL_MODEL, RESULTS)  # tools/train.py
IMPORTED_FILES = (CONFIG, CARD, FINAL_MODEL)  # tools/import_official.py
# What `--overwrite` removes of a finished run before training it again.
REPLACED_FILES = (CHECKPOINTS, FINAL_MODEL, RESULTS, CONFIG, CARD)
# What `--overwrite` may remove inside a listed `checkpoints/` (TensorFlow's CheckpointManager
# files and our signature); anything else a user put there stays.
CHECKPOINT_FILES = ("checkpoint", "ckpt-*", "model_signature.json*", ".partial-*")
# The run's JSON files (flags, manifest, card, checkpoint signature) are kilobytes; a larger one
# is forged or damaged, and is refused without being read whole.
MAX_JSON_BYTES = 16 * 2**20


class RunDirError(Exception):
    """A run folder that is not ours, is in use, or holds an unreadable config."""


class RunWriteError(Exception):
    """A write into a run that failed; the message says what is kept and how to resume."""


def _hidden_ours(name):
    return name in (MANIFEST, LOCK) or name.startswith(".write_probe")


def _shard_folder(path):
    """A shard's folder of a sharded evaluation (`sat_tf.shards`): with its manifest, or still
    being set up by its process (nothing in it but the lock and write probes yet): shards start
    side by side, so one may look into the output folder while another creates its own."""
    if Shard.of_folder(path.name) is None or not path.is_dir():
        return False
    return (path / MANIFEST).is_file() or all(_hidden_ours(p.name) for p in path.iterdir())


def check_ours(model_dir, flag="--model_dir"):
    """Raises `RunDirError` when `model_dir` holds files but no manifest (not a run of ours)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or (model_dir / MANIFEST).exists() or _older_run(model_dir):
        return
    foreign = sorted(
        p.name for p in model_dir.iterdir() if not (_hidden_ours(p.name) or _shard_folder(p))
    )
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
        config = read_json(Path(model_dir) / CONFIG)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and set(config) >= OLDER_RUN_KEYS


def listed(model_dir):
    """The names the manifest of `model_dir` lists (empty when there is none)."""
    path = Path(model_dir) / MANIFEST
    if not path.exists():
        return []
    fix = "it says which files are the run's. Restore it, or use a new --model_dir."
    try:
        manifest = read_json(path)
    except ValueError as error:
        raise RunDirError(f"{path} {error}; {fix}") from None
    try:
        return [str(name) for name in manifest["files"]]
    except (KeyError, TypeError) as error:
        raise RunDirError(f"{path} is damaged ({error!r}); {fix}") from None


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
    present = [n for n in names if n in ours and os.path.lexists(model_dir / n)]
    check_no_links(model_dir)  # the run's folders and everything under them
    for name in present:  # and the listed files themselves: none is removed through a link
        if (model_dir / name).is_symlink():
            raise RunDirError(_link_message(model_dir / name))
    removed = []
    for name in present:
        path = model_dir / name
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
        config = read_json(path)
        if not isinstance(config, dict):
            raise ValueError("is not an object")
    except ValueError as error:
        raise RunDirError(
            f"{path} {error}; it is written by tools/train.py as a JSON object of the run's "
            "flags. Restore it from a copy, or use a new --model_dir."
        ) from None
    return config


def read_json(path, limit=MAX_JSON_BYTES):
    """The JSON value in the regular file `path`, reading at most `limit` bytes of it.

    Raises:
        FileNotFoundError: there is no file at `path`.
        ValueError: why it is not read, as a phrase that follows the path in a message: "is a
            directory, not a file", "is not a regular file", "is over 16 MiB", "is not valid
            JSON (...)", "cannot be read (...)".
    """
    data = read_small(path, limit)
    try:
        return json.loads(data)
    except ValueError as error:  # UnicodeDecodeError too
        raise ValueError(f"is not valid JSON ({str(error).splitlines()[0][:200]})") from None
    except RecursionError:  # "[[[[...": small, and deeper than the parser goes
        raise ValueError("is not valid JSON (nested too deeply)") from None


def read_small(path, limit):
    """The bytes of the regular file `path`, at most `limit` of them (see `read_json`).

    Opened without blocking, so a FIFO planted under the name is refused instead of waited on,
    and read only up to the limit, so a forged file that claims gigabytes costs nothing.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ValueError(f"cannot be read ({error.strerror or error})") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise ValueError("is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise ValueError("is not a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(descriptor, min(2**20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(descriptor)
    if size > limit:
        raise ValueError(f"is over {_size(limit)}")
    return b"".join(chunks)


def _size(limit):
    return f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit} bytes"


def check_no_links(model_dir):
    """Raises `RunDirError` naming the first symbolic link among the run's folders
    (`RUN_FOLDERS`), anything under them, and the temporaries of atomic writes (`.partial-*`).

    Those are written into in place or removed by `--overwrite`: through a link, files outside
    the run folder would change. Called by every process that holds the lock (`locked`), before
    it writes, and by `remove_listed`.
    """
    model_dir = Path(model_dir)
    for entry in _entries(model_dir):
        if entry.is_symlink():
            raise RunDirError(_link_message(entry))


def _entries(model_dir):
    if model_dir.is_dir():
        yield from (p for p in model_dir.iterdir() if p.name.startswith(PREFIX))
    for name in RUN_FOLDERS:
        folder = model_dir / name
        yield folder
        if folder.is_dir() and not folder.is_symlink():
            for root, folders, files in os.walk(folder):  # never descends into a link
                yield from (Path(root) / entry for entry in folders + files)


def _link_message(path):
    return (
        f"{path} is a symbolic link (to {os.readlink(path)}): sat_tf never writes or removes "
        "through a link, so that nothing outside the run folder changes; nothing was changed. "
        "Replace it with a real folder or file, then re-run."
    )


@contextlib.contextmanager
def locked(model_dir, purpose):
    """Holds the exclusive lock of `model_dir` (created if needed) for `purpose` ("training").

    The run's folders are checked for links (`check_no_links`) once the lock is held.

    Raises:
        RunDirError: another live process holds it (naming its pid, host and purpose); the lock
            is not a file of its own (a symbolic or hard link, a folder); or a run folder is a link.
        RunWriteError: the lock file cannot be created (read-only folder, disk full).
    """
    model_dir = Path(model_dir)
    path = model_dir / LOCK
    handle = _take_lock(model_dir, path, purpose)
    try:
        check_no_links(model_dir)
        handle.seek(0)
        previous = _shown(handle.read(512))
        if previous:  # the file outlived its holder: killed before it could remove it
            print(
                f"Taking over the stale lock {path} of {previous}: no longer running.", flush=True
            )
        handle.seek(0)
        handle.truncate()
        host = socket.gethostname()
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        handle.write(f"pid {os.getpid()} on host {host} ({purpose}, since {started})")
        handle.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the unlock: a waiter then retries on a fresh file
        handle.close()


def _take_lock(model_dir, path, purpose):
    """The open lock file of `model_dir`, locked; see `locked`."""
    while True:
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
            # Never through a link: the file is truncated and written below.
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
            descriptor = os.open(path, flags, 0o644)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EISDIR):
                what = "a symbolic link" if path.is_symlink() else "not a regular file"
                raise RunDirError(_foreign_lock(path, what, purpose)) from None
            raise write_failure(  # a read-only folder: say so before any work
                f"the lock file {LOCK}",
                model_dir,
                "everything, unchanged",
                f"re-run {purpose}",
                error,
            ) from None
        handle = os.fdopen(descriptor, "r+", errors="replace")  # the content may be forged
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or status.st_nlink > 1:  # 0: removed, retried below
            handle.close()
            regular = stat.S_ISREG(status.st_mode)
            what = "a hard link (the file has other names)" if regular else "not a regular file"
            raise RunDirError(_foreign_lock(path, what, purpose))
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            holder = _shown(handle.read(512)) or "another process"
            handle.close()
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise RunDirError(
                f"--model_dir={model_dir} is in use: {holder} holds {path}. Wait for it to "
                "finish or stop it (a lock left by a process that died is taken over)."
            ) from None
        # The previous holder may have removed the file between our open and flock: then we
        # hold a lock on an orphan, so try again on the file now at `path`.
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(path).st_ino == status.st_ino:
                return handle
        handle.close()


def holder(folder):
    """Who holds the lock of `folder` ("pid 12 on host h (evaluation, since ...)"), or None when
    no live process does."""
    path = Path(folder) / LOCK
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(descriptor, "r", errors="replace") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _shown(handle.read(512)) or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _foreign_lock(path, what, purpose):
    return (
        f"{path} is {what}: not a lock file sat_tf made, so it was left as it is (and whatever it "
        f"points to) and nothing was written. Check who put it there, remove {path}, then re-run "
        f"the {purpose}."
    )


def _shown(text):
    """The first line of a lock's content, short and printable (the file may be forged)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return "".join(c for c in line[:200] if c.isprintable())


def probe(directory):
    """Creates, writes and removes a new file in `directory`; OSError when that fails.

    The file gets a fresh random name and is created exclusively (`tempfile.mkstemp`), so a link
    planted under a predictable name is never followed.
    """
    descriptor, name = tempfile.mkstemp(dir=directory, prefix=".write_probe-")
    os.close(descriptor)
    try:
        Path(name).write_text("ok")  # the file just made: a full disk fails here
    finally:
        os.unlink(name)


def check_writable(directory, what):
    """Raises `RunWriteError` unless a file can be created in `directory` (made if missing):
    called before long work whose results go there."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe(directory)
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
