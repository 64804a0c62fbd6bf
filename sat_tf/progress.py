"""Signs of life for long evaluations: a progress bar or log lines, and the timing behind the
up-front estimate (`time_batch`; `sat_tf.passes.run_jobs` prints the estimate).

On a terminal each attack pass gets a Keras `Progbar` (examples done / to do, the accuracy so far:
clean in the clean pass, robust after it; an ETA); when output is not a terminal (CI, `nohup`, a
log file) it gets one plain line about every 5% instead, since a bar redrawn with carriage returns
is unreadable in a file.
Verbosity follows Keras's convention: 0 silent, 1 progress, 2 one line per result only.
"""

import math
import sys
import time

import keras
import numpy as np

from sat_tf import attacks, backend

LOG_EVERY = 0.05  # fraction of a pass between two log lines when output is not a terminal


def is_terminal(stream=None):
    """Whether `stream` redraws a line: a TTY, or a notebook's output (where Progbar works)."""
    stream = stream or sys.stdout
    notebook = "ipykernel" in sys.modules and stream is sys.stdout
    return notebook or bool(getattr(stream, "isatty", None) and stream.isatty())


def duration(seconds):
    """A duration in words a person reads at a glance: "42 s", "3 min 05 s", "2 h 10 min"."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 86400:.1f} days"


class PassProgress:
    """The progress of one pass of one attack over the examples it attacks.

    Args:
        label: What runs, e.g. "autoattack eps=8: apgd-t (2/4)".
        total: Examples this pass attacks (those still standing when it started).
        done: Examples already done by an earlier, interrupted process.
        verbose: 1 shows progress; anything else shows nothing.
        stream: Where plain log lines go (default sys.stdout); a terminal gets the bar.
    """

    def __init__(self, label, total, *, done=0, verbose=1, stream=None):
        self.label, self.total, self.start_done = label, int(total), int(done)
        self.active = verbose == 1 and self.total > 0
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()
        self.next_log = done + max(1, math.ceil(LOG_EVERY * self.total))
        self.bar = None
        if not self.active:
            return
        resumed = f" (resumed: {done} done before)" if done else ""
        print(f"{label}: {self.total} examples{resumed}", file=self.stream, flush=True)
        if is_terminal(self.stream):
            # The bar counts this process's examples, so that its ETA comes from this process's
            # speed; the line above says how many an earlier process did.
            self.bar = keras.utils.Progbar(
                self.total - done, stateful_metrics=["accuracy"], unit_name="example"
            )

    def update(self, done, accuracy):
        """`done` examples of this pass finished; `accuracy`: the accuracy so far (clean in the
        clean pass, else robust, after this pass; `sat_tf.passes.accuracy_so_far`)."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(done - self.start_done, [("accuracy", accuracy)])
            return
        if done < self.next_log and done < self.total:
            return
        self.next_log = done + max(1, math.ceil(LOG_EVERY * self.total))
        elapsed = time.perf_counter() - self.start
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = duration((self.total - done) / rate) if rate > 0 else "?"
        print(
            f"  {self.label}: {done}/{self.total} examples ({100 * done / self.total:.0f}%), "
            f"accuracy so far {accuracy:.4f}, {duration(elapsed)} elapsed, "
            f"ETA {eta}",
            file=self.stream,
            flush=True,
        )


def chunk_line(record, labels, num_examples, seconds, first, stream=None):
    """One line after a chunk of a long evaluation: the examples done, the time left at this
    process's speed (it started at example `first`), each attack's accuracy so far."""
    done = int(record.cursor[0])
    total = "" if num_examples is None else f" of {num_examples}"
    left = ""
    if num_examples is not None and done > first and seconds > 0:
        rate = (done - first) / seconds
        left = f", about {duration((num_examples - done) / rate)} left"
    robust = (record.fooled_by[:, :done] == -1).mean(axis=1)
    accuracies = ", ".join(
        f"{label} {value:.4f}" for label, value in zip(labels, robust, strict=True)
    )
    print(
        f"Examples {done}{total} done ({duration(seconds)}{left}); accuracy so far: {accuracies}",
        file=stream or sys.stdout,
        flush=True,
    )


def time_batch(model, images, labels, *, batch_size, repeats=1):
    """Seconds of one input gradient and of one forward pass on a batch of `batch_size` examples.

    Traced first (tracing is not counted), then timed; the examples are the first ones of
    `images`, repeated to fill the batch.
    """
    index = np.resize(np.arange(len(labels)), batch_size)
    x = keras.ops.convert_to_tensor(np.asarray(images[index], np.float32))
    y = keras.ops.convert_to_tensor(np.asarray(labels[index]), "int32")

    def gradient(ref):
        return lambda x, y: attacks.input_gradient(ref(), x, y)[1]

    def forward(ref):
        return lambda x: ref()(x, training=False)

    grad_fn = backend.compiled(model, ("timing", "gradient"), gradient, x, y)
    forward_fn = backend.compiled(model, ("timing", "forward"), forward, x)
    seconds = []
    for fn, args in ((grad_fn, (x, y)), (forward_fn, (x,))):
        backend.to_numpy(fn(*args))  # warm: the first call may still allocate (JAX: compiles)
        start = time.perf_counter()
        for _ in range(repeats):
            backend.to_numpy(fn(*args))
        seconds.append((time.perf_counter() - start) / repeats)
    return tuple(seconds)
