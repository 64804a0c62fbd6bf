"""The loop every evaluation runs: attack passes over the examples still standing, batch by batch.

A job is one attack at one epsilon (PGD-20 at 4 pixels, AutoAttack at 8); its passes run in order
(pass 0 is the clean forward pass; then one per PGD restart or AutoAttack stage), each only on the
examples no earlier pass fooled. What a job finds is one small int per example, `fooled_by`:
`ROBUST` (-1) where no pass fooled it, else the index of the pass that did (0: misclassified
without attack). Every stage's accuracy follows from it, and so does where to pick up: pass `p`
attacks the examples with `fooled_by` ROBUST or >= p, in fixed batches, so a run that stopped
after batch b of pass p resumes at batch b + 1 with exactly the batches an uninterrupted run
would have attacked (`run_job`'s `checkpoint` sees every finished batch).

The compiled attacks are traced for any batch size under TensorFlow (`sat_tf.backend.compiled`),
so the last, smaller batch needs no new trace. Under XLA (`jit_compile`, and always under JAX,
which traces and compiles once per shape) every new shape is a new compilation, so there
(`pad=True`) the last batch of a pass is padded with repeats of its own examples, which count
nowhere, up to the next power of two (at most `batch_size`): an attack meets a few shapes, each
compiled once, and the few examples a late pass has left are not attacked `batch_size` times
over. An attack treats every example on its own, so the padding changes no result.
"""

import dataclasses
import time

import keras
import numpy as np

from sat_tf import backend, examples, progress

ROBUST = -1
# The dtype of the example indices (and seeds) handed to attacks: int64 under TensorFlow; JAX
# runs without 64-bit types, and indices below 2**31 are the same numbers in int32
# (`sat_tf.draws` keys on their low 32 bits either way).
ID_DTYPE = "int32" if backend.NAME == "jax" else "int64"


@dataclasses.dataclass(frozen=True)
class Pass:
    """One pass of a job.

    Attributes:
        name: e.g. "clean", "restart" (of PGD-KxR), "apgd-t".
        attack: `(images, labels, ids) -> adversarial images` on one batch (tensors; `ids` are
            the examples' indices in the whole evaluation, `ID_DTYPE`, which key their random
            draws, `sat_tf.draws`), or None for the clean pass (the images themselves).
        gradients: Input gradients per attacked example, worst case (every step, every target).
        queries: Forward passes per attacked example besides gradients (Square's queries, the
            final check), worst case.
    """

    name: str
    attack: object = None
    gradients: int = 0
    queries: int = 1


CLEAN = Pass("clean")


@dataclasses.dataclass(frozen=True)
class Job:
    """One attack at one epsilon: a label ("pgd-20 eps=4") and its passes, `CLEAN` first."""

    label: str
    passes: tuple

    def work(self, fooled_by, start=(0, 0), batch_size=1):
        """(gradients, queries) left from `start` = (pass, batches done), in the worst case.

        The pass at `start` attacks its standing examples less those done; every later pass is
        counted as attacking every example not fooled yet (none leave, in the worst case).
        """
        first, done = start
        gradients = queries = 0
        for index in range(first, len(self.passes)):
            if index == first:
                attacked = max(0, len(standing(fooled_by, first)) - done * batch_size)
            else:
                attacked = int(np.sum(fooled_by == ROBUST))
            gradients += attacked * self.passes[index].gradients
            queries += attacked * self.passes[index].queries
        return gradients, queries


def standing(fooled_by, index):
    """The examples pass `index` attacks: those no earlier pass fooled."""
    return np.flatnonzero((fooled_by == ROBUST) | (fooled_by >= index))


def batches(indices, batch_size, pad=False):
    """`indices` in batches of `batch_size`: (batch, count) pairs. With `pad`, a smaller last
    batch is filled up with repeats of its own examples to the next power of two, at most
    `batch_size` (the first `count` entries are the real ones)."""
    for i in range(0, len(indices), batch_size):
        chunk = indices[i : i + batch_size]
        size = min(batch_size, 1 << (len(chunk) - 1).bit_length()) if pad else len(chunk)
        yield np.resize(chunk, size), len(chunk)


def robust_after(fooled_by, index):
    """[N] bool: the examples no pass up to `index` fooled."""
    return (fooled_by == ROBUST) | (fooled_by > index)


def accuracy_so_far(fooled_by, done, standing):
    """The accuracy after the current pass, estimated from its first examples: the fraction
    `standing` / N it attacks times the share of `done` (those attacked so far) it did not fool.
    The clean accuracy of the examples seen in the clean pass; exact once the pass is done."""
    if not len(done):
        return float(standing) / max(1, len(fooled_by))
    return standing / len(fooled_by) * float(np.mean(fooled_by[done] == ROBUST))


def predict(model, images):
    """Arg-max classes of one batch (compiled once per model: for every batch size under
    TensorFlow, per padded batch shape under JAX)."""

    def build(ref):
        return lambda x: keras.ops.cast(
            keras.ops.argmax(ref()(x, training=False), axis=-1), "int32"
        )

    x = keras.ops.convert_to_tensor(np.asarray(images, np.float32))
    return backend.to_numpy(backend.compiled(model, ("predict",), build, x)(x))


def _tensors(images, labels, ids):
    """One batch as the attacks take it: float32 images, int32 labels, `ID_DTYPE` ids."""
    return (
        keras.ops.convert_to_tensor(images, "float32"),
        keras.ops.convert_to_tensor(labels, "int32"),
        keras.ops.convert_to_tensor(np.asarray(ids).astype(ID_DTYPE)),
    )


def run_job(
    model,
    job,
    images,
    labels,
    *,
    fooled_by,
    batch_size,
    start=(0, 0),
    clean=None,
    checkpoint=None,
    adversarial=None,
    pad=False,
    verbose=0,
    ids=None,
):
    """Runs `job`'s passes from `start` = (pass, batch), recording into `fooled_by` in place.

    Args:
        model: The model evaluated (an adversarial image counts when it fools this model).
        job: A `Job`.
        images: [N, H, W, C] pixels (NumPy; uint8 or float, each batch is made float32).
        labels: [N] int32 classes.
        fooled_by: [N] int array, this job's record (all `ROBUST` for a fresh job).
        batch_size: Examples per attack call.
        start: (pass, batch) to start at, from a checkpoint; (0, 0) for a fresh job.
        clean: Another job's `fooled_by` whose clean pass this job reuses (it then starts at
            pass 1) instead of running its own.
        checkpoint: Called as `checkpoint((pass, batches done), seconds)` after every batch and
            once with `(len(passes), 0)` at the end; `seconds` is the time since the last call.
        adversarial: Optional [N, H, W, C] array: each fooling image is written into it.
        pad: Pad the last batch of each pass to a power of two (few XLA compilations per attack).
        verbose: 1 shows a progress bar (or log lines) per pass.
        ids: [N] int indices of the examples in the whole evaluation (their random draws are
            keyed by them, so a chunk or shard attacks each example as the whole run would);
            None: 0..N-1.
    """
    ids = np.arange(len(labels)) if ids is None else np.asarray(ids)
    first, first_batch = start
    last_time = time.perf_counter()

    def mark(position):
        nonlocal last_time
        now = time.perf_counter()
        if checkpoint is not None:
            checkpoint(position, now - last_time)
        last_time = now

    if start == (0, 0) and clean is not None:
        fooled_by[:] = clean
        first = 1
    count_passes = len(job.passes) - 1
    for index in range(first, len(job.passes)):
        pass_ = job.passes[index]
        todo = standing(fooled_by, index)
        skip = first_batch if index == first else 0
        name = pass_.name if index == 0 else f"{pass_.name} ({index}/{count_passes})"
        alone = len(job.passes) == 1 or (len(job.passes) == 2 and index == 1)
        label = job.label if alone else f"{job.label}: {name}"
        done = min(skip * batch_size, len(todo))
        bar = progress.PassProgress(label, len(todo), done=done, verbose=verbose)
        for number, (batch, count) in enumerate(batches(todo, batch_size, pad)):
            if number < skip:
                continue
            x, y = np.asarray(images[batch], np.float32), labels[batch]
            if pass_.attack is not None:
                x = backend.to_numpy(pass_.attack(*_tensors(x, y, ids[batch])))
            wrong = (predict(model, x) != y)[:count]
            fooled = batch[:count][wrong]
            fooled_by[fooled] = index
            if adversarial is not None:
                adversarial[fooled] = x[:count][wrong]
            mark((index, number + 1))
            done = min((number + 1) * batch_size, len(todo))
            bar.update(done, accuracy_so_far(fooled_by, todo[:done], len(todo)))
    mark((len(job.passes), 0))


def run_jobs(
    model,
    jobs,
    images,
    labels,
    record,
    *,
    batch_size,
    pad=False,
    adversarial=None,
    verbose=0,
    ids=None,
    announce=True,
    bars=True,
    examples_left=None,
):
    """Runs every unfinished job of `record` in order, each from where it stopped.

    When the first job is the clean pass alone (`evaluate`'s layout), the other jobs reuse its
    record instead of running their own clean pass. Each finished batch goes to
    `record.record` (which writes the state file, if any).

    Args:
        model: The model evaluated.
        jobs: `Job`s, in the order of `record`'s rows.
        images: [N, H, W, C] pixels.
        labels: [N] int32 classes.
        record: A `sat_tf.evalstate.EvaluationState` for these jobs.
        batch_size: Examples per attack call.
        pad: See `run_job`.
        adversarial: See `run_job`.
        verbose: Keras-style: 1 the work ahead and progress, 2 the resume line only, 0 nothing.
        ids: See `run_job`.
        announce: Print where a resumed run stands and (verbose 1) the work ahead.
        bars: Show a progress bar per pass (with verbose 1).
        examples_left: The examples left in the whole evaluation, these included, for the
            estimate (None: these only).
    """
    shared = jobs[0].passes == (CLEAN,)
    starts = []
    for j in range(len(jobs)):
        start, fooled_by = tuple(int(v) for v in record.position[j]), record.fooled_by[j]
        if shared and j and start == (0, 0):  # not started: it will reuse the clean pass
            start, fooled_by = (1, 0), record.fooled_by[0]
        starts.append((start, fooled_by))
    left = [j for j, job in enumerate(jobs) if record.position[j][0] < len(job.passes)]
    if verbose and announce:
        _announce(model, jobs, record, images, labels, left, starts, batch_size, verbose)
        if verbose == 1 and left and len(labels):
            _estimate(model, jobs, images, labels, left, starts, batch_size, examples_left)
    for j in left:
        run_job(
            model,
            jobs[j],
            images,
            labels,
            fooled_by=record.fooled_by[j],
            batch_size=batch_size,
            start=tuple(int(v) for v in record.position[j]),
            clean=record.fooled_by[0] if shared and j else None,
            checkpoint=lambda position, seconds, j=j: record.record(j, position, seconds),
            adversarial=adversarial,
            pad=pad,
            verbose=verbose if bars else 0,
            ids=ids,
        )


def _announce(model, jobs, record, images, labels, left, starts, batch_size, verbose):
    """Prints where a resumed run stands."""
    if not record.batches.sum():
        return
    where = ""
    if left and record.batches[left[0]]:
        (p, b), fooled_by = starts[left[0]]
        total = -(-len(standing(fooled_by, p)) // batch_size)
        where = f"; {jobs[left[0]].label} at {jobs[left[0]].passes[p].name}, batch {b} of "
        where += f"{total} done"
    done = len(jobs) - len(left)
    print(f"Resuming {record.path}: {done} of {len(jobs)} attacks done{where}.", flush=True)


def _estimate(model, jobs, images, labels, left, starts, batch_size, examples_left):
    """Prints the work left in the worst case (`Job.work`; every example past these counted
    as fresh) and its time at the speed of one timed batch (`progress.time_batch`)."""
    work = [jobs[j].work(starts[j][1], start=starts[j][0], batch_size=batch_size) for j in left]
    later = max(0, (examples_left or len(labels)) - len(labels))
    if later:
        fresh = np.full([1], ROBUST, np.int16)
        work += [(later * g, later * q) for g, q in (job.work(fresh) for job in jobs)]
    gradients, queries = (sum(column) for column in zip(*work, strict=True))
    grad_seconds, forward_seconds = progress.time_batch(
        model, images, labels, batch_size=batch_size
    )
    seconds = (gradients * grad_seconds + queries * forward_seconds) / batch_size
    names = ", ".join(jobs[j].label for j in left)
    attacks_left = f"{len(left)} attack{'s' * (len(left) != 1)}"
    print(
        f"Work ahead: {len(labels) + later} examples, {attacks_left} ({names}); worst case "
        f"{gradients:,} input gradients and {queries:,} forward passes (as if no example were "
        "ever fooled; fooled examples leave early)."
    )
    print(
        f"One batch of {batch_size} here: {grad_seconds:.3g} s per gradient, {forward_seconds:.3g} "
        f"s per forward pass: the worst case takes about {progress.duration(seconds)} at this "
        "speed, plus compiling each attack and slower small batches.",
        flush=True,
    )


class _ChunkRecord:
    """The records of the examples [start, end) of an `EvaluationState`, as `run_jobs` sees
    them: its `fooled_by` is a view, the rest is the state's."""

    def __init__(self, state, start, end):
        self.state, self.fooled_by = state, state.fooled_by[:, start:end]
        self.position, self.seconds, self.batches = state.position, state.seconds, state.batches
        self.path = state.path

    def record(self, job, position, seconds):
        self.state.record(job, position, seconds)


def run_chunks(
    model,
    jobs,
    chunks,
    record,
    *,
    batch_size,
    chunk_size,
    pad=False,
    adversarial=None,
    verbose=0,
    num_examples=None,
):
    """Runs every job on each chunk of examples in turn (`sat_tf.examples`), each chunk from
    where `record` stands; chunks finished before are read again only to check their examples.

    Args:
        model: The model evaluated.
        jobs: `Job`s, in the order of `record`'s rows.
        chunks: `sat_tf.examples.Chunk`s in order.
        record: A `sat_tf.evalstate.EvaluationState` for these jobs.
        batch_size: Examples per attack call.
        chunk_size: Examples per chunk (all but the last chunk have that many).
        pad: See `run_job`.
        adversarial: See `run_job`; indexed by position among the examples.
        verbose: 1: with one chunk, progress bars; with several, one line per chunk; 2: the
            resume line only; 0: nothing.
        num_examples: How many examples the chunks hold, when known (for the estimate).
    """
    start_time, announced, end, first = time.perf_counter(), False, 0, None
    for chunk in chunks:
        end = chunk.start + len(chunk.ids)
        record.admit(chunk.start, examples.digests(chunk.images, chunk.labels), chunk.labels)
        if record.finished or end <= record.cursor[0]:
            continue
        several = chunk.start > 0 or (len(chunk.ids) == chunk_size and num_examples != end)
        run_jobs(
            model,
            jobs,
            chunk.images,
            chunk.labels,
            _ChunkRecord(record, chunk.start, end),
            batch_size=batch_size,
            pad=pad,
            adversarial=None if adversarial is None else adversarial[chunk.start : end],
            verbose=verbose,
            ids=chunk.ids,
            announce=not announced,
            bars=not several,
            examples_left=None if num_examples is None else num_examples - chunk.start,
        )
        announced, first = True, chunk.start if first is None else first
        del chunk  # freed before the next one is read
        record.finish_chunk(end)
        if several and verbose == 1:
            seconds = time.perf_counter() - start_time
            progress.chunk_line(record, [job.label for job in jobs], num_examples, seconds, first)
    record.check_count(end)
    record.finish([len(job.passes) for job in jobs])
