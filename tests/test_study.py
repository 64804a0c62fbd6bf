"""The study package (study/, run by tools/study.py): the queue (seed-major, skip finished,
stop), the row configs and the report."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import study
from study import arrays as study_arrays
from study import paths as study_paths
from study import protocol as study_protocol
from study import report as study_report


def _write_result(folder, row, seed, clean, pgd20, activation="relu", version=None):
    """A result file shaped as run_one writes it, with hand-chosen metrics."""
    record = dict(
        row=row,
        seed=seed,
        eval_protocol=dict(study.EVAL, version=version or study.EVAL["version"]),
        config=dict(activation=activation, smooth_gradients=["attack"]),
        metrics=dict(
            clean=clean,
            pgd20=pgd20,
            pgd50x2=pgd20 - 0.01,
            autoattack=pgd20 - 0.02,
            subset_clean=clean,
            curve={"2.0": pgd20 + 0.1, "4.0": pgd20, "8.0": pgd20 - 0.1},
            checks=[dict(name="accuracy falls as epsilon grows", status="pass", message="")],
        ),
        wall_time_s=dict(train=120.0, eval=240.0),
    )
    path = study.result_path(row, seed, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_queue_is_seed_major():
    assert study.queue(["a", "b"], [0, 1]) == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]


def test_pending_skips_runs_with_a_result_file(tmp_path):
    _write_result(tmp_path, "silu", 0, 0.5, 0.3)
    assert study.pending(["relu", "silu"], [0, 1], tmp_path) == [
        ("relu", 0),
        ("relu", 1),
        ("silu", 1),
    ]


def test_results_of_an_older_protocol_are_pending_and_left_out_of_the_report(tmp_path):
    _write_result(tmp_path, "relu", 0, 0.5, 0.3, version=study.EVAL["version"] - 1)
    _write_result(tmp_path, "silu", 0, 0.5, 0.3)
    assert study.pending(["relu", "silu"], [0], tmp_path) == [("relu", 0)]
    assert list(study_report.load_results(tmp_path, version=study.EVAL["version"])) == ["silu"]


def test_stop_at_is_the_next_time_the_clock_reads_it():
    for hhmm in ("00:00", "11:59", "23:59"):
        when = study.next_utc_time(hhmm)
        assert 0 < when - time.time() <= 86400
        assert time.strftime("%H:%M", time.gmtime(when)) == hhmm


def test_run_queue_starts_pending_runs_and_stops_on_failure(tmp_path):
    _write_result(tmp_path, "relu", 0, 0.5, 0.3)
    calls = []

    def call(command, cwd):
        calls.append(command[command.index("--one") + 1])
        return 1 if len(calls) == 2 else 0  # the second child fails

    started = study.run_queue(
        ["relu", "silu", "gelu"], [0, 1], results=tmp_path, call=call, claims=tmp_path / "c"
    )
    assert calls == ["silu:0", "gelu:0"]
    assert started == [("silu", 0), ("gelu", 0)]


def test_run_queue_starts_nothing_after_the_stop_time(tmp_path):
    def call(command, cwd):
        raise AssertionError("started a run after the stop time")

    assert (
        study.run_queue(
            ["relu"], [0], results=tmp_path, stop_at=time.time() - 1, call=call, claims=tmp_path
        )
        == []
    )


def test_claims_keep_two_queues_apart_and_a_dead_runners_claim_is_taken(tmp_path):
    claims = tmp_path / "claims"
    mine = study.claim("relu", 0, claims)
    assert mine.read_text() == str(os.getpid())
    assert study.claim("relu", 0, claims) is None  # held by a live process (this one)

    def call(command, cwd):  # while silu s0 runs, another queue finishes gelu s0
        _write_result(tmp_path, "gelu", 0, 0.5, 0.3)
        return 0

    # relu s0 is claimed: the queue skips it, runs silu s0, and skips gelu s0, finished meanwhile.
    rows = ["relu", "silu", "gelu"]
    started = study.run_queue(rows, [0], results=tmp_path, call=call, claims=claims)
    assert started == [("silu", 0)] and not (claims / "silu_s0.pid").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine.write_text(str(dead.pid))  # its runner died: the claim is taken over
    assert study.claim("relu", 0, claims) == mine and mine.read_text() == str(os.getpid())
    assert sorted(p.name for p in claims.iterdir()) == ["relu_s0.pid"]  # no drafts left


def test_every_row_has_a_flagfile_and_differs_from_relu_only_where_named():
    relu = vars(study.load_config("relu", 0, cache="/c"))
    expected = {
        "clean_relu": dict(num_steps=0, random_start=False),
        "smoothgrad_attack": dict(activation="smooth_grad_relu", smooth_gradients=("attack",)),
        "smoothgrad_update": dict(activation="smooth_grad_relu", smooth_gradients=("update",)),
        "smoothgrad_both": dict(activation="smooth_grad_relu"),
    }
    assert relu["epsilon"] == 4.0 and relu["num_steps"] == 1 and relu["random_start"]
    for row in study.ROWS:
        config = vars(study.load_config(row, 2, cache="/c"))
        want = expected.get(row, {"activation": row} if row != "relu" else {})
        diff = {k: v for k, v in config.items() if relu[k] != v and k not in ("seed", "model_dir")}
        assert diff == want, row
        assert config["seed"] == 2 and config["model_dir"] == f"/c/runs/{row}_s2"


def test_report_table_mean_std_missing_runs_and_kept_prose(tmp_path):
    results = tmp_path / "results"
    for seed, (clean, pgd) in enumerate([(0.5, 0.30), (0.6, 0.35), (0.7, 0.40)]):
        _write_result(results, "relu", seed, clean, pgd)
    _write_result(results, "silu", 0, 0.55, 0.33, activation="silu")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "study.md").write_text(
        f"# Study\n\nprose before\n{study_report.BEGIN}\nold\n{study_report.END}\nafter\n"
    )
    table = study_report.load_results(results, version=study.EVAL["version"])
    study_report.write_report(
        table, docs, rows=("relu", "silu"), seeds=(0, 1, 2), protocol=study.EVAL
    )
    text = (docs / "study.md").read_text()
    assert text.startswith("# Study\n\nprose before\n") and text.endswith("after\n")
    assert "old" not in text
    relu_line = next(line for line in text.splitlines() if line.startswith("| relu |"))
    # Hand-computed: clean 50/60/70 -> 60.0 +- 10.0; PGD-20 30/35/40 -> 35.0 +- 5.0; 6 min a run.
    assert "| 3 (s0,1,2) | 60.0 +- 10.0 | 35.0 +- 5.0 | 34.0 +- 5.0 | 33.0 +- 5.0 | 0 | 6.0 |" in (
        relu_line
    )
    silu_line = next(line for line in text.splitlines() if line.startswith("| silu |"))
    assert "| 1 (s0) | 55.0 | 33.0 |" in silu_line  # one seed: no std
    assert "| silu | 1 | +5.0 | +3.0 |" in text  # paired with relu seed 0: 55-50, 33-30
    assert "Not yet run (2): silu s1, silu s2." in text
    assert (docs / "study_epsilon.png").stat().st_size > 0
    assert (docs / "study_scatter.png").stat().st_size > 0


def test_run_one_reuses_a_finished_model_and_writes_the_record(tmp_path, monkeypatch):
    """A run killed during its evaluation is evaluated again, not trained again."""
    import keras
    import numpy as np

    monkeypatch.setattr(study_paths, "CACHE", tmp_path / "cache")
    model_dir = tmp_path / "cache" / "runs" / "silu_s1"
    model_dir.mkdir(parents=True)
    inputs = keras.Input((4, 4, 3))
    keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs))).save(
        model_dir / "model.keras"
    )
    (model_dir / "results.json").write_text(
        json.dumps({"results": {"loss": 1.5}, "wall_time_s": 9})
    )
    seen = {}
    monkeypatch.setattr(study_arrays, "ensure_data", lambda config: None)
    monkeypatch.setattr(
        study_arrays, "eval_arrays", lambda config, arm: (np.zeros((2, 4, 4, 3)), [0, 1])
    )
    monkeypatch.setattr(
        study_protocol, "evaluate_model",
        lambda model, x, y, protocol: seen.setdefault("m", dict(clean=0.5, pgd20=0.2, pgd50x2=0.1,
                                                                autoattack=0.1, n=len(y))),
    )  # fmt: skip
    from sat_tf import training

    monkeypatch.setattr(training, "run", lambda *a, **k: pytest.fail("trained a finished run"))
    study.run_one("silu", 1, tmp_path / "results")
    record = json.loads((tmp_path / "results" / "silu_s1.json").read_text())
    assert record["metrics"]["n"] == 2 and record["train_results"] == {"loss": 1.5}
    assert record["config"]["activation"] == "silu" and record["config"]["seed"] == 1
    assert record["wall_time_s"]["train"] == 9 and record["machine"]["cpu_count"] >= 1
    assert record["arm"] == "cifar10" and record["eval_protocol"]["epsilon"] == 4.0


def test_digits_arm_keeps_the_rows_and_changes_the_data_and_scale():
    digits = study.ARMS["digits"]
    for row in study.ROWS:
        cifar = vars(study.load_config(row, 1, cache="/c"))
        small = vars(study.load_config(row, 1, cache="/c", arm=digits))
        for name in ("activation", "smooth_gradients", "num_steps", "random_start", "seed"):
            assert small[name] == cifar[name], (row, name)
        assert small["model_dir"] == f"/c/runs/digits/{row}_s1"
    assert (small["dataset"], small["image_size"], small["epsilon"]) == ("demo", 16, 16.0)
    assert small["augmentation"] == "none" and small["label_smoothing"] == 0.0
    assert study.result_path("relu", 2, "/r", digits) == Path("/r/digits/relu_s2.json")


def test_the_report_writes_one_section_per_arm(tmp_path):
    docs = tmp_path / "docs"
    for arm in study.ARMS.values():
        results = tmp_path / "results" / arm.name
        _write_result(results, "relu", 0, 0.5, 0.3)
        table = study_report.load_results(results, version=study.EVAL["version"])
        study_report.write_report(table, docs, rows=["relu"], seeds=[0], protocol=arm.protocol,
                                  arm=arm.name, data=arm.data)  # fmt: skip
    text = (docs / "study.md").read_text()
    assert text.count("| relu | relu | 1 (s0) | 50.0 | 30.0 |") == 2
    assert "| clean (10k) |" in text and "| clean (360) | PGD-20 (360) |" in text
    assert text.index(study_report.BEGIN) < text.index(study_report.markers("digits")[0])
    assert (docs / "study_digits_epsilon.png").exists() and (docs / "study_epsilon.png").exists()


@pytest.mark.parametrize("values, mean, std", [([0.5], 50.0, None), ([0.1, 0.3], 20.0, 14.142)])
def test_mean_std_in_percent(values, mean, std):
    got_mean, got_std = study_report.mean_std(values)
    assert got_mean == pytest.approx(mean)
    if std is None:
        assert got_std != got_std  # nan
    else:
        assert got_std == pytest.approx(std, abs=1e-3)


def test_eval_arrays_order_depends_on_the_images_not_the_file_names(tmp_path, monkeypatch):
    """The subset is the first images of the protocol's order: renaming files must not move it."""
    import dataclasses

    import numpy as np
    from PIL import Image

    arm = dataclasses.replace(study.CIFAR10, name="tiny")
    orders = []
    for name, reverse in (("a", False), ("b", True)):
        for label in ("cat", "dog"):
            for i, value in enumerate(sorted(range(10, 60, 10), reverse=reverse)):
                path = tmp_path / name / "test" / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image = np.full((8, 8, 3), value + (label == "dog"), np.uint8)
                Image.fromarray(image).save(path)
        monkeypatch.setattr(study_paths, "CACHE", tmp_path / f"cache_{name}")
        study_paths.CACHE.mkdir()
        config = dataclasses.replace(
            study.load_config("relu", 0, cache=tmp_path),
            dataset=f"folder:{tmp_path / name}", image_size=8, num_classes=2,
        )  # fmt: skip
        orders.append(study_arrays.eval_arrays(config, arm))
    (xa, ya), (xb, yb) = orders
    assert sorted(ya.tolist()) == [0] * 5 + [1] * 5 and ya.tolist() != sorted(ya.tolist())
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)


def test_standard_autoattack_pass_queues_finished_runs_without_its_file(tmp_path):
    _write_result(tmp_path, "relu", 0, 0.5, 0.3)
    _write_result(tmp_path, "silu", 0, 0.5, 0.3)
    done = study.result_path("silu", 0, tmp_path, standard_aa=True)
    done.parent.mkdir()
    done.write_text(json.dumps(dict(eval_protocol=study.EVAL)))
    # relu s1 has no result: it is trained by --run first, not attacked by this pass.
    assert study.pending(["relu", "silu"], [0, 1], tmp_path, standard_aa=True) == [("relu", 0)]
    calls = []

    def call(command, cwd):
        calls.append(command)
        return 0

    study.run_queue(["relu", "silu"], [0, 1], results=tmp_path, call=call,
                    claims=tmp_path / "c", standard_aa=True)  # fmt: skip
    assert len(calls) == 1 and calls[0][-1] == "--autoattack_standard" and "relu:0" in calls[0]


def test_standard_autoattack_runs_on_the_subset_with_the_true_gradient(tmp_path, monkeypatch):
    import keras
    import numpy as np

    from sat_tf import activations, autoattack

    monkeypatch.setattr(study_paths, "CACHE", tmp_path / "cache")
    results = tmp_path / "results"
    _write_result(results, "smoothgrad_both", 1, 0.5, 0.3)
    model_dir = tmp_path / "cache" / "runs" / "smoothgrad_both_s1"
    model_dir.mkdir(parents=True)
    inputs = keras.Input((4, 4, 3))
    keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs))).save(
        model_dir / "model.keras"
    )
    n = study.EVAL["subset_examples"]
    labels = np.arange(n + 5) % 10
    monkeypatch.setattr(study_arrays, "ensure_data", lambda config: None)
    monkeypatch.setattr(
        study_arrays, "eval_arrays", lambda config, arm: (np.zeros((n + 5, 4, 4, 3)), labels)
    )
    seen = {}

    def spy(model, images, labels, *, epsilon, version):
        seen.update(n=len(labels), epsilon=epsilon, version=version,
                    smooth=activations.smooth_gradients_enabled())  # fmt: skip
        stages = {"clean": 0.5, "apgd-ce": 0.3, "apgd-t": 0.25, "square": 0.25}
        return autoattack.AutoAttackResult(0.5, 0.25, stages, images, labels < 3)

    monkeypatch.setattr(autoattack, "auto_attack", spy)
    study.run_standard_autoattack("smoothgrad_both", 1, results)
    assert seen == dict(n=n, epsilon=4.0, version="standard", smooth=False)
    record = json.loads(
        study.result_path("smoothgrad_both", 1, results, standard_aa=True).read_text()
    )
    assert record["autoattack"] == 0.25 and record["autoattack_fast"] == pytest.approx(0.28)
    assert record["budget"]["apgd_steps"] == 100 and record["num_examples"] == n


def test_standard_autoattack_without_the_saved_model_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(study_paths, "CACHE", tmp_path / "cache")
    with pytest.raises(SystemExit, match="no saved model.*--rows=relu --seeds=2"):
        study.run_standard_autoattack("relu", 2, tmp_path)


def test_report_shows_standard_autoattack_next_to_fast_and_paired(tmp_path):
    results = tmp_path / "results"
    cases = [("relu", 0, 0.22, 0.20), ("relu", 1, 0.24, 0.21), ("silu", 0, 0.25, 0.22),
             ("silu", 1, 0.23, 0.22)]  # fmt: skip
    for row, seed, fast, standard in cases:
        _write_result(results, row, seed, 0.5, 0.3)
        path = study.result_path(row, seed, results, standard_aa=True)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(dict(row=row, seed=seed, eval_protocol=study.EVAL,
                                        num_examples=1000, autoattack=standard,
                                        autoattack_fast=fast, seconds=600)))  # fmt: skip
    version = study.EVAL["version"]
    standard = study_report.load_results(results / study.STANDARD_AA, version=version)
    study_report.write_report(
        study_report.load_results(results, version=version), tmp_path / "docs",
        rows=("relu", "silu"), seeds=(0, 1), protocol=study.EVAL, standard=standard,
    )  # fmt: skip
    text = (tmp_path / "docs" / "study.md").read_text()
    # Hand-computed: relu fast 22/24 -> 23.0 +- 1.4, standard 20/21 -> 20.5 +- 0.7, diff -2/-3;
    # silu standard - relu standard at seeds 0, 1: +2, +1 -> +1.5 +- 0.7.
    assert "| relu | 0,1 | 23.0 +- 1.4 | 20.5 +- 0.7 | -2.5 +- 0.7 |  | 10.0 |" in text
    assert "| silu | 0,1 | 24.0 +- 1.4 | 22.0 +- 0.0 | -2.0 +- 1.4 | +1.5 +- 0.7 | 10.0 |" in text
    # Results without a FAB-T stage are the former AutoAttack, never called standard.
    assert "without FAB-T" in text and "| AutoAttack std. budgets, no FAB-T |" in text
    with_fab = {
        row: [dict(r, stages={"fab-t": 0.2}) for r in runs] for row, runs in standard.items()
    }
    assert "| AutoAttack standard |" in study_report.standard_aa_markdown(
        with_fab, ("relu", "silu")
    )
