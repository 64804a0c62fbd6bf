"""Import of the official SAT checkpoints, against the official code's own forward pass.

tests/official/ holds what `make test-official` wrote by running the official ResNet code
(cihangxie/SmoothAdversarialTraining, ResNet/resnet_model.py under tf.compat.v1 + Tensorpack 0.11):
the variable names and shapes of its graph, four Imagenette images preprocessed by its evaluation
loader, and its logits for a checkpoint filled by tests/official/weights.py. Here the same
checkpoint is rebuilt from the seed with plain TensorFlow, imported, and compared.
"""

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sat_tf import preflight, pretrained, rundir, saving
from sat_tf.config import TrainConfig
from sat_tf.pretrained import efficientnet, resnet
from sat_tf.pretrained import model_dir as run_dir

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / "tests" / "official"
_spec = importlib.util.spec_from_file_location("official_weights", OFFICIAL / "weights.py")
weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(weights)
SIZE = 64  # make_reference.py's --size
# Variables of training a real Tensorpack checkpoint also holds (momentum slots, counters).
TRAINING_ONLY = [
    ("global_step", ()),
    ("learning_rate", ()),
    ("conv0/W/Momentum", (7, 7, 3, 64)),
    ("linear/b/Momentum", (1000,)),
]
OFFICIAL_NAMES = {"relu": "relu", "silu": "silu", "elu": "elu", "gelu": "gelu"}
OFFICIAL_NAMES |= {"softplus": "softplus", "mish": "mish"}


def _link(prefix, name, folder):
    """`folder/name.*` -> the files of `prefix` (a checkpoint under a released file name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".index", ".data-00000-of-00001"):
        (folder / f"{name}{suffix}").symlink_to(f"{prefix}{suffix}")
    return str(folder / name)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    rows = weights.read_names(OFFICIAL / "resnet50_variables.txt")
    return {
        "resnet50": weights.write_checkpoint(root / "r50" / "ckpt", rows + TRAINING_ONLY),
        "smoothrelu": weights.write_checkpoint(
            root / "r50s" / "ckpt",
            weights.read_names(OFFICIAL / "resnet50_smoothrelu_variables.txt"),
        ),
        "resnext": weights.write_checkpoint(
            root / "rx" / "ckpt", weights.read_names(OFFICIAL / "resnext50_32x4d_variables.txt")
        ),
        "root": root,
    }


@pytest.fixture(scope="module")
def images():
    return np.load(OFFICIAL / "images_rgb.npy").astype("float32")


def _assert_matches(model, images, reference_file):
    reference = np.load(OFFICIAL / reference_file)
    logits = model(images, training=False).numpy()
    relative = np.abs(logits - reference).max() / np.abs(reference).max()
    assert relative < 1e-5, relative
    np.testing.assert_array_equal(logits.argmax(1), reference.argmax(1))


def test_reference_logits_depend_on_the_image():
    # A fixture whose top-1 never changes would not catch, e.g., a colour-channel swap.
    assert len(set(np.load(OFFICIAL / "resnet50_silu_logits.npy").argmax(1))) == 4


@pytest.mark.parametrize("activation", sorted(OFFICIAL_NAMES))
def test_resnet50_matches_the_official_forward(checkpoints, images, tmp_path, activation):
    # The activation comes from the released file name (Res50-<activation>), as downloaded.
    prefix = _link(checkpoints["resnet50"], f"Res50-{OFFICIAL_NAMES[activation]}", tmp_path)
    imported = pretrained.import_official(prefix, image_size=SIZE)
    assert (imported.arch, imported.activation) == ("resnet50", activation)
    assert sorted(imported.skipped) == sorted(n for n, _ in TRAINING_ONLY)
    _assert_matches(imported.model, images, f"resnet50_{activation}_logits.npy")


def test_smooth_relu_with_a_beta_per_layer(checkpoints, images):
    imported = pretrained.import_official(checkpoints["smoothrelu"], image_size=SIZE)
    assert imported.activation == "smooth_relu"  # inferred from the beta variables
    model = imported.model
    reader_values = {
        "conv0/smoothrelu_beta": model.get_layer("stem_act").b,
        "group2/block3/conv2/smoothrelu_beta": model.get_layer("stage3_block4_act2").b,
        "group3/block2/smoothrelu_beta": model.get_layer("stage4_block3_out").b,
    }
    for name, b in reader_values.items():  # beta = raw^2 officially, b^2 here
        raw = weights.value(name, (1,))[0]
        assert float(b.numpy()) ** 2 == pytest.approx(raw**2, rel=1e-6)
    assert len({float(layer.b.numpy()) for layer in model.layers if hasattr(layer, "b")}) == 49
    _assert_matches(model, images, "resnet50_smoothrelu_logits.npy")


def test_resnext50_matches_the_official_forward(checkpoints, images):
    imported = pretrained.import_official(
        checkpoints["resnext"], activation="silu", image_size=SIZE
    )
    assert imported.arch == "resnext50_32x4d"  # groups and width from the grouped 3x3 kernels
    _assert_matches(imported.model, images, "resnext50_32x4d_silu_logits.npy")


def _deeper(counts, width=64, groups=1):
    """Names/shapes of a deeper ResNet(ResNeXt): group blocks repeated as nets.py NUM_BLOCKS."""
    shapes = {"conv0/W": (7, 7, 3, 64), "linear/W": (2048, 1000)}
    for group, count in enumerate(counts):
        for block in range(count):
            shapes[f"group{group}/block{block}/conv1/W"] = (1, 1, 256, width)
    shapes["group0/block0/conv2/W"] = (3, 3, width // groups, width)
    return shapes


@pytest.mark.parametrize(
    "counts, width, groups, arch",
    [
        ((3, 4, 23, 3), 64, 1, "resnet101"),
        ((3, 8, 36, 3), 64, 1, "resnet152"),
        ((3, 4, 6, 3), 256, 32, "resnext50_32x8d"),
        ((3, 8, 36, 3), 256, 32, "resnext152_32x8d"),
    ],
)
def test_depth_and_width_are_inferred(counts, width, groups, arch):
    # ch_factor = res2_bottleneck * group / 64 (resnet_model.py line 151): 32x8d -> 4 x 64.
    assert resnet.infer(_deeper(counts, width, groups))[0] == arch


@pytest.mark.parametrize(
    "prefix, arch",
    [("efficientnet-b3", "efficientnet_b3"), ("efficientnet-bL1", "efficientnet_l1")],
)
def test_efficientnet_variant_from_the_name_prefix(prefix, arch):
    shapes = {
        f"{prefix}/stem/conv2d/kernel": (3, 3, 3, 40),
        f"{prefix}/head/dense/kernel": (8, 1000),
    }
    assert efficientnet.infer(shapes) == (arch, "silu", 1000)


def _one_line_error(match, *args, **kwargs):
    with pytest.raises(pretrained.OfficialCheckpointError, match=match) as info:
        pretrained.import_official(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_and_truncated_files_fail_in_one_line(checkpoints, tmp_path):
    _one_line_error(r"nowhere/Res50-silu\.index not found", tmp_path / "nowhere" / "Res50-silu")
    source = checkpoints["resnet50"]
    shutil.copy(source + ".index", tmp_path / "only.index")
    _one_line_error(r"no .*only\.data-\* file", str(tmp_path / "only"))
    shutil.copy(source + ".index", tmp_path / "cut.index")
    with open(source + ".data-00000-of-00001", "rb") as full:
        (tmp_path / "cut.data-00000-of-00001").write_bytes(full.read(1 << 20))
    _one_line_error("truncated or corrupt", str(tmp_path / "cut"), activation="silu")


def test_efficientnet_b0_raw_and_moving_average_match_the_official_forward(tmp_path, images):
    # The official code builds B0 with the README's evaluation flags; its moving-average logits
    # come from restoring through its own ExponentialMovingAverage.variables_to_restore map.
    rows = weights.read_names(OFFICIAL / "efficientnet_b0_variables.txt")
    source = weights.write_checkpoint(tmp_path / "e" / "ckpt", rows)
    shadow = weights.value(
        "efficientnet-b0/head/dense/kernel/ExponentialMovingAverage", (1280, 1000)
    )
    assert not np.allclose(shadow, weights.value("efficientnet-b0/head/dense/kernel", (1280, 1000)))
    # Released as efficientnet-b0, evaluated with --moving_average_decay=0: the raw weights.
    imported = pretrained.import_official(
        _link(source, "efficientnet-b0", tmp_path), image_size=SIZE
    )
    assert (imported.arch, imported.moving_average) == ("efficientnet_b0", False)
    _assert_matches(imported.model, images, "efficientnet_b0_raw_logits.npy")
    imported = pretrained.import_official(source, image_size=SIZE, moving_average=True)
    assert imported.moving_average and "global_step" in imported.skipped
    _assert_matches(imported.model, images, "efficientnet_b0_ema_logits.npy")
    _one_line_error("does not fit a efficientnet", source, arch="resnet50")


def test_other_families_fail_in_one_line(checkpoints, tmp_path):
    plain = weights.write_checkpoint(tmp_path / "k" / "ckpt", [("dense/kernel", (4, 2))])
    _one_line_error("not an official SAT checkpoint.*dense/kernel", plain)
    _one_line_error(
        "arch='efficientnet_b0' does not fit a resnet",
        checkpoints["resnet50"],
        arch="efficientnet_b0",
    )
    _one_line_error("pass activation=", checkpoints["resnet50"])  # no beta, no released name


def test_every_missing_unused_and_mismatched_name_is_listed(tmp_path):
    rows = weights.read_names(OFFICIAL / "resnet50_variables.txt")
    rows = [(n, (999,) if n == "linear/b" else s) for n, s in rows if n != "group1/block2/conv2/W"]
    prefix = weights.write_checkpoint(tmp_path / "ckpt", rows + [("group9/extra/W", (3,))])
    message = _one_line_error("1 shape mismatch", prefix, activation="relu")
    assert "linear/b [999] vs logits/bias [1000]" in message
    assert "stage2_block3_conv2/kernel <- group1/block2/conv2/W" in message
    assert "1 checkpoint variables not used: group9/extra/W" in message
    message = _one_line_error("mismatch", prefix, activation="relu", ignore=r"^group9/")
    assert "not used" not in message


@pytest.fixture(scope="module")
def imported_dir(checkpoints, tmp_path_factory):
    """A ResNet-50 (SiLU) imported into a new model_dir, as tools/import_official.py does."""
    imported = pretrained.import_official(
        checkpoints["resnet50"], activation="silu", image_size=SIZE
    )
    folder = tmp_path_factory.mktemp("imported") / "r50_silu"
    run_dir.write(imported, folder, command="tools/import_official.py")
    return imported, folder


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_import_into_a_foreign_folder_is_refused_and_changes_nothing(imported_dir, tmp_path):
    imported, _ = imported_dir
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "model.keras").write_bytes(b"a user's own model")
    (foreign / "notes.txt").write_text("do not touch")
    before = _tree(foreign)
    for overwrite in (False, True):
        with pytest.raises(rundir.RunDirError, match="not a sat_tf run") as info:
            run_dir.write(imported, foreign, overwrite=overwrite)
        message = str(info.value)
        assert "\n" not in message and "Use a new or empty --model_dir" in message
        assert _tree(foreign) == before
        assert sorted(p.name for p in foreign.iterdir()) == ["model.keras", "notes.txt"]


def test_import_into_a_run_in_use_is_refused(imported_dir, tmp_path):
    imported, _ = imported_dir
    busy = tmp_path / "busy"
    in_use = pytest.raises(rundir.RunDirError, match="is in use: pid")
    with rundir.locked(busy, "training"), in_use:
        run_dir.write(imported, busy)
    assert not (busy / rundir.MANIFEST).exists()


def test_an_imported_folder_is_a_run_of_ours_listing_its_files(imported_dir):
    imported, folder = imported_dir
    rundir.check_ours(folder)  # no RunDirError
    present = sorted(p.name for p in folder.iterdir())
    assert present == sorted(
        [rundir.MANIFEST, "config.json", "model.keras", "robustness_card.json"]
    )
    assert sorted(rundir.listed(folder)) == [n for n in present if n != rundir.MANIFEST]
    # tools/train.py on it: a finished run of ours (--overwrite applies), not a foreign folder.
    with pytest.raises(preflight.RunError, match="holds a finished run"):
        preflight.check_model_dir(TrainConfig(model_dir=str(folder)))
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        run_dir.write(imported, folder)


def test_overwrite_replaces_only_what_the_manifest_lists(imported_dir, tmp_path):
    imported, _ = imported_dir
    folder = tmp_path / "run"
    rundir.record(folder, "results.json", "model.keras")  # a finished training run of ours
    (folder / "results.json").write_text("{}")
    (folder / "model.keras").write_bytes(b"the trained model")
    (folder / "notes.txt").write_text("a user's file")
    run_dir.write(imported, folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [rundir.MANIFEST, "config.json", "model.keras", "notes.txt", "robustness_card.json"]
    )
    assert (folder / "notes.txt").read_text() == "a user's file"
    assert (folder / "model.keras").stat().st_size > 1e6  # the imported ResNet-50, not the bytes


def test_train_init_from_an_imported_resnet50_passes_preflight(imported_dir, tmp_path):
    imported, folder = imported_dir
    run = TrainConfig(
        model_dir=str(tmp_path / "finetune"),
        model="resnet50",
        init_from=str(folder / "model.keras"),
        num_classes=1000,
        image_size=SIZE,
    )
    preflight.check_names(run)  # loads model.keras: no RunError
    base = imported.model  # what model.keras holds, without a second load
    with pytest.raises(preflight.RunError, match="set --num_classes=1000"):
        preflight.check_init_from(dataclasses.replace(run, num_classes=10), base)
    with pytest.raises(preflight.RunError, match=f"takes {SIZE}x{SIZE} images"):
        preflight.check_init_from(dataclasses.replace(run, image_size=SIZE * 2), base)


def test_download_fetches_the_three_files_into_the_cache(checkpoints, tmp_path, monkeypatch):
    fetched = []

    def fake_gdown(url, path):  # stands in for gdown.download (no internet here)
        fetched.append(url)
        suffix = next(
            s for s in (".index", ".data-00000-of-00001", ".meta") if path.name.endswith(s)
        )
        source = checkpoints["resnet50"] + suffix if suffix != ".meta" else None
        path.write_bytes(Path(source).read_bytes() if source else b"meta")
        return str(path)

    prefix = pretrained.download("Res50-elu", tmp_path, downloader=fake_gdown)
    assert prefix == str(tmp_path / "Res50-elu" / "Res50-elu")
    ids = pretrained.RELEASED["Res50-elu"].drive_ids
    assert fetched == [f"https://drive.google.com/uc?id={i}" for i in ids]

    def offline(url, path):
        raise AssertionError(f"fetched {url} again")

    assert pretrained.download("Res50-elu", tmp_path, downloader=offline) == prefix  # cached
    assert pretrained.import_official(prefix, image_size=SIZE).activation == "elu"
    monkeypatch.setitem(sys.modules, "gdown", None)
    with pytest.raises(ImportError, match=r"pip install 'sat_tf\[pretrained\]'"):
        pretrained.download("Res50-relu", tmp_path / "other")
    with pytest.raises(ValueError, match="Unknown checkpoint 'Res51-silu'"):
        pretrained.download("Res51-silu", tmp_path)


FAKE_GDOWN = """
import os, shutil
def download(url, output, quiet=False):
    source = os.environ["FAKE_GDOWN_SOURCE"]
    suffix = [s for s in (".index", ".data-00000-of-00001", ".meta") if output.endswith(s)][0]
    if suffix == ".meta":
        open(output, "wb").write(b"meta")
    else:
        shutil.copy(source + suffix, output)
    return output
"""
SERVE = """
import sys, numpy as np, tensorflow as tf
served = tf.saved_model.load(sys.argv[1]).signatures["serving_bytes"]
images = [open(path, "rb").read() for path in sys.argv[2:]]
print(served(tf.constant(images))["top_k_classes"].numpy()[:, 0].tolist())
"""


def _run(args, env):
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.data
def test_download_import_eval_export_serve(checkpoints, shared_data, tmp_path):
    import json
    import tarfile

    import tensorflow as tf

    from sat_tf.data import preprocessing

    val = tmp_path / "imagenette" / "val"
    with tarfile.open(shared_data / "imagenette-224.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".JPEG") and "/val/" in m.name]
        for member in members[:2] + members[-2:]:  # two classes, two images each
            member.name = "/".join(member.name.split("/")[-2:])
            tar.extract(member, val)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "gdown.py").write_text(FAKE_GDOWN)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FAKE_GDOWN_SOURCE": checkpoints["resnet50"]}
    env["PYTHONPATH"] = os.pathsep.join([str(fake), env.get("PYTHONPATH", "")])
    model_dir = tmp_path / "r50_silu"
    tool = sys.executable, "tools/import_official.py"
    _run([*tool, "--download=Res50-silu", f"--cache_dir={tmp_path / 'cache'}",
          f"--model_dir={model_dir}", f"--image_size={SIZE}"], env)  # fmt: skip
    run = json.loads((model_dir / "config.json").read_text())
    assert (run["eval_epsilon"], run["eval_step_size"], run["model"]) == (4.0, 1.0, "resnet50")
    card = json.loads((model_dir / "robustness_card.json").read_text())
    reported = card["reported_by_official_repository"]
    assert reported["accuracy_percent"] == {
        "clean": 69.7,
        "pgd-10": 43.0,
        "pgd-20": 42.2,
        "pgd-50": 41.9,
    }
    assert "not measured by sat_tf" in reported["note"]
    _run([sys.executable, "tools/eval.py", f"--model_dir={model_dir}",
          f"--dataset=folder:{val.parent}", "--eval_split=val", "--num_steps=1",
          "--batch_size=4"], env)  # fmt: skip
    card = json.loads((model_dir / "robustness_card.json").read_text())
    assert card["evaluations"][0]["num_examples"] == 4
    _run([sys.executable, "tools/export.py", f"--model_dir={model_dir}"], env)
    files = sorted(str(p) for p in val.glob("*/*.JPEG"))
    served = _run([sys.executable, "-c", SERVE, str(model_dir / "export" / "1"), *files], env)
    model = saving.load_model(model_dir / "model.keras")
    pixels = np.stack(
        [preprocessing.preprocess_for_eval(tf.io.read_file(f), SIZE).numpy() for f in files]
    )
    expected = model.predict(pixels.astype("float32"), verbose=0).argmax(1).tolist()
    assert json.loads(served.strip().splitlines()[-1]) == expected
