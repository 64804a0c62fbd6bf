"""Auto-PGD (APGD-CE, APGD-T) and the DLR losses, L-inf.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020. The algorithm follows the paper and fra31/auto-attack's
`autopgd_base.py`; the code is written for TF.

Conventions as in `sat_tf.attacks`: functions of (model, images, labels, *, keyword-only
hyperparameters); pixels in [clip_min, clip_max] (default [0, 255]), `epsilon` in the same units;
the model is called with `training=False`; fixed seeds make every run reproducible; the result is
`tf.stop_gradient(x_adv)`. Inner loops are `tf.function` graphs, traced once for any batch size
(XLA only with `jit_compile=True`, for GPU/TPU: on CPU its convolutions measured 2.7x slower
than TensorFlow's oneDNN kernels). Examples that are already
misclassified leave the batch at every checkpoint and between restarts/target classes, so they
are not recomputed.
"""

import tensorflow as tf

from sat_tf import attacks, draws
from sat_tf.attacks import compiled, project


def dlr_loss(logits, labels):
    """Difference of Logits Ratio, -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3), (Croce & Hein, Eq. 6).

    Args:
        logits: [B, K] float logits, K >= 3.
        labels: [B] int true classes.

    Returns:
        [B] loss, to be maximized; shift- and scale-invariant in the logits.
    """
    logits = tf.cast(logits, tf.float32)
    top = tf.math.top_k(logits, k=3).values
    true = tf.gather(logits, labels, axis=1, batch_dims=1)
    other = _best_other(logits, labels)
    return -(true - other) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits, labels, targets):
    """Targeted DLR, -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) (Croce & Hein, Eq. 7); K >= 4."""
    logits = tf.cast(logits, tf.float32)
    top = tf.math.top_k(logits, k=4).values
    true = tf.gather(logits, labels, axis=1, batch_dims=1)
    target = tf.gather(logits, targets, axis=1, batch_dims=1)
    return -(true - target) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def margin(logits, labels):
    """z_y - max_{i!=y} z_i: positive while the example is classified correctly."""
    logits = tf.cast(logits, tf.float32)
    return tf.gather(logits, labels, axis=1, batch_dims=1) - _best_other(logits, labels)


def check_num_classes(num_classes, *, loss, targeted):
    """Raises ValueError where the DLR losses cannot run: they rank the top 3 (4 targeted) logits.

    The reference code only warns here and then fails inside the loss; the message says what to
    run instead.
    """
    if loss != "dlr":
        return
    needed = 4 if targeted else 3
    if num_classes < needed:
        name = "APGD-T (targeted DLR loss)" if targeted else "APGD-DLR"
        raise ValueError(
            f"{name} needs at least {needed} classes; the model has {num_classes}. Use an "
            "attack without the DLR loss, e.g. auto_attack(..., attacks=['apgd-ce', 'fab-t', "
            "'square']) or apgd(..., loss='ce')."
        )


def _best_other(logits, labels):
    mask = tf.one_hot(labels, tf.shape(logits)[1], on_value=-float("inf"), off_value=0.0)
    return tf.reduce_max(logits + mask, axis=1)


def _loss(name, targeted, logits, labels, targets):
    if name == "dlr":
        return targeted_dlr_loss(logits, labels, targets) if targeted else dlr_loss(logits, labels)
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits
    logits = tf.cast(logits, tf.float32)
    return -cross_entropy(targets, logits) if targeted else cross_entropy(labels, logits)


def checkpoints(num_steps):
    """The iterations after which APGD may halve its step (Croce & Hein, Sec. 3.2).

    As fra31/auto-attack's `autopgd_base.py` computes them for any step count: the first window
    is max(int(0.22 N), 1) iterations long, each next one max(int(0.03 N), 1) shorter, but at
    least max(int(0.06 N), 1) (the paper's p_j + max(p_j - p_{j-1} - 0.03, 0.06), rounded down
    per window). Checkpoints at or after the last iteration change nothing and are left out.
    """
    window = max(int(0.22 * num_steps), 1)
    shrink, shortest = max(int(0.03 * num_steps), 1), max(int(0.06 * num_steps), 1)
    found, at = [], window
    while at < num_steps:
        found.append(at)
        window = max(window - shrink, shortest)
        at += window
    return found


def _per_example(v, x):
    return tf.reshape(v, [-1] + [1] * (len(x.shape) - 1))


def _make_apgd_fns(model, loss, targeted, epsilon, rho, clip_min, clip_max, eot_iter, float16):
    """(init, segment) of one APGD run; `model` is a `weakref.ref` (`attacks.compiled`)."""
    bounds = dict(epsilon=epsilon, clip_min=clip_min, clip_max=clip_max)

    def one_pass(x, s):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = tf.cast(model()(x, training=False), tf.float32)
            if float16:
                # Under float16 the input gradient of a confident model underflows; scale each
                # example's loss by a power of two (exact to undo), as `attacks.input_gradient`.
                with tf.GradientTape() as inner:
                    inner.watch(logits)
                    value = _loss(loss, targeted, logits, s["y"], s["target"])
                scale = attacks.gradient_scale(inner.gradient(value, logits))
            else:
                value = _loss(loss, targeted, logits, s["y"], s["target"])
                scale = tf.ones_like(value)
            total = tf.reduce_sum(value * scale)
        grad = tape.gradient(total, x) / _per_example(scale, x)
        return value, grad, tf.argmax(logits, axis=1, output_type=tf.int32) != s["y"]

    def loss_grad(x, s):
        if eot_iter == 1:
            return one_pass(x, s)

        # Expectation over transformation: the mean gradient of `eot_iter` passes of a
        # randomized model; loss and prediction of the last pass (autopgd_base.py).
        def body(i, grad, value, fooled):
            value, g, fooled = one_pass(x, s)
            return i + 1, grad + g / float(eot_iter), value, fooled

        value, grad, fooled = one_pass(x, s)
        _, grad, value, fooled = tf.while_loop(
            lambda i, *_: i < eot_iter, body, (1, grad / float(eot_iter), value, fooled)
        )
        return value, grad, fooled

    def init(s):
        value, grad, fooled = loss_grad(s["x_cur"], s)
        zeros = tf.zeros_like(value)
        return dict(
            s,
            x_prev=s["x_cur"],
            grad=grad,
            # The first window compares its first loss with 0, not with the start's loss: the
            # reference's check_oscillation reads loss_steps[-1], a row still all zeros then.
            loss_cur=zeros,
            x_best=s["x_cur"],
            loss_best=value,
            grad_best=grad,
            x_adv=s["x_cur"],
            fooled=fooled,
            step=zeros + 2.0 * epsilon,
            n_increase=zeros,
            best_at_check=value,
            reduced_at_check=tf.ones_like(fooled),
        )

    def iterate(k, s):
        x_cur, x = s["x_cur"], s["x"]
        # Momentum 0.75, none on the first step (official code: a = 1 at i = 0).
        a = tf.where(k == 0, 1.0, 0.75)
        z = project(x_cur + _per_example(s["step"], x) * tf.sign(s["grad"]), x, **bounds)
        x_new = project(x_cur + a * (z - x_cur) + (1.0 - a) * (x_cur - s["x_prev"]), x, **bounds)
        value, grad, fooled = loss_grad(x_new, s)
        better = value > s["loss_best"]
        pick = lambda c, new, old: tf.where(_per_example(c, new), new, old)  # noqa: E731
        return k + 1, dict(
            s,
            x_prev=x_cur,
            x_cur=x_new,
            grad=grad,
            loss_cur=value,
            x_adv=pick(fooled, x_new, s["x_adv"]),
            fooled=s["fooled"] | fooled,
            n_increase=s["n_increase"] + tf.cast(value > s["loss_cur"], tf.float32),
            x_best=pick(better, x_new, s["x_best"]),
            grad_best=pick(better, grad, s["grad_best"]),
            loss_best=tf.maximum(value, s["loss_best"]),
        )

    def segment(s, start, stop):
        _, s = tf.while_loop(lambda k, _: k < stop, iterate, (start, s))
        # Halve the step where (1) at most rho of the window's steps raised the loss, or (2) the
        # step was not halved last time and the best loss has not improved since; restart from
        # x_best (autopgd_base.py: `t <= k * k3` and `loss_best_last_check >= loss_best`).
        window = tf.cast(stop - tf.maximum(start, 0), tf.float32)
        halve = (s["n_increase"] <= rho * window) | (
            ~s["reduced_at_check"] & (s["loss_best"] <= s["best_at_check"])
        )
        back = _per_example(halve, s["x_cur"])
        return dict(
            s,
            step=tf.where(halve, s["step"] / 2.0, s["step"]),
            x_cur=tf.where(back, s["x_best"], s["x_cur"]),
            grad=tf.where(back, s["grad_best"], s["grad"]),
            n_increase=tf.zeros_like(s["step"]),
            best_at_check=s["loss_best"],
            reduced_at_check=halve,
        )

    return init, segment


def _apgd_single_run(model, x, y, target, x_start, *, num_steps, config, jit_compile):
    """One APGD run on a batch; returns (fooled [B] bool, x_adv).

    x_adv is the first misclassified iterate where the attack succeeded and the highest-loss
    iterate elsewhere. Fooled examples leave the batch at every checkpoint (early exit).
    """
    key = ("apgd",) + tuple(sorted(config.items()))
    index = tf.range(tf.shape(y)[0])
    s = {"x": x, "y": y, "target": target, "x_cur": x_start, "index": index}
    init = compiled(
        model,
        key + ("init",),
        lambda ref: _make_apgd_fns(ref, **config)[0],
        s,
        jit_compile=jit_compile,
    )
    s = init(s)
    segment = compiled(
        model,
        key + ("segment",),
        lambda ref: _make_apgd_fns(ref, **config)[1],
        s,
        tf.constant(0),
        tf.constant(1),
        jit_compile=jit_compile,
    )
    out_adv, out_fooled = s["x_best"], tf.zeros_like(s["fooled"])
    bounds = [0] + checkpoints(num_steps) + [num_steps]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        done = s["fooled"]
        out_adv = _scatter(out_adv, s["index"], s["x_adv"], done)
        out_fooled = _scatter(out_fooled, s["index"], done, done)
        s = {name: tf.boolean_mask(v, ~done) for name, v in s.items()}
        if s["index"].shape[0] == 0:
            return out_fooled, out_adv
        s = segment(s, tf.constant(start), tf.constant(stop))
    final = tf.where(_per_example(s["fooled"], s["x_adv"]), s["x_adv"], s["x_best"])
    everyone = tf.ones_like(s["fooled"])
    return _scatter(out_fooled, s["index"], s["fooled"], everyone), _scatter(
        out_adv, s["index"], final, everyone
    )


def _scatter(out, index, values, where):
    """out[index[where]] = values[where]."""
    return tf.tensor_scatter_nd_update(
        out, tf.boolean_mask(index, where)[:, None], tf.boolean_mask(values, where)
    )


def apgd(
    model,
    images,
    labels,
    *,
    epsilon,
    num_steps=100,
    loss="ce",
    targeted=False,
    num_restarts=1,
    target_classes=9,
    rho=0.75,
    eot_iter=1,
    seed=0,
    ids=None,
    clip_min=0.0,
    clip_max=255.0,
    jit_compile=False,
):
    """Auto-PGD, L-inf (Croce & Hein 2020, Alg. 1), untargeted or targeted.

    Step 2 * epsilon, momentum 0.75, and at each checkpoint (see `checkpoints`) the step is
    halved and the iterate restarts from the best point where fewer than `rho` of the window's
    steps raised the loss, or where the step was not halved at the last checkpoint and the best
    loss is unchanged.
    Random start: uniform noise rescaled so that its largest entry is +-epsilon, as the official
    code starts; the noise of run r (restarts and target classes counted together) is keyed by
    (seed, example index, r), `sat_tf.draws`, so an example starts at the same point whatever
    batch, chunk or shard of an evaluation it is attacked in.

    Args:
        model: Keras model mapping images to logits; called with `training=False`.
        images: [B, H, W, C] pixels in [clip_min, clip_max].
        labels: [B] int true classes.
        epsilon: L-inf radius, in pixel units.
        num_steps: Iterations per run (one gradient each).
        loss: "ce" (cross-entropy) or "dlr" (difference of logits ratio, `dlr_loss`).
        targeted: If True ("APGD-T" with loss="dlr"), for each of the `target_classes` classes
            ranked 2nd, 3rd, ... by the clean logits, maximize `targeted_dlr_loss` (or -CE of the
            target with loss="ce") on the examples still classified correctly.
        num_restarts: Random restarts per target (per run when untargeted); only examples still
            correct are restarted.
        target_classes: Number of target classes for the targeted attack; with K classes at
            most K - 1 are used (with a warning, as the reference code warns).
        rho: Threshold of the step-halving condition 1.
        eot_iter: Gradients averaged per step (expectation over transformation), for
            randomized models; 1 for deterministic ones.
        seed: Seed of the random starts (an int or a scalar int tensor); same seed, same result.
        ids: [B] int indices of the examples in the whole evaluation, which key their random
            starts; None numbers the batch 0..B-1.
        clip_min: Lowest valid pixel value.
        clip_max: Highest valid pixel value.
        jit_compile: Compile the inner loops with XLA (pays on GPU/TPU; on CPU TensorFlow's
            oneDNN convolutions are faster).

    Returns:
        Adversarial images: the first misclassified iterate where the attack succeeded, the
        highest-loss iterate of the last run elsewhere (the clean image if the clean prediction was
        already wrong); `tf.stop_gradient` applied.
    """
    if loss not in ("ce", "dlr"):
        raise ValueError(f"loss must be 'ce' or 'dlr'. Received: loss={loss!r}")
    if not (isinstance(eot_iter, int) and eot_iter >= 1):
        raise ValueError(f"`eot_iter` must be an int >= 1. Received: eot_iter={eot_iter!r}")
    x = tf.convert_to_tensor(images, tf.float32)
    y = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    config = dict(
        loss=loss,
        targeted=bool(targeted),
        epsilon=float(epsilon),
        rho=float(rho),
        clip_min=float(clip_min),
        clip_max=float(clip_max),
        eot_iter=eot_iter,
        float16=attacks.uses_float16(model),
    )
    logits = tf.cast(model(x, training=False), tf.float32)
    check_num_classes(logits.shape[1], loss=loss, targeted=targeted)
    fooled = tf.argmax(logits, axis=1, output_type=tf.int32) != y
    ranking = tf.argsort(logits, axis=1, direction="DESCENDING", stable=True)
    ranks = [None]
    if targeted:
        ranks = range(1, attacks.target_classes(target_classes, logits.shape[1], who="APGD-T") + 1)
    if ids is None:
        ids = tf.range(tf.shape(y)[0], dtype=tf.int64)
    keys = draws.keys(seed, ids, "apgd")
    adv, run = x, 0
    for rank in ranks:
        target = y if rank is None else ranking[:, rank]
        for _ in range(num_restarts):
            active = tf.where(~fooled)[:, 0]
            if active.shape[0] == 0:
                return tf.stop_gradient(adv)
            xa = tf.gather(x, active)
            noise = 2.0 * draws.uniform(tf.gather(keys, active), xa.shape[1:], run) - 1.0
            largest = tf.reduce_max(tf.abs(tf.reshape(noise, [tf.shape(xa)[0], -1])), axis=1)
            noise = epsilon * noise / (_per_example(largest, noise) + 1e-12)
            start = project(xa + noise, xa, epsilon=epsilon, clip_min=clip_min, clip_max=clip_max)
            hit, adv_run = _apgd_single_run(
                model,
                xa,
                tf.gather(y, active),
                tf.gather(target, active),
                start,
                num_steps=num_steps,
                config=config,
                jit_compile=jit_compile,
            )
            adv = tf.tensor_scatter_nd_update(adv, active[:, None], adv_run)
            fooled = tf.tensor_scatter_nd_update(fooled, active[:, None], hit)
            run += 1
    return tf.stop_gradient(adv)
