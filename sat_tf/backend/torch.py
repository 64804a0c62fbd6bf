"""`sat_tf.backend` under PyTorch: `torch.autograd.grad`, eager execution, torch's generator."""

import weakref

import keras
import numpy as np
import torch

_COMPILED = weakref.WeakKeyDictionary()  # model -> {key: function}


def _detached(tree):
    return keras.tree.map_structure(
        lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree
    )


def value_and_gradient(fn, x):
    """(value, aux, d value / d x) of `fn(x) -> (value, aux)`, with `torch.autograd.grad`.

    `x` is a tensor or a nest of them; the gradient has its structure (None where `value` does
    not depend on a leaf). Only these gradients are computed: the weights' are left alone.
    Inside an enclosing `value_and_gradient` whose graph `x` belongs to, the graph is kept and
    the gradient is itself differentiable (second derivatives); otherwise `value` and `aux`
    come back detached.
    """
    with torch.enable_grad():
        x = keras.tree.map_structure(keras.ops.convert_to_tensor, x)
        nested = any(t.requires_grad for t in keras.tree.flatten(x))
        if not nested:
            x = keras.tree.map_structure(lambda t: t.detach().requires_grad_(True), x)
        leaves = keras.tree.flatten(x)
        value, aux = fn(x)
        gradient = [None] * len(leaves)
        if leaves and value.requires_grad:
            gradient = torch.autograd.grad(value, leaves, create_graph=nested, allow_unused=True)
    gradient = keras.tree.pack_sequence_as(x, list(gradient))
    if nested:
        return value, aux, gradient
    return value.detach(), _detached(aux), gradient


def _tensors(tree):
    """NumPy arrays in `tree` as tensors, as `tf.function` and `jax.jit` take their arguments
    (a torch tensor compared with a NumPy array gives a Python bool)."""
    return keras.tree.map_structure(
        lambda a: keras.ops.convert_to_tensor(a) if isinstance(a, np.ndarray) else a, tree
    )


def compiled(model, key, build, *args, jit_compile=False):
    """`build(model_ref)`, once per (model, key), run eagerly without autograd's bookkeeping
    (`torch.no_grad`; `value_and_gradient` turns it back on for the input gradient), its NumPy
    arguments converted to tensors.

    PyTorch runs op by op: there is nothing to trace. `args` and `jit_compile` are accepted for
    the TensorFlow signature.
    """
    del args, jit_compile
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        fn = build(weakref.ref(model))

        def call(*call_args):
            with torch.no_grad():
                return fn(*_tensors(call_args))

        per_model[key] = call
    return per_model[key]


def uniform(shape, minval, maxval):
    """Uniform draws from Keras's global seed generator (training without a seed)."""
    return keras.random.uniform(shape, minval, maxval)


def replica():
    """(0, 1): Keras distributes no PyTorch training; a step sees the whole batch."""
    return 0, 1


def compiled_call(model, key, build, *args):
    """`build(model_ref)(*args)`, run as it is (PyTorch runs eagerly)."""
    del key
    return build(weakref.ref(model))(*_tensors(args))


def batch_bucket(batch):
    """`batch`: nothing is compiled per shape."""
    return batch
