"""The README's code never rots: its Python blocks run, its commands name real files and flags."""

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BACKEND, only_tensorflow

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _commands():
    """`python tools/...` commands of the bash blocks, with line continuations joined."""
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("python tools/"):
                yield shlex.split(line)


TORCH = 'os.environ["KERAS_BACKEND"] = "torch"'


@pytest.mark.slow
@only_tensorflow
def test_python_blocks_run(tmp_path):
    blocks = [b for b in _blocks("python") if "pretrained" not in b and TORCH not in b]
    assert blocks, "the README should show the user-code example"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    for code in blocks:
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "digits_silu.keras").is_file()
    assert "adv_accuracy" in result.stdout


@pytest.mark.backends
@pytest.mark.skipif(BACKEND != "torch", reason="the PyTorch example runs in .venv-torch")
def test_the_pytorch_block_trains_and_hands_the_model_to_the_reference(tmp_path):
    (code,) = [b for b in _blocks("python") if TORCH in b]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    clean, robust = map(
        float, re.search(r"clean ([\d.]+), robust .* ([\d.]+)", result.stdout).groups()
    )
    assert clean >= 0.8 and robust < clean, result.stdout  # trained, and the attack fools some


def test_the_two_setup_commands_exist():
    assert "make demo" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@functools.cache
def _helpfull(tool):
    """`python <tool> --helpfull`, once per tool (each run imports TensorFlow: ~5 s)."""
    return subprocess.run(
        [sys.executable, str(ROOT / tool), "--helpfull"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    ).stdout


@pytest.mark.parametrize("argv", list(_commands()), ids=lambda a: " ".join(a[:3]))
def test_commands_name_real_tools_flagfiles_and_flags(argv):
    tool = ROOT / argv[1]
    assert tool.is_file(), argv[1]
    for arg in argv[2:]:
        if arg.startswith("--flagfile="):
            assert (ROOT / arg.split("=", 1)[1]).is_file(), arg
    # Each flag must be one the tool defines (absl lists them in --helpfull).
    helpfull = _helpfull(argv[1])
    for arg in argv[2:]:
        name = arg.lstrip("-").split("=", 1)[0]
        if name != "flagfile":
            assert f"--{name}" in helpfull or f"--[no]{name}" in helpfull, arg


FAKE_GDOWN = """
import os, shutil
def download(url, output, quiet=False):
    suffix = [s for s in (".index", ".data-00000-of-00001", ".meta") if output.endswith(s)][0]
    if suffix == ".meta":
        open(output, "wb").write(b"meta")
    else:
        shutil.copy(os.environ["FAKE_GDOWN_SOURCE"] + suffix, output)
    return output
"""


@pytest.mark.slow
def test_pretrained_block_runs_with_a_local_fake_download(tmp_path):
    """The "Use the paper's models" code, with gdown replaced by a copy of a local checkpoint."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("w", ROOT / "tests" / "official" / "weights.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    rows = weights.read_names(ROOT / "tests" / "official" / "resnet50_variables.txt")
    source = weights.write_checkpoint(tmp_path / "source" / "ckpt", rows)
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "gdown.py").write_text(FAKE_GDOWN)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FAKE_GDOWN_SOURCE": source}
    env |= {"SAT_TF_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path / "fake")}
    (code,) = [b for b in _blocks("python") if "pretrained" in b]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resnet50 (None, 224, 224, 3)" in result.stdout
    assert "'pgd-50': 41.9" in result.stdout
    assert (tmp_path / "cache" / "Res50-silu" / "Res50-silu.index").is_file()
