"""The study's queue: which (row, seed) runs are pending, who runs them, in which process.

Several `--run` queues may share the machine and its results folder (a small model's evaluation
keeps about one core busy, so two queues use two cores); they split the runs between them with
claim files. Each run trains and evaluates in a child process (`tools/study.py --one`), so every
run starts with a fresh TensorFlow.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from study import paths
from study.protocol import CIFAR10, STANDARD_AA


def queue(rows, seeds):
    """(row, seed) pairs, seed-major: every row at the first seed, then the next seed."""
    return [(row, seed) for seed in seeds for row in rows]


def result_path(row, seed, results=None, arm=CIFAR10, standard_aa=False):
    """The run's result file, or with `standard_aa` its standard-AutoAttack file."""
    folder = Path(results or paths.RESULTS) / arm.folder
    return (folder / STANDARD_AA if standard_aa else folder) / f"{row}_s{seed}.json"


def is_current(path, arm=CIFAR10):
    """Whether `path` is a result of the arm's current protocol (protocol 1 had no version)."""
    if not Path(path).exists():
        return False
    version = json.loads(Path(path).read_text())["eval_protocol"].get("version", 1)
    return version == arm.protocol["version"]


def pending(rows, seeds, results=None, arm=CIFAR10, standard_aa=False):
    """The queue minus the runs whose result file exists with the current protocol.

    With `standard_aa`: the finished runs (current result file) without a current
    standard-AutoAttack file.
    """
    done = [
        (r, s) for r, s in queue(rows, seeds) if is_current(result_path(r, s, results, arm), arm)
    ]
    if not standard_aa:
        return [pair for pair in queue(rows, seeds) if pair not in done]
    return [(r, s) for r, s in done if not is_current(result_path(r, s, results, arm, True), arm)]


def claim(row, seed, claims):
    """Claims a run for this process: the path of its claim file, or None if a live runner has it.

    A claim is `<claims>/<row>_s<seed>.pid`, created complete and atomically with a hard link; the
    claim of a runner that died is taken over.
    """
    claims = Path(claims)
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / f"{row}_s{seed}.pid"
    draft = claims / f".{row}_s{seed}.{os.getpid()}"
    draft.write_text(str(os.getpid()))
    try:
        for _ in range(2):  # a second try after removing a dead runner's claim
            try:
                os.link(draft, path)
                return path
            except FileExistsError:
                try:
                    os.kill(int(path.read_text()), 0)
                    return None  # its runner is alive
                except ProcessLookupError:
                    path.unlink(missing_ok=True)
                except (FileNotFoundError, ValueError, PermissionError):
                    pass  # released meanwhile, or another user's process: try once more
        return None
    finally:
        draft.unlink(missing_ok=True)


def run_queue(
    rows,
    seeds,
    *,
    results=None,
    stop_at=None,
    call=subprocess.call,
    claims=None,
    arm=CIFAR10,
    standard_aa=False,
):
    """Runs each pending, unclaimed (row, seed) in a child process; none after `stop_at`.

    With `standard_aa` the queue is the standard-AutoAttack pass (`runs.run_standard_autoattack`).

    Returns the (row, seed) pairs started. A failing child stops the queue (e.g. a broken edit of
    a shared module would otherwise fail every later run in a second).
    """
    results = results or paths.RESULTS
    claims = Path(claims or paths.CACHE / "claims") / arm.folder
    claims = claims / (STANDARD_AA if standard_aa else "")
    started = []
    for row, seed in pending(rows, seeds, results, arm, standard_aa):
        if stop_at is not None and time.time() >= stop_at:
            print(f"Stop time reached; not starting {row} seed {seed}.", flush=True)
            break
        held = claim(row, seed, claims)
        if held is None:
            continue  # another queue runs it
        try:
            if is_current(result_path(row, seed, results, arm, standard_aa), arm):
                continue  # another queue finished it since `pending` was listed
            print(f"=== {row} seed {seed} ({time.strftime('%H:%M:%S')})", flush=True)
            started.append((row, seed))
            command = [sys.executable, str(paths.ROOT / "tools" / "study.py"), "--one"]
            command += [f"{row}:{seed}", f"--arm={arm.name}", f"--results={results}"]
            command += ["--autoattack_standard"] * standard_aa
            code = call(command, cwd=paths.ROOT)
        finally:
            held.unlink(missing_ok=True)
        if code:
            print(f"{row} seed {seed} failed (exit {code}); stopping the queue.", flush=True)
            break
    return started


def next_utc_time(hhmm):
    """The next time the UTC clock reads HH:MM (tomorrow's if today's has passed), in epoch s."""
    hours, minutes = map(int, hhmm.split(":"))
    now = time.gmtime()
    when = time.mktime(now[:3] + (hours, minutes, 0) + now[6:]) - time.mktime(now) + time.time()
    return when + 86400 if when <= time.time() else when
