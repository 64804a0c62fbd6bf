"""One evaluation as N shards (one process per device or machine), merged into one result.

Shard `I/N` (`tools/eval.py --shard=I/N`, `evaluate(shard=...)`, `robustbench.benchmark(shard=...)`)
attacks the examples whose index is I modulo N, with its own state in its own folder
(`<output>/shard-I-of-N/eval_state.npz`, or the robustbench protocol's state file),
resumable like any evaluation. Once every shard is done, `merge` checks their states and joins
them into the state the evaluation of all examples in one process would have finished with:
the same fingerprint, the same per-example records (the attacks' random draws are keyed by the
example, `sat_tf.draws`), its examples' digests in order, the shards' seconds added up. The
evaluation run again with that state (`tools/eval.py --merge`) finds every attack done, checks
the examples as it reads them, and writes the reports and card entry of the whole run.

`status` says which shards are done, running, stopped or missing, and the work left.
"""

import dataclasses
from dataclasses import astuple
from pathlib import Path

import numpy as np

from sat_tf import evalstate, progress, rundir
from sat_tf.examples import Shard

STATE = "eval_state.npz"  # protocol "sat"; robustbench: robustbench_<leaderboard>_Linf_state.npz


class ShardError(ValueError):
    """The shards cannot be merged (missing, overlapping, unfinished or mismatched)."""


def folders(output):
    """The shard folders in `output` ("shard-I-of-N"), in shard order."""
    output = Path(output)
    if not output.is_dir():
        return []
    found = {p: Shard.of_folder(p.name) for p in output.iterdir() if p.is_dir()}
    return sorted((p for p, s in found.items() if s), key=lambda p: astuple(found[p])[::-1])


def state_file(folder):
    """The state file in a shard's folder (`STATE`, or a robustbench protocol's), or None."""
    found = sorted(Path(folder).glob("*state.npz"))
    return found[0] if found else None


def _load(folder, name):
    """(shard, fingerprint, arrays) of the state `name` in `folder`."""
    path = Path(folder) / name
    if not path.is_file():
        raise ShardError(f"{folder} holds no {name}: this shard never ran; run it first.")
    try:
        fingerprint, arrays = evalstate.load(path)
    except evalstate.StateMismatchError as error:
        raise ShardError(str(error)) from None
    if "shard" not in fingerprint:
        raise ShardError(f"{path} is not a shard's state (it ran without --shard).")
    return Shard.parse(fingerprint["shard"]), fingerprint, arrays


def merge(shard_folders, destination):
    """Joins the finished states of shards 0/N .. N-1/N into one state at `destination`.

    Args:
        shard_folders: The shards' folders, each with its state, named as `destination`.
        destination: Where the merged state is written (the whole evaluation's state file).

    Returns:
        The merged `evalstate.EvaluationState`.

    Raises:
        ShardError: one line: a shard missing or given twice, unfinished, from another
            evaluation (naming what differs), or with another number of examples than its
            share of the total.
    """
    loaded = [(Path(f), *_load(f, Path(destination).name)) for f in shard_folders]
    if not loaded:
        raise ShardError("no shard folders to merge (shard-I-of-N, written by --shard=I/N).")
    count = loaded[0][1].count
    by_index = {}
    for folder, shard, fingerprint, arrays in loaded:
        if shard.count != count:
            raise ShardError(f"{folder} is shard {shard}, not one of {count}: one N for all.")
        if shard.index in by_index:
            raise ShardError(
                f"shard {shard} is given twice ({by_index[shard.index][0]} and {folder}): "
                "each example must count once; keep one of them."
            )
        by_index[shard.index] = (folder, fingerprint, arrays)
    missing = [f"{i}/{count}" for i in range(count) if i not in by_index]
    if missing:
        raise ShardError(
            f"missing shard{'s' * (len(missing) > 1)} {', '.join(missing)}: run "
            "tools/eval.py with the same flags and --shard=I/N for each, or copy their folders."
        )
    first_folder, first, _ = by_index[0]
    common = {k: v for k, v in first.items() if k != "shard"}
    for index in range(count):
        folder, fingerprint, arrays = by_index[index]
        changed = evalstate.differences(
            common, {k: v for k, v in fingerprint.items() if k != "shard"}
        )
        if changed:
            raise ShardError(
                f"{folder} is another evaluation than {first_folder}: {'; '.join(changed)} "
                "differ; every shard must run with the same flags."
            )
        if not arrays["cursor"][1]:
            raise ShardError(
                f"shard {index}/{count} ({folder}) is unfinished: {int(arrays['cursor'][0])} "
                "examples done; rerun its command to finish it (it resumes), then merge."
            )
    total = sum(by_index[i][2]["fooled_by"].shape[1] for i in range(count))
    for index in range(count):
        folder, _, arrays = by_index[index]
        has, share = arrays["fooled_by"].shape[1], Shard(index, count).size(total)
        if has != share:
            raise ShardError(
                f"shard {index}/{count} ({folder}) holds {has} examples, but its share of "
                f"{total} is {share}: the shards read different data."
            )
    return _joined(by_index, count, total, common, destination)


def _joined(by_index, count, total, fingerprint, destination):
    state = evalstate.EvaluationState(Path(destination), fingerprint, len(fingerprint["passes"]))
    state.fooled_by = np.full([len(fingerprint["passes"]), total], -1, np.int16)
    state.example_digests = np.zeros([total], np.uint64)
    state.labels = np.zeros([total], np.int32)
    for index in range(count):
        arrays = by_index[index][2]
        state.fooled_by[:, index::count] = arrays["fooled_by"]
        state.example_digests[index::count] = arrays["example_digests"]
        state.labels[index::count] = arrays["labels"]
        state.seconds += arrays["seconds"]
        state.batches += arrays["batches"]
    state.position[:, 0] = fingerprint["passes"]
    state.cursor[:] = total, 1
    state.save()
    return state


@dataclasses.dataclass(frozen=True)
class ShardStatus:
    """Where one shard stands: `state` "done", "running", "stopped" or "missing"."""

    shard: Shard
    state: str
    done: int = 0
    expected: int | None = None
    seconds: float = 0.0
    holder: str = ""
    under_way: int = 0  # examples of the chunk under way (not in `done`)

    def line(self):
        if self.state == "missing":
            return f"shard {self.shard}: missing (never started here)"
        expected = "" if self.expected is None else f" of {self.expected}"
        text = f"shard {self.shard}: {self.state}, {self.done}{expected} examples"
        if self.under_way:
            text += f" (and a chunk of {self.under_way} under way)"
        text += f" in {progress.duration(self.seconds)}"
        if self.state != "done" and self.expected and self.done:
            rate = self.done / max(self.seconds, 1e-9)
            text += f", about {progress.duration((self.expected - self.done) / rate)} left"
        return text + (f" ({self.holder})" if self.holder else "")


def status(shard_folders):
    """`ShardStatus`es of shards 0/N .. N-1/N, from their folders (`folders`); N is the one
    most folders name, and a shard without a folder is "missing"."""
    found = {}
    for folder in shard_folders:
        shard = Shard.of_folder(Path(folder).name)
        if shard is not None:
            found.setdefault(shard.count, {})[shard.index] = Path(folder)
    if not found:
        return []
    count = max(found, key=lambda n: len(found[n]))
    rows = []
    for index in range(count):
        shard = Shard(index, count)
        folder = found[count].get(index)
        path = None if folder is None else state_file(folder)
        if path is None:
            holder = rundir.holder(folder) if folder is not None else None
            rows.append(ShardStatus(shard, "running" if holder else "missing", holder=holder or ""))
            continue
        try:
            fingerprint, arrays = evalstate.load(path)
        except evalstate.StateMismatchError:
            rows.append(ShardStatus(shard, "damaged"))
            continue
        total = fingerprint.get("num_examples")
        holder = rundir.holder(folder)
        state = "done" if arrays["cursor"][1] else "running" if holder else "stopped"
        rows.append(
            ShardStatus(
                shard,
                state,
                done=int(arrays["cursor"][0]),
                expected=None if total is None else shard.size(int(total)),
                seconds=float(arrays["seconds"].sum()),
                holder=holder or "",
                under_way=arrays["fooled_by"].shape[1] - int(arrays["cursor"][0]),
            )
        )
    return rows
