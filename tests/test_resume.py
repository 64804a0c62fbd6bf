"""Long evaluations: progress output, the up-front estimate, and resuming after a kill.

The reference for every resume test is the same evaluation run without interruption: a resumed
run must end with exactly its per-example records and table, and must not redo finished batches.
Under every backend (JAX: padded batches, int32 example ids).
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import only_tensorflow
from test_autoattack import EPSILON, make_data, train_tiny_model

from sat_tf import evalstate, evaluation, passes

pytestmark = pytest.mark.backends
ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ["clean", "pgd-3x2", "autoattack-fast"]
OPTIONS = dict(attacks=ATTACKS, epsilons=[EPSILON], batch_size=8, checks=False, seed=3)


@pytest.fixture(scope="module")
def model():
    return train_tiny_model()


@pytest.fixture(scope="module")
def data():
    return make_data(40, seed=1)


@pytest.fixture(scope="module")
def uninterrupted(model, data, tmp_path_factory):
    """(results, state) of the evaluation run in one go."""
    path = tmp_path_factory.mktemp("whole") / "state.npz"
    results = evaluation.evaluate(model, data, **OPTIONS, verbose=0, state=path)
    return results, np.load(path)


def table(results):
    return [(r.attack, r.epsilon, r.accuracy) for r in results.rows], results.worst_case


class KillError(Exception):
    """Stands in for a kill: raised before the state of the n-th batch is written."""


def interrupt_after(monkeypatch, batches):
    """Makes the evaluation die at its `batches`-th batch, that batch's result not yet saved."""
    original, seen = evalstate.EvaluationState.record, []

    def record(self, job, position, seconds):
        seen.append(position)
        if position[1] > 0 and sum(p[1] > 0 for p in seen) == batches:
            raise KillError
        original(self, job, position, seconds)

    monkeypatch.setattr(evalstate.EvaluationState, "record", record)
    return seen


def test_resume_gives_the_uninterrupted_results_and_redoes_no_batch(
    model, data, uninterrupted, tmp_path, monkeypatch
):
    whole, whole_state = uninterrupted
    total = int(whole_state["batches"].sum())
    # Batches: clean 5, pgd restarts 2 x 5 at most, then AutoAttack's stages (APGD-CE alone
    # has a batch per 8 examples still standing): the third batch after PGD is in AutoAttack.
    kill_at = int(whole_state["batches"][:2].sum()) + 3
    assert total > kill_at
    path = tmp_path / "state.npz"
    interrupt_after(monkeypatch, kill_at)
    with pytest.raises(KillError):
        evaluation.evaluate(model, data, **OPTIONS, verbose=0, state=path)
    saved = np.load(path)
    assert saved["batches"].sum() == kill_at - 1  # the last one was lost with the "kill"
    assert saved["position"][2][0] >= 1  # inside AutoAttack, after its clean pass
    monkeypatch.undo()

    ran = interrupt_after(monkeypatch, 10**6)  # counts, never kills
    resumed = evaluation.evaluate(model, data, **OPTIONS, verbose=0, state=path)
    assert sum(p[1] > 0 for p in ran) == total - (kill_at - 1)  # only the unfinished batches
    assert table(resumed) == table(whole)
    np.testing.assert_array_equal(resumed.per_example.fooled_by, whole.per_example.fooled_by)
    np.testing.assert_array_equal(np.load(path)["fooled_by"], whole_state["fooled_by"])
    assert resumed.per_example.passes[2] == ["clean", "apgd-ce", "apgd-t", "square"]


def test_a_different_evaluation_refuses_the_state_and_names_the_change(
    model, data, tmp_path, monkeypatch
):
    path = tmp_path / "state.npz"
    interrupt_after(monkeypatch, 3)
    with pytest.raises(KillError):
        evaluation.evaluate(model, data, **OPTIONS, verbose=0, state=path)
    monkeypatch.undo()
    before = path.read_bytes()
    other_seed = OPTIONS | {"seed": 4}
    with pytest.raises(evalstate.StateMismatchError, match=r"the seed \(3 -> 4\).*--discard_state"):
        evaluation.evaluate(model, data, **other_seed, verbose=0, state=path)
    fewer = (data[0][:30], data[1][:30])
    with pytest.raises(evalstate.StateMismatchError, match=r"number of examples \(40 -> 30\)"):
        evaluation.evaluate(model, fewer, **OPTIONS, verbose=0, state=path)
    edited = data[0].copy()
    edited[5, 0, 0, 0] += 1.0
    with pytest.raises(evalstate.StateMismatchError, match="example 5 of this evaluation's"):
        evaluation.evaluate(model, (edited, data[1]), **OPTIONS, verbose=0, state=path)
    with pytest.raises(evalstate.StateMismatchError, match="the attacks"):
        evaluation.evaluate(model, data, **OPTIONS | {"epsilons": [8]}, verbose=0, state=path)
    other = train_tiny_model(epochs=1)
    with pytest.raises(evalstate.StateMismatchError, match="the model weights"):
        evaluation.evaluate(other, data, **OPTIONS, verbose=0, state=path)
    assert path.read_bytes() == before  # a refusal loses nothing

    fresh = evaluation.evaluate(
        model, data, **other_seed, verbose=0, state=path, discard_state=True
    )
    assert np.load(path)["batches"].sum() > 3 and fresh.rows[0].kind == "clean"
    path.write_text("not a state")
    with pytest.raises(evalstate.StateMismatchError, match="not a readable"):
        evaluation.evaluate(model, data, **OPTIONS, verbose=0, state=path)


def test_progress_lines_and_the_estimate_come_before_the_results(model, data, capsys):
    results = evaluation.evaluate(model, data, **OPTIONS | {"attacks": ["pgd-5x2"]}, verbose=1)
    correct = round(40 * results.clean_accuracy)
    out = capsys.readouterr().out.splitlines()
    work = next(line for line in out if line.startswith("Work ahead"))
    # Worst case: 40 examples x 5 steps x 2 restarts (the clean pass takes no gradient).
    assert "40 examples, 2 attacks" in work and "worst case 400 input gradients" in work
    assert out.index(work) < min(i for i, line in enumerate(out) if "accuracy=" in line)
    assert any(line.startswith("One batch of 8 here:") and "takes about" in line for line in out)
    progress = [line for line in out if "pgd-5x2 eps=32: restart (1/2): " in line]
    # Not a terminal: a line per ~5% (here every batch of 8), with an ETA.
    assert progress[0].endswith(f"{correct} examples")
    assert f"8/{correct} examples (" in progress[1] and "accuracy so far" in progress[1]
    assert "ETA" in progress[1] and f"{correct}/{correct} examples (100%)" in progress[-1]

    short = OPTIONS | {"attacks": ["pgd-3"]}
    evaluation.evaluate(model, data, **short, verbose=0)
    assert capsys.readouterr().out == ""
    evaluation.evaluate(model, data, **short, verbose=2)
    quiet = capsys.readouterr().out
    assert "accuracy=" in quiet and "examples (" not in quiet and "Work ahead" not in quiet


def test_a_terminal_gets_a_keras_progress_bar(model, data, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    evaluation.evaluate(model, data, **OPTIONS | {"attacks": ["pgd-3"]}, verbose=1)
    out = capsys.readouterr().out
    assert "accuracy:" in out and "example" in out and "\r" in out  # Progbar's redrawn line
    assert "examples (" not in out  # no plain log lines on a terminal


def test_accuracy_so_far_is_exact_at_the_end_of_a_pass():
    fooled_by = np.array([0, -1, 1, -1, 1, -1, -1, 0])  # pass 1 attacked 6, fooled 2 so far
    todo = passes.standing(fooled_by, 1)
    np.testing.assert_array_equal(todo, [1, 2, 3, 4, 5, 6])
    assert passes.accuracy_so_far(fooled_by, todo[:4], len(todo)) == pytest.approx(6 / 8 * 2 / 4)
    assert passes.accuracy_so_far(fooled_by, todo, len(todo)) == np.mean(fooled_by == -1)


CHILD = """
import os, signal, sys
import keras, numpy as np
from sat_tf import evalstate, evaluation

model = keras.saving.load_model(sys.argv[1])
with np.load(sys.argv[2]) as arrays:
    data = (arrays["images"], arrays["labels"])
options = dict(attacks={attacks}, epsilons=[{epsilon}], batch_size=8, checks=False, seed=3)
record = evalstate.EvaluationState.record
kill_at = int(sys.argv[4])

def record_then_die(self, job, position, seconds):
    # A real SIGKILL, in the middle of a batch: its attack ran, its result is not saved.
    if int(self.batches.sum()) + (position[1] > 0) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    record(self, job, position, seconds)

evalstate.EvaluationState.record = record_then_die
evaluation.evaluate(model, data, **options, verbose=1, state=sys.argv[3])
"""


# TensorFlow only: the resume itself is checked under every backend in-process above; a second
# process under JAX would compile every attack again (a minute here) to check the same file.
@pytest.mark.slow
@only_tensorflow
def test_sigkill_in_the_middle_of_autoattack_then_resume(model, data, uninterrupted, tmp_path):
    whole, whole_state = uninterrupted
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", images=data[0], labels=data[1])
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(attacks=ATTACKS, epsilon=EPSILON)))
    state = tmp_path / "state.npz"
    positions = whole_state["position"]
    assert positions[2][0] == 4  # AutoAttack's 4 passes: clean, APGD-CE, APGD-T, Square
    kill_at = int(whole_state["batches"][:2].sum()) + 7  # a few batches into AutoAttack
    arguments = [tmp_path / "model.keras", tmp_path / "data.npz", state, kill_at]
    child = subprocess.run(
        [sys.executable, str(script), *map(str, arguments)],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert "Work ahead" in child.stdout and "autoattack-fast eps=32: apgd-ce" in child.stdout
    killed = np.load(state)
    assert killed["batches"].sum() == kill_at - 1
    assert 1 <= killed["position"][2][0] < 4  # stopped inside AutoAttack

    resumed = evaluation.evaluate(model, data, **OPTIONS, verbose=0, state=state)
    assert table(resumed) == table(whole)
    np.testing.assert_array_equal(resumed.per_example.fooled_by, whole.per_example.fooled_by)
    assert np.load(state)["batches"].sum() == whole_state["batches"].sum()


def test_work_left_counts_only_unfinished_batches_and_unfooled_examples():
    job = passes.Job(
        "x",
        (passes.CLEAN, passes.Pass("a", gradients=10), passes.Pass("b", gradients=5, queries=7)),
    )
    fooled_by = np.array([0, -1, 1, -1, -1])  # pass 1 has 4 examples; 1 fooled so far
    # Pass 1: 4 standing - 1 batch of 2 done = 2 left x 10; pass 2: at most the 3 not fooled.
    assert job.work(fooled_by, start=(1, 1), batch_size=2) == (2 * 10 + 3 * 5, 2 * 1 + 3 * 7)
    fresh = np.full(5, -1)
    assert job.work(fresh) == (5 * 10 + 5 * 5, 5 + 5 + 5 * 7)
