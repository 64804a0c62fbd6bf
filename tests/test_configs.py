"""Every flagfile under configs/ is a valid, documented run of `tools/train.py`.

The files are read here with a small parser that follows absl's flagfile rules (a line that starts
with '#' or '//' is a comment, blank lines are skipped, a nested `--flagfile=<path>` is expanded in
place with paths relative to the repository root, the last value of a flag wins), and the parser
is itself checked against absl. `tools/train.py` is deliberately not imported: these tests hold the
configs to `sat_tf.config.TrainConfig`, the one contract both sides share.

The recipe constants below are written down from the official SAT code
(github.com/cihangxie/SmoothAdversarialTraining: ResNet/main.py, EfficientNet/main.py and utils.py,
EfficientNet/efficientnet_builder.py), not read back from the configs.
"""

import dataclasses
import json
import pathlib
import re
import shlex
import typing

import pytest
from absl import flags as absl_flags

from sat_tf import activations, models
from sat_tf.config import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALL_FILES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.cfg"))
ROWS = [p for p in ALL_FILES if not pathlib.PurePath(p).name.startswith("_")]
IMAGENET_ROWS = [p for p in ROWS if p.startswith("configs/imagenet/")]
CIFAR_ROWS = [p for p in ROWS if p.startswith("configs/cifar10/")]
FIELDS = {field.name: field for field in dataclasses.fields(TrainConfig)}

# ResNet-50 activation comparison and gradient-quality ablation (paper Table 1).
ACTIVATION_ROWS = {
    act: f"configs/imagenet/resnet50_{act}.cfg"
    for act in ("relu", "softplus", "parametric_softplus", "silu", "gelu", "elu", "smooth_relu")
}
ABLATION_ROWS = {
    "configs/imagenet/resnet50_smoothgrad_attack.cfg": ("attack",),
    "configs/imagenet/resnet50_smoothgrad_update.cfg": ("update",),
    "configs/imagenet/resnet50_smoothgrad_both.cfg": ("attack", "update"),
}
# ResNet scaling rows of the official README: depth, width (ResNeXt), resolution; all SiLU.
SCALING_ROWS = {
    "configs/imagenet/resnet101_silu.cfg": ("resnet101", 224),
    "configs/imagenet/resnet152_silu.cfg": ("resnet152", 224),
    "configs/imagenet/resnext50_32x4d_silu.cfg": ("resnext50_32x4d", 224),
    "configs/imagenet/resnext50_32x8d_silu.cfg": ("resnext50_32x8d", 224),
    "configs/imagenet/resnet50_silu_299.cfg": ("resnet50", 299),
    "configs/imagenet/resnet50_silu_380.cfg": ("resnet50", 380),
    "configs/imagenet/resnext152_32x8d_silu_380.cfg": ("resnext152_32x8d", 380),
}
# Native resolutions from the official efficientnet_builder.py (efficientnet-bL1 is 600).
EFFICIENTNET_ROWS = {
    f"configs/imagenet/efficientnet_{key}.cfg": (f"efficientnet_{key}", size)
    for key, size in (
        ("b0", 224), ("b1", 240), ("b2", 260), ("b3", 300), ("b4", 380),
        ("b5", 456), ("b6", 528), ("b7", 600), ("l1", 600),
    )
}  # fmt: skip
CIFAR_MODELS = ("resnet20", "wide_resnet28_10", "preact_resnet18")
# What demo_smoke.cfg may cut from demo.cfg.
SMOKE_CUTS = (
    "global_batch_size",
    "epochs",
    "steps_per_epoch",
    "eval_examples",
    "eval_num_steps",
    "checkpoint_every_steps",
)

# Official ResNet/main.py: SGD (Nesterov) 0.1 per 256, 5 warm-up epochs, 100 epochs, x0.1 at
# 30/60/90; ImageNet-Adversarial-Training's weight decay 1e-4 and label smoothing 0.1.
RESNET_RECIPE = dict(
    optimizer="sgd", base_learning_rate=0.1, momentum=0.9, lr_schedule="step",
    warmup_epochs=5.0, decay_epochs=(30.0, 60.0, 90.0), decay_rate=0.1, epochs=100,
    weight_decay=1e-4, label_smoothing=0.1, ema_decay=0.0,
)  # fmt: skip
# Official EfficientNet/main.py and utils.py: RMSProp, 0.016 per 256, 5 warm-up epochs, x0.97
# every 2.4 epochs, EMA 0.9999, weight decay 1e-5, label smoothing 0.1.
EFFICIENTNET_RECIPE = dict(
    optimizer="rmsprop", base_learning_rate=0.016, momentum=0.9, lr_schedule="exponential",
    warmup_epochs=5.0, decay_rate=0.97, decay_every_epochs=2.4, ema_decay=0.9999,
    weight_decay=1e-5, label_smoothing=0.1, activation="silu",
)  # fmt: skip
# SAT's attack protocol on ImageNet (official ResNet/main.py and its README's eval command).
IMAGENET_ATTACK = dict(
    epsilon=4.0, step_size=4.0, num_steps=1, random_start=True, prob_start_from_clean=0.2,
    eval_epsilon=4.0, eval_step_size=1.0, eval_num_steps=10,
)  # fmt: skip


class FlagfileError(ValueError):
    pass


def _kind(name):
    """The Python type of a field, from its default (`model_dir` has none and is a string; a None
    default, as `eval_epsilon`'s, takes the type of its `float | None` annotation)."""
    field = FIELDS[name]
    if field.default is None:
        return typing.get_args(field.type)[0]
    return str if field.default is dataclasses.MISSING else type(field.default)


def _convert(name, text):
    kind = _kind(name)
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(text)
        return text.lower() == "true"
    if kind is tuple:
        items = [item.strip() for item in text.split(",") if item.strip()]
        return tuple(float(i) for i in items) if name == "decay_epochs" else tuple(items)
    return kind(text)  # int("4.0") raises, as absl's integer flags do


def parse_args(args, where="command line", stack=()):
    """`[(name, text, where)]` for absl-style arguments, expanding nested flagfiles in place."""
    items = []
    for arg in args:
        if not arg.startswith("--"):
            raise FlagfileError(f"{where}: {arg!r} is not a --flag (absl takes it as an argument)")
        name, has_value, text = arg[2:].partition("=")
        if name == "flagfile":
            items += read_flagfile(text, stack)
        elif "#" in arg:
            raise FlagfileError(f"{where}: {arg!r}: absl has no inline comments")
        elif name in FIELDS and (has_value or _kind(name) is bool):
            items.append((name, text if has_value else "true", where))
        elif not has_value and name[2:] in FIELDS and _kind(name[2:]) is bool and name[:2] == "no":
            items.append((name[2:], "false", where))
        else:
            raise FlagfileError(f"{where}: {arg!r} is not a TrainConfig field with a value")
    return items


def read_flagfile(path, stack=()):
    """The flags of one flagfile, in order, with nested flagfiles expanded."""
    if path in stack:
        raise FlagfileError(f"circular --flagfile: {' -> '.join((*stack, path))}")
    file = ROOT / path
    if not file.is_file():
        raise FlagfileError(f"--flagfile={path} does not exist (paths are relative to the root)")
    items = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        where = f"{path}:{number}"
        if not line.strip() or line.startswith(("#", "//")):
            continue
        if line != line.strip():
            # absl strips flag lines, but an indented '#' would not be a comment: keep it plain.
            raise FlagfileError(f"{where}: leading or trailing whitespace")
        items += parse_args([line], where, (*stack, path))
    return items


def resolve(items):
    """The flags' values as TrainConfig field types; the last occurrence wins, as in absl."""
    values = {}
    for name, text, where in items:
        try:
            values[name] = _convert(name, text)
        except ValueError:
            raise FlagfileError(
                f"{where}: --{name}={text} is not of type {_kind(name).__name__}"
            ) from None
    return values


def header(path):
    """The comment block a file opens with."""
    lines = (ROOT / path).read_text().splitlines()
    block = []
    for line in lines:
        if not line.startswith("#"):
            break
        block.append(line.lstrip("#").strip())
    return block


def command_args(path):
    """The arguments after `tools/train.py` in the file's documented command."""
    for line in header(path):
        if line.startswith("python tools/train.py"):
            return shlex.split(line)[2:]
    raise AssertionError(f"{path}: no 'python tools/train.py ...' line under 'Command:'")


def row_values(path):
    return resolve(parse_args(command_args(path)))


def test_there_are_rows_for_every_table():
    expected = {
        *ACTIVATION_ROWS.values(),
        *ABLATION_ROWS,
        *SCALING_ROWS,
        *EFFICIENTNET_ROWS,
    }
    assert set(IMAGENET_ROWS) == expected
    cifar = {f"configs/cifar10/{m}_{a}.cfg" for m in CIFAR_MODELS for a in ("relu", "silu")}
    assert cifar <= set(CIFAR_ROWS)
    assert {"configs/demo.cfg", "configs/demo_smoke.cfg"} <= set(ROWS)


@pytest.mark.parametrize("path", ALL_FILES)
def test_file_parses_into_fields_of_the_right_type(path):
    assert header(path), f"{path} must open with a comment block saying what it is for"
    values = resolve(read_flagfile(path))
    assert values, f"{path} sets no flag"


@pytest.mark.parametrize("path", ALL_FILES)
def test_parser_agrees_with_absl(path, monkeypatch):
    """absl itself reads the file to the same values (nested flagfiles relative to the root)."""
    flag_values = absl_flags.FlagValues()
    for name in FIELDS:
        default = None if FIELDS[name].default is dataclasses.MISSING else FIELDS[name].default
        define = {
            bool: absl_flags.DEFINE_bool,
            int: absl_flags.DEFINE_integer,
            float: absl_flags.DEFINE_float,
            tuple: absl_flags.DEFINE_list,
        }.get(_kind(name), absl_flags.DEFINE_string)
        define(
            name,
            list(default) if isinstance(default, tuple) else default,
            "",
            flag_values=flag_values,
        )
    monkeypatch.chdir(ROOT)
    flag_values(["prog", f"--flagfile={path}"])
    ours = resolve(read_flagfile(path))
    assert {name for name in FIELDS if flag_values[name].present} == set(ours)
    for name, value in ours.items():
        theirs = flag_values[name].value
        if isinstance(theirs, list):
            theirs = tuple(float(v) if name == "decay_epochs" else v for v in theirs if v)
        assert theirs == value, name


@pytest.mark.parametrize("path", ROWS)
def test_row_documents_its_command_and_numbers(path):
    text = "\n".join(header(path))
    assert "Command:" in text
    assert ("Paper:" if path in IMAGENET_ROWS else "Expected:") in text
    args = command_args(path)
    assert args[0] == f"--flagfile={path}", "the documented command must run this very file"
    assert any(a.startswith("--model_dir=runs/") for a in args), "a model_dir under runs/"


@pytest.mark.parametrize("path", ROWS)
def test_row_command_builds_a_valid_config(path):
    config = TrainConfig(**row_values(path)).validate()
    assert config.activation in activations.names()
    # Step boundaries must fall inside the run to mean anything.
    assert list(config.decay_epochs) == sorted(config.decay_epochs)
    assert all(0 < e < config.epochs for e in config.decay_epochs)


@pytest.mark.parametrize("path", ROWS)
def test_row_model_is_registered(path):
    assert row_values(path)["model"] in models.names()


@pytest.mark.parametrize("path", IMAGENET_ROWS)
def test_imagenet_rows_use_the_sat_attack_and_data(path):
    values = row_values(path)
    assert {k: values[k] for k in IMAGENET_ATTACK} == IMAGENET_ATTACK
    assert values["num_classes"] == 1000
    assert values["dataset"] == "tfrecord:/path/to/imagenet"
    assert values["train_files"] == "/path/to/imagenet/train-*"
    assert values["eval_files"] == "/path/to/imagenet/validation-*"


@pytest.mark.parametrize("path", [*ACTIVATION_ROWS.values(), *ABLATION_ROWS, *SCALING_ROWS])
def test_resnet_rows_use_the_official_resnet_recipe(path):
    values = row_values(path)
    assert {k: values[k] for k in RESNET_RECIPE} == RESNET_RECIPE


@pytest.mark.parametrize("path", EFFICIENTNET_ROWS)
def test_efficientnet_rows_use_the_official_recipe_at_native_resolution(path):
    values = row_values(path)
    assert {k: values[k] for k in EFFICIENTNET_RECIPE} == EFFICIENTNET_RECIPE
    assert (values["model"], values["image_size"]) == EFFICIENTNET_ROWS[path]


def _without(values, *names):
    return {k: v for k, v in values.items() if k not in (*names, "model_dir")}


def test_activation_rows_differ_only_in_the_activation():
    rows = {act: row_values(path) for act, path in ACTIVATION_ROWS.items()}
    assert {act: values["activation"] for act, values in rows.items()} == {a: a for a in rows}
    assert rows["relu"]["model"] == "resnet50" and rows["relu"]["image_size"] == 224
    for values in rows.values():
        assert _without(values, "activation") == _without(rows["relu"], "activation")


def test_ablation_rows_are_relu_with_smooth_gradients_in_the_named_phases():
    relu = row_values(ACTIVATION_ROWS["relu"])
    for path, phases in ABLATION_ROWS.items():
        values = row_values(path)
        assert values["activation"] == "smooth_grad_relu"
        assert values["smooth_gradients"] == phases
        assert _without(values, "activation", "smooth_gradients") == _without(relu, "activation")


def test_scaling_rows_vary_model_and_resolution_only():
    silu = row_values(ACTIVATION_ROWS["silu"])
    for path, (model, size) in SCALING_ROWS.items():
        values = row_values(path)
        assert (values["model"], values["image_size"], values["activation"]) == (
            model,
            size,
            "silu",
        )
        assert _without(values, "model", "image_size") == _without(silu, "model", "image_size")


@pytest.mark.parametrize("model", CIFAR_MODELS)
def test_cifar_twins_differ_only_in_the_activation(model):
    relu = row_values(f"configs/cifar10/{model}_relu.cfg")
    silu = row_values(f"configs/cifar10/{model}_silu.cfg")
    assert (relu["activation"], silu["activation"], relu["model"]) == ("relu", "silu", model)
    assert _without(relu, "activation") == _without(silu, "activation")
    # The CIFAR-10 L-inf convention: PGD-10 training at 8/255 with step 2/255, 32 px, 10 classes.
    recipe = dict(epsilon=8.0, step_size=2.0, num_steps=10, random_start=True, image_size=32)
    assert {k: relu[k] for k in recipe} == recipe
    assert relu["num_classes"] == 10


@pytest.mark.parametrize("path", [p for p in CIFAR_ROWS if p.endswith("_cpu.cfg")])
def test_cifar_cpu_rows_shrink_the_budget_not_the_threat_model(path):
    full = row_values(path.replace("_cpu.cfg", ".cfg"))
    cpu = row_values(path)
    steps = cpu["epochs"] * cpu["steps_per_epoch"]
    assert 0 < steps < full["epochs"] * 50_000 // full["global_batch_size"]
    assert 0 < cpu["eval_examples"] <= 1000
    assert (cpu["epsilon"], cpu["eval_epsilon"], cpu["model"]) == (8.0, 8.0, "resnet20")


def test_demo_runs_on_builtin_data_and_smoke_takes_two_steps():
    demo = row_values("configs/demo.cfg")
    smoke = row_values("configs/demo_smoke.cfg")
    assert (demo["dataset"], demo["model"], demo["image_size"]) == ("demo", "small_cnn", 16)
    assert demo["num_steps"] >= 1 and demo["eval_num_steps"] >= 1  # adversarial, not clean
    assert smoke["epochs"] * smoke["steps_per_epoch"] == 2
    assert _without(smoke, *SMOKE_CUTS) == _without(demo, *SMOKE_CUTS)


@pytest.mark.parametrize(
    "text, message",
    [
        ("--bogus=1", "not a TrainConfig field"),
        ("--nobogus", "not a TrainConfig field"),
        ("--noepochs", "not a TrainConfig field"),
        ("--epochs=1.5", "is not of type int"),
        ("--random_start=maybe", "is not of type bool"),
        ("--epsilon=4  # inline", "no inline comments"),
        ("  # indented comment", "whitespace"),
        ("resnet50", "not a --flag"),
        ("--model", "not a TrainConfig field with a value"),
        ("--flagfile=configs/nope.cfg", "does not exist"),
        ("--flagfile={self}", "circular"),
    ],
)
def test_parser_rejects_what_absl_would_misread(tmp_path, monkeypatch, text, message):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/bad.cfg").write_text(text.format(self="configs/bad.cfg") + "\n")
    with pytest.raises(FlagfileError, match=message):
        resolve(read_flagfile("configs/bad.cfg"))


def test_parser_lets_later_flags_win_and_reads_negated_bools(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/base.cfg").write_text("# base\n--epochs=3\n--random_start\n")
    (tmp_path / "configs/row.cfg").write_text(
        "# row\n--flagfile=configs/base.cfg\n--epochs=7\n--norandom_start\n--smooth_gradients=\n"
    )
    assert resolve(read_flagfile("configs/row.cfg")) == {
        "epochs": 7,
        "random_start": False,
        "smooth_gradients": (),
    }


def test_a_runs_saved_settings_resolve_as_training_resolved_them(tmp_path):
    """tools/eval.py reads config.json back: the eval files, split and epsilon of the run."""
    path = tmp_path / "config.json"
    saved = dict(model_dir="r", dataset="tfrecord:/d/train-*", eval_files="/d/val-*", epsilon=8.0)
    path.write_text(json.dumps({**saved, "decay_epochs": [30, 60], "unknown_key": 1}))
    run = TrainConfig.from_json(path)
    assert run.data_spec(training=False) == "tfrecord:/d/val-*"
    assert run.data_spec(training=True) == "tfrecord:/d/train-*"
    assert run.decay_epochs == (30, 60) and run.resolved_eval_split == "validation"
    assert run.eval_epsilon is None and run.resolved_eval_epsilon == 8.0
    older = TrainConfig.from_dict({**saved, "eval_epsilon": -1.0})  # the sentinel before None
    assert older.eval_epsilon is None and older.resolved_eval_epsilon == 8.0
    assert TrainConfig.from_dict({**saved, "eval_epsilon": 4.0}).resolved_eval_epsilon == 4.0
    with pytest.raises(ValueError, match="--eval_epsilon=-2"):
        dataclasses.replace(run, eval_epsilon=-2.0).validate()


# Every float flag, with the values that make no sense for it: NaN and the infinities (a
# negative eval_epsilon means "same as --epsilon", as its help says, so -inf is not listed there).
FLOAT_FIELDS = [name for name, field in FIELDS.items() if field.type in (float, float | None)]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_float_flags_are_refused_naming_the_flag(name, value):
    if name == "eval_epsilon" and value < 0:
        pytest.skip("negative eval_epsilon means --epsilon")
    config = dataclasses.replace(TrainConfig(model_dir="r"), **{name: value})
    with pytest.raises(ValueError) as info:
        config.validate()
    message = str(info.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"--{name}={value} is invalid")
    assert re.search(r"finite|must be in [\[(]", message), message  # the rule names the range


def test_float_fields_are_the_ones_the_test_above_covers():
    assert set(FLOAT_FIELDS) >= {"epsilon", "step_size", "base_learning_rate", "eval_epsilon"}
    assert len(FLOAT_FIELDS) == 13, FLOAT_FIELDS


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(num_classes=100_001), "--num_classes=100001 is invalid: must be in [2, 100000]"),
        (dict(image_size=4097), "--image_size=4097 is invalid: must be in [8, 4096]"),
        (dict(global_batch_size=65537), "--global_batch_size=65537 is invalid: must be in [1, "),
        (dict(epsilon=256.0), "--epsilon=256.0 is invalid: must be in [0, 255]"),
        (dict(eval_epsilon=300.0), "--eval_epsilon=300.0 is invalid: must be in [0, 255]"),
        (dict(decay_epochs=(30.0, float("nan"))), "--decay_epochs=30.0,nan is invalid"),
        (dict(decay_epochs=(-1.0,)), "--decay_epochs=-1.0 is invalid"),
        (dict(seed=2**32), "--seed=4294967296 is invalid: must be in [0, 4294967295]"),
    ],
)
def test_flags_beyond_what_can_fit_are_refused_naming_the_limit(changes, match):
    with pytest.raises(ValueError) as info:
        dataclasses.replace(TrainConfig(model_dir="r"), **changes).validate()
    assert str(info.value).startswith(match), str(info.value)


def test_the_limits_leave_room_for_every_recipe():
    limits = dict(num_classes=100_000, image_size=4096, global_batch_size=65_536, epsilon=255.0)
    for path in ALL_FILES:
        values = row_values(path) if path in ROWS else {}
        for name, limit in limits.items():
            assert values.get(name, 0) <= limit / 2, (path, name)
    TrainConfig(model_dir="r", **limits, eval_epsilon=255.0, seed=2**32 - 1).validate()


def test_a_list_flag_that_is_not_numbers_is_one_line():
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict({"model_dir": "r", "decay_epochs": ["30", "sixty"]})
    message = str(info.value)
    assert message == "--decay_epochs=30,sixty is invalid: give epochs as numbers, e.g. 30,60,80"
