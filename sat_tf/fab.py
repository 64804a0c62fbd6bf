"""FAB-T: the targeted Fast Adaptive Boundary attack, L-inf (Croce & Hein, ICML 2020).

FAB is a minimum-norm attack: it steps to the linearised decision boundary between the true
class and a target class, biased back towards the clean image, and keeps the closest
misclassified point it finds. The attack succeeds where that point lies within epsilon.
The algorithm and its constants (alpha_max 0.1, eta 1.05, beta 0.9, targets ranked 2nd, 3rd, ...
by the clean logits, no random start on the first restart) follow fra31/auto-attack's
`fab_base.py` (`attack_single_run`, `perturb`) and `fab_projections.py` (`projection_linf`), as
AutoAttack's "standard" version runs them (`autoattack.py`, `set_version`); the code is
`keras.ops`, the same on every Keras backend (`sat_tf.backend` gives the input gradient and
the compilation).

The reference works on [0, 1] images; here the attack maps [clip_min, clip_max] onto [0, 1]
(an affine change of variables, under which every step is the same) and back.
Conventions as in `sat_tf.attacks`: keyword-only hyperparameters, `training=False`,
`keras.ops.stop_gradient` on the result.
"""

import numpy as np
from keras import ops

from sat_tf import attacks, backend


def linf_projection(points, w, b):
    """Smallest L-inf step onto the hyperplane <w, z> = b that stays in the box [0, 1].

    Moving coordinate i by lam towards the box face that lowers (or raises) <w, z> changes
    <w, z> by |w_i| * min(lam, room_i), with room_i the distance to that face; the smallest lam
    that closes the gap is found on the sorted rooms. Where the hyperplane cannot be reached
    inside the box the step goes to the box corner nearest to it (as `projection_linf` does).

    Args:
        points: [N, D] float32 in [0, 1].
        w: [N, D] normals.
        b: [N] offsets.

    Returns:
        [N, D] steps d: points + d lies on the hyperplane (where reachable) and in [0, 1].
    """
    points, w, b = (ops.convert_to_tensor(v, "float32") for v in (points, w, b))
    side = ops.where(ops.sum(w * points, axis=1) - b >= 0.0, 1.0, -1.0)
    w = w * side[:, None]
    gap = ops.sum(w * points, axis=1) - b * side  # <w, z> must fall by this much.
    room = ops.where(w < 0.0, 1.0 - points, points)
    order = ops.argsort(room, axis=1)
    room_sorted = ops.take_along_axis(room, order, axis=1)
    weight = ops.take_along_axis(ops.abs(w), order, axis=1)
    cum_w = ops.cumsum(weight, axis=1)
    cum_wr = ops.cumsum(weight * room_sorted, axis=1)
    total = cum_w[:, -1:]
    reach = cum_wr + room_sorted * (total - cum_w)  # Fall reached at lam = room_sorted[k].
    feasible = reach[:, -1] > gap
    k = ops.sum(ops.cast(reach < gap[:, None], "int32"), axis=1)
    previous = ops.maximum(k - 1, 0)[:, None]

    def before(v):  # v[k - 1], 0 for k = 0.
        return ops.where(k > 0, ops.take_along_axis(v, previous, axis=1)[:, 0], 0.0)

    lam = ops.divide_no_nan(gap - before(cum_wr), total[:, 0] - before(cum_w))
    lam = ops.maximum(lam, 0.0)
    size = ops.where(feasible[:, None], ops.minimum(lam[:, None], room), room)
    return -ops.sign(w) * size


def _flat(x):
    return ops.reshape(x, (-1, int(np.prod(x.shape[1:]))))


def _per_example(mask, x):
    return ops.reshape(mask, (-1,) + (1,) * (len(x.shape) - 1))


def _make_fab_run(model, *, clip_min, clip_max, num_steps, alpha_max, eta, beta):
    """One FAB-T run on [0, 1] images u (x = clip_min + u * width); `model` is a `weakref.ref`."""
    width = clip_max - clip_min

    def logits_of(u):
        return ops.cast(model()(clip_min + u * width, training=False), "float32")

    def boundary(u, y, target):
        """f = z_target - z_y and its gradient w.r.t. u (fab_pt.py's targeted difference).

        One gradient of the batch's sum gives every example's row: examples do not interact.
        Its gradient w.r.t. the logits is +-1, so unlike the cross-entropy's it does not
        underflow under float16 and needs no loss scaling.
        """

        def difference(u):
            logits = logits_of(u)
            pick = lambda c: ops.take_along_axis(logits, c[:, None], axis=1)[:, 0]  # noqa: E731
            f = pick(target) - pick(y)
            return ops.sum(f), f

        _, f, gradient = backend.value_and_gradient(difference, u)
        return f, gradient

    def run(x0, y, target):
        flat0 = _flat(x0)

        def body(i, x1, adv, best):
            f, grad = boundary(x1, y, target)
            w = _flat(grad)
            b = -f + ops.sum(w * _flat(x1), axis=1)
            # Both projections in one call: from the current point and from the clean image.
            d1, d2 = ops.split(
                linf_projection(
                    ops.concatenate([_flat(x1), flat0], 0),
                    ops.concatenate([w, w], 0),
                    ops.concatenate([b, b], 0),
                ),
                2,
            )
            a1 = ops.maximum(ops.max(ops.abs(d1), axis=1), 1e-8)
            a2 = ops.maximum(ops.max(ops.abs(d2), axis=1), 1e-8)
            alpha = ops.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
            step = (_flat(x1) + eta * d1) * (1.0 - alpha) + (flat0 + eta * d2) * alpha
            x1 = ops.reshape(ops.clip(step, 0.0, 1.0), (-1, *x0.shape[1:]))
            fooled = ops.cast(ops.argmax(logits_of(x1), axis=1), "int32") != y
            dist = ops.max(ops.abs(_flat(x1) - flat0), axis=1)
            closer = fooled & (dist < best)
            adv = ops.where(_per_example(closer, x1), x1, adv)
            best = ops.where(closer, dist, best)
            # Back off towards the clean image after every success (beta).
            x1 = ops.where(_per_example(fooled, x1), x0 + (x1 - x0) * beta, x1)
            return i + 1, x1, adv, best

        best = ops.full_like(flat0[:, 0], 1e10)
        start = ops.convert_to_tensor(0, "int32")
        _, _, adv, best = ops.while_loop(lambda i, *_: i < num_steps, body, (start, x0, x0, best))
        return adv, best

    return run


def fab_targeted(
    model,
    images,
    labels,
    *,
    epsilon,
    num_steps=100,
    target_classes=9,
    alpha_max=0.1,
    eta=1.05,
    beta=0.9,
    clip_min=0.0,
    clip_max=255.0,
    jit_compile=False,
):
    """FAB-T, L-inf: for each target class in turn, on the examples still correct.

    The targets are the classes ranked 2nd, 3rd, ... (`target_classes` of them, at most K - 1)
    by the clean logits. One run per target starts at the clean image (AutoAttack's FAB-T uses
    1 restart, so no random start), takes `num_steps` projection steps and keeps the closest
    misclassified point; an example counts as fooled when that point is within `epsilon`.

    Args:
        model: Keras model mapping images to logits; called with `training=False`.
        images: [B, H, W, C] pixels in [clip_min, clip_max].
        labels: [B] int true classes.
        epsilon: L-inf radius, in pixel units.
        num_steps: Iterations per target (one gradient and one forward pass each).
        target_classes: Number of target classes.
        alpha_max: Largest weight of the step from the clean image.
        eta: Overshoot of each projection.
        beta: Back-off factor towards the clean image after a success.
        clip_min: Lowest valid pixel value.
        clip_max: Highest valid pixel value.
        jit_compile: Compile each run with XLA (TensorFlow; JAX always compiles).

    Returns:
        Adversarial images: the closest misclassified point where it is within `epsilon`, the
        clean image elsewhere; `keras.ops.stop_gradient` applied.
    """
    # The bookkeeping between runs is NumPy on the host: under JAX an eager op compiles once
    # per shape, and the number of examples still standing changes with every target.
    x = np.asarray(backend.to_numpy(images), np.float32)
    y = np.asarray(backend.to_numpy(labels)).astype(np.int32).reshape(-1)
    width = float(clip_max) - float(clip_min)
    u = (x - np.float32(clip_min)) / np.float32(width)
    config = dict(
        clip_min=float(clip_min),
        clip_max=float(clip_max),
        num_steps=int(num_steps),
        alpha_max=float(alpha_max),
        eta=float(eta),
        beta=float(beta),
    )
    key = ("fab-t",) + tuple(sorted(config.items()))
    run = backend.compiled(
        model, key, lambda ref: _make_fab_run(ref, **config), u, y, y, jit_compile=jit_compile
    )
    logits = backend.to_numpy(_clean_logits(model, x, jit_compile))
    # Descending, ties in class order (a stable sort of the negated logits).
    ranking = np.argsort(-logits, axis=1, kind="stable").astype(np.int32)
    fooled_clean = np.argmax(logits, axis=1) != y
    fooled = fooled_clean.copy()
    adv = u.copy()
    for rank in range(1, attacks.target_classes(target_classes, logits.shape[1], who="FAB-T") + 1):
        active = np.flatnonzero(~fooled)
        if not len(active):
            break
        # Padded to a batch bucket (copies of the last one; each example runs on its own), so
        # under JAX the shrinking set of examples compiles a few shapes, not one per target.
        rows = active[np.minimum(np.arange(backend.batch_bucket(len(active))), len(active) - 1)]
        adv_run, dist = run(u[rows], y[rows], ranking[rows, rank])
        adv_run = backend.to_numpy(adv_run)[: len(active)]
        # Success needs a misclassified point within epsilon (fab_base.py `perturb`).
        hit = backend.to_numpy(dist)[: len(active)] <= epsilon / width
        adv[active[hit]] = adv_run[hit]
        fooled[active[hit]] = True
    # Mapping back to pixels can round a hair past epsilon: project (float noise only); the
    # examples FAB-T did not fool get their clean image back exactly.
    bounds = dict(epsilon=epsilon, clip_min=clip_min, clip_max=clip_max)
    adv = attacks.project(np.float32(clip_min) + adv * np.float32(width), x, **bounds)
    keep = (fooled & ~fooled_clean).reshape((-1,) + (1,) * (x.ndim - 1))
    return ops.stop_gradient(ops.where(keep, adv, x))


def _clean_logits(model, x, jit_compile):
    """The model's float32 logits, compiled (an eager call under JAX compiles every layer once
    per batch size)."""

    def build(ref):
        return lambda x: ops.cast(ref()(x, training=False), "float32")

    return backend.compiled(model, ("logits",), build, x, jit_compile=jit_compile)(x)


__all__ = ["fab_targeted", "linf_projection"]
