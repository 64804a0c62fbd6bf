"""Robustness evaluation: accuracy under a list of attacks and epsilons, with masking checks.

    results = evaluate(model, (images, labels), attacks=["clean", "pgd-10", "pgd-50x3", "apgd-ce",
                       "apgd-t", "square", "autoattack"], epsilons=[2, 4, 8],
                       state="eval/state.npz")
    results.save("eval/")  # results.json, results.md, per_example.npz, two plots

Attack specs are strings such as "pgd-50x3" or `AttackSpec`s (`sat_tf.jobs` lists them).
Epsilons are L-inf radii in pixel units (0-255 images: 8 means 8/255). Besides the table, the
evaluation runs "pgd-20" at `large_epsilon` and, when a `surrogate` model is given, a transfer
PGD from it, for the checks in `sat_tf.masking`. An attack runs only on the examples still
standing (correct clean, and for restart r, having survived restarts 1..r-1; `sat_tf.passes`):
the accuracy is that of attacking every example, at a fraction of the cost when accuracy is low.

Long evaluations show their progress and an estimate of the work ahead (`verbose=1`), and with
`state=` record every finished batch, so that the same call after a kill resumes where it was and
ends with the same per-example results (`sat_tf.evalstate`). `sat_tf.evalrun` runs a whole
evaluation of a run folder or .keras file (`tools/eval.py`).
"""

import dataclasses
import sys

import numpy as np

from sat_tf import jobs, masking, passes, reporting
from sat_tf.examples import Examples
from sat_tf.rows import AttackSpec, Row

__all__ = ["attack_batch", "collect", "evaluate"]


def attack_batch(
    model, spec, images, labels, *, epsilon, seed=0, surrogate=None, jit_compile=False
):
    """Per-example robustness of one batch: [B] bool, True where the model stays correct.

    Args:
        model: The model evaluated.
        spec: An attack spec (`sat_tf.jobs`), string or `AttackSpec`.
        images: [B, H, W, C] pixels.
        labels: [B] int classes.
        epsilon: L-inf radius in pixel units.
        seed: Seed of the attack (restart r of PGD uses seed + r).
        surrogate: The model a "transfer" attack computes its gradients on.
        jit_compile: Compile the attack with XLA.
    """
    x = np.asarray(images, np.float32)
    _, record = jobs.run(
        model,
        (x, labels),
        [(spec, float(epsilon))],
        where="attack_batch",
        seed=seed,
        batch_size=len(x),
        surrogate=surrogate,
        jit_compile=jit_compile,
    )
    return record.fooled_by[0] == passes.ROBUST


def collect(data, num_examples=None):
    """(images float32 [N, H, W, C], labels int32 [N]) from arrays or a tf.data (batched or not,
    labels one-hot or not), read only up to `num_examples`: all of it as one `Examples` chunk."""
    chunk = next(Examples(data, num_examples=num_examples).chunks(sys.maxsize), None)
    if chunk is None:
        return np.zeros([0], np.float32), np.zeros([0], np.int32)
    return chunk.images, chunk.labels


def _probe(data, num_examples, size=64):
    """The first `size` examples of the evaluation (of every shard), for the masking checks."""
    return collect(data, size if num_examples is None else min(size, num_examples))[0]


def evaluate(
    model,
    data,
    *,
    attacks,
    epsilons,
    num_examples=None,
    batch_size=128,
    chunk_size=None,
    shard=None,
    seed=0,
    surrogate=None,
    pgd_step_size=None,
    large_epsilon=128.0,
    checks=True,
    verbose=1,
    jit_compile=False,
    state=None,
    discard_state=False,
    settings=None,
):
    """Accuracy of `model` under every attack at every epsilon, plus the masking checks.

    Args:
        model: Keras model mapping [0, 255] pixels to logits.
        data: (images, labels) arrays, or a tf.data.Dataset of (images, labels).
        attacks: Attack specs, strings or `AttackSpec`s (see `sat_tf.jobs`).
        epsilons: L-inf radii, pixel units.
        num_examples: Evaluate on the first N examples (all when None).
        batch_size: Examples per attack call.
        chunk_size: Examples read and attacked at a time: memory is bounded by it, results
            do not depend on it (`sat_tf.examples`). None: arrays at once, a dataset 8
            batches at a time.
        shard: "I/N" (or a `sat_tf.examples.Shard`): evaluate only the examples whose index
            is I modulo N, for one of N processes; `sat_tf.shards.merge` joins their states.
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
        discard_state: Ignore (and overwrite) a state file of another evaluation instead of
            refusing.
        settings: Further settings that change results, e.g. {"deterministic": True}: part of
            the state's fingerprint, so a resume under other settings is refused.

    Returns:
        A `reporting.EvaluationResults` (rows, per-epsilon worst case over attacks, checks,
        per-example records).

    Raises:
        evalstate.StateMismatchError: `state` holds an unfinished run of another evaluation.
    """
    verbose = int(verbose)
    specs = [jobs.parse_attack(a) for a in attacks]
    if pgd_step_size is not None:
        specs = [
            dataclasses.replace(a, step_size=float(pgd_step_size)) if a.kind == "pgd" else a
            for a in specs
        ]
    entries = [(spec, float(eps)) for eps in epsilons for spec in specs if spec.kind != "clean"]
    entries = [(AttackSpec("clean"), 0.0)] + entries
    if surrogate is not None:
        entries += [(jobs.parse_attack("transfer-20"), float(eps)) for eps in epsilons]
    if large_epsilon is not None and checks:
        entries.append((jobs.parse_attack("pgd-20"), float(large_epsilon)))
    ran, record = jobs.run(
        model,
        Examples(data, num_examples=num_examples, shard=shard),
        entries,
        where="evaluate",
        seed=seed,
        batch_size=batch_size,
        chunk_size=chunk_size,
        surrogate=surrogate,
        jit_compile=jit_compile,
        state=state,
        discard_state=discard_state,
        verbose=verbose,
        pgd_step_size=pgd_step_size,
        **(settings or {}),
    )
    labels = record.labels
    rows, worst = [], {}
    for j, (spec, eps) in enumerate(entries):
        robust = record.fooled_by[j] == passes.ROBUST
        row = Row(
            attack=spec.label,
            kind=spec.kind,
            epsilon=eps,
            num_steps=spec.num_steps,
            num_queries=spec.num_queries,
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
            _probe(data, num_examples),
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
            jobs=[job.label for job in ran],
            passes=[[p.name for p in job.passes] for job in ran],
        ),
        evaluation_id=record.evaluation_id,
    )
