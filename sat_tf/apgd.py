"""Auto-PGD (APGD-CE, APGD-T) and the DLR losses, L-inf.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020. The algorithm follows the paper and fra31/auto-attack's
`autopgd_base.py`; the code is `keras.ops`, for every Keras backend.

Conventions as in `sat_tf.attacks`: functions of (model, images, labels, *, keyword-only
hyperparameters); pixels in [clip_min, clip_max] (default [0, 255]), `epsilon` in the same units;
the model is called with `training=False`; fixed seeds make every run reproducible, with the same
random starts on every backend (`sat_tf.draws`); the result is `keras.ops.stop_gradient(x_adv)`.
Inner loops are compiled (`sat_tf.backend.compiled`): under TensorFlow `tf.function` graphs traced
once for any batch size (XLA only with `jit_compile=True`, for GPU/TPU: on CPU its convolutions
measured 2.7x slower than TensorFlow's oneDNN kernels), under JAX `jax.jit`, once per batch size.
Examples that are already misclassified leave the batch at every checkpoint and between
restarts/target classes, so they are not recomputed; that bookkeeping runs eagerly, on the host.
"""

import numpy as np
from keras import ops

from sat_tf import attacks, backend, draws
from sat_tf.attacks import project


def dlr_loss(logits, labels):
    """Difference of Logits Ratio, -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3), (Croce & Hein, Eq. 6).

    Args:
        logits: [B, K] float logits, K >= 3.
        labels: [B] int true classes.

    Returns:
        [B] loss, to be maximized; shift- and scale-invariant in the logits.
    """
    logits = ops.cast(logits, "float32")
    top = ops.top_k(logits, k=3)[0]
    true = _pick(logits, labels)
    other = _best_other(logits, labels)
    return -(true - other) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits, labels, targets):
    """Targeted DLR, -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) (Croce & Hein, Eq. 7); K >= 4."""
    logits = ops.cast(logits, "float32")
    top = ops.top_k(logits, k=4)[0]
    true = _pick(logits, labels)
    target = _pick(logits, targets)
    return -(true - target) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def margin(logits, labels):
    """z_y - max_{i!=y} z_i: positive while the example is classified correctly."""
    logits = ops.cast(logits, "float32")
    return _pick(logits, labels) - _best_other(logits, labels)


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


def _pick(logits, labels):
    """logits[b, labels[b]]."""
    labels = ops.cast(ops.reshape(labels, (-1, 1)), "int32")
    return ops.take_along_axis(logits, labels, axis=1)[:, 0]


def _best_other(logits, labels):
    mask = ops.where(ops.one_hot(labels, logits.shape[1]) > 0, -float("inf"), 0.0)
    return ops.max(logits + mask, axis=1)


def _loss(name, targeted, logits, labels, targets):
    if name == "dlr":
        return targeted_dlr_loss(logits, labels, targets) if targeted else dlr_loss(logits, labels)
    logits = ops.cast(logits, "float32")
    if targeted:
        return -ops.sparse_categorical_crossentropy(targets, logits, from_logits=True)
    return ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)


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
    return ops.reshape(v, (-1,) + (1,) * (len(x.shape) - 1))


def _predicted(logits):
    return ops.cast(ops.argmax(logits, axis=1), "int32")


def _make_apgd_fns(model, loss, targeted, epsilon, rho, clip_min, clip_max, eot_iter, float16):
    """(init, segment) of one APGD run; `model` is a `weakref.ref` (`backend.compiled`)."""
    bounds = dict(epsilon=epsilon, clip_min=clip_min, clip_max=clip_max)

    def one_pass(x, s):
        def total(x):
            logits = ops.cast(model()(x, training=False), "float32")
            if float16:
                # Under float16 the input gradient of a confident model underflows; scale each
                # example's loss by a power of two (exact to undo), as `attacks.input_gradient`.
                def summed(z):
                    value = _loss(loss, targeted, z, s["y"], s["target"])
                    return ops.sum(value), value

                _, value, logit_gradient = backend.value_and_gradient(summed, logits)
                scale = attacks.gradient_scale(logit_gradient)
            else:
                value = _loss(loss, targeted, logits, s["y"], s["target"])
                scale = ops.ones_like(value)
            return ops.sum(value * scale), (value, scale, _predicted(logits) != s["y"])

        _, (value, scale, fooled), grad = backend.value_and_gradient(total, x)
        return value, grad / _per_example(scale, x), fooled

    def loss_grad(x, s):
        if eot_iter == 1:
            return one_pass(x, s)

        # Expectation over transformation: the mean gradient of `eot_iter` passes of a
        # randomized model; loss and prediction of the last pass (autopgd_base.py).
        def body(i, grad, value, fooled):
            value, g, fooled = one_pass(x, s)
            return i + 1, grad + g / float(eot_iter), value, fooled

        value, grad, fooled = one_pass(x, s)
        _, grad, value, fooled = ops.while_loop(
            lambda i, *_: i < eot_iter, body, (1, grad / float(eot_iter), value, fooled)
        )
        return value, grad, fooled

    def init(s):
        value, grad, fooled = loss_grad(s["x_cur"], s)
        zeros = ops.zeros_like(value)
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
            reduced_at_check=ops.ones_like(fooled),
        )

    def iterate(k, s):
        x_cur, x = s["x_cur"], s["x"]
        # Momentum 0.75, none on the first step (official code: a = 1 at i = 0).
        a = ops.where(k == 0, 1.0, 0.75)
        z = project(x_cur + _per_example(s["step"], x) * ops.sign(s["grad"]), x, **bounds)
        x_new = project(x_cur + a * (z - x_cur) + (1.0 - a) * (x_cur - s["x_prev"]), x, **bounds)
        value, grad, fooled = loss_grad(x_new, s)
        better = value > s["loss_best"]
        pick = lambda c, new, old: ops.where(_per_example(c, new), new, old)  # noqa: E731
        return k + 1, dict(
            s,
            x_prev=x_cur,
            x_cur=x_new,
            grad=grad,
            loss_cur=value,
            x_adv=pick(fooled, x_new, s["x_adv"]),
            fooled=s["fooled"] | fooled,
            n_increase=s["n_increase"] + ops.cast(value > s["loss_cur"], "float32"),
            x_best=pick(better, x_new, s["x_best"]),
            grad_best=pick(better, grad, s["grad_best"]),
            loss_best=ops.maximum(value, s["loss_best"]),
        )

    def segment(s, start, stop):
        _, s = ops.while_loop(lambda k, _: k < stop, iterate, (start, s))
        # Halve the step where (1) at most rho of the window's steps raised the loss, or (2) the
        # step was not halved last time and the best loss has not improved since; restart from
        # x_best (autopgd_base.py: `t <= k * k3` and `loss_best_last_check >= loss_best`).
        window = ops.cast(stop - ops.maximum(start, 0), "float32")
        halve = (s["n_increase"] <= rho * window) | (
            ~s["reduced_at_check"] & (s["loss_best"] <= s["best_at_check"])
        )
        back = _per_example(halve, s["x_cur"])
        return dict(
            s,
            step=ops.where(halve, s["step"] / 2.0, s["step"]),
            x_cur=ops.where(back, s["x_best"], s["x_cur"]),
            grad=ops.where(back, s["grad_best"], s["grad"]),
            n_increase=ops.zeros_like(s["step"]),
            best_at_check=s["loss_best"],
            reduced_at_check=halve,
        )

    return init, segment


def _apgd_single_run(model, x, y, target, x_start, *, num_steps, config, jit_compile):
    """One APGD run on a batch of NumPy arrays; returns (fooled [B] bool, x_adv), NumPy.

    x_adv is the first misclassified iterate where the attack succeeded and the highest-loss
    iterate elsewhere. Fooled examples leave the batch at every checkpoint (early exit). The
    state waits on the host between segments: selecting the examples that stay is NumPy
    indexing, exact, and compiles nothing for each new batch size.
    """
    key = ("apgd",) + tuple(sorted(config.items()))
    index = np.arange(len(y), dtype=np.int32)
    s = {"x": x, "y": y, "target": target, "x_cur": x_start, "index": index}
    init = backend.compiled(
        model,
        key + ("init",),
        lambda ref: _make_apgd_fns(ref, **config)[0],
        s,
        jit_compile=jit_compile,
    )
    s = _padded(init, s)
    counter = lambda k: ops.convert_to_tensor(k, "int32")  # noqa: E731
    segment = backend.compiled(
        model,
        key + ("segment",),
        lambda ref: _make_apgd_fns(ref, **config)[1],
        s,
        counter(0),
        counter(1),
        jit_compile=jit_compile,
    )
    out_adv, out_fooled = s["x_best"].copy(), np.zeros(len(y), bool)
    bounds = [0] + checkpoints(num_steps) + [num_steps]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        done = s["fooled"]
        out_adv[s["index"][done]] = s["x_adv"][done]
        out_fooled[s["index"][done]] = True
        s = {name: v[~done] for name, v in s.items()}
        if len(s["index"]) == 0:
            return out_fooled, out_adv
        s = _padded(segment, s, counter(start), counter(stop))
    final = np.where(s["fooled"].reshape((-1,) + (1,) * (x.ndim - 1)), s["x_adv"], s["x_best"])
    out_fooled[s["index"]] = s["fooled"]
    out_adv[s["index"]] = final
    return out_fooled, out_adv


def _padded(fn, s, *args):
    """`fn(s, *args)` on the NumPy batch `s` padded to `backend.batch_bucket` rows (copies of its
    last example; every example is attacked on its own), cut back to the batch, as NumPy."""
    batch = len(s["x"])
    rows = np.minimum(np.arange(backend.batch_bucket(batch)), batch - 1)
    out = fn({name: v[rows] for name, v in s.items()}, *args)
    return {name: backend.to_numpy(v)[:batch] for name, v in out.items()}


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
        already wrong); `keras.ops.stop_gradient` applied.
    """
    if loss not in ("ce", "dlr"):
        raise ValueError(f"loss must be 'ce' or 'dlr'. Received: loss={loss!r}")
    if not (isinstance(eot_iter, int) and eot_iter >= 1):
        raise ValueError(f"`eot_iter` must be an int >= 1. Received: eot_iter={eot_iter!r}")
    x = np.asarray(backend.to_numpy(images)).astype(np.float32)
    y = np.asarray(backend.to_numpy(labels)).reshape(-1).astype(np.int32)
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
    # Under JAX every new batch size compiles the eager ops below: pad the batch to the
    # backend's bucket with copies of its last example (TensorFlow: no padding).
    batch = len(x)
    rows = np.minimum(np.arange(backend.batch_bucket(batch)), batch - 1)
    ids = np.arange(batch) if ids is None else np.asarray(backend.to_numpy(ids)).reshape(-1)
    x, y, ids = x[rows], y[rows], ids[rows]
    x_tensor = ops.convert_to_tensor(x)
    logits = backend.to_numpy(ops.cast(model(x_tensor, training=False), "float32"))
    check_num_classes(logits.shape[1], loss=loss, targeted=targeted)
    fooled = backend.to_numpy(_predicted(logits)) != y
    # Targets: the classes ranked 2nd, 3rd, ... by the clean logits, ties in class order.
    ranking = np.argsort(-logits, axis=1, kind="stable").astype(np.int32)
    ranks = [None]
    if targeted:
        ranks = range(1, attacks.target_classes(target_classes, logits.shape[1], who="APGD-T") + 1)
    keys = draws.keys(seed, ids, "apgd")
    bounds = dict(epsilon=epsilon, clip_min=clip_min, clip_max=clip_max)
    adv, run = x.copy(), 0
    for rank in ranks:
        target = y if rank is None else ranking[:, rank]
        for _ in range(num_restarts):
            active = np.flatnonzero(~fooled)
            if len(active) == 0:
                break
            # Every example's start is drawn (an example draws the same numbers whatever else is
            # in the batch), so these eager ops keep one shape per call.
            noise = 2.0 * draws.uniform(keys, x.shape[1:], run) - 1.0
            largest = ops.max(ops.abs(ops.reshape(noise, (len(x), -1))), axis=1)
            noise = epsilon * noise / (_per_example(largest, noise) + 1e-12)
            start = backend.to_numpy(project(x_tensor + noise, x_tensor, **bounds))
            hit, adv_run = _apgd_single_run(
                model,
                x[active],
                y[active],
                target[active],
                start[active],
                num_steps=num_steps,
                config=config,
                jit_compile=jit_compile,
            )
            adv[active] = adv_run
            fooled[active] = hit
            run += 1
    return ops.stop_gradient(ops.convert_to_tensor(adv[:batch]))
