"""Tests for sat_tf.distribute: strategies, and the custom loop against fit and across devices.

Every comparison uses a deterministic attack (no random start) and synchronized BatchNorm, so
one global batch gives the same step whether it is split over replicas/workers or not.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import distribute

REPO = pathlib.Path(__file__).resolve().parents[1]
GLOBAL_BATCH, STEPS = 8, 2

# Shared by this process and the multi-worker subprocesses, so all build the same model.
SETUP = textwrap.dedent(
    """
    import keras
    import numpy as np
    import tensorflow as tf
    from sat_tf.adversarial import AdversarialModel

    def classifier():
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
        x = keras.layers.Conv2D(4, 3, padding="same")(x)
        x = keras.layers.BatchNormalization(synchronized=True)(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(3)(x))

    def adversarial_model(weights):
        net = classifier()
        net.set_weights(weights)
        model = AdversarialModel(net, epsilon=4.0, step_size=4.0, random_start=False)
        model.compile(
            keras.optimizers.SGD(0.5, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model

    def dataset_fn_for(images, labels, global_batch):
        def dataset_fn(context):
            dataset = tf.data.Dataset.from_tensor_slices((images, labels))
            dataset = dataset.shard(context.num_input_pipelines, context.input_pipeline_id)
            return dataset.batch(context.get_per_replica_batch_size(global_batch)).repeat()
        return dataset_fn
    """
)
_namespace = {}
exec(SETUP, _namespace)  # noqa: S102 - the source above, so subprocesses can run it too.
adversarial_model = _namespace["adversarial_model"]
dataset_fn_for = _namespace["dataset_fn_for"]


@pytest.fixture(scope="module")
def case():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (GLOBAL_BATCH * STEPS, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 3, GLOBAL_BATCH * STEPS).astype("int32")
    return images, labels, _namespace["classifier"]().get_weights()


@pytest.fixture(scope="module")
def reference(case):
    """`fit` with the default strategy on the global batches: weights and logs."""
    images, labels, weights = case
    model = adversarial_model(weights)
    history = model.fit(images, labels, batch_size=GLOBAL_BATCH, shuffle=False, verbose=0)
    return model.classifier.get_weights(), history.history


def assert_same_training(weights, logs, reference):
    want_weights, want_logs = reference
    for got, want in zip(weights, want_weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert set(logs) == set(want_logs) == {"loss", "adv_accuracy"}
    for name in want_logs:  # E.g. the loss is the global mean, not divided by replicas.
        np.testing.assert_allclose(logs[name][-1], want_logs[name][-1], rtol=1e-5)


def test_get_strategy_names_and_errors():
    assert distribute.get_strategy("default") is tf.distribute.get_strategy()
    mirrored = distribute.get_strategy("mirrored")
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == 2  # The two logical CPUs set up by conftest.
    with pytest.raises(ValueError, match="default, mirrored, multi_worker, tpu"):
        distribute.get_strategy("horovod")
    with pytest.raises(ValueError, match="only used with name='tpu'"):
        distribute.get_strategy("mirrored", tpu="my-tpu")


def test_custom_loop_matches_fit_with_default_strategy(case, reference):
    images, labels, weights = case
    model = adversarial_model(weights)
    epochs = []
    callback = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: epochs.append(logs))
    history = distribute.train(
        model,
        dataset_fn_for(images, labels, GLOBAL_BATCH),
        strategy=tf.distribute.get_strategy(),
        epochs=1,
        steps_per_epoch=STEPS,
        callbacks=[callback],
    )
    assert epochs == [{name: values[0] for name, values in history.history.items()}]
    assert_same_training(model.classifier.get_weights(), history.history, reference)


def test_mirrored_strategy_matches_default_in_custom_loop_and_fit(case, reference):
    images, labels, weights = case
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        looped = adversarial_model(weights)
        fitted = adversarial_model(weights)
    history = distribute.train(
        looped,
        dataset_fn_for(images, labels, GLOBAL_BATCH),
        strategy=strategy,
        epochs=1,
        steps_per_epoch=STEPS,
    )
    assert_same_training(looped.classifier.get_weights(), history.history, reference)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(GLOBAL_BATCH)
    history = fitted.fit(dataset, shuffle=False, verbose=0)
    assert_same_training(fitted.classifier.get_weights(), history.history, reference)


def test_custom_loop_validation_logs(case):
    images, labels, weights = case
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = adversarial_model(weights)
    dataset_fn = dataset_fn_for(images, labels, GLOBAL_BATCH)
    history = distribute.train(
        model,
        dataset_fn,
        strategy=strategy,
        epochs=1,
        steps_per_epoch=1,
        validation_fn=dataset_fn,
        validation_steps=STEPS,
    )
    want = model.evaluate(images, labels, batch_size=GLOBAL_BATCH, return_dict=True, verbose=0)
    assert {f"val_{name}" for name in want} <= set(history.history)
    for name, value in want.items():
        np.testing.assert_allclose(history.history[f"val_{name}"][0], value, rtol=1e-5)


WORKER = """
import json, os, sys
import numpy as np
from sat_tf import distribute
strategy = distribute.get_strategy("multi_worker")
{setup}
data = np.load(sys.argv[1])
with strategy.scope():
    model = adversarial_model([data[f"w{{i}}"] for i in range(int(data["n"]))])
history = distribute.train(
    model, dataset_fn_for(data["images"], data["labels"], {batch}), strategy=strategy,
    epochs=1, steps_per_epoch={steps},
)
out = sys.argv[2]
np.savez(out + ".npz", *model.classifier.get_weights())
with open(out + ".json", "w") as f:
    json.dump(history.history, f)
"""


@pytest.mark.slow
def test_multi_worker_custom_loop_matches_default(case, reference, tmp_path):
    images, labels, weights = case
    arrays = {f"w{i}": w for i, w in enumerate(weights)}
    np.savez(tmp_path / "data.npz", images=images, labels=labels, n=len(weights), **arrays)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(setup=SETUP, batch=GLOBAL_BATCH, steps=STEPS))
    workers = distribute.local_hosts(2)
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        )
        command = [
            sys.executable,
            str(script),
            str(tmp_path / "data.npz"),
            str(tmp_path / f"w{index}"),
        ]
        processes.append(
            subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        )
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        assert process.returncode == 0, stderr[-3000:]
    for index in range(2):
        result = np.load(tmp_path / f"w{index}.npz")
        got = [result[f"arr_{i}"] for i in range(len(weights))]
        logs = json.loads((tmp_path / f"w{index}.json").read_text())
        assert_same_training(got, logs, reference)
