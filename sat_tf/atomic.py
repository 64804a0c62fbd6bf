"""Atomic file writes: a file (or folder) appears whole under its name, or not at all.

Everything is first written to a hidden temporary name in the same folder, `.partial-<name>`, then
renamed with `os.replace`, which is atomic on POSIX file systems. A reader that looks for the name
(a resumed run for `model.keras`, TF Serving for a numeric export folder, a glob for
`<split>-*` shards) never sees a half-written file; a process killed mid-write leaves only the
hidden temporary behind, which the next write replaces.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

PREFIX = ".partial-"


def partial_path(path):
    """The hidden temporary name `path` is written under before the rename."""
    path = Path(path)
    return path.with_name(PREFIX + path.name)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path to write `path` through (a file or a folder, by any writer).

    When the block ends without an error, the temporary is renamed to `path`; after an error
    (a full disk, say), nothing is renamed and the temporary is removed. A stale temporary of
    an earlier, killed write is removed first.

        with atomic_path(model_dir / "model.keras") as partial:
            model.save(partial)
    """
    partial = partial_path(path)
    _remove(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
    except BaseException:
        _remove(partial)  # never leave half a file behind
        raise
    os.replace(partial, path)


def _remove(partial):
    if partial.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.unlink(missing_ok=True)


def atomic_write(path, data):
    """Writes `data` (str as UTF-8, or bytes) to `path` atomically; returns `path` as a Path."""
    with atomic_path(path) as partial:
        partial.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path, payload):
    """Writes `payload` as indented JSON to `path` atomically; returns `path` as a Path."""
    return atomic_write(path, json.dumps(payload, indent=2, default=str) + "\n")
