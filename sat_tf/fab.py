"""FAB-T: the targeted Fast Adaptive Boundary attack, L-inf (Croce & Hein, ICML 2020).

FAB is a minimum-norm attack: it steps to the linearised decision boundary between the true
class and a target class, biased back towards the clean image, and keeps the closest
misclassified point it finds. The attack succeeds where that point lies within epsilon.
The algorithm and its constants (alpha_max 0.1, eta 1.05, beta 0.9, targets ranked 2nd, 3rd, ...
by the clean logits, no random start on the first restart) follow fra31/auto-attack's
`fab_base.py` (`attack_single_run`, `perturb`) and `fab_projections.py` (`projection_linf`), as
AutoAttack's "standard" version runs them (`autoattack.py`, `set_version`); the code is written
for TF.

The reference works on [0, 1] images; here the attack maps [clip_min, clip_max] onto [0, 1]
(an affine change of variables, under which every step is the same) and back.
Conventions as in `sat_tf.attacks`: keyword-only hyperparameters, `training=False`,
`tf.stop_gradient` on the result.
"""

import tensorflow as tf

from sat_tf import attacks


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
    side = tf.where(tf.reduce_sum(w * points, axis=1) - b >= 0.0, 1.0, -1.0)
    w = w * side[:, None]
    gap = tf.reduce_sum(w * points, axis=1) - b * side  # <w, z> must fall by this much.
    room = tf.where(w < 0.0, 1.0 - points, points)
    order = tf.argsort(room, axis=1)
    room_sorted = tf.gather(room, order, batch_dims=1)
    weight = tf.gather(tf.abs(w), order, batch_dims=1)
    cum_w = tf.cumsum(weight, axis=1)
    cum_wr = tf.cumsum(weight * room_sorted, axis=1)
    total = cum_w[:, -1:]
    reach = cum_wr + room_sorted * (total - cum_w)  # Fall reached at lam = room_sorted[k].
    feasible = reach[:, -1] > gap
    k = tf.reduce_sum(tf.cast(reach < gap[:, None], tf.int32), axis=1)
    before = lambda v: tf.where(  # noqa: E731 - v[k - 1], 0 for k = 0.
        k > 0, tf.gather(v, tf.maximum(k - 1, 0), batch_dims=1), 0.0
    )
    lam = tf.math.divide_no_nan(gap - before(cum_wr), total[:, 0] - before(cum_w))
    lam = tf.maximum(lam, 0.0)
    size = tf.where(feasible[:, None], tf.minimum(lam[:, None], room), room)
    return -tf.sign(w) * size


def _flat(x):
    return tf.reshape(x, [tf.shape(x)[0], -1])


def _make_fab_run(model, *, clip_min, clip_max, num_steps, alpha_max, eta, beta):
    """One FAB-T run on [0, 1] images u (x = clip_min + u * width); `model` is a `weakref.ref`."""
    width = clip_max - clip_min

    def logits_of(u):
        return tf.cast(model()(clip_min + u * width, training=False), tf.float32)

    def boundary(u, y, target):
        """f = z_target - z_y and its gradient w.r.t. u (fab_pt.py's targeted difference).

        Its gradient w.r.t. the logits is +-1, so unlike the cross-entropy's it does not
        underflow under float16 and needs no loss scaling.
        """
        with tf.GradientTape() as tape:
            tape.watch(u)
            logits = logits_of(u)
            f = tf.gather(logits, target, axis=1, batch_dims=1) - tf.gather(
                logits, y, axis=1, batch_dims=1
            )
            total = tf.reduce_sum(f)
        return f, tape.gradient(total, u)

    def run(x0, y, target):
        n = tf.shape(x0)[0]
        flat0 = _flat(x0)

        def body(i, x1, adv, best):
            f, grad = boundary(x1, y, target)
            w = _flat(grad)
            b = -f + tf.reduce_sum(w * _flat(x1), axis=1)
            d = linf_projection(
                tf.concat([_flat(x1), flat0], 0), tf.concat([w, w], 0), tf.concat([b, b], 0)
            )
            d1, d2 = d[:n], d[n:]
            a1 = tf.maximum(tf.reduce_max(tf.abs(d1), axis=1), 1e-8)
            a2 = tf.maximum(tf.reduce_max(tf.abs(d2), axis=1), 1e-8)
            alpha = tf.clip_by_value(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
            step = (_flat(x1) + eta * d1) * (1.0 - alpha) + (flat0 + eta * d2) * alpha
            x1 = tf.reshape(tf.clip_by_value(step, 0.0, 1.0), tf.shape(x0))
            fooled = tf.argmax(logits_of(x1), axis=1, output_type=tf.int32) != y
            dist = tf.reduce_max(tf.abs(_flat(x1) - flat0), axis=1)
            closer = fooled & (dist < best)
            adv = tf.where(closer[:, None, None, None], x1, adv)
            best = tf.where(closer, dist, best)
            # Back off towards the clean image after every success (beta).
            x1 = tf.where(fooled[:, None, None, None], x0 + (x1 - x0) * beta, x1)
            return i + 1, x1, adv, best

        best = tf.fill([n], 1e10)
        _, _, adv, best = tf.while_loop(
            lambda i, *_: i < num_steps, body, (tf.constant(0), x0, x0, best)
        )
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
        jit_compile: Compile each run with XLA.

    Returns:
        Adversarial images: the closest misclassified point where it is within `epsilon`, the
        clean image elsewhere; `tf.stop_gradient` applied.
    """
    x = tf.convert_to_tensor(images, tf.float32)
    y = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    width = float(clip_max) - float(clip_min)
    u = (x - clip_min) / width
    config = dict(
        clip_min=float(clip_min),
        clip_max=float(clip_max),
        num_steps=int(num_steps),
        alpha_max=float(alpha_max),
        eta=float(eta),
        beta=float(beta),
    )
    key = ("fab-t",) + tuple(sorted(config.items()))
    run = attacks.compiled(
        model, key, lambda ref: _make_fab_run(ref, **config), u, y, y, jit_compile=jit_compile
    )
    logits = tf.cast(model(x, training=False), tf.float32)
    ranking = tf.argsort(logits, axis=1, direction="DESCENDING", stable=True)
    fooled = fooled_clean = tf.argmax(logits, axis=1, output_type=tf.int32) != y
    adv = u
    for rank in range(1, attacks.target_classes(target_classes, logits.shape[1], who="FAB-T") + 1):
        active = tf.where(~fooled)[:, 0]
        if active.shape[0] == 0:
            break
        adv_run, dist = run(
            tf.gather(u, active), tf.gather(y, active), tf.gather(ranking[:, rank], active)
        )
        # Success needs a misclassified point within epsilon (fab_base.py `perturb`).
        hit = dist <= epsilon / width
        index = tf.boolean_mask(active, hit)[:, None]
        adv = tf.tensor_scatter_nd_update(adv, index, tf.boolean_mask(adv_run, hit))
        fooled = tf.tensor_scatter_nd_update(fooled, index, tf.ones_like(index[:, 0], tf.bool))
    # Mapping back to pixels can round a hair past epsilon: project (float noise only); the
    # examples FAB-T did not fool get their clean image back exactly.
    bounds = dict(epsilon=epsilon, clip_min=clip_min, clip_max=clip_max)
    adv = attacks.project(clip_min + adv * width, x, **bounds)
    return tf.stop_gradient(tf.where((fooled & ~fooled_clean)[:, None, None, None], adv, x))
