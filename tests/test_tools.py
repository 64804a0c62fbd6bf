"""End to end through the command-line tools, as a user runs them: train, resume, eval, export.

Each tool runs in its own process on the built-in demo data (tiny, no download).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
SMOKE = "--flagfile=configs/demo_smoke.cfg"
# The module's trained run: also the first of the two runs the determinism test compares.
DETERMINISTIC = [SMOKE, "--deterministic", "--seed=3"]

pytestmark = pytest.mark.slow


def tool(name, *args, check=True, timeout=300):
    result = subprocess.run(
        [sys.executable, f"tools/{name}.py", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


# Runs several refused commands of the tools in ONE interpreter: it imports what the tools import
# (the slow part of each start), then forks a pristine child per command, which runs
# tools/<name>.py as __main__ with its own argv, stdout and stderr files and exit status.
BATCH = r"""
import json, logging, os, runpy, sys, time, traceback
start = time.time()
import tensorflow, keras, sat_tf.config, sat_tf.card, sat_tf.rundir  # what every tool imports
imported = time.time() - start
results = []
for case in json.loads(sys.argv[1]):
    start = time.time()
    pid = os.fork()
    if pid == 0:  # the child: a tool's process, from its command line on
        for fd, name in ((1, case["stdout"]), (2, case["stderr"])):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [f"tools/{case['tool']}.py", *case["args"]]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as stop:  # what the interpreter does with it, at the top level
            code = stop.code if isinstance(stop.code, int) else stop.code is not None
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        logging.shutdown()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)  # skips TensorFlow's teardown at exit (~1 s of CPU each)
    status = os.waitpid(pid, 0)[1]
    code = os.waitstatus_to_exitcode(status)
    results.append(dict(code=code, seconds=imported + time.time() - start))
print(json.dumps(results))
"""


def refused_batch(cases, directory):
    """Runs {key: (tool, args)} through BATCH; returns {key: (result, seconds)}, `result` as
    subprocess.run gives it and `seconds` from the start of the interpreter to the exit."""
    jobs = {
        key: dict(
            tool=name,
            args=[str(arg) for arg in args],
            stdout=str(directory / f"{i}.out"),
            stderr=str(directory / f"{i}.err"),
        )
        for i, (key, (name, args)) in enumerate(cases.items())
    }
    result = subprocess.run(
        [sys.executable, "-c", BATCH, json.dumps(list(jobs.values()))],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.splitlines()[-1])
    return {
        key: (
            subprocess.CompletedProcess(
                [job["tool"], *job["args"]],
                outcome["code"],
                Path(job["stdout"]).read_text(),
                Path(job["stderr"]).read_text(),
            ),
            outcome["seconds"],
        )
        for (key, job), outcome in zip(jobs.items(), outcomes, strict=True)
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("run") / "smoke"
    tool("train", *DETERMINISTIC, f"--model_dir={model_dir}")
    return model_dir


@pytest.fixture(scope="module")
def relu_run(tmp_path_factory):
    """A ReLU run trained under MultiWorkerMirroredStrategy: the multi-worker test's run, and
    the ReLU model the --init_from test converts."""
    model_dir = tmp_path_factory.mktemp("relu") / "mw"
    tool("train", SMOKE, f"--model_dir={model_dir}", "--strategy=multi_worker", "--activation=relu")
    return model_dir


def test_train_writes_a_complete_run(trained):
    for name in ("config.json", "model.keras", "results.json", "robustness_card.json"):
        assert (trained / name).is_file(), name
    assert any((trained / "logs").rglob("events.out.tfevents.*"))
    config = json.loads((trained / "config.json").read_text())
    assert config["model"] == "small_cnn" and config["steps_per_epoch"] == 2
    results = json.loads((trained / "results.json").read_text())
    assert results["steps"] == 2
    assert {"accuracy", "adv_accuracy"} <= set(results["results"])
    card = json.loads((trained / "robustness_card.json").read_text())
    assert card["threat_model"]["epsilon"]["pixels"] == 16.0
    assert card["training"]["attack"]["num_steps"] == 1


def test_finished_run_is_never_overwritten(trained):
    before = (trained / "model.keras").stat().st_mtime_ns
    result = tool("train", *DETERMINISTIC, f"--model_dir={trained}", check=False)
    assert result.returncode != 0
    assert "holds a finished run" in result.stderr and "--overwrite" in result.stderr
    assert (trained / "model.keras").stat().st_mtime_ns == before


def test_eval_reports_clean_and_pgd_and_updates_the_card(trained, tmp_path):
    out = tmp_path / "eval"
    tool(
        "eval",
        f"--model_dir={trained}",
        f"--output_dir={out}",
        "--num_examples=32",
        "--num_steps=2,4",
        "--epsilons=8,16",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] == 8.0
    assert 0 <= summary["pgd-4"] <= summary["clean"] <= 1
    for name in ("results.json", "results.md"):
        assert (out / name).is_file()
    card = json.loads((trained / "robustness_card.json").read_text())
    entry = card["evaluations"][-1]
    # No --step_size: the run's --eval_step_size (4 in configs/demo.cfg).
    assert entry["num_examples"] == 32 and entry["pgd_step_size_pixels"] == 4.0
    assert "tools/eval.py" in entry["command"]


def test_deterministic_runs_give_bit_identical_weights_and_results(trained, tmp_path):
    runs = [trained, tmp_path / "b"]  # `trained` ran the same command
    tool("train", *DETERMINISTIC, f"--model_dir={runs[1]}")
    from sat_tf import saving

    weights = [saving.load_model(run / "model.keras").get_weights() for run in runs]
    for u, v in zip(*weights, strict=True):
        np.testing.assert_array_equal(u, v)
    results = [json.loads((run / "results.json").read_text())["results"] for run in runs]
    assert results[0] == results[1]
    assert json.loads((runs[0] / "config.json").read_text())["deterministic"] is True


def test_export_serves_both_signatures_in_a_fresh_process(trained, tmp_path):
    tool("export", f"--model_dir={trained}", f"--export_dir={tmp_path / 'export'}", "--version=3")
    path = tmp_path / "export" / "3"
    assert (path / "saved_model.pb").is_file()
    assert (path / "assets.extra" / "robustness_card.json").is_file()
    script = f"""
import io, json, sys
import numpy as np, tensorflow as tf, keras
from PIL import Image
loaded = tf.saved_model.load({str(path)!r})  # the export needs no sat_tf import
import sat_tf  # registers the layers, for the Keras model we compare with
model = keras.saving.load_model({str(trained / "model.keras")!r}, safe_mode=True)
rng = np.random.default_rng(0)
pixels = rng.integers(0, 256, (2, 16, 16, 3)).astype("float32")
out = loaded.signatures["serving_default"](images=tf.constant(pixels))
ref = np.asarray(model(pixels))
assert np.allclose(out["logits"].numpy(), ref, atol=1e-4), (out["logits"], ref)
assert np.allclose(out["probabilities"].numpy().sum(1), 1, atol=1e-5)
assert out["top_k_classes"].shape == (2, 5)
blobs = []
for p in pixels.astype("uint8"):
    buf = io.BytesIO(); Image.fromarray(p).save(buf, format="PNG"); blobs.append(buf.getvalue())
out_b = loaded.signatures["serving_bytes"](image_bytes=tf.constant(blobs))
assert np.allclose(out_b["logits"].numpy(), ref, atol=1e-3), (out_b["logits"], ref)
try:
    loaded.signatures["serving_default"](images=tf.constant(pixels[..., :1]))
    sys.exit("a 1-channel request was accepted")
except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
    print("rejected:", type(error).__name__)
# What `saved_model_cli show --all` lists, read from saved_model.pb itself (as the CLI does, and
# without starting one more TensorFlow process for it):
from tensorflow.core.protobuf import saved_model_pb2
proto = saved_model_pb2.SavedModel()
proto.ParseFromString(open({str(path / "saved_model.pb")!r}, "rb").read())
signatures = proto.meta_graphs[0].signature_def
assert "serving_bytes" in signatures, list(signatures)
assert "top_k_probabilities" in signatures["serving_default"].outputs, signatures
assert "top_k_probabilities" in signatures["serving_bytes"].outputs, signatures
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


DAMAGED = {
    "card": ("robustness_card.json", "{not json", "robustness_card.json is not valid JSON"),
    "config-keys": (
        "config.json",
        '{"model": "small_cnn"}',
        "lacks the run keys augmentation, dataset",
    ),
    "config-types": (
        "config.json",
        '{"image_size": "big", "augmentation": "auto", "dataset": "demo"}',
        "config.json has image_size='big', not a number of pixels in [8, 4096]",
    ),
}
EXPORT_FLAGS = [
    (["--top_k=0"], "--top_k=0 is invalid: must be >= 1"),
    (["--version=0"], "--version=0 is invalid: must be >= 1"),
    (["--image_size=-1"], "--image_size=-1 is invalid: must be in [8, 4096]"),
    (["--image_size=20000"], "--image_size=20000 is invalid: must be in [8, 4096]"),
]
BAD_TRAIN_FLAGS = [
    # The command line's own paths, one case each (every flag check is tested in-process by
    # test_bad_inputs.py::test_bad_flag_is_refused_before_any_work, through the same code):
    (["--model=resnet9000"], "Unknown model 'resnet9000'"),  # a name check
    (["--epsilon=inf"], "--epsilon=inf is invalid: must be in [0, 255]"),  # validate()
    (["--dataset=tfrecord:/nonexistent/train-*"], "/nonexistent/train-*"),  # the data
    (["--epslion=4"], "epslion"),  # absl
    (["--decay_epochs=30,sixty"], "--decay_epochs=30,sixty is invalid: give epochs as numbers"),
    (["--global_batch_size=2000"], "--global_batch_size=2000 is larger than the 1437 examples"),
]


@pytest.fixture(scope="module")
def refusals(trained, tmp_path_factory):
    """Every refused command of this file, run once in one batch (BATCH): {key: (result,
    seconds, folder)}; each export case has its own copy of the trained run."""
    root = tmp_path_factory.mktemp("refusals")
    cases, folders = {}, {}

    def run_copy(key):
        folders[key] = run = root / key / "run"
        shutil.copytree(trained, run)
        return run

    for key, (name, payload, _) in DAMAGED.items():
        (run_copy(f"damaged-{key}") / name).write_text(payload)
        cases[f"damaged-{key}"] = ("export", [f"--model_dir={folders[f'damaged-{key}']}"])
    run = run_copy("linked")
    (root / "linked" / "outside").mkdir()
    (run / "export").symlink_to(root / "linked" / "outside")
    cases["linked"] = ("export", [f"--model_dir={run}"])
    for args, _ in EXPORT_FLAGS:
        cases[f"export{args}"] = ("export", [f"--model_dir={run_copy(f'export{args}')}", *args])
    for args, _ in BAD_TRAIN_FLAGS:
        folders[f"train{args}"] = root / f"train{args}"
        cases[f"train{args}"] = (
            "train",
            [SMOKE, f"--model_dir={root / f'train{args}' / 'bad'}", *args],
        )
    folders["flagfile"] = root / "flagfile"
    folders["flagfile"].mkdir()
    cases["flagfile"] = (
        "train",
        ["--flagfile=configs/nope.cfg", f"--model_dir={folders['flagfile']}"],
    )
    outcomes = refused_batch(cases, root)
    return {key: (*outcomes[key], folders[key]) for key in cases}


def refused_export(refusals, key):
    """tools/export.py's one-line refusal; nothing was exported and nothing took long."""
    result, seconds, run = refusals[key]
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert not (run / "export").exists() or (run / "export").is_symlink()
    assert seconds < 60
    return lines[0], run


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_export_of_a_damaged_run_is_one_line_before_exporting(refusals, case):
    name, payload, match = DAMAGED[case]
    line, run = refused_export(refusals, f"damaged-{case}")
    assert f"error: {run / name}" in line and match in line, line
    assert (run / name).read_text() == payload  # kept as it is


def test_export_never_writes_through_a_linked_export_folder(refusals):
    line, run = refused_export(refusals, "linked")
    assert f"{run / 'export'} is a symbolic link" in line, line
    assert list((run.parent / "outside").iterdir()) == []


@pytest.mark.parametrize(("args", "match"), EXPORT_FLAGS)
def test_export_flags_are_checked_before_the_model_is_loaded(refusals, args, match):
    assert match in refused_export(refusals, f"export{args}")[0]


def test_killed_run_resumes_where_it_stopped(tmp_path):
    model_dir = tmp_path / "resume"
    args = [
        sys.executable,
        "tools/train.py",
        SMOKE,
        f"--model_dir={model_dir}",
        "--epochs=2",
        "--steps_per_epoch=6",
        "--checkpoint_every_steps=2",
    ]
    process = subprocess.Popen(
        args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    index = model_dir / "checkpoints" / "checkpoint"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if index.exists() and "ckpt-4" in index.read_text():
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (model_dir / "model.keras").exists(), "killed too late: the run had finished"
    result = tool("train", *args[2:])
    assert "Resuming" in result.stdout
    resumed_from = int(result.stdout.split("from step ")[1].split(".")[0])
    assert 2 <= resumed_from < 12
    assert json.loads((model_dir / "results.json").read_text())["steps"] == 12


def test_init_from_fine_tunes_a_converted_relu_model(relu_run, tmp_path):
    relu_dir, sat_dir = relu_run, tmp_path / "sat"
    tool(
        "train",
        SMOKE,
        f"--model_dir={sat_dir}",
        f"--init_from={relu_dir / 'model.keras'}",
        "--activation=gelu",
    )
    script = f"""
import keras, sat_tf
model = keras.saving.load_model({str(sat_dir / "model.keras")!r}, safe_mode=True)
layers = list(model._flatten_layers(include_self=False))
assert not any(isinstance(layer, keras.layers.ReLU) for layer in layers)
assert any(isinstance(layer, sat_tf.activations.GELU) for layer in layers)
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert "ok" in result.stdout, result.stderr[-3000:]
    card = json.loads((sat_dir / "robustness_card.json").read_text())
    assert card["model"]["init_from"].endswith("model.keras")


def test_multi_worker_strategy_trains_through_the_custom_loop(relu_run):
    # Keras 3.15's fit fails under MultiWorkerMirroredStrategy; training.run uses
    # sat_tf.distribute.train there (one local worker when TF_CONFIG is unset).
    assert json.loads((relu_run / "config.json").read_text())["strategy"] == "multi_worker"
    assert json.loads((relu_run / "results.json").read_text())["steps"] == 2


@pytest.mark.parametrize(("args", "message"), BAD_TRAIN_FLAGS)
def test_bad_flags_fail_fast_with_one_clear_line(refusals, args, message):
    result, seconds, folder = refusals[f"train{args}"]
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert seconds < 60
    assert not (folder / "bad" / "checkpoints").exists()


def test_missing_flagfile_is_named(refusals):
    result, _, _ = refusals["flagfile"]
    assert result.returncode != 0 and "configs/nope.cfg" in result.stderr
    assert "Traceback" not in result.stderr


def test_pixels_round_trip_is_exact_for_png():
    # Guard for the export test above: PNG keeps uint8 pixels exactly.
    import io

    from PIL import Image

    pixels = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue()))), pixels)
