"""`sat_tf.autoattack`'s "standard" version runs the reference AutoAttack's standard settings.

The reference is fra31/auto-attack (Croce & Hein, ICML 2020), the code RobustBench runs; PyPI's
`pyautoattack` 0.2.0 packages it (requirements-torch.txt). Where pyautoattack is installed (the
PyTorch suite in .venv-torch, every CI run), the settings are read from it: the attributes of
`AutoAttack(model, norm="Linf", version="standard")` and its APGD and Square objects. Where it is
not (.venv and .venv-jax), they are the constants of `REFERENCE`, copied from that package with
file and line, and `test_the_constants_are_the_installed_reference` checks the copy wherever the
package is installed.

On the sat_tf side, the settings are what `auto_attack(version="standard")` actually calls: each
attack function is replaced by a recorder that fools nothing, so every stage runs once, and each
recorded call is bound to the function's signature with its defaults filled in.

tests/test_reference_autoattack.py compares the schedule functions themselves (APGD's windows at
20 and 100 steps, Square's p at every query, rescaled or not) and the attacks' results with the
reference code, and needs torch; here the schedules are checked only as the standard version
configures them, with or without the reference installed.
"""

import inspect
import sys

import keras
import numpy as np
import pytest

from sat_tf import apgd, autoattack, fab, square

# Under PyTorch (.venv-torch, every CI run) the settings are read from the installed reference.
pytestmark = pytest.mark.backends

NUM_CLASSES = 10

# The reference's standard L-inf settings, from pyautoattack 0.2.0 (site-packages/pyautoattack/),
# which packages fra31/auto-attack's autoattack/ folder: AutoAttack.__init__ and `set_version`
# of autoattack/autoattack.py (renamed `_set_version` in the package), autopgd_base.py,
# fab_base.py and square.py.
REFERENCE = dict(
    # autoattack.py:302 (`_set_version`, version "standard").
    attacks=("apgd-ce", "apgd-t", "fab-t", "square"),
    # autoattack.py:46-47: APGDAttack(n_restarts=5, n_iter=100, eot_iter=1, rho=.75); :304 sets
    # n_restarts = 1 for Linf; the loss is autopgd_base.py:113's default 'ce'.
    apgd_ce=dict(loss="ce", steps=100, restarts=1, rho=0.75, eot_iter=1),
    # autoattack.py:56-57: APGDAttack_targeted(n_restarts=1, n_iter=100, eot_iter=1, rho=.75);
    # :305 n_target_classes = 9, :312 n_restarts = 1; loss 'dlr-targeted' (autopgd_base.py:588).
    apgd_t=dict(loss="dlr-targeted", steps=100, restarts=1, rho=0.75, eot_iter=1, targets=9),
    # autoattack.py:50: FABAttack_PT(n_restarts=5, n_iter=100); :311 n_restarts = 1, :313
    # n_target_classes = 9; alpha_max, eta, beta: the defaults of fab_base.py:42-44.
    fab_t=dict(steps=100, restarts=1, targets=9, alpha_max=0.1, eta=1.05, beta=0.9),
    # autoattack.py:53-54: SquareAttack(p_init=.8, n_queries=5000, resc_schedule=False); :315
    # n_queries = 5000.
    square=dict(queries=5000, p_init=0.8, rescale_schedule=False),
    # APGD's checkpoint windows at 100 steps, autopgd_base.py:153-155: first window
    # max(int(0.22 * n_iter), 1), each next one size_decr = max(int(0.03 * n_iter), 1) shorter
    # (:424), but at least n_iter_min = max(int(0.06 * n_iter), 1).
    apgd_windows=dict(first=22, shrink=3, shortest=6),
    # Square's p schedule as (first query, p_init / p) from that query on (0-based), for
    # AutoAttack's Square (resc_schedule=False): square.py:198-217 halve p after queries 10, 50,
    # 200, 500, 1000, 2000 and 4000 (its thresholds 6000 and 8000 lie beyond 5,000 queries).
    square_p=((0, 1), (11, 2), (51, 4), (201, 8), (501, 16), (1001, 32), (2001, 64), (4001, 128)),
)


def _breakpoints(p_of, queries):
    """((first query, p(0) / p), ...) where p_of(query) changes, over 0..queries - 1."""
    found, last = [], None
    for query in range(queries):
        p = p_of(query)
        if p != last:
            found.append((query, round(p_of(0) / p)))
            last = p
    return tuple(found)


def _installed_reference():
    """REFERENCE's fields read from the installed pyautoattack, or None where it is absent."""
    try:
        import pyautoattack
        import torch
    except ImportError:
        return None
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, NUM_CLASSES))
    adversary = pyautoattack.AutoAttack(model, norm="Linf", eps=8 / 255, version="standard")
    ce, t, f, s = adversary.apgd, adversary.apgd_targeted, adversary.fab, adversary.square
    return dict(
        attacks=tuple(adversary.attacks_to_run),
        apgd_ce=dict(
            loss=ce.loss, steps=ce.n_iter, restarts=ce.n_restarts, rho=ce.thr_decr,
            eot_iter=ce.eot_iter,
        ),
        apgd_t=dict(
            loss=t.loss, steps=t.n_iter, restarts=t.n_restarts, rho=t.thr_decr,
            eot_iter=t.eot_iter, targets=t.n_target_classes,
        ),
        fab_t=dict(
            steps=f.n_iter, restarts=f.n_restarts, targets=f.n_target_classes,
            alpha_max=f.alpha_max, eta=f.eta, beta=f.beta,
        ),
        square=dict(queries=s.n_queries, p_init=s.p_init, rescale_schedule=s.rescale_schedule),
        apgd_windows=dict(first=ce.n_iter_2, shrink=ce.size_decr, shortest=ce.n_iter_min),
        square_p=_breakpoints(s.p_selection, s.n_queries),
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    """The reference settings: from the installed pyautoattack, else the constants above."""
    installed = _installed_reference()
    return REFERENCE if installed is None else installed


STAGE_FUNCTIONS = {"apgd": apgd.apgd, "fab_targeted": fab.fab_targeted, "square": square.square}


def _stage(function, call):
    """The AutoAttack stage name of one recorded call."""
    if function == "apgd":
        return "apgd-t" if call["targeted"] else f"apgd-{call['loss']}"
    return {"fab_targeted": "fab-t", "square": "square"}[function]


@pytest.fixture(scope="module")
def ours():
    """[(stage name, keyword arguments)] of the attack calls `auto_attack(version="standard")`
    makes, in order, each with the attack function's defaults filled in.

    Every sat_tf module's reference to `apgd`, `fab_targeted` and `square` is replaced by a
    recorder that returns the images unchanged, so no stage fools anything and each one runs.
    """
    calls = []

    def recorder(name, function):
        def record(model, images, labels, **kwargs):
            bound = inspect.signature(function).bind(model, images, labels, **kwargs)
            bound.apply_defaults()
            arguments = {k: v for k, v in bound.arguments.items() if k != "model"}
            calls.append((_stage(name, arguments), arguments))
            return images

        return record

    # Every example is class 0 with a margin of 1: correct, and never fooled by the recorders.
    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(NUM_CLASSES)]
    )
    bias = np.zeros(NUM_CLASSES, np.float32)
    bias[0] = 1.0
    model.layers[-1].set_weights([np.zeros((48, NUM_CLASSES), np.float32), bias])
    images, labels = np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, np.int32)
    with pytest.MonkeyPatch.context() as patch:
        for module in [m for name, m in sys.modules.items() if name.split(".")[0] == "sat_tf"]:
            for attribute, value in list(vars(module).items()):
                for name, function in STAGE_FUNCTIONS.items():
                    if value is function:
                        patch.setattr(module, attribute, recorder(name, function))
        result = autoattack.auto_attack(model, images, labels, epsilon=8.0, version="standard")
    assert calls, "auto_attack called none of the recorders: find where it now looks them up"
    assert result.robust.all(), "the recorders fool nothing: every stage ran on every example"
    return calls


def test_stage_order(reference, ours):
    assert autoattack.VERSIONS["standard"]["attacks"] == reference["attacks"]
    assert tuple(stage for stage, _ in ours) == reference["attacks"]


@pytest.mark.parametrize("stage", ["apgd-ce", "apgd-t"])
def test_apgd_stages(reference, ours, stage):
    want = reference[stage.replace("-", "_")]
    call = dict(ours)[stage]
    loss = call["loss"] + ("-targeted" if call["targeted"] else "")
    assert loss == want["loss"]
    assert call["num_steps"] == want["steps"]
    assert call["num_restarts"] == want["restarts"]
    assert call["rho"] == want["rho"]
    assert call["eot_iter"] == want["eot_iter"]
    if call["targeted"]:
        assert call["target_classes"] == want["targets"]


def test_fab_t_stage(reference, ours):
    want, call = reference["fab_t"], dict(ours)["fab-t"]
    assert call["num_steps"] == want["steps"]
    assert call["target_classes"] == want["targets"]
    assert (call["alpha_max"], call["eta"], call["beta"]) == (
        want["alpha_max"],
        want["eta"],
        want["beta"],
    )
    # fab_targeted runs once per target from the clean image, without a random restart.
    assert "num_restarts" not in inspect.signature(fab.fab_targeted).parameters
    assert want["restarts"] == 1


def test_square_stage(reference, ours):
    want, call = reference["square"], dict(ours)["square"]
    assert call["num_queries"] == want["queries"]
    assert call["p_init"] == want["p_init"]
    assert call["rescale_schedule"] == want["rescale_schedule"]


def test_apgd_checkpoints_are_the_reference_windows(reference, ours):
    steps = dict(ours)["apgd-ce"]["num_steps"]
    w = reference["apgd_windows"]
    expected, at, window = [], w["first"], w["first"]
    while at < steps:  # The reference checks when its counter reaches k (autopgd_base.py:405).
        expected.append(at)
        window = max(window - w["shrink"], w["shortest"])
        at += window
    assert apgd.checkpoints(steps) == expected
    assert dict(ours)["apgd-t"]["num_steps"] == steps


def test_square_p_schedule_is_the_reference_schedule(reference, ours):
    call = dict(ours)["square"]
    rescale = call["num_queries"] if call["rescale_schedule"] else None
    breakpoints = reference["square_p"]
    for (first, divisor), (following, _) in zip(
        breakpoints, breakpoints[1:] + ((call["num_queries"], None),), strict=True
    ):
        for query in (first, following - 1):  # Both ends of each constant stretch.
            p = float(square.p_schedule(query, call["p_init"], num_queries=rescale))
            assert p == pytest.approx(call["p_init"] / divisor, rel=1e-6), query
    assert breakpoints[-1][0] < call["num_queries"]


def test_the_constants_are_the_installed_reference():
    installed = _installed_reference()
    if installed is None:
        pytest.skip("pyautoattack (and torch) are bench extras: requirements-bench.txt")
    assert installed == REFERENCE
