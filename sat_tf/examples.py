"""The examples of an evaluation, read in order, a chunk at a time, one shard's part only.

An evaluation never holds its whole split: `Examples.chunks` reads arrays, a tf.data dataset or
an iterable of batches in order and hands out chunks of `chunk_size` examples, each with the
examples' `ids`, their positions in the whole evaluation (0, 1, 2, ... in reading order, up to
`num_examples`). Every pass of every attack runs on a chunk before the next one is read
(`sat_tf.jobs.run`), so memory is bounded by the chunk and the batch, not by the split.

A shard `I/N` keeps the examples whose id is I modulo N: N processes (one per device, or one per
machine) with the same flags and shards 0/N .. N-1/N attack every example once between them, and
`sat_tf.shards.merge` puts their records back together. The attacks' random draws are keyed by
the ids (`sat_tf.draws`), so an example meets the same attack in any chunk and any shard.

Each example also gets a short digest of its pixels and label (`digests`): the evaluation state
keeps them, so a resumed evaluation checks that it reads the same examples, and the digest of a
whole evaluation's examples (`examples_digest`) is the same whether it ran as one process or was
merged from shards.
"""

import dataclasses
import hashlib
import re

import keras
import numpy as np

# A dataset is read and attacked this many batches at a time (`Examples.default_chunk_size`):
# few enough to bound memory, enough that the last, partial batch of each pass costs little.
CHUNK_BATCHES = 8


# The folder of shard I/N in an evaluation's output folder: "shard-I-of-N" (`Shard.name`).
SHARD_FOLDER = re.compile(r"shard-(\d+)-of-(\d+)")


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (`index` in [0, count)); `Shard(0, 1)` is the whole evaluation."""

    index: int = 0
    count: int = 1

    @classmethod
    def of_folder(cls, name):
        """The `Shard` whose folder is called `name`, or None for another name."""
        match = SHARD_FOLDER.fullmatch(name)
        return cls(int(match[1]), int(match[2])) if match else None

    @classmethod
    def parse(cls, text):
        """A `Shard` from "I/N" (e.g. "3/8"); "" is the whole evaluation."""
        if not text:
            return cls()
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not match or not int(match.group(1)) < int(match.group(2)):
            raise ValueError(f"a shard is I/N with 0 <= I < N, e.g. 0/4 .. 3/4. Received: {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def name(self):
        """The shard's folder name, "shard-3-of-8"."""
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self):
        return f"{self.index}/{self.count}"

    def size(self, total):
        """How many of `total` examples are this shard's."""
        return max(0, -(-(total - self.index) // self.count))


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Consecutive examples of one shard: ids [n] int64, images [n, H, W, C] float32, labels
    [n] int32, and `start`, the position of its first example among the shard's examples."""

    start: int
    ids: np.ndarray
    images: np.ndarray
    labels: np.ndarray


def digests(images, labels):
    """[n] uint64: a BLAKE2b digest per example of its shape, float32 pixels and label."""
    found = np.empty([len(labels)], np.uint64)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        image = np.ascontiguousarray(image, np.float32)
        digest = hashlib.blake2b(f"{image.shape}:{int(label)};".encode(), digest_size=8)
        digest.update(image.tobytes())
        found[i] = int.from_bytes(digest.digest(), "little")
    return found


def examples_digest(example_digests):
    """The digest of a whole evaluation's examples, from their `digests` in id order."""
    digest = hashlib.blake2b(np.ascontiguousarray(example_digests, "<u8").tobytes())
    return f"{len(example_digests)} examples, blake2b {digest.hexdigest()[:16]}"


class Examples:
    """Where an evaluation reads its examples from.

    Args:
        data: (images, labels) arrays (labels may be one-hot), a tf.data.Dataset of
            (images, labels), batched or not, or another iterable of (images, labels) batches
            (arrays or tensors), not a tuple or list (those are the arrays) and iterated afresh
            for each read (so not a one-shot generator): a loader without TensorFlow.
        num_examples: Read only the first N examples (None: all).
        shard: A `Shard` (or "I/N"): keep only the examples whose id is I modulo N.
    """

    def __init__(self, data, *, num_examples=None, shard=None):
        self.data = data
        self.num_examples = None if num_examples is None else int(num_examples)
        if isinstance(data, tuple | list):  # known: a resume with fewer is refused up front
            total = len(data[1])
            self.num_examples = min(total, self.num_examples or total)
        self.shard = shard if isinstance(shard, Shard) else Shard.parse(shard or "")

    @property
    def count(self):
        """This shard's number of examples, when known (arrays, or `num_examples` given)."""
        total = self.num_examples
        return None if total is None else self.shard.size(total)

    def default_chunk_size(self, batch_size):
        """Arrays: all at once (they are in memory already; every shard takes the size of the
        whole, so that shards and the whole share one fingerprint); a dataset: `CHUNK_BATCHES`
        batches at a time."""
        if isinstance(self.data, tuple | list):
            return max(1, self.num_examples)
        return CHUNK_BATCHES * batch_size

    def _batches(self):
        """(images, labels) NumPy batches in reading order, from the first example."""
        if isinstance(self.data, tuple | list):
            images, labels = self.data
            step = 1024
            for i in range(0, len(labels), step):
                yield np.asarray(images[i : i + step]), np.asarray(labels[i : i + step])
            return
        data = self.data
        for x, y in data.as_numpy_iterator() if hasattr(data, "as_numpy_iterator") else data:
            x, y = keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y)
            if y.ndim == 0 or (y.ndim == 1 and x.ndim == 3):  # an unbatched dataset
                x, y = x[None], y[None]
            yield x, y

    def _selected(self):
        """(ids, images, labels) of this shard's examples, batch by batch, up to num_examples."""
        seen = 0
        for x, y in self._batches():
            if self.num_examples is not None:
                x, y = x[: self.num_examples - seen], y[: self.num_examples - seen]
            ids = np.arange(seen, seen + len(y), dtype=np.int64)
            seen += len(y)
            keep = ids % self.shard.count == self.shard.index
            if keep.any():
                yield ids[keep], x[keep], y[keep]
            if self.num_examples is not None and seen >= self.num_examples:
                return

    def chunks(self, chunk_size):
        """`Chunk`s of `chunk_size` of this shard's examples (the last may be smaller)."""
        parts, count, start = [], 0, 0
        for part in self._selected():
            parts.append(part)
            count += len(part[0])
            while count >= chunk_size:
                chunk, parts, count = _cut(parts, chunk_size, start)
                start += chunk_size
                yield chunk
                del chunk  # not held while the next one is read
        if count:
            yield _cut(parts, count, start)[0]


def _cut(parts, size, start):
    """The first `size` examples of `parts` as a `Chunk`, and the rest (parts, count)."""
    ids, images, labels = (np.concatenate(column) for column in zip(*parts, strict=True))
    if labels.ndim > 1:  # one-hot
        labels = np.argmax(labels, axis=-1)
    first = images[:size].astype(np.float32, copy=False)  # no second copy of float32 pixels
    chunk = Chunk(start, ids[:size], first, labels[:size].astype(np.int32))
    # A copy: a view would keep the whole concatenation, this chunk included, alive.
    rest = [(ids[size:], images[size:].copy(), labels[size:])] if len(ids) > size else []
    return chunk, rest, len(ids) - size
