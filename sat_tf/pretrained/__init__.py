"""Import of the SAT paper's released checkpoints into the zoo's own Keras models.

    model = sat_tf.pretrained.load_official("Res50-silu/Res50-silu")  # a keras.Model, [0, 255] RGB

The official models are TF1 checkpoints (Tensorpack ResNets in NCHW, tensorflow/tpu
EfficientNets). They are read with `tf.train.load_checkpoint` only (no TF1 graph, no Tensorpack;
TensorFlow is imported only for the reading, and the imported model runs under any backend),
the architecture is inferred from the variable names and shapes, and every variable is copied onto
a model from `sat_tf.models.build`, so an imported model is the same Keras model as one trained
here. Nothing is silent: a checkpoint variable that is neither used nor a known training-only
variable, or a model weight without a variable, fails the import with one error naming them all.
`released.py` lists the released checkpoints and downloads them. Conventions converted: see the
family modules (`resnet.py`, `efficientnet.py`) and docs/pretrained.md.

What the import allocates is bounded by the files and the architecture, never by what the index
claims: the index is checked against its .data files before TensorFlow opens it (`bundle.py`: no
tensor larger than the bytes there), the number of classes is bounded before the model is built,
every declared shape and dtype is compared with the model's before any tensor is read, and weights
holding NaN or Inf are refused (`check_finite`, also before a model_dir with the official numbers
is written).
"""

import dataclasses
import glob
import re
from pathlib import Path

import numpy as np

from sat_tf import backend, models
from sat_tf.pretrained import bundle, efficientnet, released, resnet
from sat_tf.pretrained.released import RELEASED, Released, download

__all__ = ["RELEASED", "Imported", "OfficialCheckpointError", "Released", "download"]
__all__ += ["MAX_CLASSES", "check_finite", "import_official", "load_official"]
_FAMILIES = (resnet, efficientnet)
_LIST = 8  # names shown per category in an error
_READING = "reading the official TF1 checkpoints"
MAX_CLASSES = 100_000  # the official heads have 1000; a larger claim is a damaged index


class OfficialCheckpointError(ValueError):
    """A checkpoint that cannot be imported; the message is one line naming the cause."""


@dataclasses.dataclass(frozen=True)
class Imported:
    """An imported checkpoint: the model and what was inferred about it."""

    model: object
    prefix: str
    family: str
    arch: str
    activation: str
    image_size: int
    num_classes: int
    moving_average: bool
    released: Released | None
    skipped: tuple  # training-only variables accounted for but not used (optimizer slots, ...)


def _fail(prefix, message):
    raise OfficialCheckpointError(f"checkpoint {prefix}: {message}")


def _listed(label, names):
    more = f" (+{len(names) - _LIST} more)" if len(names) > _LIST else ""
    return f"{len(names)} {label}: {', '.join(names[:_LIST])}{more}"


def check_finite(prefix, named):
    """Raises one error naming the (name, array) pairs that hold NaN or Inf."""
    bad = sorted(name for name, value in named if not np.isfinite(value).all())
    if bad:
        _fail(
            prefix,
            _listed("variables hold NaN or Inf", bad)
            + "; the checkpoint is damaged: download it again",
        )


def _resolve_prefix(prefix):
    prefix = str(prefix)
    if Path(prefix).is_dir():  # the folder's name is not a pattern: exp[1] must not match exp1
        found = sorted(glob.glob(str(Path(glob.escape(prefix)) / "*.index")))
        if len(found) != 1:
            _fail(prefix, f"a folder with {len(found)} .index files; give the checkpoint prefix")
        prefix = found[0][: -len(".index")]
    if not Path(prefix + ".index").is_file():
        _fail(prefix, f"{prefix}.index not found; give the prefix of the .index/.data files")
    if not glob.glob(glob.escape(prefix) + ".data-*"):
        _fail(prefix, f"no {prefix}.data-* file beside the .index; the download is incomplete")
    return prefix


def _family(prefix, shapes, arch):
    found = [f for f in _FAMILIES if f.matches(shapes)]
    if not found:
        names = ", ".join(sorted(shapes)[:4])
        _fail(
            prefix,
            "not an official SAT checkpoint (neither Tensorpack ResNet conv0/W + linear/W nor "
            f"tensorflow/tpu efficientnet-*/ variables); its first variables: {names}",
        )
    family = found[0]
    if arch and not arch.startswith(family.FAMILY.replace("resnet", "res")):
        _fail(prefix, f"arch={arch!r} does not fit a {family.FAMILY} checkpoint; drop arch=")
    return family


def _check(prefix, plan, entries, family, ignore):
    """Raises one error listing missing, mismatched and unused names; returns skipped names."""
    shapes = {name: entry.shape for name, entry in entries.items()}
    not_float = sorted(
        f"{name} ({bundle.dtype_name(entries[name].dtype)})"
        for _, name, _ in plan
        if name in entries and entries[name].dtype not in bundle.FLOATS
    )
    if not_float:  # before reading: np.asarray(b"abc", "float32") fails without a name
        _fail(
            prefix,
            _listed("checkpoint variables not float", not_float)
            + "; model weights are float: the checkpoint is damaged or not an official one",
        )
    missing, mismatched, used = [], [], set()
    for variable, name, transform in plan:
        if name is None or name not in shapes:
            missing.append(f"{variable.path} <- {name or '(no official name)'}")
            continue
        used.add(name)
        expected = tuple(variable.shape)
        got = tuple(shapes[name])
        squeezed = tuple(d for d in got if d != 1) == tuple(d for d in expected if d != 1)
        if got != expected and not (transform in ("scalar", "squeeze") and squeezed):
            mismatched.append(f"{name} {list(got)} vs {variable.path} {list(expected)}")
    unused, skipped = [], []
    for name in sorted(set(shapes) - used):
        accounted = family.not_model(name, used) or (ignore and re.search(ignore, name))
        (skipped if accounted else unused).append(name)
    problems = []
    for label, names in (
        ("shape mismatch", mismatched),
        ("model weights without a checkpoint variable", missing),
        ("checkpoint variables not used", unused),
    ):
        if names:
            problems.append(_listed(label, names))
    if problems:
        _fail(prefix, "; ".join(problems) + " (pass arch=/activation= or ignore= if intended)")
    return tuple(skipped)


def _read(prefix, reader, plan):
    """[(variable, name, float32 value)]; the shapes and dtypes were checked by `_check`."""
    values = []
    op_error = backend.tensorflow(_READING).errors.OpError
    for variable, name, transform in plan:
        try:
            value = reader.get_tensor(name)
        except (op_error, ValueError, IndexError, RuntimeError) as error:
            reason = str(error).splitlines()[0][:160]
            _fail(
                prefix, f"reading {name} failed ({reason}); the .data file is truncated or corrupt"
            )
        value = np.asarray(value, dtype="float32")
        if transform == "bgr_to_rgb":
            value = value[:, :, ::-1, :]
        elif transform in ("scalar", "squeeze"):
            value = value.reshape(tuple(variable.shape))
        values.append((variable, name, value))
    check_finite(prefix, ((name, value) for _, name, value in values))
    return values


def import_official(
    checkpoint_prefix,
    *,
    arch=None,
    activation=None,
    image_size=None,
    moving_average=None,
    ignore=None,
):
    """Imports an official SAT checkpoint into a zoo model.

    Args:
        checkpoint_prefix: The TF1 checkpoint prefix (`<dir>/Res50-silu` for the files
            `Res50-silu.index` and `Res50-silu.data-00000-of-00001`), or a folder holding one.
        arch: A `sat_tf.models.build` name; default: inferred (depth from the block counts,
            ResNeXt groups and width from the grouped kernels, EfficientNet variant from the
            name prefix).
        activation: A `sat_tf.activations` name or an official `--activation-name`; default:
            SmoothReLU when the checkpoint has its beta variables, else the released checkpoint's
            (from the file name, e.g. `Res50-gelu`). Other activations have no variables, so a
            renamed ResNet checkpoint needs this.
        image_size: Input resolution; default: the released checkpoint's, else the model's own.
        moving_average: EfficientNet: load the ExponentialMovingAverage shadows instead of the
            raw weights; default: as the official evaluation of that checkpoint (README's
            `--moving_average_decay`), else the shadows when present.
        ignore: A regular expression of extra checkpoint variables to leave unused.

    Returns:
        An `Imported` with the model (float32 [0, 255] RGB NHWC input, float32 logits).

    Raises:
        OfficialCheckpointError: one line naming the problem (no files, an index that does not
            describe its .data files, truncated data, another family, every missing /
            mismatched / unused / non-float variable, or weights holding NaN or Inf).
        ImportError: TensorFlow, which reads the checkpoint, is not installed (one line saying
            what to install).
    """
    prefix = _resolve_prefix(checkpoint_prefix)
    tf = backend.tensorflow(_READING)  # the index's protos, then the reader
    try:
        index = bundle.read(prefix)
    except (bundle.BundleError, OSError) as error:
        _fail(prefix, str(error))
    shapes = index.shapes()
    family = _family(prefix, shapes, arch)
    entry = released.from_prefix(prefix)
    try:
        inferred_arch, inferred_act, num_classes = family.infer(shapes)
    except ValueError as error:
        _fail(prefix, str(error))
    if num_classes > MAX_CLASSES:  # checked before the model (and its head) is built
        _fail(
            prefix,
            f"{family.head(shapes)} declares {num_classes} classes, more than {MAX_CLASSES} "
            f"(the official models have 1000); {bundle.DAMAGED}",
        )
    arch = arch or inferred_arch
    activation = activation or inferred_act or (entry.activation if entry else None)
    if activation is None:
        _fail(
            prefix,
            "the activation is not stored in the checkpoint (only SmoothReLU has variables): "
            f"pass activation= (one of {', '.join(sorted(set(resnet.ACTIVATIONS)))})",
        )
    activation = resnet.ACTIVATIONS.get(activation, activation)
    if moving_average is None:
        moving_average = entry.moving_average if entry else family.has_moving_average(shapes)
    size = image_size or (entry.image_size if entry and entry.image_size else None)
    model = models.build(
        arch,
        num_classes=num_classes,
        activation=activation,
        input_shape=(size, size, 3) if size else None,
        **family.BUILD_OPTIONS,
    )
    plan = list(family.assignments(model, moving_average=moving_average))
    skipped = _check(prefix, plan, index.entries, family, ignore)
    covered = {id(v) for v, _, _ in plan}
    left = [w.path for w in model.weights if id(w) not in covered]
    if left:
        _fail(prefix, f"{len(left)} model weights have no mapping: {', '.join(left[:_LIST])}")
    try:
        with bundle.opened(prefix, index) as reader:
            values = _read(prefix, reader, plan)
    except (tf.errors.OpError, OSError) as error:
        _fail(prefix, f"unreadable ({str(error).splitlines()[0][:160]})")
    for variable, _, value in values:
        variable.assign(value)
    return Imported(
        model=model,
        prefix=prefix,
        family=family.FAMILY,
        arch=arch,
        activation=activation,
        image_size=int(model.input_shape[1]),
        num_classes=int(num_classes),
        moving_average=bool(moving_average) and family.FAMILY == "efficientnet",
        released=entry,
        skipped=skipped,
    )


def load_official(checkpoint_prefix, *, arch=None, **options):
    """The imported `keras.Model` of an official checkpoint; see `import_official`."""
    return import_official(checkpoint_prefix, arch=arch, **options).model
