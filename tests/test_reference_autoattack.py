"""The reference AutoAttack and ours attack the very same model, example by example.

The reference is fra31/auto-attack as PyPI's `pyautoattack` 0.2.0 packages it (docs/robustbench.md
says which commit). Under KERAS_BACKEND=torch a Keras model is a `torch.nn.Module`, so the
reference attacks `sat_tf.torch_module(model)` (NCHW [0, 1]) and ours attacks `model` (NHWC
[0, 255]): one set of weights, no copy. The model is tests/data/backends/cifar_relu.keras (a
small_cnn PGD-trained with sat_tf), the images 40 real CIFAR-10 test images, epsilon 8/255, the
standard version's full budgets (100 steps, 9 targets, 5,000 queries).

The two codes draw different random numbers: APGD's random starts (torch's generator there,
`sat_tf.draws` here) and Square's squares. FAB-T at one restart draws nothing. So every verdict
must be equal, or differ only on an example whose verdict the random draw decides: one that a
rerun with another seed (1 to 4) on either side gives the other verdict. At most `BOUND` such
examples. CI runs this module in .venv-torch (`make test-torch`); elsewhere it skips.
"""

import pathlib

import keras
import numpy as np
import pytest
from conftest import BACKEND

pytestmark = [
    pytest.mark.backends,
    pytest.mark.data,
    pytest.mark.skipif(BACKEND != "torch", reason="the reference runs under KERAS_BACKEND=torch"),
]

EPSILON = 8.0  # pixels; 8/255 for the reference
BOUND = 2  # verdicts of 40 that a random draw may decide
RESEEDS = (1, 2, 3, 4)
FIXTURES = pathlib.Path(__file__).parent / "data" / "backends"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("pyautoattack")
    from conftest import SHARED_DATA

    from tests.data.backends.budgets import cifar_images, cifar_test_root

    root = cifar_test_root(SHARED_DATA, tmp_path_factory.mktemp("cifar"))
    if root is None:
        pytest.skip(f"{SHARED_DATA} has no cifar10-jpeg.tar.gz: needs the shared data folder")
    images, labels = cifar_images(root)
    return keras.saving.load_model(FIXTURES / "cifar_relu.keras"), images, labels


def _nchw(images):
    import torch

    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)) / 255.0).float()


def _reference(model, images, labels, attacks, seed):
    """Robust verdicts [N] of the reference's standard version (its `attacks` only)."""
    import torch
    from pyautoattack import AutoAttack

    import sat_tf

    module = sat_tf.torch_module(model)
    adversary = AutoAttack(module, norm="Linf", eps=EPSILON / 255, version="standard", seed=seed)
    adversary.attacks_to_run = list(attacks)  # the standard settings, these stages alone
    x = _nchw(images)
    y = torch.from_numpy(labels).long()
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(labels))
    with torch.no_grad():
        return module(x_adv).argmax(1).numpy() == labels


def _ours(model, images, labels, attacks, seed):
    from sat_tf import autoattack

    result = autoattack.auto_attack(
        model, images, labels, epsilon=EPSILON, version="standard", attacks=list(attacks), seed=seed
    )
    return result.robust


def _assert_agree(model, images, labels, attacks):
    """Equal verdicts, or at most BOUND differences, each on an example a reseed flips."""
    theirs = _reference(model, images, labels, attacks, seed=0)
    ours = _ours(model, images, labels, attacks, seed=0)
    assert 0 < ours.sum() < len(labels)  # the attacks decide something here
    differ = np.flatnonzero(theirs != ours)
    assert len(differ) <= BOUND, f"{len(differ)} verdicts differ: examples {differ.tolist()}"
    for i in differ:
        x, y = images[i : i + 1], labels[i : i + 1]
        verdicts = {
            bool(run(model, x, y, attacks, seed)[0])
            for run in (_reference, _ours)
            for seed in RESEEDS
        }
        assert verdicts == {True, False}, (
            f"example {i}: reference says robust={theirs[i]}, ours {ours[i]}, and no reseed of "
            "either side flips it, so no random draw explains the difference"
        )
    return theirs, ours


def test_the_module_computes_the_models_logits(case):
    import torch

    import sat_tf

    model, images, _ = case
    module = sat_tf.torch_module(model)
    assert isinstance(module, torch.nn.Module) and not module.training
    # The reference and RobustBench read parameters through the module: the Keras weights.
    assert sum(p.numel() for p in module.parameters()) == model.count_params()
    with torch.no_grad():
        theirs = module(_nchw(images)).numpy()
    ours = keras.ops.convert_to_numpy(model(images, training=False))
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())


def test_standard_autoattack_verdicts_agree(case):
    theirs, ours = _assert_agree(*case, ["apgd-ce", "apgd-t", "fab-t", "square"])
    assert theirs.sum() == pytest.approx(ours.sum(), abs=BOUND)


def test_apgd_t_alone_agrees(case):
    _assert_agree(*case, ["apgd-t"])


def test_fab_t_alone_agrees(case):
    _assert_agree(*case, ["fab-t"])


def test_projection_equals_reference():
    import torch
    from pyautoattack.fab_projections import projection_linf

    from sat_tf import fab

    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1, (64, 40)).astype(np.float32)
    w = rng.normal(size=(64, 40)).astype(np.float32)
    b = (np.sum(w * t, 1) + rng.normal(size=64) * np.linspace(0.1, 6, 64)).astype(np.float32)
    theirs = projection_linf(torch.from_numpy(t), torch.from_numpy(w), torch.from_numpy(b))
    ours = keras.ops.convert_to_numpy(fab.linf_projection(t, w, b))
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)


def test_square_schedule_equals_reference():
    from pyautoattack.square import SquareAttack

    from sat_tf import autoattack

    for rescale, queries in ((False, 5000), (True, 1000)):
        theirs = SquareAttack(lambda x: x, n_queries=queries, resc_schedule=rescale, eps=0.1)
        for it in range(0, queries, 7):
            ours = autoattack.p_schedule(it, 0.8, num_queries=queries if rescale else None)
            assert float(keras.ops.convert_to_numpy(ours)) == pytest.approx(theirs.p_selection(it))


def test_apgd_checkpoints_equal_reference_windows():
    from pyautoattack.autopgd_base import APGDAttack

    from sat_tf import autoattack

    for steps in (20, 100):
        ref = APGDAttack(lambda x: x, n_iter=steps, eps=0.1)
        # The reference's windows: n_iter_2, then shrinking by size_decr down to n_iter_min.
        windows, at, k = [], 0, ref.n_iter_2
        while at + k < steps:
            at += k
            windows.append(at)
            k = max(k - ref.size_decr, ref.n_iter_min)
        assert autoattack.checkpoints(steps) == windows
