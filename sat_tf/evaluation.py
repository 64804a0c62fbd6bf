"""Robustness evaluation: accuracy under a list of attacks and epsilons, with masking checks.

    results = evaluate(model, (images, labels), attacks=["clean", "pgd-10", "pgd-50x3", "apgd-ce",
                       "apgd-t", "square", "autoattack"], epsilons=[2, 4, 8],
                       state="eval/state.npz")
    results.save("eval/")  # results.json, results.md, per_example.npz, two plots

Attack specs are strings such as "pgd-50x3" or `AttackSpec`s (`sat_tf.rows` lists them).
Epsilons are L-inf radii in pixel units (0-255 images: 8 means 8/255). Besides the table, the
evaluation runs "pgd-20" at `large_epsilon` and, when a `surrogate` model is given, a transfer
PGD from it, for the checks in `sat_tf.masking`. An attack runs only on the examples still
standing (correct clean, and for restart r, having survived restarts 1..r-1; `sat_tf.passes`):
the accuracy is that of attacking every example, at a fraction of the cost when accuracy is low.

Long evaluations show their progress and an estimate of the work ahead (`verbose=1`), and with
`state=` record every finished batch, so that the same call after a kill resumes where it was and
ends with the same per-example results (`sat_tf.evalstate`). `tools/eval.py` is the command-line
front end.
"""

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

from sat_tf import attacks, autoattack, evalstate, masking, passes, reporting
from sat_tf.attacks import require_logits
from sat_tf.rows import AttackSpec, Row, parse_attack

__all__ = ["AttackSpec", "Row", "attack_batch", "collect", "evaluate", "parse_attack"]


def _gradient_attack(
    source, kind, images, labels, *, epsilon, num_steps, seed, step_size=None, jit_compile=False
):
    """`sat_tf.attacks` FGSM or PGD (default step 2.5 * epsilon / K, Madry et al. 2018), compiled
    once per (model, kind, epsilon, steps, step, jit_compile) for every batch size."""
    if step_size is None and kind == "pgd":
        step_size = 2.5 * epsilon / num_steps
    key = ("evaluation", kind, float(epsilon), num_steps, step_size)
    seed = tf.constant([seed, 0], tf.int64)

    def build(ref):
        if kind == "fgsm":
            return lambda x, y, s: attacks.fgsm(ref(), x, y, epsilon=epsilon)
        return lambda x, y, s: attacks.pgd(
            ref(), x, y, epsilon=epsilon, step_size=step_size, num_steps=num_steps, seed=s
        )

    attack = attacks.compiled(source, key, build, images, labels, seed, jit_compile=jit_compile)
    return attack(images, labels, seed)


def _job(model, spec, epsilon, *, seed, num_classes, source=None, jit_compile=False):
    """The `passes.Job` of one attack spec at one epsilon."""
    if spec.kind == "clean":
        return passes.Job("clean", (passes.CLEAN,))
    label = f"{spec.label} eps={epsilon:g}"
    options = dict(epsilon=epsilon, seed=seed, jit_compile=jit_compile)
    if spec.kind == "autoattack":
        return autoattack.attack_job(
            model, num_classes=num_classes, version=spec.version, **options
        )
    if spec.kind in ("fgsm", "pgd", "transfer"):
        kind = "fgsm" if spec.kind == "fgsm" else "pgd"
        restarts = spec.num_restarts if kind == "pgd" else 1
        steps = 1 if kind == "fgsm" else spec.num_steps

        def restart(r):
            return lambda x, y: _gradient_attack(
                source or model,
                kind,
                x,
                y,
                num_steps=spec.num_steps,
                step_size=spec.step_size,
                **(options | {"seed": seed + r}),
            )

        name = "restart" if restarts > 1 else spec.label
        runs = [passes.Pass(name, restart(r), gradients=steps) for r in range(restarts)]
        return passes.Job(label, (passes.CLEAN, *runs))
    if spec.kind == "square":

        def square(x, y):
            return autoattack.square(model, x, y, num_queries=spec.num_steps, **options)

        queries = spec.num_steps + 2  # the start, every query, the final check
        return passes.Job(label, (passes.CLEAN, passes.Pass(spec.label, square, queries=queries)))
    targeted = spec.kind == "apgd-t"
    targets = min(9, num_classes - 1) if targeted else 1
    if targeted and targets < 9:
        warnings.warn(
            f"{label}: a {num_classes}-class model has {targets} target classes, not 9; "
            f"using {targets}.",
            stacklevel=3,
        )

    def apgd(x, y):
        return autoattack.apgd(
            model,
            x,
            y,
            num_steps=spec.num_steps,
            loss="dlr" if targeted else "ce",
            targeted=targeted,
            target_classes=targets,
            num_restarts=spec.num_restarts,
            **options,
        )

    work = (spec.num_steps + 1) * spec.num_restarts * targets  # a gradient at the start, one a step
    return passes.Job(label, (passes.CLEAN, passes.Pass(spec.label, apgd, gradients=work)))


def _num_classes(model, images):
    return int(model(tf.constant(images[:1], tf.float32), training=False).shape[-1])


def attack_batch(model, spec, images, labels, *, epsilon, seed=0, source=None, jit_compile=False):
    """Per-example robustness of one batch: [B] bool, True where the model stays correct.

    Args:
        model: The model evaluated.
        spec: An `AttackSpec`.
        images: [B, H, W, C] pixels.
        labels: [B] int classes.
        epsilon: L-inf radius in pixel units.
        seed: Seed of the attack (restart r of PGD uses seed + r).
        source: The model the attack computes gradients on, for kind="transfer" (else `model`).
        jit_compile: Compile the attack with XLA (FGSM, PGD, APGD, Square).
    """
    x, y = np.asarray(images, np.float32), np.asarray(labels).astype(np.int32)
    job = _job(
        model,
        spec,
        epsilon,
        seed=seed,
        num_classes=_num_classes(model, x),
        source=source,
        jit_compile=jit_compile,
    )
    fooled_by = np.full(len(y), passes.ROBUST, np.int16)
    passes.run_job(model, job, x, y, fooled_by=fooled_by, batch_size=max(1, len(y)))
    return fooled_by == passes.ROBUST


def collect(dataset, num_examples=None):
    """(images float32 [N, H, W, C], labels int32 [N]) from arrays or a tf.data (batched or not)."""
    if isinstance(dataset, tuple | list):
        images, labels = (np.asarray(a) for a in dataset)
    else:
        parts = [(np.asarray(x), np.asarray(y)) for x, y in dataset.as_numpy_iterator()]
        if parts and parts[0][1].ndim == 0:  # An unbatched dataset.
            parts = [(x[None], y[None]) for x, y in parts]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
    if labels.ndim > 1:  # One-hot.
        labels = np.argmax(labels, axis=-1)
    n = len(labels) if num_examples is None else min(num_examples, len(labels))
    return images[:n].astype(np.float32), labels[:n].astype(np.int32)


def evaluate(
    model,
    dataset,
    *,
    attacks,
    epsilons,
    num_examples=None,
    batch_size=128,
    seed=0,
    surrogate=None,
    pgd_step_size=None,
    large_epsilon=128.0,
    checks=True,
    verbose=1,
    jit_compile=False,
    state=None,
    restart=False,
):
    """Accuracy of `model` under every attack at every epsilon, plus the masking checks.

    Args:
        model: Keras model mapping [0, 255] pixels to logits.
        dataset: (images, labels) arrays, or a tf.data.Dataset of (images, labels).
        attacks: Attack specs, strings or `AttackSpec`s (see the module docstring).
        epsilons: L-inf radii, pixel units.
        num_examples: Evaluate on the first N examples (all when None).
        batch_size: Examples per attack call.
        seed: Seed of every attack.
        surrogate: Optional model (e.g. the ReLU twin) for the transfer check: PGD-20 computed
            on it, evaluated on `model`, at every epsilon.
        pgd_step_size: Step in pixels of the listed PGD attacks (e.g. 1, as in the official SAT
            evaluation); None uses 2.5 * epsilon / K. The masking probes keep 2.5 * epsilon / K.
        large_epsilon: Radius at which PGD-20 should bring accuracy to ~0; None skips it.
        checks: Run the gradient-masking checks of `sat_tf.masking`.
        verbose: 0 silent; 1 the work ahead and a time estimate, a progress bar per attack pass
            (log lines when output is not a terminal), one line per row and per check; 2 the
            rows and checks only.
        jit_compile: Compile the attacks with XLA (for GPU/TPU; on CPU TensorFlow's oneDNN
            convolutions are faster than XLA's).
        state: Path of a state file (`sat_tf.evalstate`), rewritten after every batch; a call
            finding the state of an unfinished run of the same evaluation resumes it.
        restart: Ignore (and overwrite) a state file of another evaluation instead of refusing.

    Returns:
        A `reporting.EvaluationResults` (rows, per-epsilon worst case over attacks, checks,
        per-example records).

    Raises:
        evalstate.StateMismatchError: `state` holds an unfinished run of another evaluation.
    """
    verbose = int(verbose)
    require_logits(model, where="evaluate")
    images, labels = collect(dataset, num_examples)
    specs = [parse_attack(a) for a in attacks]
    if pgd_step_size is not None:
        specs = [
            dataclasses.replace(a, step_size=float(pgd_step_size)) if a.kind == "pgd" else a
            for a in specs
        ]
    entries = [(spec, eps, None) for eps in epsilons for spec in specs if spec.kind != "clean"]
    entries = [(AttackSpec("clean"), 0.0, None)] + entries
    if surrogate is not None:
        entries += [(AttackSpec("transfer", 20), eps, surrogate) for eps in epsilons]
    if large_epsilon is not None and checks:
        entries.append((AttackSpec("pgd", 20), float(large_epsilon), None))
    num_classes = _num_classes(model, images)
    jobs = [
        _job(
            model,
            spec,
            float(eps),
            seed=seed,
            num_classes=num_classes,
            source=source,
            jit_compile=jit_compile,
        )
        for spec, eps, source in entries
    ]
    batch_size = max(1, min(batch_size, len(labels)))
    record = evalstate.EvaluationState.open(
        Path(state) if state else None,
        len(jobs),
        len(labels),
        restart=restart,
        model=model,
        images=images,
        labels=labels,
        attacks=[job.label for job in jobs],
        seed=seed,
        batch_size=batch_size,
        surrogate=surrogate,
        pgd_step_size=pgd_step_size,
        jit_compile=bool(jit_compile),
    )
    passes.run_jobs(
        model, jobs, images, labels, record, batch_size=batch_size, pad=jit_compile, verbose=verbose
    )
    rows, worst = [], {}
    for j, (spec, eps, _) in enumerate(entries):
        robust = record.fooled_by[j] == passes.ROBUST
        row = Row(
            attack=spec.label,
            kind=spec.kind,
            epsilon=float(eps),
            num_steps=spec.num_steps,
            num_restarts=spec.num_restarts,
            step_size=spec.step_size,
            accuracy=float(robust.mean()) if len(labels) else 0.0,
            seconds=round(float(record.seconds[j]), 3),
        )
        rows.append(row)
        if spec.kind != "transfer" and eps in epsilons:
            worst[eps] = worst.get(eps, robust) & robust
        if verbose:
            accuracy, seconds = row.accuracy, row.seconds
            print(f"{spec.label:>16s}  eps={eps:<7g} accuracy={accuracy:.4f}  ({seconds:.1f} s)")
    tolerance = max(0.01, 1.0 / max(len(labels), 1))
    found = (
        masking.run_checks(
            model,
            images,
            rows,
            large_epsilon=large_epsilon,
            tolerance=tolerance,
            verbose=bool(verbose),
        )
        if checks
        else []
    )
    return reporting.EvaluationResults(
        rows=rows,
        worst_case={float(e): float(r.mean()) for e, r in worst.items()},
        checks=found,
        num_examples=len(labels),
        per_example=reporting.PerExample(
            labels=labels,
            fooled_by=record.fooled_by.copy(),
            jobs=[job.label for job in jobs],
            passes=[[p.name for p in job.passes] for job in jobs],
        ),
    )
