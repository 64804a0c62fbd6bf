"""The core of sat_tf needs no TensorFlow under JAX, and what does need it says what to install.

`make test` runs this module twice: in .venv under TensorFlow, and in .venv-jax under JAX, where
TensorFlow is not installed (`HAS_TENSORFLOW` False). There the in-process test is the proof that
the core (model zoo, `AdversarialModel.fit`, an attack, the evaluation, `.keras` saving) runs
without it. In both, a JAX subprocess checks that importing the core leaves TensorFlow unimported
even where it is installed, and that the TensorFlow-only modules refuse in one line naming the
extra to install once `import tensorflow` fails.
"""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import HAS_TENSORFLOW

import sat_tf
from sat_tf import attacks, backend, saving

pytestmark = pytest.mark.backends

# What the issue calls the core: it imports, and runs on arrays, without TensorFlow under JAX.
CORE = (
    "sat_tf",
    "sat_tf.activations",
    "sat_tf.models",
    "sat_tf.attacks",
    "sat_tf.apgd",
    "sat_tf.fab",
    "sat_tf.square",
    "sat_tf.autoattack",
    "sat_tf.adversarial",
    "sat_tf.convert",
    "sat_tf.evaluation",
    "sat_tf.evalrun",
    "sat_tf.card",
    "sat_tf.saving",
)
# Where TensorFlow is the point: importing these without it is an ImportError naming the extra.
NEEDS_TENSORFLOW = ("sat_tf.data", "sat_tf.data.tfrecord", "sat_tf.export")
INSTALL = "pip install 'sat_tf[cpu]'"

PROBE = """
import importlib, json, sys
found = {"imported_tensorflow": None, "errors": {}}
for name in CORE:
    importlib.import_module(name)
    if "tensorflow" in sys.modules and found["imported_tensorflow"] is None:
        found["imported_tensorflow"] = name
sys.modules["tensorflow"] = None  # as in a venv without it: `import tensorflow` fails
import sat_tf
for name in NEEDS_TENSORFLOW:
    try:
        importlib.import_module(name)
    except ImportError as error:
        found["errors"][name] = str(error)
try:
    sat_tf.data.load("demo", split="test", batch_size=8)
except ImportError as error:
    found["errors"]["sat_tf.data.load"] = str(error)
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def probe():
    """What a fresh `KERAS_BACKEND=jax` interpreter imported, and the errors it got."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed (pip install 'sat_tf[jax]')")
    code = f"CORE = {CORE!r}\nNEEDS_TENSORFLOW = {NEEDS_TENSORFLOW!r}\n{PROBE}"
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)  # one device is enough to import
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_core_under_jax_imports_no_tensorflow(probe):
    assert probe["imported_tensorflow"] is None, (
        f"`import {probe['imported_tensorflow']}` under KERAS_BACKEND=jax imported TensorFlow: "
        "import it where it is used, through sat_tf.backend.tensorflow(...)"
    )


@pytest.mark.parametrize("name", [*NEEDS_TENSORFLOW, "sat_tf.data.load"])
def test_tensorflow_only_features_say_what_to_install(probe, name):
    message = probe["errors"].get(name)
    assert message is not None, f"{name} did not raise ImportError without TensorFlow"
    assert INSTALL in message and "\n" not in message, message


def test_backend_tensorflow_returns_the_module_or_says_what_to_install():
    if HAS_TENSORFLOW:
        assert backend.tensorflow("a feature").__name__ == "tensorflow"
    else:
        with pytest.raises(ImportError, match=r"^a feature needs TensorFlow.*sat_tf\[cpu\]"):
            backend.tensorflow("a feature")


def test_the_core_trains_attacks_and_saves_on_arrays(tmp_path):
    """One PGD-AT step, PGD and a `.keras` round trip, on NumPy arrays; in .venv-jax all of it
    without TensorFlow installed (the evaluation's own tests run there too)."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 3, 8).astype("int32")
    net = sat_tf.models.build("small_cnn", num_classes=3, input_shape=(8, 8, 3), width=4)
    model = sat_tf.AdversarialModel(net, epsilon=8.0, step_size=4.0, num_steps=1, seed=0)
    model.compile(
        keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    before = net.get_weights()
    history = model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(not np.array_equal(a, b) for a, b in zip(before, net.get_weights(), strict=True))

    x_adv = backend.to_numpy(
        attacks.pgd(net, images, labels, epsilon=8.0, step_size=2.0, num_steps=2, seed=0)
    )
    assert np.abs(x_adv - images).max() <= 8.0 + 1e-3 and x_adv.min() >= 0 and x_adv.max() <= 255

    logits = backend.to_numpy(net(images, training=False))
    net.save(tmp_path / "net.keras")
    loaded = saving.load_model(tmp_path / "net.keras")
    np.testing.assert_allclose(
        backend.to_numpy(loaded(images, training=False)), logits, rtol=1e-5, atol=1e-5
    )
    if not HAS_TENSORFLOW:
        assert "tensorflow" not in sys.modules
