"""Import of the official SAT checkpoints, against the official code's own forward pass.

tests/official/ holds what `make test-official` wrote by running the official ResNet code
(cihangxie/SmoothAdversarialTraining, ResNet/resnet_model.py under tf.compat.v1 + Tensorpack 0.11):
the variable names and shapes of its graph, four Imagenette images preprocessed by its evaluation
loader, and its logits for a checkpoint filled by tests/official/weights.py. Here the same
checkpoint is rebuilt from the seed with plain TensorFlow, imported, and compared. The forward
comparisons also run under JAX (`backends`): TensorFlow reads the checkpoint, the model is JAX's.
"""

import dataclasses
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import needs_tensorflow

from sat_tf import models, preflight, pretrained, rundir, saving
from sat_tf.config import TrainConfig
from sat_tf.pretrained import efficientnet, resnet
from sat_tf.pretrained import model_dir as run_dir

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / "tests" / "official"
_spec = importlib.util.spec_from_file_location("official_weights", OFFICIAL / "weights.py")
weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(weights)
_spec = importlib.util.spec_from_file_location("tf1_bundle", ROOT / "tests" / "tf1_bundle.py")
tf1_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tf1_bundle)
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
    logits = keras.ops.convert_to_numpy(model(images, training=False))
    relative = np.abs(logits - reference).max() / np.abs(reference).max()
    assert relative < 1e-5, relative
    np.testing.assert_array_equal(logits.argmax(1), reference.argmax(1))


def test_reference_logits_depend_on_the_image():
    # A fixture whose top-1 never changes would not catch, e.g., a colour-channel swap.
    assert len(set(np.load(OFFICIAL / "resnet50_silu_logits.npy").argmax(1))) == 4


@pytest.mark.backends
@needs_tensorflow  # the checkpoints are written and read with TensorFlow
@pytest.mark.parametrize("activation", sorted(OFFICIAL_NAMES))
def test_resnet50_matches_the_official_forward(checkpoints, images, tmp_path, activation):
    # The activation comes from the released file name (Res50-<activation>), as downloaded.
    prefix = _link(checkpoints["resnet50"], f"Res50-{OFFICIAL_NAMES[activation]}", tmp_path)
    imported = pretrained.import_official(prefix, image_size=SIZE)
    assert (imported.arch, imported.activation) == ("resnet50", activation)
    assert sorted(imported.skipped) == sorted(n for n, _ in TRAINING_ONLY)
    _assert_matches(imported.model, images, f"resnet50_{activation}_logits.npy")


@pytest.mark.backends
@needs_tensorflow  # the checkpoints are written and read with TensorFlow
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


@pytest.mark.backends
@needs_tensorflow  # the checkpoints are written and read with TensorFlow
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


@pytest.mark.backends
@needs_tensorflow  # the checkpoints are written and read with TensorFlow
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


R50 = dict(weights.read_names(OFFICIAL / "resnet50_variables.txt"))


@pytest.fixture
def no_build(monkeypatch):
    """Fails a test that builds a model: the checks must come first, so nothing is allocated."""

    def build(*args, **kwargs):
        raise AssertionError(f"the model was built ({args}, {kwargs})")

    monkeypatch.setattr(models, "build", build)


def _declared(prefix, **options):
    """A ResNet-50 index declaring the official shapes over a sparse .data file (a few KB of disk):
    each variable's region is all zeros but its first element. `options` go to tf1_bundle.write."""
    shapes = {**R50, **options.pop("declared", {})}
    tensors = {name: np.ones(1, "float32") for name in shapes}
    return tf1_bundle.write(prefix, tensors, declared=shapes, **options)


def _saved(prefix, values):
    """A complete ResNet-50 checkpoint written by TensorFlow (SaveV2), `values` replacing some."""
    import tensorflow as tf

    names = sorted(R50)
    tensors = [values[n] if n in values else weights.value(n, R50[n]) for n in names]
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tf.raw_ops.SaveV2(
        prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors
    )
    return str(prefix)


def test_the_index_reader_agrees_with_tensorflow(checkpoints, tmp_path):
    import tensorflow as tf

    from sat_tf.pretrained import bundle

    # A partitioned variable (two slices of one [4, 6] tensor), a string and an int64 beside it.
    sliced = str(tmp_path / "sliced")
    tf.raw_ops.SaveV2(
        prefix=sliced,
        tensor_names=["part", "part", "note", "global_step"],
        shape_and_slices=["4 6 0,2:-", "4 6 2,2:-", "", ""],
        tensors=[
            tf.ones((2, 6)),
            tf.zeros((2, 6)),
            tf.constant(["a", "bc"]),
            tf.constant(7, tf.int64),
        ],
    )
    for prefix in (checkpoints["resnet50"], checkpoints["resnext"], sliced):
        reader = tf.train.load_checkpoint(prefix)
        index = bundle.read(prefix)
        expected = {k: tuple(v) for k, v in reader.get_variable_to_shape_map().items()}
        assert index.shapes() == expected
        dtypes = {k: v.as_datatype_enum for k, v in reader.get_variable_to_dtype_map().items()}
        assert {k: e.dtype for k, e in index.entries.items()} == dtypes
    assert index.entries["part"].sliced and not index.entries["note"].sliced


@pytest.mark.parametrize("classes", [400_000, 2_000_000])
def test_a_huge_declared_head_is_refused_before_building(tmp_path, no_build, classes):
    # The index is consistent with its .data file (sparse: 3.3 GB / 16 GB apparent, no disk), so
    # only the bound on the number of classes stands between it and a 400,000-class model. An
    # index that also lies about its entry (1e9 classes in 4 bytes): the "entry-size" case below.
    head = {"linear/W": (2048, classes), "linear/b": (classes,)}
    prefix = _declared(tmp_path / "ckpt", declared=head)
    start = time.perf_counter()
    _one_line_error(
        f"linear/W declares {classes} classes, more than 100000", prefix, activation="silu"
    )
    assert time.perf_counter() - start < 1.0  # the index only: no model, no tensor


@pytest.mark.parametrize(
    "options, match",
    [
        # The entry says 4 bytes where its shape needs 8 TB.
        ({"declared": {"linear/W": (2048, 10**9)}, "sizes": {"linear/W": 4}},
         r"linear/W declares \[2048, 1000000000\] float32 \(8\.2 TB\) but its entry holds 4 bytes"),
        # A consistent index over a .data file cut short: found before anything is built.
        ({"data_size": 1 << 20},
         r"/W ends at byte \d+ of the 1048576-byte .*ckpt\.data-00000-of-00001"
         r": the \.data file is truncated or corrupt"),
        ({"num_shards": 2}, r"1 of 2 \.data files missing: .*ckpt\.data-00001-of-00002"),
        ({"num_shards": 2**31 - 1}, r"2147483646 of 2147483647 \.data files missing: "),
        ({"declared": {"linear/b": (-1,)}}, r"linear/b declares the dimension -1"),
        ({"declared": {"linear/b": (2**40, 2**40)}, "sizes": {"linear/b": 4}},
         r"linear/b declares \[1099511627776, 1099511627776\] float32 \(4\.8e\+12 TB\)"),
        ({"declared": {"linear/b": (1,) * 300}}, r"linear/b declares 300 dimensions \(at most 32"),
        ({"dtypes": {"linear/b": 999}}, r"linear/b has the unknown dtype 999"),
    ],
    ids=["entry-size", "short-data", "missing-shard", "2**31-shards", "negative-dim", "overflow",
         "300-dims", "unknown-dtype"],
)  # fmt: skip
def test_absurd_index_entries_are_refused_before_tensorflow_reads_them(
    tmp_path, no_build, options, match
):
    # A dimension of -1, more than 2**63 elements or 254+ dimensions stop TensorFlow's
    # CheckpointReader with a CHECK failure (the whole process); the rest would be read or built.
    _one_line_error(match, _declared(tmp_path / "ckpt", **options), activation="silu")


@pytest.mark.parametrize(
    "content",
    [b"", b"model_checkpoint_path: 'ckpt-1'\n", bytes(range(256)) * 4],
    ids=["empty", "text", "noise"],
)
def test_an_index_that_is_not_an_index_is_refused_in_one_line(tmp_path, no_build, content):
    prefix = _declared(tmp_path / "ckpt")
    Path(prefix + ".index").write_bytes(content)
    _one_line_error(
        r"ckpt\.index is not a TensorFlow checkpoint index \(", prefix, activation="silu"
    )


@pytest.mark.parametrize(
    "kernel, match",
    [
        ({"group0/block0/conv2/W": (3, 3, 0, 64)}, r"\[3, 3, 0, 64\]"),
        ({"group0/block0/conv2/W": (3, 3, 64, 0)}, r"\[3, 3, 64, 0\]"),
        ({"group0/block0/conv2/W": (3, 3, 48, 64)}, r"\[3, 3, 48, 64\]"),
        ({"group0/block0/conv2/W": (3, 3, 64)}, r"\[3, 3, 64\]"),
        ({"linear/W": (2048,)}, r"linear/W \[2048\] is not a \[features, classes\] kernel"),
        ({"linear/W": (2048, 0)}, r"linear/W \[2048, 0\] is not a \[features, classes\] kernel"),
    ],
    ids=["zero-in", "zero-width", "not-grouped", "rank-3", "head-rank-1", "zero-classes"],
)  # fmt: skip
def test_a_kernel_the_architecture_cannot_be_read_from_is_refused(
    tmp_path, no_build, kernel, match
):
    message = _one_line_error(
        match, _declared(tmp_path / "ckpt", declared=kernel), activation="silu"
    )
    if "conv2" in str(kernel):
        assert "group0/block0/conv2/W" in message and "grouped 3x3 kernel" in message


def test_non_finite_weights_are_refused_naming_them(tmp_path):
    # Under a released name: the card would carry the README's numbers for these weights.
    nan = {n: np.full(R50[n], np.nan, "float32") for n in R50 if n.endswith("/conv1/W")}
    nan["linear/b"] = np.full(1000, np.inf, "float32")
    prefix = _saved(tmp_path / "Res50-silu" / "Res50-silu", nan)
    message = _one_line_error(r"17 variables hold NaN or Inf: group0/block0/conv1/W, ", prefix)
    assert "linear/b" not in message and "(+9 more)" in message  # eight named, sorted


def test_reported_numbers_are_written_only_for_finite_weights(imported_dir, tmp_path):
    import keras

    imported, earlier = imported_dir
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, name="logits")])
    model.get_layer("logits").bias.assign([0.0, np.nan, 0.0])
    broken = dataclasses.replace(imported, model=model, released=pretrained.RELEASED["Res50-silu"])
    folder = tmp_path / "run"
    refused = pytest.raises(pretrained.OfficialCheckpointError, match="1 variables hold NaN or Inf")
    with refused:
        run_dir.write(broken, folder)
    assert not folder.exists()
    before = _tree(earlier)  # --overwrite over a good import: refused before anything is cleared
    with refused:
        run_dir.write(broken, earlier, overwrite=True)
    assert _tree(earlier) == before


def _tool_main(script, *args, define=None):
    """Runs `tools/<script>`'s main in this process on `args` (absl flags), as `python tools/...`
    would; its flags are removed again afterwards. `define(FLAGS)` adds flags the script defines
    only under `__main__`. Returns what main returned; a sys.exit propagates as SystemExit."""
    from absl import flags

    flag_values = flags.FLAGS
    # Flags other tests' tool modules left in this worker (tests/test_build_tfrecords.py loads its
    # tool at import) may share names with this tool's: set them aside while it runs.
    absl_own = {
        flag.name
        for module, defined in flag_values.flags_by_module_dict().items()
        if module.startswith("absl.")
        for flag in defined
    }
    aside = {name: flag_values[name] for name in set(flag_values) - absl_own}
    for name in aside:
        delattr(flag_values, name)
    before = set(flag_values)
    was_parsed = flag_values.is_parsed()
    spec = importlib.util.spec_from_file_location(f"_tool_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if define:
            define(flag_values)
        argv = flag_values([script, *args])
        return module.main(argv)
    finally:
        for name in set(flag_values) - before:
            delattr(flag_values, name)
        if not was_parsed:
            flag_values.unparse_flags()
        for name, flag in aside.items():
            flag_values[name] = flag


def test_the_tool_refuses_non_finite_weights_in_one_line_and_writes_nothing(tmp_path):
    prefix = _saved(
        tmp_path / "Res50-silu" / "Res50-silu", {"linear/b": np.full(1000, np.nan, "float32")}
    )
    model_dir = tmp_path / "r50_silu"
    # In this process: the message sys.exit prints as the last line of stderr, with status 1.
    with pytest.raises(SystemExit) as info:
        _tool_main("tools/import_official.py", f"--checkpoint={prefix}",
                   f"--model_dir={model_dir}", f"--image_size={SIZE}")  # fmt: skip
    assert info.value.code == (
        f"error: checkpoint {prefix}: 1 variables hold NaN or Inf: linear/b; the checkpoint is "
        "damaged: download it again"
    )
    assert not model_dir.exists()  # no card with the README's numbers for these weights


def test_a_string_variable_is_named(tmp_path):
    import tensorflow as tf

    prefix = _saved(tmp_path / "ckpt", {"linear/b": tf.constant(["abc"] * 1000)})
    _one_line_error(
        r"1 checkpoint variables not float: linear/b \(string\)", prefix, activation="silu"
    )


def test_glob_characters_in_the_path_are_literal(checkpoints, tmp_path):
    # exp[1] is also a glob pattern, matching exp1: the plain checkpoint beside the SmoothReLU one.
    folder = tmp_path / "ck"
    for name, source in (("[1]", "smoothrelu"), ("1", "resnet50")):
        _link(checkpoints[source], f"exp{name}", folder)  # the prefixes ck/exp[1], ck/exp1
        _link(checkpoints[source], "ckpt", folder / f"run{name}")  # the folders ck/run[1], ck/run1
    _link(checkpoints["smoothrelu"], "alone[2]", folder)  # a pattern that matches no file
    for given in ("exp[1]", "run[1]", "alone[2]"):
        imported = pretrained.import_official(folder / given, image_size=SIZE)
        assert imported.activation == "smooth_relu", given  # the plain one would need activation=


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

    from sat_tf import config as config_lib
    from sat_tf.data import preprocessing

    val = tmp_path / "imagenette" / "val"
    with tarfile.open(shared_data / "imagenette-224.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".JPEG") and "/val/" in m.name]
        for member in members[:1] + members[-1:]:  # two classes, an image each
            member.name = "/".join(member.name.split("/")[-2:])
            tar.extract(member, val)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "gdown.py").write_text(FAKE_GDOWN)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FAKE_GDOWN_SOURCE": checkpoints["resnet50"]}
    env["PYTHONPATH"] = os.pathsep.join([str(fake), env.get("PYTHONPATH", "")])
    model_dir = tmp_path / "r50_silu"
    # The import in its own process, as a user runs it: gdown found on the path, the command line
    # parsed, the run folder written; eval and export then run their tools' main in this process.
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
    define_eval = functools.partial(config_lib.define_flags, cls=config_lib.EvalConfig)
    _tool_main("tools/eval.py", f"--model_dir={model_dir}", f"--dataset=folder:{val.parent}",
               "--eval_split=val", "--num_steps=1", "--batch_size=2",
               define=define_eval)  # fmt: skip
    card = json.loads((model_dir / "robustness_card.json").read_text())
    assert card["evaluations"][0]["num_examples"] == 2
    _tool_main("tools/export.py", f"--model_dir={model_dir}")
    files = sorted(str(p) for p in val.glob("*/*.JPEG"))
    served = tf.saved_model.load(str(model_dir / "export" / "1")).signatures["serving_bytes"]
    images = tf.constant([Path(f).read_bytes() for f in files])
    top1 = served(images)["top_k_classes"].numpy()[:, 0].tolist()
    model = saving.load_model(model_dir / "model.keras")
    pixels = np.stack(
        [preprocessing.preprocess_for_eval(tf.io.read_file(f), SIZE).numpy() for f in files]
    )
    expected = model.predict(pixels.astype("float32"), verbose=0).argmax(1).tolist()
    assert top1 == expected
