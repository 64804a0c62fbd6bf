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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("run") / "smoke"
    tool("train", SMOKE, f"--model_dir={model_dir}")
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
    result = tool("train", SMOKE, f"--model_dir={trained}", check=False)
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


def test_deterministic_runs_give_bit_identical_weights_and_results(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        tool("train", SMOKE, f"--model_dir={run}", "--deterministic", "--seed=3")
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
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    cli = Path(sys.executable).parent / "saved_model_cli"
    shown = subprocess.run(
        [str(cli), "show", "--dir", str(path), "--all"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "serving_bytes" in shown.stdout and "top_k_probabilities" in shown.stdout


def run_copy(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def refused_export(run, *args):
    """tools/export.py's one-line refusal; nothing was exported and nothing took long."""
    start = time.time()
    result = tool("export", f"--model_dir={run}", *args, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert not (run / "export").exists() or (run / "export").is_symlink()
    assert time.time() - start < 60
    return lines[0]


@pytest.mark.parametrize(
    ("name", "payload", "match"),
    [
        ("robustness_card.json", "{not json", "robustness_card.json is not valid JSON"),
        ("config.json", '{"model": "small_cnn"}', "lacks the run keys augmentation, dataset"),
        (
            "config.json",
            '{"image_size": "big", "augmentation": "auto", "dataset": "demo"}',
            "config.json has image_size='big', not a number of pixels in [8, 4096]",
        ),
    ],
    ids=["card", "config-keys", "config-types"],
)
def test_export_of_a_damaged_run_is_one_line_before_exporting(
    trained, tmp_path, name, payload, match
):
    run = run_copy(trained, tmp_path)
    (run / name).write_text(payload)
    line = refused_export(run)
    assert f"error: {run / name}" in line and match in line, line
    assert (run / name).read_text() == payload  # kept as it is


def test_export_never_writes_through_a_linked_export_folder(trained, tmp_path):
    run = run_copy(trained, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "export").symlink_to(outside)
    line = refused_export(run)
    assert f"{run / 'export'} is a symbolic link" in line, line
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--top_k=0"], "--top_k=0 is invalid: must be >= 1"),
        (["--version=0"], "--version=0 is invalid: must be >= 1"),
        (["--image_size=-1"], "--image_size=-1 is invalid: must be in [8, 4096]"),
        (["--image_size=20000"], "--image_size=20000 is invalid: must be in [8, 4096]"),
    ],
)
def test_export_flags_are_checked_before_the_model_is_loaded(trained, tmp_path, args, match):
    run = run_copy(trained, tmp_path)
    assert match in refused_export(run, *args)


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


def test_init_from_fine_tunes_a_converted_relu_model(tmp_path):
    relu_dir, sat_dir = tmp_path / "relu", tmp_path / "sat"
    tool("train", SMOKE, f"--model_dir={relu_dir}", "--activation=relu")
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


def test_multi_worker_strategy_trains_through_the_custom_loop(tmp_path):
    # Keras 3.15's fit fails under MultiWorkerMirroredStrategy; training.run uses
    # sat_tf.distribute.train there (one local worker when TF_CONFIG is unset).
    tool("train", SMOKE, f"--model_dir={tmp_path / 'mw'}", "--strategy=multi_worker")
    assert json.loads((tmp_path / "mw" / "results.json").read_text())["steps"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # The command line's own paths, one case each (every flag check is tested in-process by
        # test_bad_inputs.py::test_bad_flag_is_refused_before_any_work, through the same code):
        (["--model=resnet9000"], "Unknown model 'resnet9000'"),  # a name check
        (["--epsilon=inf"], "--epsilon=inf is invalid: must be in [0, 255]"),  # validate()
        (["--dataset=tfrecord:/nonexistent/train-*"], "/nonexistent/train-*"),  # the data
        (["--epslion=4"], "epslion"),  # absl
        (["--decay_epochs=30,sixty"], "--decay_epochs=30,sixty is invalid: give epochs as numbers"),
        (["--global_batch_size=2000"], "--global_batch_size=2000 is larger than the 1437 examples"),
    ],
)
def test_bad_flags_fail_fast_with_one_clear_line(args, message, tmp_path):
    start = time.time()
    result = tool("train", SMOKE, f"--model_dir={tmp_path / 'bad'}", *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert time.time() - start < 60
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_missing_flagfile_is_named(tmp_path):
    result = tool("train", "--flagfile=configs/nope.cfg", f"--model_dir={tmp_path}", check=False)
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
