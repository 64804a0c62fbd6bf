"""Training across backends and devices: PGD-AT under JAX and PyTorch against TensorFlow's
recorded steps, and `keras.distribution.DataParallel` on 4 (virtual CPU) devices against 1 device
(JAX).

The attack's random starts are keyed by the model's `seed` (`sat_tf.draws`), so every run here
draws the same starts, whatever the backend or the number of devices.
"""

import importlib.util
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import BACKEND

pytestmark = pytest.mark.backends

DATA = Path(__file__).resolve().parent / "data"


def _recipe():
    spec = importlib.util.spec_from_file_location(
        "make_training_reference", DATA / "make_training_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pgd_training_matches_tensorflows_recorded_steps():
    """Tolerances: the adversarial batch to 1e-3 pixel (float32 rounding of the same start
    and step; a sign flip would move a pixel by the 4-pixel step), losses to 1e-5 relative,
    weights and BatchNorm statistics to 1e-5 relative + 1e-6 absolute."""
    recipe = _recipe()
    reference = dict(np.load(DATA / "training_reference.npz"))
    got = recipe.run(reference)
    np.testing.assert_allclose(got["first_adversarial"], reference["first_adversarial"], atol=1e-3)
    np.testing.assert_allclose(got["losses"], reference["losses"], rtol=1e-5)
    assert len(got["losses"]) == recipe.STEPS
    for i in range(8):
        np.testing.assert_allclose(
            got[f"final_{i}"], reference[f"final_{i}"], rtol=1e-5, atol=1e-6, err_msg=f"weight {i}"
        )


def _fit(distribution, arrays, recipe):
    """Two steps of seeded PGD-AT on global batches of 8, under `distribution` (or none)."""
    from sat_tf.adversarial import AdversarialModel

    def train():
        net = recipe.classifier()
        net.set_weights([arrays[f"init_{i}"] for i in range(len(net.weights))])
        model = AdversarialModel(net, epsilon=8.0, step_size=4.0, num_steps=2, seed=5)
        model.compile(
            keras.optimizers.SGD(0.1, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        history = model.fit(
            arrays["images"][:16], arrays["labels"][:16], batch_size=8, shuffle=False, verbose=0
        )
        if distribution is not None:  # replicated on every device
            assert len(net.weights[0].value.sharding.device_set) == 4
        return net.get_weights(), history.history

    if distribution is None:
        return train()
    with distribution.scope():
        return train()


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs under JAX")
def test_data_parallel_on_4_devices_matches_1_device():
    """Tolerance: 1e-5 relative + 1e-6 absolute (only the order of the batch reductions
    differs); BatchNorm sees the global batch on 4 devices as on 1."""
    import jax

    assert len(jax.devices("cpu")) == 4  # conftest's XLA flag
    recipe = _recipe()
    arrays = recipe.inputs()
    want_weights, want_logs = _fit(None, arrays, recipe)
    parallel = keras.distribution.DataParallel(devices=jax.devices("cpu"))
    got_weights, got_logs = _fit(parallel, arrays, recipe)
    for i, (got, want) in enumerate(zip(got_weights, want_weights, strict=True)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"weight {i}")
    assert set(got_logs) == {"loss", "adv_accuracy"}
    for name, values in want_logs.items():
        np.testing.assert_allclose(got_logs[name], values, rtol=1e-5)


def _small_model(recipe, arrays):
    from sat_tf.adversarial import AdversarialModel

    net = recipe.classifier()
    net.set_weights([arrays[f"init_{i}"] for i in range(len(net.weights))])
    model = AdversarialModel(net, epsilon=8.0, step_size=4.0, seed=1)
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_checkpoint_round_trip_restores_weights_slots_and_step(tmp_path):
    """TensorFlow checkpoints under TensorFlow, Keras weights files under JAX: a restored model
    has the saved step, weights and optimizer slots (momentum)."""
    from sat_tf import callbacks

    recipe = _recipe()
    arrays = recipe.inputs()
    model = _small_model(recipe, arrays)
    model.fit(arrays["images"][:16], arrays["labels"][:16], batch_size=8, verbose=0)
    saver = callbacks.Checkpointer(tmp_path / "ckpt", max_to_keep=1)
    saver.set_model(model)
    saver.save()
    restored = _small_model(recipe, arrays)
    restored.build((None, 8, 8, 3))
    assert callbacks.Checkpointer(tmp_path / "ckpt").restore(restored) == 2
    for got, want in zip(restored.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=want.path)
    for got, want in zip(restored.weights, model.weights, strict=True):
        np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=want.path)
    model.fit(arrays["images"][:8], arrays["labels"][:8], batch_size=8, verbose=0)
    saver.save()  # step 3; max_to_keep=1 leaves only it
    if BACKEND == "jax":
        assert sorted(p.name for p in (tmp_path / "ckpt").glob("ckpt-*")) == ["ckpt-3.weights.h5"]


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs under JAX")
def test_strategies_under_jax_are_keras_distributions():
    from sat_tf import distribute

    assert distribute.get_strategy("default").num_replicas_in_sync == 1
    mirrored = distribute.get_strategy("mirrored")
    assert isinstance(mirrored.distribution, keras.distribution.DataParallel)
    assert mirrored.num_replicas_in_sync == 4  # conftest's 4 CPU devices
    with pytest.raises(ValueError, match="--strategy=mirrored"):
        distribute.get_strategy("tpu")


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs under JAX")
def test_evaluation_under_data_parallel_gives_the_same_per_example_records():
    """An evaluation (clean, PGD-3 and APGD-CE, keyed draws) of a model laid out by
    `DataParallel` on 4 devices gives, example by example, the record of a one-device model."""
    import jax

    from sat_tf.evaluation import evaluate

    recipe = _recipe()
    arrays = recipe.inputs()
    weights = [arrays[f"init_{i}"] for i in range(8)]
    x, y = arrays["images"][:24], arrays["labels"][:24]

    def records(distribution):
        keras.distribution.set_distribution(distribution)
        try:
            net = recipe.classifier()
            net.set_weights(weights)
            results = evaluate(
                net, (x, y), attacks=["clean", "pgd-3", "apgd-ce"], epsilons=[8.0], batch_size=8,
                checks=False, verbose=0,
            )  # fmt: skip
        finally:
            keras.distribution.set_distribution(None)
        return results.per_example.fooled_by

    alone = records(None)
    parallel = records(keras.distribution.DataParallel(devices=jax.devices("cpu")))
    np.testing.assert_array_equal(parallel, alone)
