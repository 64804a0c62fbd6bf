"""Writes training_reference.npz: three PGD-AT steps under TensorFlow, for the JAX comparison.

    KERAS_BACKEND=tensorflow python tests/data/make_training_reference.py tests/data

The recipe (`run`) is shared with tests/test_training_backends.py, which runs it under the backend
of the test session from the same initial weights and data (stored here, drawn by NumPy) and
compares the adversarial batch of the first step, the logged losses and the final weights
(BatchNorm's moving statistics included) with TensorFlow's. The attack's random starts are
keyed by the model's `seed` (`sat_tf.draws`), so they are the same numbers on every backend.
"""

import sys
from pathlib import Path

import keras
import numpy as np

SEED, BATCH, STEPS = 11, 8, 3


def classifier():
    """Conv -> BatchNorm -> SiLU -> pooling -> Dense on 8x8x3 [0, 255] images."""
    from sat_tf import activations

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = activations.SiLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def inputs():
    """Initial weights (NumPy draws, not a backend's initialisers) and the data."""
    rng = np.random.default_rng(0)
    weights = [
        rng.normal(0, 0.5, (3, 3, 3, 4)),  # conv kernel
        rng.normal(0, 0.1, 4),  # conv bias
        np.ones(4),  # gamma
        np.zeros(4),  # beta
        np.zeros(4),  # moving mean
        np.ones(4),  # moving variance
        rng.normal(0, 0.5, (4, 3)),  # dense kernel
        rng.normal(0, 0.1, 3),  # dense bias
    ]
    images = rng.uniform(0, 255, (BATCH * STEPS, 8, 8, 3))
    labels = rng.integers(0, 3, BATCH * STEPS)
    return {
        "images": images.astype("float32"),
        "labels": labels.astype("int32"),
        **{f"init_{i}": w.astype("float32") for i, w in enumerate(weights)},
    }


def run(arrays):
    """`STEPS` steps of PGD-2 training from `arrays`; the first step's adversarial batch, the
    per-batch logged losses and the final classifier weights."""
    from sat_tf.adversarial import AdversarialModel

    net = classifier()
    net.set_weights([arrays[f"init_{i}"] for i in range(len(net.weights))])
    model = AdversarialModel(
        net,
        epsilon=8.0,
        step_size=4.0,
        num_steps=2,
        prob_start_from_clean=0.5,
        weight_decay=1e-3,
        seed=SEED,
    )
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    images, labels = arrays["images"], arrays["labels"]
    first = model.adversarial_examples(
        images[:BATCH], labels[:BATCH], training=True, ids=np.arange(BATCH, dtype="int32")
    )
    losses = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
    )
    model.fit(images, labels, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[record])
    return {
        "first_adversarial": keras.ops.convert_to_numpy(first),
        "losses": np.array(losses, "float32"),
        **{f"final_{i}": np.asarray(w) for i, w in enumerate(net.get_weights())},
    }


if __name__ == "__main__":
    if keras.backend.backend() != "tensorflow":
        sys.exit("Run under KERAS_BACKEND=tensorflow: this is TensorFlow's reference.")
    keras.utils.set_random_seed(0)
    arrays = inputs()
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
    np.savez(out / "training_reference.npz", **arrays, **run(arrays))
    print(f"wrote {out / 'training_reference.npz'}")
