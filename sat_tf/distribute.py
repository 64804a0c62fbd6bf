"""Distribution strategies (TensorFlow) or `keras.distribution` (JAX), and a custom training loop
that works under every TensorFlow strategy.

Under JAX, `get_strategy` returns a `KerasDistribution`: `keras.distribution.DataParallel` behind
the two members of a strategy that `sat_tf.training` uses (`scope()`, `num_replicas_in_sync`).
"mirrored" replicates the model on every local device (GPUs, TPU cores; or the CPU devices of
XLA_FLAGS=--xla_force_host_platform_device_count=N) and splits each global batch between them;
BatchNorm and the loss see the global batch, so the step equals the one-device step
(tests/test_training_backends.py). "multi_worker" first calls `keras.distribution.initialize()`,
which starts `jax.distributed` from KERAS_DISTRIBUTION_JOB_ADDRESSES (the coordinator's host:port
first), KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID, then spreads the
batch over the devices of all processes; every process runs the same command (on Cloud TPU pods
the variables may be left unset: JAX finds the pod itself). The multi-process path was not run
here (one machine, no second host).

`keras.Model.fit` works with the default strategy and `MirroredStrategy`, but in Keras
3.15 it fails under `MultiWorkerMirroredStrategy` (a PerReplica reduction error when it
reduces the step's logs). `train` is the loop from the TensorFlow guide "Custom training
with tf.distribute.Strategy": `strategy.run` of the model's own `train_step` over
`strategy.distribute_datasets_from_function`, so the step's math lives in one place
(`AdversarialModel.train_step`). Metrics are read in cross-replica context, where Keras's
on-read-synchronised metric variables are summed over replicas and workers, so the logs
are exact global means.

Typical use::

    strategy = get_strategy("multi_worker")       # reads TF_CONFIG
    with strategy.scope():
        model = AdversarialModel(build("resnet50", num_classes=1000))
        model.compile(optimizer, loss, metrics=["accuracy"])
    train(model, dataset_fn, strategy=strategy, epochs=90, steps_per_epoch=5000)
"""

import contextlib
import socket

import keras

from sat_tf import _keras_compat as compat
from sat_tf import backend
from sat_tf.options import STRATEGIES


class KerasDistribution:
    """A `keras.distribution.Distribution` (or None: one device) with the strategy members
    `sat_tf.training` uses.

    Attributes:
        distribution: The `keras.distribution.DataParallel`, or None.
        num_replicas_in_sync: The devices a global batch is split between.
    """

    def __init__(self, distribution=None):
        self.distribution = distribution
        devices = distribution.device_mesh.devices if distribution is not None else [None]
        self.num_replicas_in_sync = int(getattr(devices, "size", len(devices)))

    def scope(self):
        """Variables created and `fit` run inside are laid out by the distribution."""
        if self.distribution is None:
            return contextlib.nullcontext()
        return self.distribution.scope()


def _keras_distribution(name):
    if backend.NAME == "torch" and name != "default":
        raise ValueError(
            f"--strategy={name}: Keras distributes no training under KERAS_BACKEND=torch; use "
            "--strategy=default (one device), or KERAS_BACKEND=jax or tensorflow to distribute."
        )
    if name == "tpu":
        raise ValueError(
            "--strategy=tpu is TensorFlow's TPUStrategy; under KERAS_BACKEND=jax use "
            "--strategy=mirrored (all local TPU cores) or multi_worker (a pod)."
        )
    if name == "default":
        return KerasDistribution()
    if name == "multi_worker":
        keras.distribution.initialize()
    return KerasDistribution(keras.distribution.DataParallel())


def local_hosts(count):
    """`count` "localhost:<port>" addresses on free ports: a one-machine multi-worker cluster
    (TF_CONFIG's cluster.worker), as the tests and benchmarks launch."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return [f"localhost:{port}" for port in ports]


def get_strategy(name, tpu=None):
    """Returns the `tf.distribute.Strategy` called `name` (under JAX and PyTorch: a
    `KerasDistribution`).

    Args:
        name: "default" (the current/no-op strategy), "mirrored" (all local GPUs, or the
            logical devices set up by the caller), "multi_worker" (synchronous training
            over the cluster described by the TF_CONFIG environment variable) or "tpu".
        tpu: Only for "tpu": the TPU name or grpc address (e.g. the `--tpu` flag); None or
            "" means the local TPU VM / the TPU_NAME environment. The TPU branch is the
            standard four-line TensorFlow set-up; it cannot be run on this project's CI,
            which has no TPU, so it is kept to exactly that.

    Raises:
        ValueError: For an unknown name, or `tpu` given with another strategy (or under JAX).
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}. Valid names: {', '.join(STRATEGIES)}.")
    if tpu and name != "tpu":
        raise ValueError(
            f"`tpu` is only used with name='tpu'. Received: name={name!r}, tpu={tpu!r}"
        )
    if backend.NAME != "tensorflow":
        return _keras_distribution(name)
    tf = backend.tensorflow("tf.distribute strategies")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _logs(model):
    # AdversarialModel reports only what its train_step updates; plain models report all.
    read = getattr(model, "train_metrics_result", model.get_metrics_result)
    return read()


def build_variables(model, strategy, dataset_fn):
    """Creates the model's metric and optimizer variables before any replica context,
    as Keras's fit does, from the dataset's element spec."""
    tf = backend.tensorflow("sat_tf.distribute.train")
    element_spec = dataset_fn(tf.distribute.InputContext()).element_spec
    with strategy.scope():
        compat.symbolic_build(model, element_spec)


def make_step(model, strategy, validation=False):
    """`run(iterator) -> logs`: one `strategy.run` of the model's train (or test) step, compiled;
    the logs are read in cross-replica context."""
    step = model.test_step if validation else model.train_step
    tf = backend.tensorflow("sat_tf.distribute.train")

    @tf.function
    def run(iterator):
        strategy.run(step, args=(next(iterator),))
        # Cross-replica read: on-read metric variables are summed over all replicas.
        return model.get_metrics_result() if validation else _logs(model)

    return run


def _validate(model, run, dataset, steps):
    model.reset_metrics()
    iterator, logs = iter(dataset), {}
    for _ in range(steps):
        logs = run(iterator)
    return {f"val_{name}": float(value) for name, value in logs.items()}


def train(
    model,
    dataset_fn,
    *,
    strategy,
    epochs,
    steps_per_epoch,
    callbacks=None,
    validation_fn=None,
    validation_steps=None,
    initial_epoch=0,
    verbose=0,
):
    """Trains `model` with its own `train_step` under `strategy`; works for every strategy
    (TensorFlow only: under JAX `fit` runs under `keras.distribution`).

    The model must be created and compiled under `strategy.scope()`.

    Args:
        model: A compiled Keras model, typically `sat_tf.AdversarialModel`.
        dataset_fn: `f(input_context) -> tf.data.Dataset` of per-replica batches, repeated
            as needed; called once per worker by `distribute_datasets_from_function`
            (shard with `input_context.input_pipeline_id`, batch with
            `input_context.get_per_replica_batch_size(global_batch_size)`).
        strategy: A `tf.distribute.Strategy`, e.g. from `get_strategy`.
        epochs: Index of the last epoch, as in `fit`.
        steps_per_epoch: Training steps per epoch.
        callbacks: Keras callbacks; they see the same logs as with `fit`.
        validation_fn: Optional dataset function for validation at each epoch end.
        validation_steps: Number of validation batches (required with `validation_fn`).
        initial_epoch: Epoch to start from (to resume).
        verbose: 1 adds Keras's progress bar.

    Returns:
        The `keras.callbacks.History` of the run.
    """
    if validation_fn is not None and not validation_steps:
        raise ValueError("`validation_steps` is required with `validation_fn`.")
    build_variables(model, strategy, dataset_fn)
    history = keras.callbacks.History()
    callbacks = keras.callbacks.CallbackList(
        [*(callbacks or []), history],
        add_history=False,
        add_progbar=verbose != 0,
        verbose=verbose,
        epochs=epochs,
        steps=steps_per_epoch,
        model=model,
    )
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    run = make_step(model, strategy)
    if validation_fn is not None:
        validation = strategy.distribute_datasets_from_function(validation_fn)
        run_validation = make_step(model, strategy, validation=True)
    model.stop_training = False
    callbacks.on_train_begin()
    logs = {}
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        for step in range(steps_per_epoch):
            callbacks.on_train_batch_begin(step)
            logs = run(iterator)
            callbacks.on_train_batch_end(step, logs)
            if model.stop_training:
                break
        logs = {name: float(value) for name, value in logs.items()}
        if validation_fn is not None:
            logs.update(_validate(model, run_validation, validation, validation_steps))
        callbacks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callbacks.on_train_end(logs)
    return history
