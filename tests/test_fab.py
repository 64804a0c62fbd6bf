"""Tests for sat_tf.fab: the L-inf hyperplane projection and FAB-T."""

import keras
import numpy as np
import pytest
from test_autoattack import (
    EPSILON,
    accuracy,
    assert_in_ball,
    make_data,
    predict,
    train_tiny_model,
)

from sat_tf import fab

pytestmark = pytest.mark.backends


def bisection_projection(t, w, b):
    """Independent reference: bisect the L-inf radius lam at which the box-clipped move reaches
    the hyperplane, moving each coordinate towards the face that closes the gap."""
    gap = w @ t - b
    direction = -np.sign(w) * np.sign(gap)
    room = np.where(direction > 0, 1.0 - t, np.where(direction < 0, t, 0.0))

    def moved(lam):
        return t + direction * np.minimum(lam, room)

    if abs(w @ moved(1.0) - b) > 0 and np.sign(w @ moved(1.0) - b) == np.sign(gap):
        return moved(1.0) - t  # Unreachable in the box: the nearest corner.
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.sign(w @ moved(mid) - b) == np.sign(gap) else (lo, mid)
    return moved(hi) - t


def test_linf_projection_matches_bisection():
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1, (40, 30))
    w = rng.normal(size=(40, 30))
    w[:, :3] = 0.0  # Zero weights never move.
    b = np.sum(w * t, axis=1) + rng.normal(size=40) * np.linspace(0.1, 8, 40)  # some unreachable
    got = keras.ops.convert_to_numpy(
        fab.linf_projection(t.astype("float32"), w.astype("float32"), b.astype("float32"))
    )
    for i in range(40):
        np.testing.assert_allclose(got[i], bisection_projection(t[i], w[i], b[i]), atol=2e-5)
    assert np.all(t + got >= -1e-6) and np.all(t + got <= 1 + 1e-6)
    assert np.all(got[:, :3] == 0.0)


@pytest.fixture(scope="module")
def model():
    return train_tiny_model()


def test_fab_targeted_stays_in_ball_and_fools(model):
    images, labels = make_data(48, seed=1)
    adv = keras.ops.convert_to_numpy(
        fab.fab_targeted(model, images, labels, epsilon=EPSILON, num_steps=20, target_classes=4)
    )
    assert_in_ball(adv, images, EPSILON)
    clean = accuracy(model, images, labels)
    assert accuracy(model, adv, labels) < clean - 0.2
    # Where FAB-T failed, the clean image comes back unchanged.
    still = predict(model, adv) == labels
    np.testing.assert_array_equal(adv[still], images[still])
    # A smaller radius can only fool fewer examples (FAB's minimum-norm points are kept).
    small = fab.fab_targeted(model, images, labels, epsilon=EPSILON / 4, num_steps=20)
    assert accuracy(model, small, labels) >= accuracy(model, adv, labels)
