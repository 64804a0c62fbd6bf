"""Agreement with the reference AutoAttack code (fra31/auto-attack, PyPI `pyautoattack`).

A small version of benchmarks/compare_reference_autoattack.py: a `small_cnn` trained for a few
seconds on the built-in digits, its PyTorch twin (weights copied), and both AutoAttacks with
reduced budgets on a few dozen images. Needs the bench extras (`pip install -r
requirements-bench.txt`); skips where torch or pyautoattack is not installed.
"""

import os
import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

torch = pytest.importorskip("torch", reason="torch is a bench extra (requirements-bench.txt)")
pytest.importorskip("pyautoattack", reason="pyautoattack is a bench extra")

from pyautoattack import AutoAttack  # noqa: E402
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # noqa: E402
from pyautoattack.fab_projections import projection_linf  # noqa: E402
from pyautoattack.fab_pt import FABAttack_PT  # noqa: E402
from pyautoattack.square import SquareAttack  # noqa: E402

import sat_tf  # noqa: E402
from sat_tf import autoattack, fab  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from compare_reference_autoattack import torch_twin  # noqa: E402

EPSILON = 2.0  # pixels, 2/255 for the reference: this clean-trained model is ~60% robust
N = 16


def _train(model):
    x, y = sat_tf.data.demo.arrays("train")
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(x, y, epochs=6, batch_size=32, verbose=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    keras.utils.set_random_seed(0)
    torch.manual_seed(0)
    model = sat_tf.models.build(
        "small_cnn", num_classes=10, activation="relu", input_shape=(16, 16, 3), width=8
    )
    if "PYTEST_XDIST_WORKER" not in os.environ:  # no xdist
        _train(model)
    else:  # under xdist: trained once, by the first worker here; the others load its weights
        from filelock import FileLock  # a torch dependency

        weights = tmp_path_factory.getbasetemp().parent / "reference_small_cnn.weights.h5"
        with FileLock(f"{weights}.lock"):
            if weights.is_file():
                model.load_weights(weights)
            else:
                _train(model)
                model.save_weights(weights)
    return model, torch_twin(model)


@pytest.fixture(scope="module")
def data():
    x, y = sat_tf.data.demo.arrays("test")
    return x[:N], y[:N]


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)) / 255.0).float()


def test_twin_logits_equal(models, data):
    model, twin = models
    with torch.no_grad():
        theirs = twin(nchw(data[0])).numpy()
    np.testing.assert_allclose(theirs, model(data[0], training=False), atol=1e-4)


def test_projection_equals_reference():
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1, (64, 40)).astype(np.float32)
    w = rng.normal(size=(64, 40)).astype(np.float32)
    b = (np.sum(w * t, 1) + rng.normal(size=64) * np.linspace(0.1, 6, 64)).astype(np.float32)
    theirs = projection_linf(torch.from_numpy(t), torch.from_numpy(w), torch.from_numpy(b))
    ours = fab.linf_projection(tf.constant(t), tf.constant(w), tf.constant(b))
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)


def test_square_schedule_equals_reference():
    for rescale, queries in ((False, 5000), (True, 1000)):
        theirs = SquareAttack(lambda x: x, n_queries=queries, resc_schedule=rescale, eps=0.1)
        schedule = tf.function(
            lambda q, r=rescale, n=queries: autoattack.p_schedule(
                q, 0.8, num_queries=n if r else None
            )
        )
        for it in range(queries):
            assert float(schedule(tf.constant(it))) == pytest.approx(theirs.p_selection(it))


def test_apgd_checkpoints_equal_reference_windows():
    for steps in (20, 100):
        ref = APGDAttack(lambda x: x, n_iter=steps, eps=0.1)
        # Reference windows: n_iter_2, then shrinking by size_decr down to n_iter_min.
        windows, at, k = [], 0, ref.n_iter_2
        while at + k < steps:
            at += k
            windows.append(at)
            k = max(k - ref.size_decr, ref.n_iter_min)
        assert autoattack.checkpoints(steps) == windows


@pytest.mark.slow
def test_fab_t_fools_the_same_examples(models, data):
    """FAB-T has no randomness at one restart: the fooled examples should be the same."""
    model, twin = models
    x, y = data
    ours = fab.fab_targeted(model, x, y, epsilon=EPSILON, num_steps=20, target_classes=3)
    fooled_ours = np.argmax(model(ours, training=False), axis=1) != y
    theirs = FABAttack_PT(
        twin, n_restarts=1, n_iter=20, eps=EPSILON / 255, seed=0, targeted=True,
        n_target_classes=3, device="cpu",
    ).perturb(nchw(x), torch.from_numpy(y).long())  # fmt: skip
    with torch.no_grad():
        fooled_theirs = twin(theirs).argmax(1).numpy() != y
    assert fooled_ours.sum() > 0
    assert np.sum(fooled_ours != fooled_theirs) <= 1


@pytest.mark.slow
def test_reduced_ensemble_agrees(models, data):
    """Every stage, 20 steps / 3 targets / 300 queries, on both sides: robust counts agree
    within 2 of 16 (APGD's and Square's random draws differ between the two codes)."""
    model, twin = models
    x, y = data
    ours = autoattack.auto_attack(
        model, x, y, epsilon=EPSILON, version="fast",
        attacks=["apgd-ce", "apgd-t", "fab-t", "square"],
    )  # fmt: skip
    common = dict(eps=EPSILON / 255, seed=0, device="cpu")
    adversary = AutoAttack(twin, version="custom", attacks=["apgd-ce", "apgd-t", "fab-t", "square"],
                           **common)  # fmt: skip
    adversary.apgd = APGDAttack(twin, n_iter=20, n_restarts=1, rho=0.75, **common)
    adversary.apgd_targeted = APGDAttack_targeted(
        twin, n_iter=20, n_restarts=1, n_target_classes=3, **common
    )
    adversary.fab = FABAttack_PT(twin, n_restarts=1, n_iter=20, n_target_classes=3,
                                 eps=EPSILON / 255, seed=0, device="cpu")  # fmt: skip
    adversary.square = SquareAttack(twin, p_init=0.8, n_queries=300, resc_schedule=False,
                                    **common)  # fmt: skip
    x_adv, _ = adversary.run_standard_evaluation(nchw(x), torch.from_numpy(y).long(), batch_size=N)
    with torch.no_grad():
        robust_theirs = twin(x_adv).argmax(1).numpy() == y
    assert 0 < ours.robust.sum() < (ours.stages["clean"] * N)
    assert abs(int(ours.robust.sum()) - int(robust_theirs.sum())) <= 2
