"""One run of the study: its config from the row's flagfile, training, evaluation, result file."""

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from sat_tf import rundir
from sat_tf.atomic import atomic_write
from study import arrays, paths, protocol
from study.jobs import result_path
from study.protocol import CIFAR10, SUMMARY


def load_config(row, seed, *, cache=None, arm=CIFAR10):
    """The row's flagfile as a `TrainConfig`, parsed by absl exactly as tools/train.py does."""
    from absl import flags

    from sat_tf import config as config_lib

    flag_values = flags.FlagValues()  # a fresh one: nothing leaks from an earlier row
    config_lib.define_flags(flag_values)
    model_dir = Path(cache or paths.CACHE) / "runs" / arm.folder / f"{row}_s{seed}"
    arm_flags = [f"--flagfile={arm.flagfile}"] if arm.flagfile else []
    cwd = os.getcwd()
    os.chdir(paths.ROOT)  # nested flagfiles are written relative to the repository root
    try:
        flag_values(["study", f"--flagfile=configs/study/{row}.cfg", *arm_flags, f"--seed={seed}"])
    finally:
        os.chdir(cwd)
    flag_values["model_dir"].value = str(model_dir)
    return config_lib.from_flags(flag_values).validate()


def machine():
    """Where and with what code a result was made."""
    import tensorflow as tf

    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        tensorflow=tf.__version__,
        load_average=list(os.getloadavg()),
        code_version=os.environ.get("SAT_TF_STUDY_COMMIT") or _git_head(),
    )


def _git_head():
    try:
        command = ["git", "rev-parse", "HEAD"]
        return subprocess.check_output(command, cwd=paths.ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_record(path, record):
    """The result file, written atomically: its presence marks the run finished."""
    atomic_write(path, json.dumps(record, indent=2, default=float) + "\n")


def _utc_now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_one(row, seed, results=None, arm=CIFAR10):
    """Trains (or resumes, or reuses) one run, evaluates it and writes its result file."""
    import keras

    from sat_tf import training

    config = load_config(row, seed, arm=arm)
    arrays.ensure_data(config)
    started = time.time()
    final = Path(config.model_dir) / rundir.FINAL_MODEL
    if not final.exists():
        command = f"python tools/study.py --run --arm={arm.name}  # {row} seed {seed}"
        summary = training.run(config, command=command)
        if summary.get("stopped"):
            sys.exit(f"{row} seed {seed}: stopped at step {summary['step']}; re-run to resume.")
    train_summary = json.loads((Path(config.model_dir) / "results.json").read_text())
    model = keras.saving.load_model(final)
    images, labels = arrays.eval_arrays(config, arm)
    eval_start = time.time()
    metrics = protocol.evaluate_model(model, images, labels, arm.protocol)
    record = dict(
        row=row,
        seed=seed,
        config=dataclasses.asdict(config),
        arm=arm.name,
        eval_protocol=arm.protocol,
        metrics=metrics,
        train_results=train_summary["results"],
        wall_time_s=dict(
            train=train_summary["wall_time_s"],
            eval=round(time.time() - eval_start, 1),
            this_process=round(time.time() - started, 1),
        ),
        machine=machine(),
        finished_utc=_utc_now(),
    )
    path = result_path(row, seed, results, arm)
    _write_record(path, record)
    print(f"Wrote {path}: {json.dumps({k: metrics[k] for k in SUMMARY})}")


def run_standard_autoattack(row, seed, results=None, arm=CIFAR10):
    """Standard AutoAttack on the protocol's subset of one finished run; writes its result file.

    The model is the run's saved final model (`<cache>/runs/...`); the images are the subset the
    run's AutoAttack-fast saw, so the two numbers pair image for image.
    """
    import keras

    from sat_tf import activations, autoattack

    config = load_config(row, seed, arm=arm)
    final = Path(config.model_dir) / rundir.FINAL_MODEL
    if not final.exists():
        sys.exit(
            f"error: {row} seed {seed}: no saved model at {final} (the cache was cleared?). "
            f"Remove {result_path(row, seed, results, arm)} and run `tools/study.py --run "
            f"--rows={row} --seeds={seed}` to train it again, then this pass."
        )
    arrays.ensure_data(config)
    model = keras.saving.load_model(final)
    images, labels = arrays.eval_arrays(config, arm)
    n, eval_protocol = arm.protocol["subset_examples"], arm.protocol
    start = time.perf_counter()
    with activations.smooth_gradients(False):  # the ReLU network's true gradient, as in `EVAL`
        aa = autoattack.auto_attack(
            model, images[:n], labels[:n], epsilon=eval_protocol["epsilon"], version="standard"
        )
    main = json.loads(result_path(row, seed, results, arm).read_text())["metrics"]
    record = dict(
        row=row,
        seed=seed,
        arm=arm.name,
        eval_protocol=eval_protocol,
        autoattack_version="standard",
        budget=autoattack.VERSIONS["standard"],
        num_examples=n,
        clean=aa.clean_accuracy,
        autoattack=aa.robust_accuracy,
        stages=aa.stages,
        autoattack_fast=main["autoattack"],
        seconds=round(time.perf_counter() - start, 1),
        machine=machine(),
        finished_utc=_utc_now(),
    )
    _write_record(result_path(row, seed, results, arm, standard_aa=True), record)
    fast, seconds = main["autoattack"], record["seconds"]
    print(
        f"{row} seed {seed}: AutoAttack standard {aa.robust_accuracy:.3f}, "
        f"fast {fast:.3f} ({seconds:.0f} s)"
    )
