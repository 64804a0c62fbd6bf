"""Square Attack, L-inf: a score-based black-box attack (Andriushchenko et al., ECCV 2020).

It uses only the model's logits, never its gradients, so it sees through masked or obfuscated
gradients; AutoAttack runs it last. The schedule and the vertical-stripe initialisation follow the
paper and fra31/auto-attack's `square.py`; the code is written for TF.

Every random choice is drawn per example and keyed by (seed, the example's index in the whole
evaluation), `sat_tf.draws`: its stripes, and at each query its own window corner and signs.
The reference draws one window and one set of signs per query for the whole batch; per example
each draw has the same distribution as there, but an example's attack no longer depends on
which examples share its batch, so a chunked or sharded evaluation attacks it exactly as one
unsplit run does.
"""

import tensorflow as tf

from sat_tf import draws
from sat_tf.attacks import compiled, project

# Square-size schedule: p halves each time the query counter passes one of these thresholds
# (paper, App. E; the reference `square.py`, `p_selection`).
_P_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)

# The counter of the initial stripes' draw; query q draws with counter q.
_STRIPES = 2**32 - 1


def p_schedule(query, p_init, *, num_queries=None):
    """Fraction p of the pixels changed at query `query` (0-based): p_init halved per threshold.

    AutoAttack builds its Square with `resc_schedule=False`: the thresholds apply to the query
    counter itself, so with 5,000 queries p halves after queries 10, 50, 200, 500, 1000, 2000
    and 4000. With `num_queries` the counter is first rescaled to a 10,000-query budget,
    int(query / num_queries * 10000), as the reference's standalone default does.
    """
    query = tf.cast(query, tf.float32)
    if num_queries is not None:
        query = tf.floor(query / float(num_queries) * 10000.0)
    halvings = tf.reduce_sum(tf.cast(query > tf.constant(_P_THRESHOLDS, tf.float32), tf.float32))
    return p_init / tf.pow(2.0, halvings)


def _margin_and_loss(model, x, y, loss):
    logits = tf.cast(model(x, training=False), tf.float32)
    true = tf.gather(logits, y, axis=1, batch_dims=1)
    mask = tf.one_hot(y, tf.shape(logits)[1], on_value=-float("inf"), off_value=0.0)
    margin = true - tf.reduce_max(logits + mask, axis=1)
    if loss == "margin":
        return margin, margin
    return margin, -tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)


def _make_chunk(model, *, epsilon, num_queries, p_init, loss, clip_min, clip_max, rescale_schedule):
    """Queries [start, stop) on the active examples; `model` is a `weakref.ref`."""
    bounds = dict(epsilon=epsilon, clip_min=clip_min, clip_max=clip_max)

    def query(i, s):
        x, x_best = s["x"], s["x_best"]
        height, width, channels = x.shape[1], x.shape[2], x.shape[3]
        p = p_schedule(i, p_init, num_queries=num_queries if rescale_schedule else None)
        side = tf.round(tf.sqrt(p * float(height * width)))
        side = tf.cast(tf.clip_by_value(side, 1.0, float(min(height, width))), tf.int32)
        # Per example: 2 numbers for the window's corner, then one per channel for its signs.
        u = draws.uniform(s["keys"], (2 + channels,), i)
        # Corner uniform in [0, H - side) as the reference draws it (its random_int floors
        # low + (high - low) * U[0, 1)), so the last position is never taken.
        room = tf.cast(tf.stack([height, width]) - side, tf.float32)
        corner = tf.cast(u[:, :2] * room, tf.int32)
        rows, cols = tf.range(height)[None, :], tf.range(width)[None, :]
        in_rows = (rows >= corner[:, :1]) & (rows < corner[:, :1] + side)
        in_cols = (cols >= corner[:, 1:]) & (cols < corner[:, 1:] + side)
        window = tf.cast(in_rows[:, :, None] & in_cols[:, None, :], tf.float32)[..., None]
        # A random sign per channel, spread over the square; adding 2 * epsilon and projecting
        # sets the square's perturbation to +-epsilon.
        signs = tf.where(u[:, None, None, 2:] < 0.5, -1.0, 1.0)
        x_new = x_best + window * 2.0 * epsilon * signs
        x_new = project(x_new, x, **bounds)
        margin, value = _margin_and_loss(model(), x_new, s["y"], loss)
        # Keep the candidate where the loss fell or the example became misclassified.
        better = (value < s["loss"]) | (margin <= 0.0)
        return i + 1, dict(
            s,
            x_best=tf.where(better[:, None, None, None], x_new, x_best),
            loss=tf.where(value < s["loss"], value, s["loss"]),
            margin=tf.where(better, margin, s["margin"]),
        )

    def chunk(s, start, stop):
        return tf.while_loop(lambda i, _: i < stop, query, (start, s))[1]

    return chunk


def square(
    model,
    images,
    labels,
    *,
    epsilon,
    num_queries=5000,
    p_init=0.8,
    seed=0,
    ids=None,
    loss="margin",
    clip_min=0.0,
    clip_max=255.0,
    chunk_size=100,
    rescale_schedule=False,
    jit_compile=False,
):
    """Square Attack, L-inf, untargeted: random square updates of size +-epsilon, kept if better.

    Starts from vertical stripes of +-epsilon; each query changes one random square per example
    (its own place and a random sign per channel; the reference shares one draw by the whole
    batch, see the module docstring) whose side is round(sqrt(p * H * W)), with p following
    `p_schedule`. Examples leave the batch once misclassified, checked every `chunk_size`
    queries.

    Args:
        model: Keras model mapping images to logits; called with `training=False`.
        images: [B, H, W, C] pixels in [clip_min, clip_max].
        labels: [B] int true classes.
        epsilon: L-inf radius, in pixel units.
        num_queries: Model queries per example after the initial one.
        p_init: Initial fraction of pixels changed per query (0.8 in AutoAttack).
        seed: Seed of every random choice (an int or a scalar int tensor); same seed, same
            result.
        ids: [B] int indices of the examples in the whole evaluation, which key their draws;
            None numbers the batch 0..B-1.
        loss: "margin" (z_y - max_{i!=y} z_i, minimized) or "ce" (cross-entropy, maximized).
        clip_min: Lowest valid pixel value.
        clip_max: Highest valid pixel value.
        chunk_size: Queries per compiled call, between which fooled examples are dropped.
        rescale_schedule: Rescale the p schedule to `num_queries` (see `p_schedule`); False, as
            AutoAttack runs Square.
        jit_compile: Compile the query loop with XLA.

    Returns:
        Adversarial images (the best point found per example), `tf.stop_gradient` applied.
    """
    if loss not in ("margin", "ce"):
        raise ValueError(f"loss must be 'margin' or 'ce'. Received: loss={loss!r}")
    x = tf.convert_to_tensor(images, tf.float32)
    y = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    if ids is None:
        ids = tf.range(tf.shape(y)[0], dtype=tf.int64)
    keys = draws.keys(seed, ids, "square")
    # A sign per column and channel (the reference's vertical stripes).
    stripes = tf.where(draws.uniform(keys, (1, x.shape[2], x.shape[3]), _STRIPES) < 0.5, -1.0, 1.0)
    bounds = dict(epsilon=epsilon, clip_min=clip_min, clip_max=clip_max)
    x_best = project(x + epsilon * stripes, x, **bounds)
    margin, value = _margin_and_loss(model, x_best, y, loss)
    config = dict(
        epsilon=float(epsilon),
        num_queries=int(num_queries),
        p_init=float(p_init),
        loss=loss,
        clip_min=float(clip_min),
        clip_max=float(clip_max),
        rescale_schedule=bool(rescale_schedule),
    )
    out = x_best
    s = {
        "x": x,
        "y": y,
        "x_best": x_best,
        "loss": value,
        "margin": margin,
        "index": tf.range(x.shape[0]),
        "keys": keys,  # the draws' keys follow their examples out of the batch
    }
    key = ("square",) + tuple(sorted(config.items()))
    chunk = compiled(
        model,
        key,
        lambda ref: _make_chunk(ref, **config),
        s,
        tf.constant(0),
        tf.constant(1),
        jit_compile=jit_compile,
    )
    for start in range(0, num_queries, chunk_size):
        done = s["margin"] <= 0.0
        out = tf.tensor_scatter_nd_update(out, s["index"][:, None], s["x_best"])
        s = {name: tf.boolean_mask(v, ~done) for name, v in s.items()}
        if s["index"].shape[0] == 0:
            break
        s = chunk(s, tf.constant(start), tf.constant(min(start + chunk_size, num_queries)))
    out = tf.tensor_scatter_nd_update(out, s["index"][:, None], s["x_best"])
    return tf.stop_gradient(out)
