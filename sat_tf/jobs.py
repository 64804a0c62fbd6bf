"""Every attack an evaluation can run, by name, and the one path that runs them.

An attack spec is a string `name[-budget][xrestarts]` (`parse_attack`) or a
`sat_tf.rows.AttackSpec`; its name is a key of `ATTACKS`, the registry:

    "clean"                   no attack.
    "fgsm"                    one signed-gradient step of size epsilon.
    "pgd-K", "pgd-KxR"        PGD, K steps (default 10) of 2.5 * epsilon / K (Madry et al. 2018)
                              or of `step_size`, random start; R restarts: an example counts
                              as robust only if it survives all R.
    "apgd-ce[-K][xR]"         APGD on cross-entropy, K steps (default 100).
    "apgd-dlr[-K][xR]"        APGD on the DLR loss (>= 3 classes).
    "apgd-t[-K][xR]"          APGD, targeted DLR loss, `TARGET_CLASSES` targets (>= 4 classes).
    "fab-t[-K]"               FAB-T, K steps (default 100), `TARGET_CLASSES` targets.
    "square[-Q]"              Square Attack, Q queries (default 5000).
    "autoattack[-fast|-rand]" the AutoAttack ensemble, version "standard" (default), "fast" or
                              "rand": the stages of `VERSIONS`, built by the entries above.
    "transfer[-K]"            PGD-K (default 20) computed on a surrogate model, checked on the
                              model (the transfer check of `sat_tf.masking`).

`job(spec, epsilon, context)` makes one attack at one epsilon a `sat_tf.passes.Job`: the clean
pass, then the attack's passes (one per PGD restart, one per AutoAttack stage), each with its
worst-case work per example for the estimate. `run` is the one path of every evaluation
(`sat_tf.evaluation.evaluate`, `sat_tf.autoattack.auto_attack`, `sat_tf.robustbench.benchmark`):
the logits check, the class count, the jobs, the resumable state and the loop.

AutoAttack's versions and budgets follow fra31/auto-attack (`autoattack.py`, `set_version`).
"""

import dataclasses
import re
from pathlib import Path

import keras
import numpy as np

from sat_tf import attacks, backend, evalstate, options, passes
from sat_tf.apgd import apgd, check_num_classes
from sat_tf.attacks import target_classes
from sat_tf.examples import Examples
from sat_tf.fab import fab_targeted
from sat_tf.rows import AttackSpec
from sat_tf.square import square

TARGET_CLASSES = 9  # targets of APGD-T and FAB-T, as in AutoAttack's standard version

VERSIONS = {
    "standard": dict(
        attacks=("apgd-ce", "apgd-t", "fab-t", "square"),
        apgd_steps=100,
        num_restarts=1,
        target_classes=9,
        fab_steps=100,
        square_queries=5000,
        eot_iter=1,
    ),
    "rand": dict(
        attacks=("apgd-ce", "apgd-dlr"),
        apgd_steps=100,
        num_restarts=1,
        target_classes=9,
        fab_steps=100,
        square_queries=5000,
        eot_iter=20,
    ),
    "fast": dict(
        attacks=("apgd-ce", "apgd-t", "square"),
        apgd_steps=20,
        num_restarts=1,
        target_classes=3,
        fab_steps=20,
        square_queries=300,
        eot_iter=1,
    ),
}


@dataclasses.dataclass(frozen=True)
class Context:
    """What every attack of one evaluation shares.

    Attributes:
        model: The model evaluated (logits).
        num_classes: Its number of classes.
        seed: Seed of every attack (restart r of PGD uses seed + r).
        jit_compile: Compile the attacks with XLA.
        clip_min: Lowest valid pixel value.
        clip_max: Highest valid pixel value.
        surrogate: The model a transfer attack computes its gradients on.
    """

    model: object
    num_classes: int
    seed: int = 0
    jit_compile: bool = False
    clip_min: float = 0.0
    clip_max: float = 255.0
    surrogate: object = None

    @property
    def common(self):
        """The keyword arguments every attack function of `sat_tf.apgd`, `sat_tf.fab` and
        `sat_tf.square` takes from the context."""
        return dict(clip_min=self.clip_min, clip_max=self.clip_max, jit_compile=self.jit_compile)


@dataclasses.dataclass(frozen=True)
class Attack:
    """An entry of `ATTACKS`.

    Attributes:
        build: `build(spec, epsilon, context, targets)` -> the attack's `passes.Pass`es (the
            clean pass excluded); `targets` is the resolved number of target classes.
        budget: The default steps (or queries, with `queries=True`) of the spec's budget.
        queries: The budget counts queries (`AttackSpec.num_queries`), not steps.
        targeted: Takes target classes (`target_classes` resolves their number).
        dlr: Uses the DLR loss (needs 3 classes, 4 when targeted).
    """

    build: object
    budget: int | None = None
    queries: bool = False
    targeted: bool = False
    dlr: bool = False


def _seed_tensor(seed):
    """A seed as a traced argument: int64 under TensorFlow, int32 under JAX (no 64-bit types
    there), so every restart's seed reuses one compiled attack."""
    if backend.NAME == "jax" and not -(2**31) <= seed < 2**31:
        raise ValueError(
            f"Under JAX a PGD/FGSM seed must fit in int32 (JAX runs without 64-bit types). "
            f"Received: seed={seed}; use a seed below 2**31."
        )
    return keras.ops.convert_to_tensor(seed, passes.ID_DTYPE)


def _gradient_attack(source, kind, epsilon, spec, seed, jit_compile):
    """`sat_tf.attacks` FGSM or PGD on one batch (default step 2.5 * epsilon / K, Madry et al.
    2018), compiled once per (model, kind, epsilon, steps, step, jit_compile) for every batch;
    the seed and the examples' indices (which key PGD's random start) are traced arguments."""
    step_size = spec.step_size
    if step_size is None and kind == "pgd":
        step_size = 2.5 * epsilon / spec.num_steps
    key = ("evaluation", kind, float(epsilon), spec.num_steps, step_size)
    seed = _seed_tensor(seed)

    def build(ref):
        if kind == "fgsm":
            return lambda x, y, s, ids: attacks.fgsm(ref(), x, y, epsilon=epsilon)
        return lambda x, y, s, ids: attacks.pgd(
            ref(),
            x,
            y,
            epsilon=epsilon,
            step_size=step_size,
            num_steps=spec.num_steps,
            seed=s,
            ids=ids,
        )

    def attack(x, y, ids):
        run = backend.compiled(source, key, build, x, y, seed, ids, jit_compile=jit_compile)
        return run(x, y, seed, ids)

    return attack


def _fgsm(spec, epsilon, c, targets):
    attack = _gradient_attack(c.model, "fgsm", epsilon, spec, c.seed, c.jit_compile)
    return [passes.Pass(spec.label, attack, gradients=1)]


def _pgd(spec, epsilon, c, targets, source=None):
    restarts = spec.num_restarts
    name = "restart" if restarts > 1 else spec.label
    return [
        passes.Pass(
            name,
            _gradient_attack(source or c.model, "pgd", epsilon, spec, c.seed + r, c.jit_compile),
            gradients=spec.num_steps,
        )
        for r in range(restarts)
    ]


def _transfer(spec, epsilon, c, targets):
    if c.surrogate is None:
        raise ValueError("A transfer attack needs a surrogate model. Received: surrogate=None")
    return _pgd(dataclasses.replace(spec, num_restarts=1), epsilon, c, targets, c.surrogate)


def _apgd(loss, targeted=False):
    def build(spec, epsilon, c, targets):
        targets = targets if targeted else 1

        def attack(x, y, ids):
            return apgd(
                c.model,
                x,
                y,
                epsilon=epsilon,
                num_steps=spec.num_steps,
                loss=loss,
                targeted=targeted,
                num_restarts=spec.num_restarts,
                target_classes=targets,
                eot_iter=spec.eot_iter,
                seed=c.seed,
                ids=ids,
                **c.common,
            )

        # A gradient at the start, then one a step (as fra31/auto-attack's apgd counts).
        work = (spec.num_steps + 1) * spec.num_restarts * targets * spec.eot_iter
        return [passes.Pass(spec.label, attack, gradients=work)]

    return build


def _fab_t(spec, epsilon, c, targets):
    def attack(x, y, ids):
        del ids  # FAB-T draws nothing: one run per target from the clean image.
        return fab_targeted(
            c.model,
            x,
            y,
            epsilon=epsilon,
            num_steps=spec.num_steps,
            target_classes=targets,
            **c.common,
        )

    # Per step and target: one gradient and one forward pass; plus the clean logits and the
    # final check.
    work = spec.num_steps * targets
    return [passes.Pass(spec.label, attack, gradients=work, queries=work + 2)]


def _square(spec, epsilon, c, targets):
    def attack(x, y, ids):
        return square(
            c.model,
            x,
            y,
            epsilon=epsilon,
            num_queries=spec.num_queries,
            seed=c.seed,
            ids=ids,
            **c.common,
        )

    # The start, every query, the final check.
    return [passes.Pass(spec.label, attack, queries=spec.num_queries + 2)]


def stage_spec(version, name):
    """The `AttackSpec` of AutoAttack stage `name` (one of `STAGES`) with `version`'s budget."""
    v = VERSIONS[version]
    if name == "fab-t":
        return AttackSpec(name, num_steps=v["fab_steps"])
    if name == "square":
        return AttackSpec(name, num_queries=v["square_queries"])
    return AttackSpec(  # the APGD stages
        name, num_steps=v["apgd_steps"], num_restarts=v["num_restarts"], eot_iter=v["eot_iter"]
    )


def _checked_targets(names, requested, context, who):
    """Checks the model's class count for the attacks `names` (the DLR losses need 3 classes, 4
    when targeted); the number of target classes their targeted ones share (0 for none)."""
    for name in names:
        if ATTACKS[name].dlr:
            check_num_classes(context.num_classes, loss="dlr", targeted=ATTACKS[name].targeted)
    if not any(ATTACKS[name].targeted for name in names):
        return 0
    return target_classes(requested, context.num_classes, who=who)


def _autoattack(spec, epsilon, c, targets):
    """The stages of `spec.version` (or `spec.stages`, with the version's budgets), checked
    against the model's class count; the targeted stages share one number of targets."""
    if spec.version not in VERSIONS:
        raise ValueError(
            f"version must be one of {sorted(VERSIONS)}. Received: version={spec.version!r}"
        )
    stages = VERSIONS[spec.version]["attacks"] if spec.stages is None else spec.stages
    if not stages or any(name not in STAGES for name in stages):
        raise ValueError(
            f"attacks must be names from {list(STAGES)}. Received: attacks={spec.stages!r}"
        )
    targeted = ", ".join(name for name in stages if ATTACKS[name].targeted)
    targets = _checked_targets(stages, VERSIONS[spec.version]["target_classes"], c, targeted)
    found = []
    for name in stages:  # each stage's pass is named by the stage ("apgd-ce", "fab-t", ...)
        built = ATTACKS[name].build(stage_spec(spec.version, name), epsilon, c, targets)
        found += [dataclasses.replace(p, name=name) for p in built]
    return found


ATTACKS = {
    "clean": Attack(lambda spec, epsilon, c, targets: []),
    "fgsm": Attack(_fgsm),
    "pgd": Attack(_pgd, budget=10),
    "apgd-ce": Attack(_apgd("ce"), budget=100),
    "apgd-dlr": Attack(_apgd("dlr"), budget=100, dlr=True),
    "apgd-t": Attack(_apgd("dlr", targeted=True), budget=100, targeted=True, dlr=True),
    "fab-t": Attack(_fab_t, budget=100, targeted=True),
    "square": Attack(_square, budget=5000, queries=True),
    "autoattack": Attack(_autoattack),
    "transfer": Attack(_transfer, budget=20),
}
# The attacks AutoAttack runs as stages (`auto_attack(attacks=...)` picks among them).
STAGES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")

_SPEC = re.compile(r"^([a-z-]+?)(?:-(\d+|standard|fast|rand))?(?:x(\d+))?$")


def parse_attack(spec):
    """An `AttackSpec` from a string such as "pgd-50x3" (an `AttackSpec` is returned as is)."""
    if isinstance(spec, AttackSpec):
        return spec
    text = str(spec).strip().lower()
    match = _SPEC.match(text)
    name, budget, restarts = match.groups() if match else (text, None, None)
    if name not in ATTACKS:
        raise ValueError(
            f"Unknown attack. Received: {spec!r}; the names are {', '.join(ATTACKS)}, as "
            "name[-budget][xR] (e.g. pgd-50x3, apgd-t-100, square-1000, autoattack-fast)."
        )
    if name == "autoattack":
        if restarts or (budget and budget.isdigit()):
            raise ValueError(f"autoattack takes a version only. Received: {spec!r}")
        return AttackSpec("autoattack", version=budget or "standard")
    if budget is not None and not budget.isdigit():
        raise ValueError(f"Only autoattack takes a version. Received: {spec!r}")
    entry = ATTACKS[name]
    if restarts and not 1 <= int(restarts) <= options.MAX_RESTARTS:
        raise ValueError(f"Restarts must be in [1, {options.MAX_RESTARTS}]. Received: {spec!r}")
    amount = int(budget) if budget else entry.budget
    if amount is not None and amount < 1:
        raise ValueError(f"An attack's budget must be >= 1. Received: {spec!r}")
    return AttackSpec(
        name,
        num_steps=None if entry.queries else amount,
        num_queries=amount if entry.queries else None,
        num_restarts=int(restarts or 1),
    )


def job(spec, epsilon, context):
    """The `passes.Job` of one attack spec at one epsilon: the clean pass, then its passes."""
    spec = parse_attack(spec)
    if spec.kind == "clean":
        return passes.Job("clean", (passes.CLEAN,))
    label = f"{spec.label} eps={epsilon:g}"
    targets = _checked_targets([spec.kind], TARGET_CLASSES, context, label)
    built = ATTACKS[spec.kind].build(spec, float(epsilon), context, targets)
    return passes.Job(label, (passes.CLEAN, *built))


def count_classes(model, images):
    """The model's number of classes, from one forward pass on the first example."""
    x = keras.ops.convert_to_tensor(np.asarray(images[:1], np.float32))
    return int(model(x, training=False).shape[-1])


def _prepend(held, chunks):
    """The chunks in `held` (popped: no reference kept), then `chunks`."""
    while held:
        yield held.pop(0)
    yield from chunks


def run(
    model,
    examples,
    attacks_at,
    *,
    where,
    seed=0,
    batch_size=128,
    chunk_size=None,
    jit_compile=False,
    surrogate=None,
    clip_min=0.0,
    clip_max=255.0,
    state=None,
    discard_state=False,
    adversarial=None,
    verbose=0,
    **settings,
):
    """Runs attacks on examples: the one path of every evaluation.

    Reads the first chunk of examples, checks that `model` returns logits, counts its classes,
    builds a job per (spec, epsilon), opens the state (resuming a killed run of the same
    evaluation) and runs every job on every chunk (`passes.run_chunks`).

    Args:
        model: The model evaluated.
        examples: A `sat_tf.examples.Examples` (a dataset, a shard of it, the first N), or
            (images, labels) arrays.
        attacks_at: (spec, epsilon) pairs, one job each, in order; a first "clean" job is
            shared by the others as their clean pass.
        where: The caller's name, for the logits check's error.
        seed: Seed of every attack.
        batch_size: Examples per attack call.
        chunk_size: Examples read and attacked at a time (every pass of a chunk, then the
            next): memory is bounded by it. None: arrays all at once, a dataset
            `CHUNK_BATCHES` batches at a time.
        jit_compile: Compile the attacks with XLA (and pad the last batch of each pass).
        surrogate: The model transfer attacks compute gradients on.
        clip_min: Lowest valid pixel value.
        clip_max: Highest valid pixel value.
        state: Path of the state file (`sat_tf.evalstate`), or None to keep it in memory.
        discard_state: Start afresh, overwriting a state file of another evaluation.
        adversarial: Optional [N, H, W, C] array each fooling image is written into.
        verbose: 0 silent; 1 the work ahead, an estimate and the progress; 2 the resume line
            only.
        **settings: Further settings that change results, for the state's fingerprint.

    Returns:
        `(jobs, record)`: the `passes.Job`s and the `evalstate.EvaluationState` with their
        per-example `fooled_by`, positions and seconds.
    """
    if not isinstance(examples, Examples):
        examples = Examples(tuple(examples))
    batch_size = max(1, int(batch_size))
    if chunk_size is None:
        chunk_size = examples.default_chunk_size(batch_size)
    chunk_size = max(1, int(chunk_size))
    chunks = examples.chunks(chunk_size)
    first = next(chunks, None)
    attacks.require_logits(model, where=where)
    context = Context(
        model,
        count_classes(model, first.images) if first else int(model.output_shape[-1]),
        seed=int(seed),
        jit_compile=bool(jit_compile),
        clip_min=float(clip_min),
        clip_max=float(clip_max),
        surrogate=surrogate,
    )
    jobs = [job(spec, epsilon, context) for spec, epsilon in attacks_at]
    settings["jit_compile"] = bool(jit_compile)
    if surrogate is not None:
        settings["surrogate"] = surrogate
    if examples.shard.count > 1:
        settings["shard"] = str(examples.shard)
    if backend.NAME != "tensorflow":  # another backend's numbers differ in the last bits
        settings["backend"] = backend.NAME
    record = evalstate.EvaluationState.open(
        Path(state) if state else None,
        num_examples=examples.num_examples,
        discard_state=discard_state,
        model=model,
        attacks=[j.label for j in jobs],
        passes=[len(j.passes) for j in jobs],
        seed=seed,
        batch_size=batch_size,
        chunk_size=chunk_size,
        **settings,
    )
    stream = _prepend([first] if first else [], chunks)
    del first  # only the chunk under attack is held, not the first one besides
    passes.run_chunks(
        model,
        jobs,
        stream,
        record,
        batch_size=min(batch_size, chunk_size),
        chunk_size=chunk_size,
        pad=bool(jit_compile) or backend.NAME == "jax",  # few compilations per attack
        adversarial=adversarial,
        verbose=int(verbose),
        num_examples=examples.count,
    )
    return jobs, record
