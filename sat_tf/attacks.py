"""L-infinity PGD and FGSM against Keras classifiers, in pixel units.

`pgd` is the attacker of Madry et al. (2018) as used for adversarial training in the
official SAT code (cihangxie/SmoothAdversarialTraining, ResNet/adv_model.py): signed
gradient ascent on the cross-entropy, projected onto the epsilon ball around the clean
image and onto the valid pixel range. `project` and `step` are the two halves of one
iteration (MadryLab/robustness `LinfStep`), reusable by other attacks.

Conventions:
  * `images` are float pixels (any range; default clip range [0, 255]) and `epsilon`,
    `step_size` are in the same units. The model maps images to logits.
  * `labels` are int class ids of shape (B,) or (B, 1), or one-hot / soft labels (B, K).
  * The model is called with `training=False`: BatchNorm uses, and does not update, its
    moving statistics (the official code freezes UPDATE_OPS and runs BN in test mode).
  * The perturbation is kept in float32. Under a float16 model the input gradient of a
    confident model underflows and `sign` of a zero gradient goes nowhere, so the loss is
    scaled before the gradient is taken and unscaled after (the official code multiplies
    by 128; here each example gets its own power-of-two scale, see `input_gradient`).
  * Everything is `keras.ops`, so one implementation runs on every Keras backend; input
    gradients and compilation come from `sat_tf.backend`. `pgd` and `fgsm` also run inside a
    compiled function (`backend.compiled`, a train step) for any batch size.
"""

import warnings

import keras
import numpy as np
from keras import ops

from sat_tf import _keras_compat as compat
from sat_tf import activations, backend, draws

# Largest per-example loss scale, 2**120: far beyond float16's range, finite in float32.
_MAX_LOG2_SCALE = 120.0


def project(x_adv, images, *, epsilon, clip_min=0.0, clip_max=255.0):
    """Projects `x_adv` onto the L-inf ball of radius `epsilon` around `images`, then the box.

    Both sets are boxes, so clipping to one then the other is the exact projection onto
    their intersection.
    """
    x_adv = ops.clip(x_adv, images - epsilon, images + epsilon)
    return ops.clip(x_adv, clip_min, clip_max)


def step(x_adv, gradient, *, step_size):
    """One signed-gradient ascent step of size `step_size` per pixel (L-inf steepest ascent)."""
    return x_adv + step_size * ops.sign(gradient)


def per_example_loss(logits, labels):
    """Float32 softmax cross-entropy per example, for int class ids or one-hot labels."""
    logits = ops.cast(logits, "float32")
    labels = _labels(labels)
    if _is_one_hot(labels, logits):
        return ops.categorical_crossentropy(ops.cast(labels, "float32"), logits, from_logits=True)
    return ops.sparse_categorical_crossentropy(_class_ids(labels), logits, from_logits=True)


def _labels(labels):
    """Labels as a tensor; int64 NumPy class ids become int32 on the host (JAX has no int64)."""
    if isinstance(labels, np.ndarray | list | tuple):
        labels = np.asarray(labels)
        if labels.dtype.kind in "iu":
            labels = labels.astype(np.int32)
    return ops.convert_to_tensor(labels)


def _class_ids(labels):
    return ops.cast(ops.reshape(labels, (-1,)), "int32")


def _is_one_hot(labels, logits):
    return len(labels.shape) == len(logits.shape) and labels.shape[-1] == logits.shape[-1] != 1


def _per_example(values, x):
    """[B] `values` reshaped to broadcast against `x` [B, ...]."""
    return ops.reshape(values, (-1,) + (1,) * (len(x.shape) - 1))


def uses_float16(model):
    """Whether any layer of `model` computes in float16 (where input gradients underflow)."""
    layers = [model, *compat.flatten_layers(model)]
    return any(getattr(layer, "compute_dtype", None) == "float16" for layer in layers)


def input_gradient(model, images, labels, *, loss_scale=None):
    """Per-example cross-entropy and its gradient w.r.t. the images, both float32.

    Args:
        model: Keras model mapping images to logits; called with `training=False`.
        images: Images, (B, ...); cast to float32.
        labels: Int class ids or one-hot labels.
        loss_scale: None picks automatically: under a float16 model each example's loss
            is multiplied by the power of two that brings its largest off-target logit
            gradient into [1, 2), which keeps the float16 backward pass out of the
            underflow range however confident the model is; otherwise 1. A number uses
            that fixed scale (128 reproduces the official code).

    Returns:
        (losses, gradient): losses (B,) and the unscaled gradient, same shape as images.
        Unscaling is exact (powers of two) unless the true gradient is below float32's
        normal range, where it flushes to zero; `pgd` takes the sign before unscaling.
    """
    losses, gradient, scale = _scaled_input_gradient(model, images, labels, loss_scale)
    return losses, gradient / scale


def _scaled_input_gradient(model, images, labels, loss_scale):
    images = ops.cast(images, "float32")
    labels = _labels(labels)

    def scaled_loss(images):
        logits = ops.cast(model(images, training=False), "float32")
        losses = per_example_loss(logits, labels)
        scale = _loss_scale(model, logits, labels, loss_scale)
        return ops.sum(losses * scale), (losses, scale)

    _, (losses, scale), gradient = backend.value_and_gradient(scaled_loss, images)
    return losses, gradient, _per_example(scale, images)


def _loss_scale(model, logits, labels, loss_scale):
    ones = ops.ones_like(logits[:, 0])
    if loss_scale is not None:
        return ones * ops.cast(loss_scale, "float32")
    if not uses_float16(model):
        return ones
    if _is_one_hot(labels, logits):
        target = ops.cast(labels, "float32")
    else:
        target = ops.one_hot(_class_ids(labels), logits.shape[-1])
    # d CE / d logits = softmax - target. For a confident model softmax - 1 at the target is
    # float32 rounding noise (~2**-24), so measure the off-target probabilities, which
    # exp(log_softmax) keeps accurate down to ~1e-38; soft labels have no such entries.
    probs = ops.exp(ops.log_softmax(logits))
    off_target = ops.max(ops.where(target > 0, ops.zeros_like(probs), probs), axis=-1)
    anywhere = ops.max(ops.abs(probs - target), axis=-1)
    return _power_of_two_scale(ops.where(off_target > 0, off_target, anywhere))


def gradient_scale(logit_gradient):
    """Per-example loss scale for float16 models, from the loss's float32 gradient w.r.t. logits.

    The power of two (>= 1) that brings each example's largest |d loss / d logit| into [1, 2),
    as `input_gradient` picks for the cross-entropy; for any per-example loss (e.g. DLR).
    """
    largest = ops.max(ops.abs(ops.cast(logit_gradient, "float32")), axis=-1)
    return _power_of_two_scale(largest)


def _power_of_two_scale(largest):
    log2 = -ops.floor(ops.log(ops.maximum(largest, 2.0**-_MAX_LOG2_SCALE)) / ops.log(2.0))
    return ops.stop_gradient(ops.power(2.0, ops.clip(log2, 0.0, _MAX_LOG2_SCALE)))


_PROBABILITY_OUTPUTS = ("softmax", "sigmoid", "log_softmax")


def output_activation(model):
    """(layer name, activation name) of a model's output layer if it squashes to probabilities.

    Looks at the last layer (recursing into a nested model there): a `Softmax` layer, or an
    `activation` of softmax, sigmoid or log-softmax (a Dense's `activation=`, an `Activation`
    layer). Returns None otherwise, and for subclassed models, which have no layer graph to read.
    """
    layers = getattr(model, "layers", None)
    if not layers:
        return None
    last = layers[-1]
    if isinstance(last, keras.Model):
        return output_activation(last)
    if isinstance(last, keras.layers.Softmax):
        return last.name, "softmax"
    name = getattr(getattr(last, "activation", None), "__name__", "")
    return (last.name, name) if name in _PROBABILITY_OUTPUTS else None


def require_logits(model, *, where="this attack"):
    """Raises ValueError when `model`'s output layer applies softmax or sigmoid.

    Every attack here takes the model's outputs as logits; on probabilities the cross-entropy and
    margin losses saturate and the robust accuracy comes out too high.
    """
    found = output_activation(model)
    if found:
        layer, activation = found
        raise ValueError(
            f"{where} needs a model that outputs logits, but its output layer {layer!r} applies "
            f"{activation}. Remove it, weights kept: model = sat_tf.models.to_logits(model)."
        )


# Counters of PGD's keyed draws (`sat_tf.draws`): the start noise and the clean-start coin.
_NOISE, _COIN = 0, 1


def _uniform(images, minval, maxval, seed, ids, counter, *, per_pixel):
    """Uniform in [minval, maxval), per pixel ([B, ...]) or per example ([B]): the backend's
    stateful draws without a seed (TensorFlow, PyTorch), else keyed by (seed, each example's
    index `ids`)."""
    if seed is None:
        shape = ops.shape(images)  # the batch may be unknown inside a compiled function
        return backend.uniform(shape if per_pixel else shape[:1], minval, maxval)
    if ids is None:
        ids = ops.arange(ops.shape(images)[0], dtype="int32")
    keys = draws.keys(seed, ids, "pgd")
    u = draws.uniform(keys, images.shape[1:] if per_pixel else (), counter)
    return minval + (maxval - minval) * u


def uniform_start(images, *, epsilon, prob_start_from_clean=0.0, seed=None, ids=None):
    """Uniform noise in [-epsilon, epsilon] added to each image, except that each example
    keeps its clean image with probability `prob_start_from_clean`.

    The official code draws that choice once per batch; it is drawn per example here, so
    every batch mixes both starts in the same proportion. With a `seed` both draws are keyed
    by each example's index `ids` (default 0..B-1), see `pgd`; without one they are the
    backend's stateful draws, which TensorFlow and PyTorch have: under JAX pass a `seed`.
    """
    images = ops.convert_to_tensor(images)
    noise = _uniform(images, -epsilon, epsilon, seed, ids, _NOISE, per_pixel=True)
    if prob_start_from_clean > 0:
        coin = _uniform(images, 0.0, 1.0, seed, ids, _COIN, per_pixel=False)
        noise = noise * _per_example(ops.cast(coin >= prob_start_from_clean, noise.dtype), noise)
    return images + noise


def target_classes(requested, num_classes, *, who="a targeted attack"):
    """The number of target classes a targeted attack (APGD-T, FAB-T) uses: the `requested`
    number, at most the K - 1 classes other than the true one; warns, naming `who`, when the
    model has fewer."""
    available = int(num_classes) - 1
    if requested > available:
        warnings.warn(
            f"{who}: a {num_classes}-class model has {available} target classes, not "
            f"{requested}; using {available}.",
            stacklevel=3,
        )
    return min(int(requested), available)


def check_arguments(
    *,
    epsilon,
    step_size,
    num_steps,
    random_start=True,
    prob_start_from_clean=0.0,
    clip_min=0.0,
    clip_max=255.0,
):
    """Raises ValueError, naming the argument, for invalid `pgd` hyperparameters."""
    del random_start  # Any truthy value is fine; accepted so a config dict can be passed.
    for name, value in (("epsilon", epsilon), ("step_size", step_size)):
        if not value >= 0:
            raise ValueError(f"`{name}` must be >= 0. Received: {name}={value!r}")
    if not (isinstance(num_steps, int) and num_steps >= 0):
        raise ValueError(f"`num_steps` must be an int >= 0. Received: num_steps={num_steps!r}")
    if not 0.0 <= prob_start_from_clean <= 1.0:
        raise ValueError(
            "`prob_start_from_clean` must be in [0, 1]. "
            f"Received: prob_start_from_clean={prob_start_from_clean!r}"
        )
    if not clip_min < clip_max:
        raise ValueError(
            f"Need clip_min < clip_max. Received: clip_min={clip_min!r}, clip_max={clip_max!r}"
        )


def pgd(
    model,
    images,
    labels,
    *,
    epsilon,
    step_size,
    num_steps,
    random_start=True,
    targeted=False,
    clip_min=0.0,
    clip_max=255.0,
    prob_start_from_clean=0.0,
    seed=None,
    ids=None,
    loss_scale=None,
):
    """Projected gradient descent in the L-inf ball (Madry et al., 2018).

    Args:
        model: Keras classifier mapping images to logits (called with `training=False`).
        images: Clean images, (B, H, W, C) or any (B, ...), in pixel units.
        labels: Int class ids (B,) / (B, 1) or one-hot (B, K). In targeted mode, the targets.
        epsilon: L-inf radius, in pixel units.
        step_size: Per-step change of each pixel, in pixel units.
        num_steps: Number of gradient steps (0 returns the, possibly random, start).
        random_start: Start from a uniform random point of the epsilon ball.
        targeted: Descend the loss of `labels` instead of ascending it.
        clip_min: Smallest valid pixel value.
        clip_max: Largest valid pixel value.
        prob_start_from_clean: With `random_start`, the chance that an example starts
            from its clean image instead (the official SAT training uses 0.2).
        seed: None for the backend's stateful random ops (training under TensorFlow or
            PyTorch; JAX has none, so there a `random_start` needs a seed), or an int / scalar
            int tensor: the start is then keyed by (seed, example index), `sat_tf.draws`, so an
            example starts at the same point in any batch, chunk or shard, on any backend.
        ids: With a `seed`, [B] int indices of the examples in the whole evaluation; None
            numbers the batch 0..B-1.
        loss_scale: See `input_gradient`; None is right for float32 and float16 models.

    Returns:
        `keras.ops.stop_gradient` of the adversarial images, float32, within `epsilon` of
        `images` and within [clip_min, clip_max].
    """
    check_arguments(
        epsilon=epsilon,
        step_size=step_size,
        num_steps=num_steps,
        prob_start_from_clean=prob_start_from_clean,
        clip_min=clip_min,
        clip_max=clip_max,
    )
    require_logits(model, where="pgd")
    config = dict(
        epsilon=epsilon,
        step_size=step_size,
        num_steps=num_steps,
        random_start=random_start,
        targeted=targeted,
        clip_min=clip_min,
        clip_max=clip_max,
        prob_start_from_clean=prob_start_from_clean,
        loss_scale=loss_scale,
    )
    # A Python seed stays a Python int (64 bits, split on the host by `sat_tf.draws`); a tensor
    # seed is an argument. The smooth-gradient switch is read when the model is traced.
    python_seed = seed is None or isinstance(seed, int | np.integer)
    key = (
        "pgd",
        *sorted(config.items()),
        seed if python_seed else "tensor",
        ids is None,
        activations.smooth_gradients_enabled(None),
    )

    def build(model_ref):
        def run(images, labels, tensor_seed, ids):
            seed_ = seed if python_seed else tensor_seed
            return _pgd(model_ref(), images, labels, seed=seed_, ids=ids, **config)

        return run

    args = (ops.convert_to_tensor(images), _labels(labels), None if python_seed else seed, ids)
    return backend.compiled_call(model, key, build, *args)


def _pgd(
    model,
    images,
    labels,
    *,
    epsilon,
    step_size,
    num_steps,
    random_start,
    targeted,
    clip_min,
    clip_max,
    prob_start_from_clean,
    seed,
    ids,
    loss_scale,
):
    images = ops.cast(images, "float32")
    bounds = {"epsilon": epsilon, "clip_min": clip_min, "clip_max": clip_max}
    x_adv = images
    if random_start:
        x_adv = project(
            uniform_start(
                images,
                epsilon=epsilon,
                prob_start_from_clean=prob_start_from_clean,
                seed=seed,
                ids=ids,
            ),
            images,
            **bounds,
        )
    direction = -1.0 if targeted else 1.0

    def body(i, x_adv):
        # The sign of the scaled gradient: positive per-example scales do not change it.
        _, gradient, _ = _scaled_input_gradient(model, x_adv, labels, loss_scale)
        return project(step(x_adv, direction * gradient, step_size=step_size), images, **bounds)

    x_adv = ops.fori_loop(0, num_steps, body, x_adv)
    return ops.stop_gradient(x_adv)


def fgsm(
    model, images, labels, *, epsilon, targeted=False, clip_min=0.0, clip_max=255.0, loss_scale=None
):
    """Fast gradient sign method (Goodfellow et al., 2015): one step of size `epsilon` from
    the clean image. Arguments as in `pgd`."""
    return pgd(
        model,
        images,
        labels,
        epsilon=epsilon,
        step_size=epsilon,
        num_steps=1,
        random_start=False,
        targeted=targeted,
        clip_min=clip_min,
        clip_max=clip_max,
        loss_scale=loss_scale,
    )


__all__ = [
    "check_arguments",
    "fgsm",
    "gradient_scale",
    "input_gradient",
    "output_activation",
    "per_example_loss",
    "pgd",
    "project",
    "require_logits",
    "step",
    "uniform_start",
    "uses_float16",
]
