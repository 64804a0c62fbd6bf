"""What `keras.ops` does not give, once per Keras backend: input gradients, compilation, and
the stateful random draws of training.

Everything else in sat_tf (activations, models, attacks, the adversarial model, the evaluation)
is `keras.ops` code that runs on any backend; it reaches the backend only through the names
here, so no attack is written twice. The module for the backend Keras runs
(`keras.backend.backend()`) is picked when sat_tf is imported:

  - `value_and_gradient(fn, x)`: `fn(x) -> (scalar, aux)`; returns `(scalar, aux, d scalar/d x)`
    (TensorFlow: `tf.GradientTape`; JAX: `jax.value_and_grad(has_aux=True)`; PyTorch:
    `torch.autograd.grad`). Nests.
  - `compiled(model, key, build, *args, jit_compile=False)`: `build(weakref.ref(model))`
    compiled once per (model, key) (TensorFlow: `tf.function`, traced for any batch size; JAX:
    `jax.jit`, reading the model's variables as arguments, so a compiled function always sees
    the current weights; PyTorch: run eagerly under `torch.no_grad`).
  - `compiled_call(model, key, build, *args)`: `build(model_ref)(*args)`, through `compiled`
    where an eager call would be slow (JAX: an eager loop compiles its body at every call;
    inside a traced function, and under TensorFlow, it runs as it is).
  - `batch_bucket(batch)`: the batch size to pad to before calling a compiled function whose
    batch varies (TensorFlow: `batch`, traced for any size; JAX: the next power of two).
  - `uniform(shape, minval, maxval)`: stateful uniform draws, for training without a seed
    (TensorFlow and PyTorch: under JAX a compiled function cannot hold random state, and
    sat_tf's training draws are keyed (`sat_tf.draws`) there).
  - `replica()`: (index of this replica, replicas in sync): the examples a step sees are
    numbered across replicas (TensorFlow: the `tf.distribute` replica context; JAX and PyTorch:
    one global batch, (0, 1)).
  - `to_numpy(x)`: a host NumPy array.

TensorFlow itself (tf.data, TFRecords, SavedModel, TF1 checkpoints) is imported only where it
is used, through `tensorflow(feature)`, which says what to install when it is missing.
"""

import importlib

import keras

SUPPORTED = ("tensorflow", "jax", "torch")
NAME = keras.backend.backend()

if NAME not in SUPPORTED:
    raise ImportError(
        f"sat_tf runs under the Keras backends {SUPPORTED}; KERAS_BACKEND is {NAME!r}. "
        "Set KERAS_BACKEND=tensorflow (the default), jax or torch."
    )

_impl = importlib.import_module(f"sat_tf.backend.{'tf' if NAME == 'tensorflow' else NAME}")
value_and_gradient = _impl.value_and_gradient
compiled = _impl.compiled
uniform = _impl.uniform
replica = _impl.replica
compiled_call = _impl.compiled_call
batch_bucket = _impl.batch_bucket


def to_numpy(x):
    """`x` (a backend tensor, array or Python number) as a NumPy array on the host."""
    return keras.ops.convert_to_numpy(x)


def tensorflow(feature):
    """The `tensorflow` module, for `feature` (e.g. "TFRecord input"); ImportError in one line
    saying what to install when it is missing."""
    try:
        return importlib.import_module("tensorflow")
    except ImportError as error:
        raise ImportError(
            f"{feature} needs TensorFlow, which is not installed: pip install 'sat_tf[cpu]' "
            "(or 'sat_tf[gpu]'). Training, attacks and evaluation on arrays run without it "
            f"under KERAS_BACKEND=jax. ({error})"
        ) from None


__all__ = [
    "NAME",
    "SUPPORTED",
    "batch_bucket",
    "compiled",
    "compiled_call",
    "replica",
    "tensorflow",
    "to_numpy",
    "uniform",
    "value_and_gradient",
]
