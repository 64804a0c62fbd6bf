"""Shared test setup: the backend (TensorFlow unless KERAS_BACKEND says otherwise), quiet logs,
fixed seeds, the shared data location.

`make test` runs the whole suite under TensorFlow, then the modules marked `backends` again under
JAX in .venv-jax and under PyTorch in .venv-torch, neither of which has TensorFlow: there a test
that needs TensorFlow is marked `needs_tensorflow` (skipped with the reason) and `HAS_TENSORFLOW`
is False.
"""

import os
import pathlib

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util  # noqa: E402

BACKEND = os.environ["KERAS_BACKEND"]
HAS_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None
if BACKEND == "torch" and "PYTEST_XDIST_WORKER" in os.environ:
    # One thread per xdist worker: two workers with two OpenMP threads each on two cores spin
    # against each other, and a small model's backward pass took 30x longer.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
if BACKEND == "jax":
    # Four virtual CPU devices, for keras.distribution.DataParallel tests; must precede JAX's
    # initialisation. Computations without a distribution stay on the first.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import keras  # noqa: E402
import pytest  # noqa: E402

needs_tensorflow = pytest.mark.skipif(not HAS_TENSORFLOW, reason="needs TensorFlow")
only_tensorflow = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow backend only")

if HAS_TENSORFLOW:
    import tensorflow as tf

    # Two logical CPU devices, so MirroredStrategy tests can run on this 2-core machine. This
    # must happen before TensorFlow initialises its devices, hence at import time of conftest.
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_ignore_collect(collection_path, config):
    """Without TensorFlow, collect only the modules that have `backends` tests: the others
    import TensorFlow at the top (a collection error there), and `-m backends` would deselect
    all their tests anyway."""
    if HAS_TENSORFLOW or not collection_path.name.startswith("test_"):
        return None
    if collection_path.suffix == ".py" and "mark.backends" not in collection_path.read_text():
        return True
    return None


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Every test starts from the float32 policy and a fixed seed."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when the folder is absent (e.g. a user's machine)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found: real-data tests need the shared data folder")
    return SHARED_DATA
