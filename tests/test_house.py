"""House rules that code review alone would miss: Keras internals stay in one module, the
modules of sat_tf import each other without a cycle, sat_tf imports nothing of the repository
outside itself (tools/, benchmarks/, study/ import sat_tf, never the other way), and the
requirements files pin one version of each package, inside pyproject.toml's ranges."""

import ast
import re
from pathlib import Path

import keras
import pytest
import tomllib
from packaging.requirements import Requirement

from sat_tf import _keras_compat

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sat_tf"
COMPAT = PACKAGE / "_keras_compat.py"
# The repository's scripts and research beside the package: not installed, so not for sat_tf.
OUTSIDE = ("tools", "benchmarks", "study")


def _sources(*folders):
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if p != COMPAT)


def _private_keras_names():
    """`_name`s that Keras's base classes define (methods and attributes of a built model)."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(), "mse", metrics=["mae"])
    objects = [model, model.optimizer, keras.metrics.Mean(), keras.callbacks.Callback()]
    objects += [keras.Model, keras.layers.Layer, keras.optimizers.Optimizer, keras.losses.Loss]
    names = {name for obj in objects for name in dir(obj)}
    names |= {name for obj in objects[:3] for name in vars(obj)}
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


pytestmark = pytest.mark.backends


def test_keras_is_a_version_the_compat_module_was_checked_on():
    assert keras.__version__ in _keras_compat.CHECKED_VERSIONS, (
        f"Keras {keras.__version__}: re-check sat_tf/_keras_compat.py against its source, then "
        "add the version to CHECKED_VERSIONS and to pyproject.toml's range."
    )


def test_no_keras_internals_outside_the_compat_module():
    private = _private_keras_names()
    assert {"_compile_metrics", "_flatten_layers", "_symbolic_build"} <= private
    attribute = re.compile(r"\.(_[A-Za-z]\w*)\b")
    found = []
    for path in _sources("sat_tf", *OUTSIDE):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            if "keras.src" in line:
                found.append(f"{where}: keras.src")
            found += [f"{where}: .{n}" for n in attribute.findall(line) if n in private]
    assert not found, "Keras internals outside sat_tf/_keras_compat.py:\n" + "\n".join(found)


def _module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, modules):
    """The sat_tf modules `path` imports, anywhere in the file (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = {f"{node.module}.{alias.name}" for alias in node.names}
            found |= {n if n in modules else node.module for n in names}
    return {name for name in found if name in modules}


def test_sat_tf_has_no_import_cycle():
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # A module's own package __init__ runs first anyway; it is not an edge of the graph.
    graph = {
        name: {m for m in _imports(path, paths) if not name.startswith(m + ".")}
        for name, path in paths.items()
    }
    assert {"sat_tf.reporting", "sat_tf.rows"} <= graph["sat_tf.evaluation"]  # the walk works
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                cycle = stack[stack.index(other) :] + [other]
                raise AssertionError("Import cycle: " + " -> ".join(cycle))
            if other not in state:
                visit(other)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def _absolute_imports(path):
    """(line, module) for every absolute import in `path`, anywhere in the file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def test_sat_tf_imports_nothing_outside_the_package():
    tool = {name for _, name in _absolute_imports(ROOT / "tools" / "study.py")}
    assert {"study", "study.protocol"} <= tool  # the walk sees the imports it must forbid below
    found = [
        f"{path.relative_to(ROOT)}:{line}: import {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, name in _absolute_imports(path)
        if name.split(".")[0] in OUTSIDE
    ]
    assert not found, (
        f"sat_tf imports {'/, '.join(OUTSIDE)}/ (not installed; they import sat_tf, not the "
        "other way): move what it needs into sat_tf\n" + "\n".join(found)
    )


REQUIREMENTS = (
    "requirements.txt",
    "requirements-dev.txt",
    "requirements-jax.txt",
    "requirements-torch.txt",
)


def _pins(name):
    """{package: Requirement} of a requirements file, with its `-r` includes."""
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("--"):  # an index option (requirements-torch.txt: the CPU build)
            continue
        if line.startswith("-r "):
            pins |= _pins(line[3:].strip())
        elif line:
            requirement = Requirement(line)
            pins[requirement.name.lower().replace("_", "-")] = requirement
    return pins


def test_requirements_pin_one_version_inside_the_declared_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [
        Requirement(r)
        for extra in ("cpu", "jax", "torch", "dev")
        for r in project["optional-dependencies"][extra]
    ]
    ranges = {r.name.lower().replace("_", "-"): r.specifier for r in declared}
    core = {Requirement(r).name for r in project["dependencies"]}
    needs_tensorflow = {"tensorboard", "tensorflow-datasets"}  # of use only with TensorFlow
    assert not {n for n in core if n.startswith("tensorflow") or n in needs_tensorflow}, (
        "TensorFlow belongs in the cpu/gpu extras: the core runs without it under JAX"
    )
    versions, found = {}, []
    for name in REQUIREMENTS:
        for package, requirement in _pins(name).items():
            (spec,) = requirement.specifier  # exactly one `==` pin
            assert spec.operator == "==", f"{name}: pin {requirement} exactly"
            if versions.setdefault(package, spec.version) != spec.version:
                found.append(f"{name}: {package}=={spec.version}, elsewhere {versions[package]}")
            if package in ranges and spec.version not in ranges[package]:
                found.append(
                    f"{name}: {package}=={spec.version} outside pyproject's {ranges[package]}"
                )
    assert not found, "Requirements disagree:\n" + "\n".join(found)
    for name in ("requirements-jax.txt", "requirements-torch.txt"):
        assert "tensorflow-cpu" not in _pins(name)  # the TF-free suites stay TF-free
