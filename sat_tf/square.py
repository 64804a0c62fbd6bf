"""Square Attack, L-inf: a score-based black-box attack (Andriushchenko et al., ECCV 2020).

It uses only the model's logits, never its gradients, so it sees through masked or obfuscated
gradients; AutoAttack runs it last. The schedule and the vertical-stripe initialisation follow the
paper and fra31/auto-attack's `square.py`; the code is `keras.ops`, the same on every Keras
backend.

Every random choice is drawn per example and keyed by (seed, the example's index in the whole
evaluation), `sat_tf.draws`: its stripes, and at each query its own window corner and signs.
The reference draws one window and one set of signs per query for the whole batch; per example
each draw has the same distribution as there, but an example's attack no longer depends on
which examples share its batch, so a chunked or sharded evaluation attacks it exactly as one
unsplit run does, and a seed gives the same windows and signs on every backend.
"""

import numpy as np
from keras import ops

from sat_tf import backend, draws
from sat_tf.attacks import per_example_loss, project

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
    query = ops.cast(query, "float32")
    if num_queries is not None:
        query = ops.floor(query / float(num_queries) * 10000.0)
    thresholds = ops.convert_to_tensor(_P_THRESHOLDS, "float32")
    halvings = ops.sum(ops.cast(query > thresholds, "float32"))
    return p_init / ops.power(2.0, halvings)


def _margin_and_loss(model, x, y, loss):
    logits = ops.cast(model(x, training=False), "float32")
    true = ops.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    others = ops.where(ops.one_hot(y, logits.shape[1]) > 0, -float("inf"), logits)
    margin = true - ops.max(others, axis=1)
    if loss == "margin":
        return margin, margin
    return margin, -per_example_loss(logits, y)


def _make_square_fns(
    model, *, epsilon, num_queries, p_init, loss, clip_min, clip_max, rescale_schedule
):
    """(start, chunk): the initial stripes, and queries [start, stop) on the active examples;
    `model` is a `weakref.ref` (`backend.compiled`)."""
    bounds = dict(epsilon=epsilon, clip_min=clip_min, clip_max=clip_max)

    def start(x, y, keys):
        # A sign per column and channel (the reference's vertical stripes).
        stripes = draws.uniform(keys, (1, x.shape[2], x.shape[3]), _STRIPES)
        x_best = project(x + epsilon * ops.where(stripes < 0.5, -1.0, 1.0), x, **bounds)
        margin, value = _margin_and_loss(model(), x_best, y, loss)
        return dict(x=x, y=y, keys=keys, x_best=x_best, loss=value, margin=margin)

    def query(i, s):
        x, x_best = s["x"], s["x_best"]
        height, width, channels = x.shape[1], x.shape[2], x.shape[3]
        p = p_schedule(i, p_init, num_queries=num_queries if rescale_schedule else None)
        side = ops.round(ops.sqrt(p * float(height * width)))
        side = ops.cast(ops.clip(side, 1.0, float(min(height, width))), "int32")
        # Per example: 2 numbers for the window's corner, then one per channel for its signs.
        u = draws.uniform(s["keys"], (2 + channels,), i)
        # Corner uniform in [0, H - side) as the reference draws it (its random_int floors
        # low + (high - low) * U[0, 1)), so the last position is never taken.
        room = ops.cast(ops.convert_to_tensor([height, width], "int32") - side, "float32")
        corner = ops.cast(u[:, :2] * room, "int32")
        rows = ops.arange(height, dtype="int32")[None, :]
        cols = ops.arange(width, dtype="int32")[None, :]
        in_rows = (rows >= corner[:, :1]) & (rows < corner[:, :1] + side)
        in_cols = (cols >= corner[:, 1:]) & (cols < corner[:, 1:] + side)
        window = ops.cast(in_rows[:, :, None] & in_cols[:, None, :], "float32")[..., None]
        # A random sign per channel, spread over the square; adding 2 * epsilon and projecting
        # sets the square's perturbation to +-epsilon.
        signs = ops.where(u[:, None, None, 2:] < 0.5, -1.0, 1.0)
        x_new = project(x_best + window * 2.0 * epsilon * signs, x, **bounds)
        margin, value = _margin_and_loss(model(), x_new, s["y"], loss)
        # Keep the candidate where the loss fell or the example became misclassified.
        better = (value < s["loss"]) | (margin <= 0.0)
        return i + 1, dict(
            s,
            x_best=ops.where(better[:, None, None, None], x_new, x_best),
            loss=ops.where(value < s["loss"], value, s["loss"]),
            margin=ops.where(better, margin, s["margin"]),
        )

    def chunk(s, first, stop):
        return ops.while_loop(lambda i, _: i < stop, query, (first, s))[1]

    return start, chunk


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
            result, on every backend.
        ids: [B] int indices of the examples in the whole evaluation, which key their draws;
            None numbers the batch 0..B-1.
        loss: "margin" (z_y - max_{i!=y} z_i, minimized) or "ce" (cross-entropy, maximized).
        clip_min: Lowest valid pixel value.
        clip_max: Highest valid pixel value.
        chunk_size: Queries per compiled call, between which fooled examples are dropped.
        rescale_schedule: Rescale the p schedule to `num_queries` (see `p_schedule`); False, as
            AutoAttack runs Square.
        jit_compile: Compile the query loop with XLA (TensorFlow; JAX always compiles).

    Returns:
        Adversarial images (the best point found per example), `keras.ops.stop_gradient`
        applied.
    """
    if loss not in ("margin", "ce"):
        raise ValueError(f"loss must be 'margin' or 'ce'. Received: loss={loss!r}")
    # The bookkeeping between chunks is NumPy on the host: under JAX an eager op compiles once
    # per shape, and the number of examples still attacked changes with every chunk.
    x = np.asarray(backend.to_numpy(images), np.float32)
    y = np.asarray(backend.to_numpy(labels)).astype(np.int32).reshape(-1)
    if ids is None:
        ids = np.arange(len(y), dtype=np.int32)
    keys = backend.to_numpy(draws.keys(seed, ids, "square"))
    config = dict(
        epsilon=float(epsilon),
        num_queries=int(num_queries),
        p_init=float(p_init),
        loss=loss,
        clip_min=float(clip_min),
        clip_max=float(clip_max),
        rescale_schedule=bool(rescale_schedule),
    )
    key = tuple(sorted(config.items()))
    start = backend.compiled(
        model,
        ("square-start", *key),
        lambda ref: _make_square_fns(ref, **config)[0],
        x,
        y,
        keys,
        jit_compile=jit_compile,
    )
    # The state of the examples still attacked (their draws' keys follow them out of the
    # batch), and their places in the batch.
    s = {name: backend.to_numpy(v) for name, v in start(x, y, keys).items()}
    index = np.arange(len(y))
    out = s["x_best"].copy()
    int32 = lambda v: ops.convert_to_tensor(v, "int32")  # noqa: E731 - a tensor, not static
    chunk = backend.compiled(
        model,
        ("square", *key),
        lambda ref: _make_square_fns(ref, **config)[1],
        s,
        int32(0),
        int32(1),
        jit_compile=jit_compile,
    )
    for first in range(0, num_queries, chunk_size):
        out[index] = s["x_best"]
        active = ~(s["margin"] <= 0.0)
        s, index = {name: v[active] for name, v in s.items()}, index[active]
        if not len(index):
            break
        # Padded to a batch bucket (copies of the last example; each runs on its own), so under
        # JAX the shrinking batch compiles a few shapes, not one per chunk.
        rows = np.minimum(np.arange(backend.batch_bucket(len(index))), len(index) - 1)
        s = chunk(
            {name: v[rows] for name, v in s.items()},
            int32(first),
            int32(min(first + chunk_size, num_queries)),
        )
        s = {name: backend.to_numpy(v)[: len(index)] for name, v in s.items()}
    out[index] = s["x_best"]
    return ops.stop_gradient(ops.convert_to_tensor(out))


__all__ = ["p_schedule", "square"]
