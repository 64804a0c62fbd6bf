"""Interruptions and numeric faults (docs/reliability.md): SIGKILL at chosen points, SIGTERM /
Ctrl-C, NaN.

The kill points are made deterministic by a small harness (`HARNESS`) that runs tools/train.py or
tools/export.py with one function wrapped: when the run reaches the chosen point, the wrapper
writes a marker file and sleeps; the test then sends SIGKILL. The library is not changed for
this. One model_dir goes through the whole chain (each rerun is the same command):

    SIGTERM at step 3 -> SIGKILL inside the ckpt-4 write (temp shards on disk, not merged)
    -> SIGKILL after step 5 (mid-epoch, ckpt-4 is the latest) -> SIGKILL after model.keras was
    written to its temporary name -> clean rerun finishes -> export SIGKILLed before its rename
    -> export rerun.

docs/reliability.md records what each step observed.
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import callbacks, saving, training
from sat_tf.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
ARGS = [
    "--flagfile=configs/demo_smoke.cfg",
    "--epochs=2",
    "--steps_per_epoch=4",
    "--checkpoint_every_steps=2",
]

# Runs a tool with one function wrapped so that reaching FAULT writes MARKER and sleeps.
HARNESS = r"""
import os, runpy, sys, time
fault, marker = os.environ["FAULT"], os.environ["MARKER"]
kind, _, arg = fault.partition(":")

def hold():
    open(marker, "w").write(fault)
    time.sleep(float(os.environ.get("HOLD", 600)))

if kind == "merge":  # inside CheckpointManager.save: shards written to ckpt-N_temp, not merged
    from tensorflow.python.ops import gen_io_ops
    merge = gen_io_ops.merge_v2_checkpoints
    def slow_merge(prefixes, destination, **kwargs):
        if destination.numpy().decode().endswith(f"ckpt-{arg}"):
            hold()
        return merge(prefixes, destination, **kwargs)
    gen_io_ops.merge_v2_checkpoints = slow_merge
elif kind == "step":  # at the end of optimizer step `arg`, before any callback saves it
    from sat_tf import callbacks
    on_batch_end = callbacks.StopOnNonFinite.on_train_batch_end
    def at_step(self, batch, logs=None):
        on_batch_end(self, batch, logs)
        if callbacks.global_step(self.model) == int(arg):
            hold()
    callbacks.StopOnNonFinite.on_train_batch_end = at_step
elif kind == "final_model":  # model.keras written to its temporary name, not yet renamed
    import keras
    save = keras.Model.save
    def slow_save(self, path, *args, **kwargs):
        save(self, path, *args, **kwargs)
        hold()
    keras.Model.save = slow_save
elif kind == "export":  # SavedModel written to export/.partial-<v>, not yet renamed
    import keras
    backend_archive = type(keras.export.ExportArchive())  # __new__ picks a backend subclass
    write_out = backend_archive.write_out
    def slow_write_out(self, path, *args, **kwargs):
        write_out(self, path, *args, **kwargs)
        hold()
    backend_archive.write_out = slow_write_out
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


KEY_LINES = re.compile(r"Resuming|Stopped|Finished|Exported")


def run_tool(tool, args, fault=None, marker=None, on_marker=signal.SIGKILL, hold=600):
    """Runs tools/<tool>.py; with `fault`, sends `on_marker` once the marker appears.

    Returns (returncode, stdout, stderr, seconds until the marker).
    """
    env = dict(ENV)
    command = [sys.executable, f"tools/{tool}.py", *args]
    if fault:
        env.update(FAULT=fault, MARKER=str(marker), HOLD=str(hold))
        command = [sys.executable, "-c", HARNESS, *command[1:]]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    start, reached = time.time(), None
    if fault:
        while time.time() - start < 240 and process.poll() is None:
            if marker.exists():
                reached = round(time.time() - start, 1)
                process.send_signal(on_marker)
                break
            time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr, reached


def checkpoint_state(model_dir):
    directory = model_dir / "checkpoints"
    latest = tf.train.latest_checkpoint(str(directory))
    return {
        "latest": Path(latest).name if latest else None,
        "files": sorted(p.name for p in directory.iterdir()) if directory.exists() else [],
    }


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Runs the whole chain once; returns what each step observed."""
    root = tmp_path_factory.mktemp("faults")
    model_dir = root / "run"
    args = [*ARGS, f"--model_dir={model_dir}"]
    seen = {}

    def step(name, tool, tool_args, fault=None, **kwargs):
        marker = root / f"{name}.marker"
        code, out, err, reached = run_tool(tool, tool_args, fault, marker, **kwargs)
        seen[name] = dict(
            code=code, stdout=out, stderr=err, reached=reached, **checkpoint_state(model_dir)
        )
        seen[name]["dir"] = sorted(p.name for p in model_dir.iterdir())
        export = model_dir / "export"
        seen[name]["export"] = sorted(p.name for p in export.iterdir()) if export.exists() else []

    step("sigterm", "train", args, "step:3", on_marker=signal.SIGTERM, hold=3)
    step("kill_in_checkpoint_write", "train", args, "merge:4")
    step("kill_mid_epoch", "train", args, "step:5")
    step("kill_in_final_save", "train", args, "final_model")
    step("finish", "train", args)
    step("kill_in_export", "export", [f"--model_dir={model_dir}"], "export")
    step("export_again", "export", [f"--model_dir={model_dir}"])
    seen["model_dir"] = model_dir
    for name, item in seen.items():  # the record docs/reliability.md quotes (pytest -s)
        if name != "model_dir":
            said = [line for line in item["stdout"].splitlines() if KEY_LINES.search(line)]
            short = {k: item[k] for k in ("code", "reached", "latest", "files", "dir", "export")}
            print(f"FAULT {name}: {json.dumps(short)} said={said}")
    return seen


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_saves_and_says_how_to_resume(chain):
    seen = chain["sigterm"]
    assert seen["code"] == 128 + signal.SIGTERM, seen["stderr"][-2000:]
    assert "Stopped on SIGTERM at step 3" in seen["stdout"]
    assert "Re-run the same command to resume" in seen["stdout"]
    assert seen["latest"] == "ckpt-3"  # the step it was in, saved, not a half step
    assert "model.keras" not in seen["dir"]


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_the_previous_checkpoint_latest(chain):
    seen = chain["kill_in_checkpoint_write"]
    assert seen["code"] == -signal.SIGKILL and seen["reached"]
    assert "Resuming" in seen["stdout"] and "from step 3" in seen["stdout"]
    assert "ckpt-4_temp" in seen["files"]  # killed with the shards on disk ...
    assert "ckpt-4.index" not in seen["files"]  # ... before the merge
    assert seen["latest"] == "ckpt-3"  # the half-written one is not mistaken for whole


@pytest.mark.slow
def test_kill_mid_epoch_resumes_from_the_last_checkpoint(chain):
    seen = chain["kill_mid_epoch"]
    assert seen["code"] == -signal.SIGKILL
    assert "from step 3" in seen["stdout"]  # resumed after the torn ckpt-4 write
    assert seen["latest"] == "ckpt-4"  # step 5 was done but not saved
    assert not any(name.endswith("_temp") for name in seen["files"])


@pytest.mark.slow
def test_kill_during_final_save_is_not_a_finished_run(chain):
    seen = chain["kill_in_final_save"]
    assert seen["code"] == -signal.SIGKILL
    assert "from step 4" in seen["stdout"]
    assert ".partial-model.keras" in seen["dir"] and "model.keras" not in seen["dir"]
    assert seen["latest"] == "ckpt-8"


@pytest.mark.slow
def test_rerun_finishes_with_every_step_done_once(chain):
    seen, model_dir = chain["finish"], chain["model_dir"]
    assert seen["code"] == 0, seen["stderr"][-2000:]
    assert "from step 8" in seen["stdout"]
    assert json.loads((model_dir / "results.json").read_text())["steps"] == 8
    assert ".partial-model.keras" not in seen["dir"]
    model = saving.load_model(model_dir / "model.keras")
    assert model.output_shape == (None, 10)


@pytest.mark.slow
def test_kill_during_export_leaves_no_servable_version(chain):
    seen = chain["kill_in_export"]
    assert seen["code"] == -signal.SIGKILL and seen["reached"]
    assert seen["export"] == [".partial-1"]  # TF Serving only loads numeric versions


@pytest.mark.slow
def test_export_rerun_writes_a_whole_version(chain):
    seen, model_dir = chain["export_again"], chain["model_dir"]
    assert seen["code"] == 0, seen["stderr"][-2000:]
    assert seen["export"] == ["1"]
    loaded = tf.saved_model.load(str(model_dir / "export" / "1"))
    out = loaded.signatures["serving_default"](images=tf.zeros([1, 16, 16, 3]))
    classifier = keras.saving.load_model(model_dir / "model.keras", safe_mode=True)
    np.testing.assert_allclose(
        out["logits"].numpy(), classifier(np.zeros((1, 16, 16, 3), "float32")), atol=1e-4
    )


# --- in-process: NaN loss, Ctrl-C -----------------------------------------------------------


def smoke(model_dir, **overrides):
    values = dict(
        dataset="demo",
        model="small_cnn",
        image_size=16,
        global_batch_size=16,
        epochs=1,
        steps_per_epoch=4,
        eval_examples=16,
        eval_num_steps=1,
        checkpoint_every_steps=1,
    )
    return TrainConfig(model_dir=str(model_dir), **{**values, **overrides})


@pytest.mark.parametrize("poison", ["learning_rate", pytest.param("data", marks=pytest.mark.slow)])
def test_nan_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, poison, monkeypatch):
    if poison == "learning_rate":  # SGD steps of 1e30 overflow float32 activations at step 2
        config = smoke(tmp_path, base_learning_rate=1e32, label_smoothing=0.0)
    else:  # NaN labels in every training batch from the third on: the loss is NaN at step 3
        config = smoke(tmp_path)
        load_split = training.load_split

        def poisoned(config, *, training, input_context=None):
            split = load_split(config, training=training, input_context=input_context)
            if not training:
                return split

            def poison(i, batch):
                images, labels = batch[:2]
                return (images, labels + tf.where(i >= 2, np.nan, 0.0), *batch[2:])

            return dataclasses.replace(split, dataset=split.dataset.enumerate().map(poison))

        monkeypatch.setattr(training, "load_split", poisoned)
    with pytest.raises(FloatingPointError, match=r"at step (\d+).*base_learning_rate") as info:
        training.run(config)
    bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert bad_step == (2 if poison == "learning_rate" else 3)
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert latest.endswith(f"ckpt-{bad_step - 1}")  # the last good step; nothing after it
    reader = tf.train.load_checkpoint(latest)
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.all(np.isfinite(value)), name
    assert not (tmp_path / "model.keras").exists()


def tiny_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    return model


class RaiseSignal(keras.callbacks.Callback):
    """Sends `signum` to this process at the end of the given batches (a user's Ctrl-C)."""

    def __init__(self, at_batches, signum=signal.SIGINT):
        super().__init__()
        self.at_batches, self.signum = at_batches, signum

    def on_train_batch_end(self, batch, logs=None):
        if batch in self.at_batches:
            signal.raise_signal(self.signum)


def test_ctrl_c_finishes_the_step_saves_and_restores_handlers(tmp_path, capsys):
    model = tiny_model()
    saver = callbacks.Checkpointer(tmp_path / "ckpt")
    stop = callbacks.GracefulStop(saver, resume_hint="Re-run to resume.")
    handler = signal.getsignal(signal.SIGINT)
    x, y = np.ones((40, 4), "float32"), np.zeros((40, 2), "float32")
    history = model.fit(
        x, y, batch_size=4, epochs=1, verbose=0, callbacks=[RaiseSignal({1}), saver, stop]
    )
    assert int(model.optimizer.iterations.numpy()) == 2  # batch index 1 = step 2, then stop
    assert len(history.history["loss"]) == 1
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpt")).endswith("ckpt-2")
    assert "Stopped on SIGINT at step 2" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is handler


def test_second_ctrl_c_aborts_at_once_and_restores_handlers(tmp_path):
    model = tiny_model()
    saver = callbacks.Checkpointer(tmp_path / "ckpt", every_steps=1)
    stop = callbacks.GracefulStop(saver)
    handler = signal.getsignal(signal.SIGINT)
    # Both signals inside one step: RaiseSignal runs before GracefulStop's batch end.
    double = [RaiseSignal({2}), RaiseSignal({2})]
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        model.fit(
            np.ones((40, 4), "float32"),
            np.zeros((40, 2), "float32"),
            batch_size=4,
            verbose=0,
            callbacks=[saver, *double, stop],
        )
    assert signal.getsignal(signal.SIGINT) is handler
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpt")).endswith("ckpt-3")
