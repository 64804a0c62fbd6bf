"""`sat_tf.backend` under TensorFlow: tapes, `tf.function`, TensorFlow's random ops."""

import weakref

import tensorflow as tf

_COMPILED = weakref.WeakKeyDictionary()  # model -> {key: tf.function}


def value_and_gradient(fn, x):
    """(value, aux, d value / d x) of `fn(x) -> (value, aux)`, with a `tf.GradientTape`."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        value, aux = fn(x)
    return value, aux, tape.gradient(value, x)


def _any_batch(t):
    t = tf.convert_to_tensor(t)
    shape = [None, *t.shape[1:]] if t.shape.rank else []
    return tf.TensorSpec(shape, t.dtype)


def compiled(model, key, build, *args, jit_compile=False):
    """`tf.function(build(model_ref))`, traced once per (model, key, jit_compile).

    The one cache of compiled attack functions (APGD, Square, FAB, the evaluation's PGD/FGSM):
    `key` holds every static argument. The first trace is made for `args` (example arguments:
    nests of tensors, batch first) with the batch dimension unknown, so every later batch size
    reuses it. With `jit_compile=True` XLA compiles the graph, once per batch size it meets.
    The cache is keyed weakly on the model, and `build` gets a `weakref.ref` to it, so a cached
    function never keeps its model alive.
    """
    per_model = _COMPILED.setdefault(model, {})
    key = (*key, jit_compile)
    if key not in per_model:
        fn = tf.function(build(weakref.ref(model)), jit_compile=jit_compile, reduce_retracing=True)
        fn.get_concrete_function(*tf.nest.map_structure(_any_batch, args))
        per_model[key] = fn
    return per_model[key]


def uniform(shape, minval, maxval):
    """TensorFlow's stateful uniform draws (training without a seed)."""
    return tf.random.uniform(shape, minval, maxval)


def replica():
    """(replica index, replicas in sync) of the current `tf.distribute` context."""
    context = tf.distribute.get_replica_context()
    strategy = tf.distribute.get_strategy()
    if context is None:  # cross-replica context
        return 0, strategy.num_replicas_in_sync
    return context.replica_id_in_sync_group, strategy.num_replicas_in_sync


def compiled_call(model, key, build, *args):
    """`build(model_ref)(*args)`, run as it is: TensorFlow runs an eager loop op by op, and
    inside a `tf.function` it is traced into the caller's graph."""
    del key
    return build(weakref.ref(model))(*args)


def batch_bucket(batch):
    """`batch`: a `tf.function` from `compiled` is traced once for any batch size."""
    return batch
