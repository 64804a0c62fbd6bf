"""`AdversarialModel`: a Keras model that trains its classifier on PGD examples.

The recipe is the paper's (Xie et al., 2020, Sec. 3; official code ResNet/adv_model.py):
for each batch, craft PGD examples with the classifier in inference mode, then train on
the adversarial batch only. `train_step` and `test_step` keep the shape of the Keras
guides "Customizing what happens in fit()" (TensorFlow: a tape and `optimizer.apply`;
JAX: `compute_loss_and_updates`, `optimizer.stateless_apply` on the step's state), so
`compile`/`fit`/`evaluate`, callbacks, sample weights, `steps_per_execution`,
`jit_compile`, mixed precision, `tf.distribute` and `keras.distribution` work as for any
Keras model; `sat_tf.distribute.train` runs the very same `train_step` under any
TensorFlow strategy. The attack is the same `attacks.pgd` call on every backend.

Logged metrics. Training: `loss` (the optimised adversarial loss, plus weight decay) and
each compiled metric on the adversarial batch, prefixed `adv_` (e.g. `adv_accuracy`).
Evaluation: `loss` and the compiled metrics on clean images (`accuracy`), and `adv_loss`
and the `adv_` metrics under the evaluation attack. So `fit(..., validation_data=...)`
logs `adv_accuracy`, `val_accuracy` and `val_adv_accuracy`.
"""

import keras
import numpy as np
from keras import ops

from sat_tf import _keras_compat as compat
from sat_tf import activations, attacks, backend
from sat_tf.models import weight_decay_variables
from sat_tf.options import SMOOTH_PHASES
from sat_tf.options import eval_epsilon as resolve_eval_epsilon


def _clone_metric(metric):
    if isinstance(metric, keras.metrics.Metric):  # Never share state with the clean metric.
        return metric.__class__.from_config(metric.get_config())
    return metric


def _replicas():
    # Keras (3.15) divides each TF replica's loss by this, so summed gradients give the mean;
    # under JAX a step sees the global batch (1).
    return backend.replica()[1]


def _check_seed(seed):
    if seed is not None and not (isinstance(seed, int | np.integer) and 0 <= seed < 2**63):
        raise ValueError(f"`seed` must be None or an int >= 0. Received: seed={seed!r}")
    return None if seed is None else int(seed)


@keras.saving.register_keras_serializable(package="sat_tf")
class AdversarialModel(keras.Model):
    """Adversarial training (PGD, L-inf, pixel units) around a Keras classifier.

    Random starts. With `seed=None` under TensorFlow the attacks draw from TensorFlow's
    stateful random ops, as always. With a `seed` (and always under JAX, where a compiled
    step holds no random state) they draw keyed numbers (`sat_tf.draws`): the training
    attack keys example k of step t by (seed, t * global batch + k), t being the
    optimizer's iteration count (under `tf.distribute`, replica r's examples are numbered
    after those of replicas 0..r-1); the evaluation attack keys each batch by position.
    So a seed gives the same starts on TensorFlow and JAX, on one device or many, and
    after a resume. Under JAX without a seed, one is drawn from NumPy when the model is
    built (`keras.utils.set_random_seed` fixes it); `get_config` keeps the given `seed`.

    Args:
        classifier: Keras model mapping [0, 255] images to logits. `model.classifier`
            is the plain model, for export and inference.
        epsilon: Training attack's L-inf radius, in pixels (the paper: 4).
        step_size: Training attack's step, in pixels (the paper: 4 for PGD-1).
        num_steps: Training attack's number of steps (the paper: 1).
        random_start: Start attacks from a random point of the epsilon ball.
        prob_start_from_clean: Per example, the chance that the training attack starts
            from the clean image instead (0.2, as in the official code).
        eval_epsilon: Evaluation attack's radius; None uses `epsilon`.
        eval_step_size: Evaluation attack's step, in pixels.
        eval_num_steps: Evaluation attack's number of steps.
        smooth_gradients: Phases in which `SmoothGradReLU` layers use their smooth
            backward pass: any of "attack" (the input gradient of the attacker, in
            training and evaluation) and "update" (the weight gradient). The paper's
            gradient-quality ablation; other layers ignore it.
        weight_decay: Coupled L2 coefficient, as in the official code:
            loss += weight_decay * sum(l2_loss(w)) over conv and dense kernels.
        seed: None, or an int >= 0 that keys the attacks' random starts (see above).
        **kwargs: `keras.Model` arguments such as `name`; `dtype` defaults to the
            classifier's dtype policy.
    """

    def __init__(
        self,
        classifier,
        *,
        epsilon=4.0,
        step_size=4.0,
        num_steps=1,
        random_start=True,
        prob_start_from_clean=0.2,
        eval_epsilon=None,
        eval_step_size=1.0,
        eval_num_steps=10,
        smooth_gradients=SMOOTH_PHASES,
        weight_decay=0.0,
        seed=None,
        **kwargs,
    ):
        # The classifier's policy, so that compile() adds loss scaling under mixed_float16.
        kwargs.setdefault("dtype", classifier.dtype_policy)
        super().__init__(**kwargs)
        phases = (smooth_gradients,) if isinstance(smooth_gradients, str) else smooth_gradients
        if not set(phases) <= set(SMOOTH_PHASES):
            raise ValueError(
                f"`smooth_gradients` must be a subset of {SMOOTH_PHASES}. "
                f"Received: smooth_gradients={smooth_gradients!r}"
            )
        if not weight_decay >= 0:
            raise ValueError(
                f"`weight_decay` must be >= 0. Received: weight_decay={weight_decay!r}"
            )
        attacks.require_logits(classifier, where="AdversarialModel")
        self.classifier = classifier
        self.attack_config = {
            "epsilon": float(epsilon),
            "step_size": float(step_size),
            "num_steps": int(num_steps),
            "random_start": bool(random_start),
            "prob_start_from_clean": float(prob_start_from_clean),
        }
        self.eval_attack_config = {
            "epsilon": resolve_eval_epsilon(epsilon, eval_epsilon),
            "step_size": float(eval_step_size),
            "num_steps": int(eval_num_steps),
            "random_start": bool(random_start),
        }
        for config in (self.attack_config, self.eval_attack_config):  # Fail at construction.
            attacks.check_arguments(**config)
        self._eval_epsilon = eval_epsilon
        self.smooth_gradients = tuple(p for p in SMOOTH_PHASES if p in phases)
        self.weight_decay = float(weight_decay)
        self.seed = _check_seed(seed)
        self._draw_seed = self.seed
        if self.seed is None and backend.NAME == "jax":  # no stateful draws in a jitted step
            self._draw_seed = int(np.random.randint(0, 2**31 - 1))
        self.adv_loss_tracker = keras.metrics.Mean(name="adv_loss")
        self._adv_metrics = None

    def call(self, inputs, training=None):
        return self.classifier(inputs, training=training)

    def adversarial_examples(self, images, labels, *, training, ids=None):
        """PGD examples with the training attack (`training=True`) or the evaluation one.

        `ids` number the examples for keyed draws (default: their positions in the batch).
        """
        config = self.attack_config if training else self.eval_attack_config
        with activations.smooth_gradients("attack" in self.smooth_gradients):
            return attacks.pgd(
                self.classifier, images, labels, **config, seed=self._draw_seed, ids=ids
            )

    def _training_ids(self, x):
        """Example numbers of a training step: iteration * global batch + position."""
        if self._draw_seed is None:
            return None
        index, replicas = backend.replica()
        batch = ops.shape(x)[0]
        first = ops.cast(self.optimizer.iterations, "int32") * (batch * replicas)
        return first + ops.cast(index, "int32") * batch + ops.arange(batch, dtype="int32")

    @compat.no_automatic_dependency_tracking
    def compile(self, *args, **kwargs):
        """`keras.Model.compile`; the compiled metrics are also kept for adversarial inputs.

        The twin reuses Keras's own resolution of "accuracy" etc. from the label and output
        shapes; its names get `adv_`.
        """
        super().compile(*args, **kwargs)
        self._adv_metrics = compat.metrics_twin(self, _clone_metric, prefix="adv_")

    def compile_from_config(self, config):
        # Keras (3.15) skips compiling on load when `compile` is overridden; ours only adds the
        # adversarial metrics, so compile as Keras 3.15's Trainer.compile_from_config does.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        metrics = super().metrics
        if self.compiled and self._adv_metrics is not None:
            metrics.append(self._adv_metrics)
        return metrics

    def _build_metrics(self, y, y_pred):
        # Both metric sets must exist before the logs are read: training updates only the
        # adversarial set, and Keras (3.15) reads all of `self.metrics` at an epoch's end.
        for metrics in (compat.compiled_metrics(self), self._adv_metrics):
            if metrics is not None and not metrics.built:
                metrics.build(y, y_pred)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Keras 3.15 builds the compiled metrics by tracing this method symbolically before
        # the first step (`compat.symbolic_build`, and `fit` under JAX); build the
        # adversarial twins alongside, so no variable is created in a replica context or a
        # jitted step.
        self._build_metrics(y, y_pred)
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if training and self.weight_decay:
            # l2_loss(w) = sum(w**2) / 2, in float32 whatever the compute dtype.
            l2 = sum(
                ops.sum(ops.square(ops.cast(v, "float32"))) for v in weight_decay_variables(self)
            )
            # Per-replica share, like Keras's own regularisation losses.
            loss += ops.cast(self.weight_decay * 0.5 * l2 / _replicas(), loss.dtype)
        return loss

    def _record_training(self, loss, x, y, y_pred, sample_weight):
        """Updates the `loss` tracker and the `adv_` metrics; returns the training logs."""
        # Keras (3.15) scales each TF replica's loss by 1 / replicas; log the true mean.
        compat.loss_tracker(self).update_state(loss * _replicas(), sample_weight=ops.shape(x)[0])
        self._build_metrics(y, y_pred)
        if self._adv_metrics is not None:
            self._adv_metrics.update_state(y, y_pred, sample_weight)
        return self.train_metrics_result()

    def train_step(self, *args):
        """One PGD-AT step: `(data)` under TensorFlow and PyTorch, `(state, data)` under JAX."""
        if backend.NAME == "jax":
            return self._jax_train_step(*args)
        if backend.NAME == "torch":
            return self._torch_train_step(*args)
        return self._tf_train_step(*args)

    def _tf_train_step(self, data):
        tf = backend.tensorflow("The TensorFlow train step")
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x_adv = self.adversarial_examples(x, y, training=True, ids=self._training_ids(x))
        with activations.smooth_gradients("update" in self.smooth_gradients):
            with tf.GradientTape() as tape:
                y_pred = self(x_adv, training=True)
                loss = compat.compute_loss(
                    self, x=x_adv, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
                )
                scaled_loss = self.optimizer.scale_loss(loss)  # Mixed precision: loss scaling.
            gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self._record_training(loss, x, y, y_pred, sample_weight)

    def _torch_train_step(self, data):
        import torch

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x_adv = self.adversarial_examples(x, y, training=True, ids=self._training_ids(x))
        # Keras's own PyTorch step: clear the weights' gradients, backward, apply.
        self.zero_grad()
        with activations.smooth_gradients("update" in self.smooth_gradients):
            y_pred = self(x_adv, training=True)
            loss = compat.compute_loss(
                self, x=x_adv, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            self.optimizer.scale_loss(loss).backward()  # Mixed precision: loss scaling.
        with torch.no_grad():
            variables = self.trainable_variables
            self.optimizer.apply([v.value.grad for v in variables], variables)
        return self._record_training(loss.detach(), x, y, y_pred.detach(), sample_weight)

    def _jax_train_step(self, state, data):
        import jax

        trainable, non_trainable, optimizer_variables, metrics_variables = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # The attack reads the state's weights and iteration count; whatever the model would
        # write meanwhile (nothing: BatchNorm runs in inference mode) is dropped with the scope.
        mapping = [
            *zip(self.trainable_variables, trainable, strict=True),
            *zip(self.non_trainable_variables, non_trainable, strict=True),
            *zip(self.optimizer.variables, optimizer_variables, strict=True),
        ]
        with keras.StatelessScope(state_mapping=mapping):
            x_adv = self.adversarial_examples(x, y, training=True, ids=self._training_ids(x))
        with activations.smooth_gradients("update" in self.smooth_gradients):
            # Keras's own JAX step: loss (scaled under mixed precision) and its gradient.
            grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
            (_, aux), gradients = grad_fn(
                trainable,
                non_trainable,
                metrics_variables,
                x_adv,
                y,
                sample_weight,
                training=True,
                optimizer_variables=optimizer_variables,
            )
        loss, y_pred, non_trainable, metrics_variables = aux
        trainable, optimizer_variables = self.optimizer.stateless_apply(
            optimizer_variables, gradients, trainable
        )
        logs, metrics_variables = self._stateless_metrics(
            metrics_variables, [], self._record_training, loss, x, y, y_pred, sample_weight
        )
        return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)

    def _stateless_metrics(self, metrics_variables, mapping, update, *args):
        """Runs `update(*args)` on the metric values of a JAX state (plus `mapping`); returns
        (its logs, the new metric values)."""
        mapping = [*mapping, *zip(self.metrics_variables, metrics_variables, strict=True)]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            logs = update(*args)
        return logs, [scope.get_current_value(v) for v in self.metrics_variables]

    def train_metrics_result(self):
        """The training logs: `loss` and the `adv_` metrics (readable in any context)."""
        logs = {"loss": compat.loss_tracker(self).result()}
        if self._adv_metrics is not None and self._adv_metrics.built:
            logs.update(self._adv_metrics.result())
        return logs

    def test_step(self, *args):
        """Clean and adversarial evaluation: `(data)` under TensorFlow, `(state, data)` under
        JAX (everything runs in inference mode, so only the metric values change)."""
        if backend.NAME != "jax":
            return self._test_logs(*args)
        (trainable, non_trainable, metrics_variables), data = args
        mapping = [
            *zip(self.trainable_variables, trainable, strict=True),
            *zip(self.non_trainable_variables, non_trainable, strict=True),
        ]
        logs, metrics_variables = self._stateless_metrics(
            metrics_variables, mapping, self._test_logs, data
        )
        return logs, (trainable, non_trainable, metrics_variables)

    def _test_logs(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch_size = ops.shape(x)[0]
        y_pred = self(x, training=False)
        loss = compat.compute_loss(
            self, x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        compat.loss_tracker(self).update_state(loss * _replicas(), sample_weight=batch_size)
        x_adv = self.adversarial_examples(x, y, training=False)
        y_adv = self(x_adv, training=False)
        adv_loss = compat.compute_loss(
            self, x=x_adv, y=y, y_pred=y_adv, sample_weight=sample_weight, training=False
        )
        self.adv_loss_tracker.update_state(adv_loss * _replicas(), sample_weight=batch_size)
        self._build_metrics(y, y_adv)
        if self._adv_metrics is not None:
            self._adv_metrics.update_state(y, y_adv, sample_weight)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def get_config(self):
        return {
            **super().get_config(),
            "classifier": keras.saving.serialize_keras_object(self.classifier),
            **self.attack_config,
            "eval_epsilon": self._eval_epsilon,
            "eval_step_size": self.eval_attack_config["step_size"],
            "eval_num_steps": self.eval_attack_config["num_steps"],
            "smooth_gradients": list(self.smooth_gradients),
            "weight_decay": self.weight_decay,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        classifier = keras.saving.deserialize_keras_object(config.pop("classifier"))
        return cls(classifier, **config)
