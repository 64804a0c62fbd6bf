"""Run folders under careless use: a folder that is not our run is never written into,
`--overwrite` removes only what the manifest lists, one process at a time holds a run, a bad
`--init_from` or `config.json` is refused before anything is written, and a failed write (disk
full, read-only) is one line saying what is kept and how to resume."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tracemalloc

import keras
import pytest
import tensorflow as tf
from test_bad_inputs import smoke, snapshot

from sat_tf import callbacks, preflight, rundir, training

RUNDIR_SOURCE = os.path.join(os.path.dirname(rundir.__file__), "rundir.py")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("finished") / "run"
    training.run(smoke(model_dir))
    return model_dir


def one_line(info):
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


# --- what is ours -----------------------------------------------------------------------------


def test_a_finished_run_lists_what_it_wrote(finished):
    assert set(rundir.listed(finished)) == set(rundir.TRAINING_FILES)
    assert not (finished / rundir.LOCK).exists()  # released and removed at the end


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_foreign_folder_is_never_written_into(tmp_path, overwrite):
    # The reported case: a user's folder with results, a card, a stray model.keras and a
    # checkpoints/ tree of other files.
    folder = tmp_path / "mine"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "notes.txt").write_text("mine")
    for name in ("results.json", rundir.CARD, "config.json", "model.keras"):
        (folder / name).write_text("{}")
    before = snapshot(folder)
    with pytest.raises(training.RunError) as info:
        training.run(smoke(folder, overwrite=overwrite))
    message = one_line(info)
    assert f"--model_dir={folder} is not empty and is not a sat_tf run" in message
    assert "Use a new or empty --model_dir" in message
    assert snapshot(folder) == before


def test_a_run_written_before_the_manifest_is_still_ours(finished, tmp_path):
    run = tmp_path / "older"
    shutil.copytree(finished, run)
    (run / rundir.MANIFEST).unlink()
    rundir.check_ours(run)  # its config.json has the keys every sat_tf run has written
    (run / "config.json").write_text('{"model": "mine"}')
    with pytest.raises(rundir.RunDirError, match="is not a sat_tf run"):
        rundir.check_ours(run)


def test_overwrite_removes_only_listed_files(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "checkpoints" / "notes.txt").write_text("a user's file in a listed folder")
    (run / "mine.txt").write_text("a user's file beside the run")
    manifest = json.loads((run / rundir.MANIFEST).read_text())
    manifest["files"].remove("results.json")  # e.g. written by hand: not the run's
    (run / rundir.MANIFEST).write_text(json.dumps(manifest))
    preflight.clear_finished_run(run)
    assert (run / "checkpoints" / "notes.txt").exists() and (run / "mine.txt").exists()
    assert (run / "results.json").exists()
    assert not (run / "model.keras").exists() and not (run / "config.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["notes.txt"]


# --- one process per run ----------------------------------------------------------------------

HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("rundir", sys.argv[1])
rundir = importlib.util.module_from_spec(spec); spec.loader.exec_module(rundir)
with rundir.locked(sys.argv[2], "training"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_process_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, RUNDIR_SOURCE, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(training.RunError) as info:
            training.run(smoke(run))
        message = one_line(info)
        host = socket.gethostname()
        assert f"is in use: pid {holder.pid} on host {host} (training, since" in message, message
        assert not (run / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays behind
        holder.wait()
    assert f"pid {holder.pid}" in (run / rundir.LOCK).read_text()
    with rundir.locked(run, "evaluation"):  # the kernel released it: taken over, not waited for
        assert f"pid {os.getpid()}" in (run / rundir.LOCK).read_text()
    assert not (run / rundir.LOCK).exists()


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    busy = pytest.raises(rundir.RunDirError, match=r"in use: pid \d+ on host .* \(export")
    with rundir.locked(tmp_path, "export"), busy, rundir.locked(tmp_path, "training"):
        pass


# --- refused before anything is written ------------------------------------------------------


def save_classifier(path, inputs, *layers):
    x = inputs = keras.Input(inputs)
    for layer in layers:
        x = layer(x)
    keras.Model(inputs, x).save(path)
    return path


@pytest.mark.parametrize(
    ("shape", "layers", "match"),
    [
        (
            (16, 16, 3),
            [
                keras.layers.Conv2D(4, 3),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(7),
            ],
            "outputs shape (7,), not --num_classes=10 logits; set --num_classes=7",
        ),
        (
            (16, 16, 1),
            [
                keras.layers.Conv2D(4, 3),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10),
            ],
            "takes inputs of shape (16, 16, 1), not RGB images",
        ),
        (
            (16, 16, 3),
            [keras.layers.Flatten(), keras.layers.Dense(10)],
            "has no convolution layers",
        ),
    ],
    ids=["classes", "channels", "no-conv"],
)
def test_incompatible_init_from_is_refused_before_anything_is_written(
    tmp_path, shape, layers, match
):
    base = save_classifier(tmp_path / "base.keras", shape, *layers)
    with pytest.raises(training.RunError) as info:
        training.run(smoke(tmp_path / "run", init_from=str(base)))
    message = one_line(info)
    assert message.startswith(f"--init_from={base} ") and match in message, message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("payload", "match"), [("{not json", "is not valid JSON"), ("[1, 2]", "is not an object")]
)
def test_config_json_that_is_not_a_json_object(tmp_path, payload, match):
    run = tmp_path / "run"
    rundir.record(run, *rundir.TRAINING_FILES)  # an unfinished run of ours
    (run / "config.json").write_text(payload)
    before = snapshot(run)
    with pytest.raises(training.RunError) as info:
        training.run(smoke(run))
    message = one_line(info)
    assert f"{run / 'config.json'} {match}" in message and "Restore it" in message, message
    assert snapshot(run) == before
    with pytest.raises(rundir.RunDirError, match=match):
        rundir.read_config(run)  # what tools/eval.py and tools/export.py read too


# --- failed writes -------------------------------------------------------------------------------


def test_disk_full_during_training_and_at_the_final_save(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = tf.train.CheckpointManager.save

    def full_after_first(self, *args, **kwargs):
        if self.latest_checkpoint:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", full_after_first)
    with pytest.raises(training.RunError) as info:
        training.run(smoke(run), command="python tools/train.py ...")
    message = one_line(info)
    assert f"Could not write checkpoint 2 in {run / 'checkpoints'} (No space left" in message
    assert f"Kept: {run / 'checkpoints' / 'ckpt-1'}. Free some space, then re-run" in message
    assert "resume (python tools/train.py ...)" in message
    monkeypatch.undo()

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(keras.Model, "save", full)
    with pytest.raises(training.RunError) as info:
        training.run(smoke(run))
    message = one_line(info)
    assert f"Could not write the final model.keras/results in {run} (No space left" in message
    assert f"Kept: the checkpoints in {run / 'checkpoints'} (step 2)" in message, message
    assert not (run / "model.keras").exists() and not (run / ".partial-model.keras").exists()
    monkeypatch.undo()
    summary = training.run(smoke(run))  # space freed: the same command finishes the run
    assert summary["steps"] == 2 and (run / "model.keras").exists()


def test_failed_checkpoint_write_keeps_the_previous_one_as_latest(tmp_path, monkeypatch):
    model = training.build_model(smoke(tmp_path), 2)
    saver = callbacks.Checkpointer(tmp_path / "ckpt")
    saver.set_model(model)
    first = saver.save()
    model.optimizer.iterations.assign(5)
    monkeypatch.setattr(
        tf.train.CheckpointManager,
        "save",
        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")),
    )
    with pytest.raises(callbacks.CheckpointWriteError) as info:
        saver.save()
    assert info.value.step == 5 and info.value.kept == first
    error = rundir.write_failure("checkpoint 5", "d", info.value.kept, "re-run", info.value.cause)
    assert str(error) == (
        f"Could not write checkpoint 5 in d (Read-only file system). Kept: {first}. Make it "
        "writable, then re-run."
    )


# --- links and forged files: nothing outside the run folder is read whole or changed ---------


@pytest.fixture
def outside(tmp_path):
    """A user's folder outside every run: a file and checkpoint-like names a removal would match."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.txt").write_text("a user's file, not a run's\n")
    (folder / "ckpt-1.index").write_text("a user's file named like a checkpoint\n")
    (folder / "checkpoint").write_text("a user's file named like the index\n")
    return folder


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "directory"])
def test_a_lock_that_is_not_our_own_file_is_refused_untouched(tmp_path, outside, capsys, kind):
    run = tmp_path / "run"
    run.mkdir()
    target = outside / "precious.txt"
    before = snapshot(outside)
    if kind == "symlink":
        (run / rundir.LOCK).symlink_to(target)
    elif kind == "hardlink":
        os.link(target, run / rundir.LOCK)
    else:
        (run / rundir.LOCK).mkdir()
    with pytest.raises(rundir.RunDirError) as info, rundir.locked(run, "training"):
        pass
    message = one_line(info)
    what = {"symlink": "a symbolic link", "hardlink": "a hard link", "directory": "not a regular"}
    assert f"{run / rundir.LOCK} is {what[kind]}" in message, message
    assert f"remove {run / rundir.LOCK}" in message, message
    assert snapshot(outside) == before
    assert "a user's file" not in capsys.readouterr().out  # its content is never shown
    assert os.path.lexists(run / rundir.LOCK)  # not removed either: the user decides


@pytest.mark.parametrize(
    "link",
    ["checkpoints", "logs", "eval", "export", "logs/train", "checkpoints/ckpt-9.index"],
)
def test_a_linked_run_folder_is_never_followed_by_training(finished, tmp_path, outside, link):
    # The reported case is checkpoints/ -> elsewhere: --overwrite deleted the ckpt-* files
    # there and the new run wrote its checkpoints into it.
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    if (run / link).is_dir():
        shutil.rmtree(run / link)
    (run / link).parent.mkdir(parents=True, exist_ok=True)
    (run / link).unlink(missing_ok=True)
    (run / link).symlink_to(outside / "ckpt-1.index" if "." in link else outside)
    before, kept = snapshot(outside), snapshot(run)
    with pytest.raises(training.RunError) as info:
        training.run(smoke(run, overwrite=True))
    message = one_line(info)
    assert f"{run / link} is a symbolic link" in message, message
    assert "nothing was changed" in message and "with a real folder" in message, message
    assert snapshot(outside) == before and snapshot(run) == kept


def test_overwrite_refuses_a_linked_checkpoints_folder_before_removing_anything(
    finished, tmp_path, outside
):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(outside)
    before, kept = snapshot(outside), snapshot(run)
    with pytest.raises(rundir.RunDirError) as info:
        preflight.clear_finished_run(run)
    assert f"{run / 'checkpoints'} is a symbolic link" in one_line(info)
    assert snapshot(outside) == before and snapshot(run) == kept


def test_a_manifest_that_is_a_directory_is_one_line(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / rundir.MANIFEST).unlink()
    (run / rundir.MANIFEST).mkdir()
    before = snapshot(run)
    with pytest.raises(training.RunError) as info:
        training.run(smoke(run, overwrite=True))
    message = one_line(info)
    assert f"{run / rundir.MANIFEST} is a directory, not a file" in message, message
    assert "a new --model_dir" in message
    assert snapshot(run) == before


def test_write_probes_never_follow_a_planted_link(tmp_path, outside):
    # check_model_dir and check_writable create a file to see that the folder is writable: a
    # link planted under the probe's name must not make them truncate the file it points to.
    run = tmp_path / "run"
    run.mkdir()
    before = snapshot(outside)
    for name in (".write_probe", f".write_probe-{os.getpid()}"):
        (run / name).symlink_to(outside / "precious.txt")
    preflight.check_model_dir(smoke(run))
    rundir.check_writable(run, "the reports")
    assert snapshot(outside) == before


SPARSE_BYTES = 256 * 2**20  # a forged file that claims this much; sparse: no disk, no time


def sparse(path, size=SPARSE_BYTES):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def bounded(call):
    """`call()`'s error, asserting that it came fast and without reading the file whole."""
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises((rundir.RunDirError, training.RunError, ValueError)) as info:
        call()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2**20, f"read {peak / 2**20:.0f} MiB of a forged file"
    assert seconds < 20, seconds
    return one_line(info)


@pytest.mark.parametrize("name", [rundir.CONFIG, rundir.MANIFEST])
def test_forged_huge_or_special_run_files_are_refused_without_reading_them(tmp_path, name):
    run = tmp_path / "run"
    rundir.record(run, *rundir.TRAINING_FILES)
    read = rundir.read_config if name == rundir.CONFIG else rundir.listed
    sparse(run / name)
    message = bounded(lambda: read(run))
    assert f"{run / name} is over 16 MiB" in message, message
    (run / name).unlink()
    os.mkfifo(run / name)  # a reader that opened it normally would wait forever
    message = bounded(lambda: read(run))
    assert f"{run / name} is not a regular file" in message, message


def unfinished_copy(finished, tmp_path):
    """A copy of the finished run without model.keras: training resumes from its checkpoints."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / rundir.FINAL_MODEL).unlink()
    config = json.loads((run / rundir.CONFIG).read_text())
    (run / rundir.CONFIG).write_text(json.dumps({**config, "model_dir": str(run)}))
    return run


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("checkpoints/model_signature.json", "model_signature.json is over 16 MiB"),
        ("checkpoints/checkpoint", "checkpoints/checkpoint is over 1 MiB"),
    ],
)
def test_forged_checkpoint_files_are_refused_before_they_are_read(finished, tmp_path, name, match):
    run = unfinished_copy(finished, tmp_path)
    sparse(run / name)
    before = snapshot(run)
    message = bounded(lambda: training.run(smoke(run)))
    assert match in message and "a new --model_dir" in message, message
    assert snapshot(run) == before


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is not a model signature"),
        ('{"weights": 5, "optimizer": []}', "is not a model signature"),
        ('{"weights": [["a"]], "optimizer": []}', "is not a model signature"),
    ],
)
def test_a_damaged_signature_names_the_file(finished, tmp_path, payload, match):
    run = unfinished_copy(finished, tmp_path)
    (run / "checkpoints" / "model_signature.json").write_text(payload)
    before = snapshot(run)
    with pytest.raises(training.RunError) as info:
        training.run(smoke(run))
    message = one_line(info)
    assert f"{run / 'checkpoints' / 'model_signature.json'} {match}" in message, message
    assert snapshot(run) == before


def test_a_forged_lock_holder_is_shown_short_and_printable(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.LOCK).write_text("pid 1 \x1b[2J" + "x" * 10_000 + "\nsecond line")
    with rundir.locked(run, "training"):
        pass
    shown = capsys.readouterr().out
    assert "Taking over the stale lock" in shown and "\x1b" not in shown
    assert len(shown) < 500 and "second line" not in shown


@pytest.mark.parametrize("damage", ["garbage", "removed"])
def test_a_damaged_checkpoint_index_is_refused_not_trained_over(finished, tmp_path, capsys, damage):
    # TensorFlow reads an unparsable or missing `checkpoint` index as "no checkpoint": the run
    # would start again from step 0 and its saves would replace ckpt-1 and ckpt-2.
    run = unfinished_copy(finished, tmp_path)
    index = run / "checkpoints" / "checkpoint"
    index.write_text("garbage") if damage == "garbage" else index.unlink()
    before = snapshot(run)
    with pytest.raises(training.RunError) as info:
        training.run(smoke(run))
    message = one_line(info)
    assert f"{index} is missing or damaged, but {run / 'checkpoints'} holds ckpt-2" in message
    assert 'model_checkpoint_path: "ckpt-2"' in message and "a new --model_dir" in message
    assert snapshot(run) == before
    index.write_text('model_checkpoint_path: "ckpt-2"\n')  # the fix the message gives
    capsys.readouterr()
    assert training.run(smoke(run))["steps"] == 2
    assert f"Resuming {run} from step 2." in capsys.readouterr().out  # not trained again


def test_a_config_nested_too_deeply_is_one_line_not_a_recursion_error(tmp_path):
    run = tmp_path / "run"
    rundir.record(run, *rundir.TRAINING_FILES)
    (run / rundir.CONFIG).write_text("[" * 100_000)  # 100 KB, far under the size limit
    with pytest.raises(rundir.RunDirError) as info:
        rundir.read_config(run)
    assert f"{run / rundir.CONFIG} is not valid JSON (nested too deeply)" in one_line(info)
