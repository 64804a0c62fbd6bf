"""Evaluations in chunks and in shards give the per-example records of one evaluation in one go.

The reference is always the same evaluation run whole in one process (arrays at once): read a
few examples at a time, or split over 3 processes and merged, it must give exactly its records,
table and evaluation id. Merges that cannot give that result are refused in one line. The records
are NumPy bookkeeping, the same on every backend (tests/test_backends.py compares the attacks),
so this runs under TensorFlow only.
"""

import json

import numpy as np
import pytest
from conftest import HAS_TENSORFLOW, needs_tensorflow, only_tensorflow
from test_autoattack import make_data, train_tiny_model
from test_resume import OPTIONS, KillError, interrupt_after

from sat_tf import evaluation, examples, shards
from sat_tf.examples import Shard


@pytest.fixture(scope="module")
def model():
    return train_tiny_model()


@pytest.fixture(scope="module")
def data():
    return make_data(40, seed=1)


@pytest.fixture(scope="module")
def whole(model, data, tmp_path_factory):
    path = tmp_path_factory.mktemp("whole") / "state.npz"
    return evaluation.evaluate(model, data, **OPTIONS, verbose=0, state=path)


class Batches:
    """A loader without TensorFlow: NumPy batches of the arrays, in order, afresh each time."""

    def __init__(self, data, batch):
        self.data, self.batch = data, batch

    def __iter__(self):
        images, labels = self.data
        for i in range(0, len(labels), self.batch):
            yield images[i : i + self.batch], labels[i : i + self.batch]


def dataset(data, batch=5):
    """The arrays as a batched tf.data pipeline, read in order, as tools/eval.py reads (without
    TensorFlow: the same NumPy batches, `Batches`; either way its length is not known up front)."""
    if not HAS_TENSORFLOW:
        return Batches(data, batch)
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(data).batch(batch)


def run_shard(model, data, folder, shard, **change):
    folder.mkdir(parents=True, exist_ok=True)
    options = OPTIONS | dict(num_examples=len(data[1]), chunk_size=16) | change
    return evaluation.evaluate(
        model, dataset(data), **options, verbose=0, state=folder / shards.STATE, shard=shard
    )


def records(results):
    return results.per_example.fooled_by, results.per_example.labels


def test_shards_select_every_example_once():
    ids = [
        np.concatenate(
            [c.ids for c in examples.Examples(dataset(make_data(23, 0)), shard=s).chunks(4)]
        )
        for s in ("0/3", "1/3", "2/3")
    ]
    assert sorted(np.concatenate(ids).tolist()) == list(range(23))
    assert [len(i) for i in ids] == [Shard(k, 3).size(23) for k in range(3)] == [8, 8, 7]
    assert all(np.all(i % 3 == k) for k, i in enumerate(ids))
    with pytest.raises(ValueError, match="0 <= I < N"):
        Shard.parse("3/3")


# Chunking is NumPy bookkeeping; under JAX the chunked path runs in the shard and resume tests.
@only_tensorflow
@pytest.mark.parametrize("chunk_size", [7])
def test_chunks_give_the_records_of_the_whole(model, data, whole, chunk_size, tmp_path):
    chunked = evaluation.evaluate(
        model,
        dataset(data),
        **OPTIONS,
        num_examples=40,
        chunk_size=chunk_size,
        verbose=0,
        state=tmp_path / "state.npz",
    )
    for got, want in zip(records(chunked), records(whole), strict=True):
        np.testing.assert_array_equal(got, want)
    assert [r.accuracy for r in chunked.rows] == [r.accuracy for r in whole.rows]


def test_three_shards_merged_give_the_whole_evaluation(model, data, whole, tmp_path):
    folders = [tmp_path / Shard(i, 3).name for i in range(3)]
    parts = [run_shard(model, data, f, f"{i}/3") for i, f in enumerate(folders)]
    assert [p.num_examples for p in parts] == [14, 13, 13]
    merged_state = shards.merge(folders, tmp_path / shards.STATE)
    np.testing.assert_array_equal(merged_state.fooled_by, whole.per_example.fooled_by)
    # The evaluation finds every attack done, checks the examples, writes the whole result; its
    # id is that of the same evaluation run unsharded.
    merged, unsharded = (
        evaluation.evaluate(
            model, dataset(data), **OPTIONS, num_examples=40, chunk_size=16, verbose=0, state=state
        )
        for state in (tmp_path / shards.STATE, tmp_path / "unsharded.npz")
    )
    for got, want in zip(records(merged), records(whole), strict=True):
        np.testing.assert_array_equal(got, want)
    assert [r.accuracy for r in merged.rows] == [r.accuracy for r in whole.rows]
    assert merged.evaluation_id == unsharded.evaluation_id is not None


def test_a_killed_shard_resumes_and_merges_to_the_same_result(
    model, data, whole, tmp_path, monkeypatch
):
    folders = [tmp_path / Shard(i, 3).name for i in range(3)]
    run_shard(model, data, folders[0], "0/3")
    run_shard(model, data, folders[2], "2/3")
    interrupt_after(monkeypatch, 6)
    with pytest.raises(KillError):
        run_shard(model, data, folders[1], "1/3")
    monkeypatch.undo()
    rows = {str(r.shard): r for r in shards.status(shards.folders(tmp_path))}
    assert rows["1/3"].state == "stopped" and rows["0/3"].state == "done"
    assert rows["0/3"].done == 14 and rows["1/3"].expected == 13
    assert rows["1/3"].line().startswith("shard 1/3: stopped, 0 of 13 examples (and a chunk of 13")
    with pytest.raises(shards.ShardError, match=r"shard 1/3 .* is unfinished"):
        shards.merge(folders, tmp_path / shards.STATE)
    run_shard(model, data, folders[1], "1/3")  # the same call: it resumes
    merged = shards.merge(folders, tmp_path / shards.STATE)
    np.testing.assert_array_equal(merged.fooled_by, whole.per_example.fooled_by)


def test_merges_that_cannot_give_the_whole_result_are_refused(model, data, tmp_path):
    small = (data[0][:12], data[1][:12])
    folders = [tmp_path / Shard(i, 3).name for i in range(3)]
    for i, folder in enumerate(folders):
        run_shard(model, small, folder, f"{i}/3", attacks=["clean", "pgd-2"])

    def refused(match, chosen):
        with pytest.raises(shards.ShardError, match=match) as info:
            shards.merge(chosen, tmp_path / shards.STATE)
        assert len(str(info.value).splitlines()) == 1
        assert not (tmp_path / shards.STATE).exists()

    refused(r"missing shard 1/3", [folders[0], folders[2]])
    refused(r"shard 2/3 is given twice", [*folders, folders[2]])
    other_seed = tmp_path / "seed" / Shard(1, 3).name
    run_shard(model, small, other_seed, "1/3", attacks=["clean", "pgd-2"], seed=4)
    refused(r"the seed \(3 -> 4\)", [folders[0], other_seed, folders[2]])
    four = tmp_path / "four" / Shard(1, 4).name
    run_shard(model, small, four, "1/4", attacks=["clean", "pgd-2"])
    refused(r"is shard 1/4, not one of 3", [folders[0], four, folders[2]])
    fewer = tmp_path / "fewer" / Shard(0, 3).name  # read a split that ended early
    short = (small[0][:9], small[1][:9])
    run_shard(model, short, fewer, "0/3", attacks=["clean", "pgd-2"], num_examples=12)
    refused(r"holds 3 examples, but its share of 11 is 4", [fewer, folders[1], folders[2]])
    (tmp_path / "never").mkdir()
    refused(r"holds no eval_state.npz", [folders[0], folders[1], tmp_path / "never"])
    whole_state = tmp_path / "whole" / "x"
    run_shard(model, small, whole_state, None, attacks=["clean", "pgd-2"])
    refused(r"not a shard's state", [folders[0], folders[1], whole_state])


@needs_tensorflow
def test_the_tool_runs_shards_reports_their_status_and_merges_them(tmp_path, capsys):
    from test_eval_tool import classifier

    from sat_tf import card, evalrun
    from sat_tf.config import EvalConfig

    path = classifier(tmp_path / "m.keras", 10)

    def config(output, **change):
        options = dict(model_path=str(path), dataset="demo", image_size=16, num_examples=15)
        options |= dict(epsilons=(8.0,), num_steps=(1,), attacks=("apgd-ce-2",), batch_size=4)
        return EvalConfig(**options | dict(output_dir=str(output), progress=False) | change)

    whole = tmp_path / "whole"
    evalrun.run(config(whole))
    out = tmp_path / "sharded"
    evalrun.run(config(out, shard="0/3"))
    evalrun.run(config(out, shard="2/3"))
    capsys.readouterr()
    rows = evalrun.run(config(out, status=True))
    assert [row.state for row in rows] == ["done", "missing", "done"]
    shown = capsys.readouterr().out
    assert "shard 1/3: missing" in shown and "2 of 3 shards done." in shown
    with pytest.raises(evalrun.EvalError, match="missing shard 1/3"):
        evalrun.run(config(out, merge=True))
    assert card.read(out) is None  # nothing merged, no card
    evalrun.run(config(out, shard="1/3"))
    summary = evalrun.run(config(out, merge=True))
    assert summary == json.loads((whole / "summary.json").read_text())
    got, want = np.load(out / "per_example.npz"), np.load(whole / "per_example.npz")
    for name in ("labels", "fooled_by"):
        np.testing.assert_array_equal(got[name], want[name])
    merged, single = card.read(out)["evaluations"], card.read(whole)["evaluations"]
    assert len(merged) == 1 and merged[0]["evaluation_id"] == single[0]["evaluation_id"]
    for entry in (*merged, *single):  # seconds: the shards' added up
        entry["rows"] = [{k: v for k, v in row.items() if k != "seconds"} for row in entry["rows"]]
        entry.pop("command")
    assert merged == single
    assert not (out / evalrun.STATE).exists()
    with pytest.raises(evalrun.EvalError, match="--shard=3/3 is invalid: give I/N"):
        evalrun.run(config(out, shard="3/3"))


# TensorFlow only: under JAX each process would compile its attacks again for the same check of
# the launcher (the shards themselves are checked under every backend above).
@pytest.mark.slow
@only_tensorflow
def test_the_launcher_runs_one_process_per_device_and_the_merge_gives_the_whole(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_eval_tool import classifier

    from sat_tf import evalrun
    from sat_tf.config import EvalConfig

    root = Path(__file__).resolve().parents[1]
    path = classifier(tmp_path / "m.keras", 10)
    options = dict(model_path=str(path), dataset="demo", image_size=16, num_examples=8)
    flags = [f"--{name}={value}" for name, value in options.items()]
    options |= dict(epsilons=(8.0,), num_steps=(2,), batch_size=4, progress=False)
    # --noprogress: no up-front timing of a batch in each process (the status is still shown).
    flags += ["--epsilons=8", "--num_steps=2", "--batch_size=4", "--noprogress"]
    env = {**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs")}
    launched = subprocess.run(
        ["tools/eval_shards.sh", "2", *flags, f"--output_dir={tmp_path / 'sharded'}"],
        cwd=root,
        env=env | {"TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert "shard 0/2: done" in launched.stdout and "shard 1/2: done" in launched.stdout
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["shard-0-of-2.log", "shard-1-of-2.log"]
    evalrun.run(EvalConfig(**options, output_dir=str(tmp_path / "sharded"), merge=True))
    evalrun.run(EvalConfig(**options, output_dir=str(tmp_path / "whole")))
    got = np.load(tmp_path / "sharded" / "per_example.npz")
    want = np.load(tmp_path / "whole" / "per_example.npz")
    np.testing.assert_array_equal(got["fooled_by"], want["fooled_by"])


@needs_tensorflow
def test_the_robustbench_protocol_runs_in_shards_and_merges_to_the_whole_entry(tmp_path):
    from test_eval_tool import classifier

    from sat_tf import card, evalrun
    from sat_tf.config import EvalConfig

    path = classifier(tmp_path / "m.keras", 10)

    def config(output, **change):
        options = dict(model_path=str(path), dataset="demo", image_size=16, num_examples=12)
        options |= dict(protocol="robustbench", autoattack_version="fast", batch_size=4)
        return EvalConfig(**options | dict(output_dir=str(output), progress=False) | change)

    whole = evalrun.run(config(tmp_path / "whole"))
    out = tmp_path / "sharded"
    for i in range(3):
        evalrun.run(config(out, shard=f"{i}/3"))
    assert [row.state for row in evalrun.run(config(out, status=True))] == ["done"] * 3
    merged = evalrun.run(config(out, merge=True))
    for key in ("clean_acc", "autoattack_acc"):
        assert merged[key] == whole[key]
    assert merged["sat_tf"]["stages"] == whole["sat_tf"]["stages"]
    name = "robustbench_cifar10_Linf"
    got, want = (np.load(tmp_path / d / f"{name}_per_example.npz") for d in ("sharded", "whole"))
    np.testing.assert_array_equal(got["fooled_by"], want["fooled_by"])
    ids = [
        card.read(tmp_path / d)["evaluations"][-1]["evaluation_id"] for d in ("sharded", "whole")
    ]
    assert ids[0] == ids[1] is not None
