"""tools/eval.py on a run: it reads the run's data as training did, checks labels against the
model, refuses to start when it could not save, and a failed card write keeps the reports."""

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_inputs import example, jpeg, write_records

from sat_tf import card, models, rundir
from sat_tf.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


def evaluate(*args):
    return subprocess.run(
        [sys.executable, "tools/eval.py", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def classifier(path, num_classes):
    model = models.build(
        "small_cnn", num_classes=num_classes, activation="silu", input_shape=(16, 16, 3)
    )
    model.save(path)
    return path


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    # Only val-* files: a tool that re-derives "<dataset>/validation-*" finds nothing.
    folder = tmp_path_factory.mktemp("records")
    write_records(folder / "val-0.tfrecord", [example(jpeg(20 * i), i + 1) for i in range(10)])
    return folder


@pytest.mark.slow
def test_eval_reads_the_runs_eval_files(records, tmp_path, capsys):
    run = tmp_path / "run"
    config = TrainConfig(
        model_dir=str(run),
        dataset=f"tfrecord:{records}",
        eval_files=f"{records}/val-*",
        augmentation="none",
        image_size=16,
    )
    rundir.record(run, *rundir.TRAINING_FILES)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    classifier(run / "model.keras", 10)
    result = evaluate(f"--model_dir={run}", "--num_steps=1", "--batch_size=5")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert set(summary) == {"clean", "epsilon", "pgd-1"}
    (entry,) = card.read(run)["evaluations"]
    assert entry["dataset"] == f"tfrecord:{records}/val-*" and entry["num_examples"] == 10
    assert "eval" in rundir.listed(run) and not (run / rundir.LOCK).exists()
    # Progress and the estimate by default; the finished run leaves no state to resume.
    assert (
        "Work ahead: 10 examples" in result.stdout
        and "clean: 10/10 examples (100%)" in result.stdout
    )
    assert not (run / "eval" / "eval_state.npz").exists()
    assert (run / "eval" / "per_example.npz").exists()

    # The same evaluation in-process (the tool is flag parsing around `evalrun.run`).
    from sat_tf import evalrun
    from sat_tf.config import EvalConfig

    (run / "eval" / "eval_state.npz").write_text("not a state")  # e.g. another program's file
    config = EvalConfig(model_dir=str(run), num_steps=(1,), batch_size=5)
    with pytest.raises(evalrun.EvalError, match="is not a readable sat_tf evaluation state"):
        evalrun.run(config)
    capsys.readouterr()
    evalrun.run(dataclasses.replace(config, progress=False, discard_state=True))
    quiet = capsys.readouterr().out
    assert "Work ahead" not in quiet and "10/10 examples" not in quiet and "accuracy=" in quiet


def test_eval_refuses_labels_outside_the_models_classes(records, tmp_path):
    from sat_tf import evalrun
    from sat_tf.config import EvalConfig

    path = classifier(tmp_path / "seven.keras", 7)  # the records hold classes 0..9
    config = EvalConfig(
        model_path=str(path),
        dataset=f"tfrecord:{records}/val-*",
        image_size=16,
        output_dir=str(tmp_path / "reports"),
    )
    with pytest.raises(evalrun.EvalError) as info:
        evalrun.run(config)
    line = str(info.value)
    assert "val-0.tfrecord (record 7) has label 7 (after label_offset), outside [0, " in line
    assert "num_classes=7)" in line and len(line.splitlines()) == 1, line
    assert card.read(tmp_path / "reports") is None  # nothing appended to a card


def test_eval_that_could_not_save_refuses_before_attacking(records, tmp_path, capsys):
    from sat_tf import evalrun
    from sat_tf.config import EvalConfig

    path = classifier(tmp_path / "m.keras", 10)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = EvalConfig(
        model_path=str(path),
        dataset=f"tfrecord:{records}/val-*",
        image_size=16,
        output_dir=str(blocker / "eval"),
    )
    with pytest.raises(evalrun.EvalError) as info:
        evalrun.run(config)
    assert f"Could not write the reports (--output_dir) in {blocker / 'eval'}" in str(info.value)
    assert "nothing was run" in str(info.value) and "Clean" not in capsys.readouterr().out


def test_failed_card_write_names_the_saved_reports(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(card.CardWriteError) as info:
        card.add_evaluation(tmp_path, {"protocol": "sat"}, saved=tmp_path / "eval")
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert f"its reports are saved in {tmp_path / 'eval'}" in message
    assert f"the card {tmp_path / rundir.CARD} could not be updated (Read-only" in message


def test_check_writable_refuses_a_read_only_folder(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(rundir.RunWriteError) as info:
        rundir.check_writable(tmp_path, "the reports")
    assert str(info.value) == (
        f"Could not write the reports in {tmp_path} (Read-only file system). Kept: everything, "
        "unchanged: nothing was run. Make it writable, then re-run."
    )


def test_evalrun_is_the_library_call_behind_the_tool(tmp_path, capsys):
    from sat_tf import evalrun
    from sat_tf.config import EvalConfig

    path = classifier(tmp_path / "m.keras", 10)
    out = tmp_path / "reports"
    config = EvalConfig(
        model_path=str(path),
        dataset="demo",
        image_size=16,
        num_examples=24,
        epsilons=(8.0,),
        num_steps=(2,),
        attacks=("fgsm",),
        batch_size=12,
        output_dir=str(out),
        progress=False,
    )
    summary = evalrun.run(config, command="test")
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary and set(summary) == {"clean", "epsilon", "pgd-2", "fgsm"}
    assert summary["epsilon"] == 8.0 and 0 <= summary["pgd-2"] <= summary["clean"] <= 1
    results = json.loads((out / "results.json").read_text())
    assert results["num_examples"] == 24
    assert [r["attack"] for r in results["rows"]][:3] == ["clean", "pgd-2", "fgsm"]
    assert results["rows"][1]["step_size"] == 1.0  # a bare file: the official 1-pixel step
    entry = card.read(out)["evaluations"][-1]  # a bare file's card: in the output folder
    assert entry["command"] == "test" and entry["num_examples"] == 24
    assert not (out / evalrun.STATE).exists()  # finished: the state is removed
    assert "Reports in" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_path=""), "exactly one of --model_dir or --model_path"),
        (dict(step_size=0.0), "--step_size=0.0 is invalid: must be finite, > 0"),
        (dict(restarts=0), "--restarts=0 is invalid"),
        (dict(num_steps=(10, 0)), "--num_steps=10,0 is invalid"),
        (dict(epsilons=(-1.0,)), "--epsilons=-1.0 is invalid"),
        (dict(protocol="robustbench"), "--epsilons cannot be used with --protocol=robustbench"),
        (dict(attacks=("pgd-5", "cw")), "--attacks=pgd-5,cw: Unknown attack"),
        (dict(leaderboard="cifar10"), "--leaderboard cannot be used with --protocol=sat"),
        (dict(epsilons=(float("inf"),)), "--epsilons=inf is invalid: radii must be finite"),
        (dict(epsilons=(float("nan"),)), "--epsilons=nan is invalid"),
        (dict(step_size=float("nan")), "--step_size=nan is invalid"),
        (dict(attacks=("pgd-10",)), "runs pgd-10 twice; list each attack once"),
        (dict(attacks=("fgsm", "FGSM")), "runs fgsm twice"),
        (dict(image_size=17), "--image_size=17 does not fit the model, which takes 16x16"),
        (dict(output_dir=""), "--output_dir is needed with --model_path"),
        (dict(restarts=10**9), "--restarts=1000000000 is invalid: must be in [1, 1000]"),
        (dict(attacks=("pgd-10x99999",)), "Restarts must be in [1, 1000]"),
    ],
)
def test_evalrun_refuses_bad_settings_in_one_line_before_any_work(change, message, tmp_path):
    from sat_tf import evalrun
    from sat_tf.config import EvalConfig

    path = classifier(tmp_path / "m.keras", 10)
    base = dict(model_path=str(path), dataset="demo", image_size=16, epsilons=(4.0,))
    base |= dict(output_dir=str(tmp_path / "eval"))
    config = EvalConfig(**(base | change))
    with pytest.raises(evalrun.EvalError) as info:
        evalrun.run(config)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1
    written = (tmp_path / "eval").glob("*")
    assert not [p.name for p in written if not p.name.startswith(".")]  # no reports, no card


def test_eval_config_reads_flag_strings():
    from sat_tf.config import EvalConfig

    config = EvalConfig.from_dict({"epsilons": ["2", "4", ""], "num_steps": ["10", "20"]})
    assert config.epsilons == (2.0, 4.0) and config.num_steps == (10, 20)
    with pytest.raises(ValueError, match="--epsilons=a is invalid: give numbers"):
        EvalConfig.from_dict({"epsilons": ["a"]})


def _bare(tmp_path, **change):
    from sat_tf.config import EvalConfig

    path = classifier(tmp_path / "m.keras", 10)
    options = dict(model_path=str(path), dataset="demo", image_size=16, num_examples=8)
    options |= dict(epsilons=(8.0,), num_steps=(1,), batch_size=8, progress=False)
    return EvalConfig(**(options | change))


def test_a_bare_model_is_evaluated_into_its_output_folder_only(tmp_path):
    from sat_tf import evalrun

    folder = tmp_path / "users_folder"
    folder.mkdir()
    (folder / "results.json").write_text("a user's file")
    config = _bare(folder, output_dir=str(tmp_path / "reports"))
    evalrun.run(config)
    assert (folder / "results.json").read_text() == "a user's file"
    assert sorted(p.name for p in folder.iterdir()) == ["m.keras", "results.json"]
    assert card.read(tmp_path / "reports")["evaluations"][-1]["num_examples"] == 8
    listed = set(rundir.listed(tmp_path / "reports"))
    assert {p.name for p in (tmp_path / "reports").iterdir() if p.name[0] != "."} <= listed
    evalrun.run(dataclasses.replace(config, seed=1))  # again into the folder: it is ours now
    assert len(card.read(tmp_path / "reports")["evaluations"]) == 2

    with pytest.raises(evalrun.EvalError, match="is not empty and is not a sat_tf run"):
        evalrun.run(_bare(tmp_path, output_dir=str(folder)))  # a foreign output folder
    assert sorted(p.name for p in folder.iterdir()) == ["m.keras", "results.json"]


def test_two_evaluations_into_one_output_folder_do_not_both_write(tmp_path):
    from sat_tf import evalrun

    config = _bare(tmp_path, output_dir=str(tmp_path / "reports"))
    busy = pytest.raises(evalrun.EvalError, match="is in use")
    with rundir.locked(tmp_path / "reports", "evaluation"), busy:  # another evaluation at work
        evalrun.run(config)
    assert not (tmp_path / "reports" / "results.json").exists()


def test_a_damaged_card_is_refused_before_any_attack(tmp_path):
    from sat_tf import evalrun

    reports = tmp_path / "reports"
    evalrun.run(_bare(tmp_path, output_dir=str(reports)))
    (reports / rundir.CARD).write_text("{not json")
    (reports / "results.json").unlink()
    with pytest.raises(evalrun.EvalError, match="robustness_card.json is not valid JSON"):
        evalrun.run(_bare(tmp_path, output_dir=str(reports)))
    assert not (reports / "results.json").exists()  # refused before attacking
    assert (reports / rundir.CARD).read_text() == "{not json"


def test_a_training_split_is_read_in_order_and_only_as_far_as_needed(tmp_path):
    from sat_tf import evalrun
    from sat_tf.data import demo

    reports = tmp_path / "reports"
    evalrun.run(_bare(tmp_path, output_dir=str(reports), eval_split="train", num_examples=8))
    import numpy as np

    labels = np.load(reports / "per_example.npz")["labels"]
    np.testing.assert_array_equal(labels, demo.arrays("train")[1][:8])  # no shuffle, no repeat


@pytest.mark.parametrize("inside", [".", "checkpoints", "logs"])
def test_reports_never_go_into_the_run_folder_itself_or_its_entries(tmp_path, inside):
    from sat_tf import evalrun
    from sat_tf.config import EvalConfig

    run = tmp_path / "run"
    rundir.record(run, *rundir.TRAINING_FILES)
    classifier(run / rundir.FINAL_MODEL, 10)
    (run / rundir.RESULTS).write_text('{"training": "results"}')
    config = EvalConfig(model_dir=str(run), output_dir=str(run / inside), dataset="demo")
    with pytest.raises(evalrun.EvalError, match="is the run folder or one of its own entries"):
        evalrun.run(config)
    assert (run / rundir.RESULTS).read_text() == '{"training": "results"}'


def test_a_kill_between_the_card_and_the_state_removal_leaves_one_card_entry(tmp_path, monkeypatch):
    from sat_tf import evalrun

    reports = tmp_path / "reports"
    config = _bare(tmp_path, output_dir=str(reports))
    unlink = Path.unlink

    def killed(path, *args, **kwargs):
        if path.name == evalrun.STATE:
            raise KeyboardInterrupt  # after the card was written, before the state goes
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed)
    with pytest.raises(evalrun.EvalError, match="interrupted"):
        evalrun.run(config)
    monkeypatch.undo()
    assert (reports / evalrun.STATE).exists()
    first = card.read(reports)["evaluations"]
    evalrun.run(config)  # the same command: resumes a finished state, records it again
    entries = card.read(reports)["evaluations"]
    assert len(first) == len(entries) == 1 and entries[0]["evaluation_id"]
    assert entries[0]["evaluation_id"] == first[0]["evaluation_id"]
    assert not (reports / evalrun.STATE).exists()
    evalrun.run(dataclasses.replace(config, seed=1))  # another evaluation: a second entry
    assert len(card.read(reports)["evaluations"]) == 2
