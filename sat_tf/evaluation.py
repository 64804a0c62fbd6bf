"""Robustness evaluation: accuracy under a list of attacks and epsilons, with masking checks.

    results = evaluate(model, (images, labels), attacks=["clean", "pgd-10", "pgd-50x3", "apgd-ce",
                       "apgd-t", "square", "autoattack"], epsilons=[2, 4, 8])
    results.save("eval/")  # results.json, results.md, accuracy_vs_{epsilon,steps}.png

Attack specs are strings such as "pgd-50x3" or `AttackSpec`s (`sat_tf.rows` lists them).
Epsilons are L-inf radii in pixel units (0-255 images: 8 means 8/255). Besides the table, the
evaluation runs "pgd-20" at `large_epsilon` and, when a `surrogate` model is given, a transfer
PGD from it, for the checks in `sat_tf.masking`. An attack runs only on the examples still
standing (correct clean, and for restart r, having survived restarts 1..r-1): the accuracy is
that of attacking every example, at a fraction of the cost when accuracy is low.
`tools/eval.py` is the command-line front end.
"""

import dataclasses
import time

import numpy as np
import tensorflow as tf

from sat_tf import attacks, autoattack, masking, reporting
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


def _correct(model, images, labels):
    return np.argmax(np.asarray(model(images, training=False)), axis=1) == labels


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
    x, y = tf.constant(images, tf.float32), tf.constant(labels, tf.int32)
    if spec.kind == "autoattack":
        return autoattack.auto_attack(
            model,
            images,
            labels,
            epsilon=epsilon,
            version=spec.version,
            seed=seed,
            jit_compile=jit_compile,
        ).robust
    robust = _correct(model, x, labels)
    if spec.kind == "clean":
        return robust
    for restart in range(spec.num_restarts if spec.kind in ("pgd", "transfer") else 1):
        if spec.kind in ("fgsm", "pgd", "transfer"):
            kind = "fgsm" if spec.kind == "fgsm" else "pgd"
            adv = _gradient_attack(
                source or model,
                kind,
                x,
                y,
                epsilon=epsilon,
                num_steps=spec.num_steps,
                seed=seed + restart,
                step_size=spec.step_size,
                jit_compile=jit_compile,
            )
        elif spec.kind == "square":
            adv = autoattack.square(
                model,
                x,
                y,
                epsilon=epsilon,
                num_queries=spec.num_steps,
                seed=seed,
                jit_compile=jit_compile,
            )
        else:
            adv = autoattack.apgd(
                model,
                x,
                y,
                epsilon=epsilon,
                num_steps=spec.num_steps,
                seed=seed,
                loss="ce" if spec.kind == "apgd-ce" else "dlr",
                targeted=spec.kind == "apgd-t",
                num_restarts=spec.num_restarts,
                jit_compile=jit_compile,
            )
        robust &= _correct(model, adv, labels)  # An example is robust only if it survives all.
    return robust


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


def _chunks(indices, batch_size):
    """Batches of `indices`, the last one padded by repeating its own examples.

    Every batch has `batch_size` entries, so a compiled attack meets one batch shape per
    evaluation; the first `count` results of each are the real ones: (batch, count) pairs.
    """
    for i in range(0, len(indices), batch_size):
        chunk = indices[i : i + batch_size]
        yield np.resize(chunk, batch_size), len(chunk)


def _run(model, spec, images, labels, *, epsilon, seed, batch_size, source=None, jit_compile=False):
    """One attack on every example: (`Row`, [N] bool robust).

    Only the examples still standing are attacked: first the correctly classified ones, then, for
    each further PGD restart, those that survived the earlier restarts (as AutoAttack does). The
    accuracy is the same as attacking everything (an example counts as robust only if it is
    correct and survives every restart), at a fraction of the cost on a model with low accuracy.
    Every call gets `min(batch_size, N)` examples (`_chunks`): padded ones count nowhere.
    """
    start = time.perf_counter()
    clean = AttackSpec("clean")
    robust = np.zeros(len(labels), bool)
    batch_size = max(1, min(batch_size, len(labels)))
    for chunk, count in _chunks(np.arange(len(labels)), batch_size):
        robust[chunk[:count]] = attack_batch(
            model, clean, images[chunk], labels[chunk], epsilon=0.0
        )[:count]
    restarts = spec.num_restarts if spec.kind in ("pgd", "transfer") else 1
    single = dataclasses.replace(spec, num_restarts=1) if restarts > 1 else spec
    for restart in range(restarts if spec.kind != "clean" else 0):
        standing = np.flatnonzero(robust)
        for chunk, count in _chunks(standing, batch_size):
            robust[chunk[:count]] = attack_batch(
                model,
                single,
                images[chunk],
                labels[chunk],
                epsilon=epsilon,
                seed=seed + restart,
                source=source,
                jit_compile=jit_compile,
            )[:count]
    row = Row(
        attack=spec.label,
        kind=spec.kind,
        epsilon=float(epsilon),
        num_steps=spec.num_steps,
        num_restarts=spec.num_restarts,
        step_size=spec.step_size,
        accuracy=float(robust.mean()),
        seconds=round(time.perf_counter() - start, 3),
    )
    return row, robust


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
    verbose=True,
    jit_compile=False,
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
        verbose: Print one line per row and per check.
        jit_compile: Compile the attacks with XLA (for GPU/TPU; on CPU TensorFlow's oneDNN
            convolutions are faster than XLA's).

    Returns:
        A `reporting.EvaluationResults` (rows, per-epsilon worst case over attacks, checks).
    """
    require_logits(model, where="evaluate")
    images, labels = collect(dataset, num_examples)
    specs = [parse_attack(a) for a in attacks]
    if pgd_step_size is not None:
        specs = [
            dataclasses.replace(a, step_size=float(pgd_step_size)) if a.kind == "pgd" else a
            for a in specs
        ]
    rows, worst = [], {}
    jobs = [(spec, eps, None) for eps in epsilons for spec in specs if spec.kind != "clean"]
    jobs = [(AttackSpec("clean"), 0.0, None)] + jobs
    if surrogate is not None:
        jobs += [(AttackSpec("transfer", 20), eps, surrogate) for eps in epsilons]
    if large_epsilon is not None and checks:
        jobs.append((AttackSpec("pgd", 20), float(large_epsilon), None))
    for spec, eps, source in jobs:
        row, robust = _run(
            model,
            spec,
            images,
            labels,
            epsilon=eps,
            seed=seed,
            batch_size=batch_size,
            source=source,
            jit_compile=jit_compile,
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
            model, images, rows, large_epsilon=large_epsilon, tolerance=tolerance, verbose=verbose
        )
        if checks
        else []
    )
    return reporting.EvaluationResults(
        rows=rows,
        worst_case={float(e): float(r.mean()) for e, r in worst.items()},
        checks=found,
        num_examples=len(labels),
    )
