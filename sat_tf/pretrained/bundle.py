"""The index of a TF1 checkpoint, read and checked in Python before TensorFlow opens it.

TensorFlow's CheckpointReader trusts the index: a declared dimension of -1, more than 2**63 - 1
elements or 254 dimensions stop the whole process with a CHECK failure (TensorFlow 2.21), and
`get_tensor` allocates the declared shape before it looks at the data. So the index is parsed here
first, as tensorflow/core/util/tensor_bundle writes it: a LevelDB-format table
(tsl/lib/io/table_builder.cc: data blocks of prefix-compressed keys, an index block, a 48-byte
footer) mapping "" to a BundleHeaderProto and each variable name to a BundleEntryProto (dtype,
shape, shard, offset, size). Every entry is checked against the files that are there: each
`.data-NNNNN-of-MMMMM` shard present, each tensor of the size its shape and dtype need and inside
its shard. What TensorFlow later allocates is then bounded by the size of the files on disk, not
by what the index claims.

TensorFlow also treats the prefix as a glob pattern when it looks for the `.index` (its V2 check
uses GetMatchingPaths, then falls back to the V1 reader, which globs), so `exp[1]` reads `exp1`'s
presence and fails alone; `opened` gives it links under a plain name instead.
"""

import contextlib
import dataclasses
import os
import re
import struct
import tempfile
from pathlib import Path

MAX_INDEX_BYTES = 1 << 26  # the largest official index (EfficientNet-L1) is well under 1 MB
MAX_RANK = 32  # TensorFlow aborts at 254; weights have at most 5
FLOATS = frozenset({1, 2, 14, 19})  # types.proto DataType: float32, float64, bfloat16, float16
_MAGIC = 0xDB4775248B80FB57  # tsl/lib/io/format.h kTableMagicNumber
_FOOTER = 48
_VARIABLE_SIZE = {7: "string", 20: "resource", 21: "variant"}  # types.proto: no fixed item size
DAMAGED = "the index is damaged: download the checkpoint again"
_UNLIKE = "the index does not describe its .data files: download the checkpoint again"


class BundleError(ValueError):
    """An index or data file that is not a consistent checkpoint; the message is one clause."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One variable of the index: DataType enum, declared shape, and where its bytes are."""

    dtype: int
    shape: tuple
    shard: int
    offset: int
    size: int
    sliced: bool


@dataclasses.dataclass(frozen=True)
class Index:
    """The checked index: {name: Entry} (partition slices excluded) and the .data file names."""

    entries: dict
    data_files: tuple  # Paths, in shard order

    def shapes(self):
        return {name: entry.shape for name, entry in self.entries.items()}


def data_name(prefix, shard, num_shards):
    """tensor_bundle's DataFilename."""
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def read(prefix):
    """Parses and checks `<prefix>.index` against the `.data` files; raises BundleError."""
    from tensorflow.core.protobuf import tensor_bundle_pb2

    path = Path(f"{prefix}.index")
    size = path.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise BundleError(f"{path} is {size} bytes, more than any checkpoint index needs")
    try:
        items = _table(path.read_bytes())
        if not items or items[0][0] != b"":
            raise BundleError("no header entry")
        header = tensor_bundle_pb2.BundleHeaderProto.FromString(items[0][1])
        raw = [(key, tensor_bundle_pb2.BundleEntryProto.FromString(v)) for key, v in items[1:]]
    except (BundleError, struct.error, IndexError, ValueError) as error:  # DecodeError too
        reason = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise BundleError(
            f"{path} is not a TensorFlow checkpoint index ({reason}); give the .index written "
            "with the .data files by tf.train.Saver"
        ) from None
    if header.endianness != 0:
        raise BundleError(f"{path} is big-endian; only little-endian checkpoints are read")
    files = _shards(prefix, header.num_shards)
    total = sum(f.stat().st_size for f in files)
    entries = {}
    for key, proto in raw:
        name = key.decode("utf-8", "replace")
        entry = _entry(name, proto, files, total)
        if not key.startswith(b"\0"):  # tensor_bundle's slice keys start with OrderedCode's 0
            entries[name] = entry
    return Index(entries, tuple(files))


@contextlib.contextmanager
def opened(prefix, index):
    """tf.train.load_checkpoint on `prefix` through links whose names are no glob pattern."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="sat_tf_checkpoint_") as folder:
        link = os.path.join(folder, "checkpoint")
        os.symlink(Path(f"{prefix}.index").resolve(), link + ".index")
        for data in index.data_files:  # <prefix>.data-NNNNN-of-MMMMM -> checkpoint.data-...
            os.symlink(data.resolve(), link + data.name[len(Path(prefix).name) :])
        yield tf.train.load_checkpoint(link)


def _shards(prefix, num_shards):
    if num_shards < 1:
        raise BundleError(f"{prefix}.index declares {num_shards} .data files; {DAMAGED}")
    present, missing, shard = [], [], 0
    while shard < num_shards and len(missing) < 4:  # bounded by the files there, not the claim
        path = Path(data_name(prefix, shard, num_shards))
        (present if path.is_file() else missing).append(path)
        shard += 1
    if missing:
        pattern = re.compile(re.escape(Path(prefix).name) + rf"\.data-(\d+)-of-{num_shards:05d}$")
        found = (pattern.match(p.name) for p in Path(prefix).parent.iterdir())
        count = num_shards - sum(1 for m in found if m and int(m.group(1)) < num_shards)
        raise BundleError(
            f"{count} of {num_shards} .data files missing: {', '.join(map(str, missing))}"
            f"{' ...' if count > len(missing) else ''}; the download is incomplete"
        )
    return present


def _dtype(name, enum):
    """(name, bytes per element) of a DataType enum; strings and variants count 1 a length."""
    if enum in _VARIABLE_SIZE:
        return _VARIABLE_SIZE[enum], 1
    import tensorflow as tf

    try:
        dtype = tf.as_dtype(enum) if 0 < enum < 100 else None  # 100+: reference types
    except TypeError:
        dtype = None
    if dtype is None or dtype.size < 1:
        raise BundleError(f"{name} has the unknown dtype {enum}; {DAMAGED}")
    return dtype.name, dtype.size


def dtype_name(enum):
    """ "float32", "string", ... for a DataType enum of a checked entry."""
    return _dtype("", enum)[0]


def _entry(name, proto, files, total):
    dims = tuple(int(d.size) for d in proto.shape.dim)
    if proto.shape.unknown_rank or len(dims) > MAX_RANK:
        raise BundleError(f"{name} declares {len(dims)} dimensions (at most {MAX_RANK}); {DAMAGED}")
    if any(d < 0 for d in dims):
        raise BundleError(f"{name} declares the dimension {min(dims)} ({list(dims)}); {DAMAGED}")
    dtype, item = _dtype(name, proto.dtype)
    needed, spread = item, item  # spread: TensorFlow multiplies every dimension, 0 or not
    for d in dims:
        needed, spread = needed * d, spread * (d or 1)
    sliced = len(proto.slices) > 0  # a partitioned variable: its bytes are in its slices' entries
    fixed = proto.dtype not in _VARIABLE_SIZE
    if not sliced and (needed != proto.size if fixed else needed > proto.size):
        raise BundleError(
            f"{name} declares {list(dims)} {dtype} ({_bytes(needed)}) but its entry holds "
            f"{_bytes(proto.size)}; {_UNLIKE}"
        )
    if spread > total:
        raise BundleError(
            f"{name} declares {list(dims)} {dtype} ({_bytes(spread)}) but the .data files hold "
            f"{_bytes(total)}; {_UNLIKE}"
        )
    if not sliced:
        if not 0 <= proto.shard_id < len(files) or proto.offset < 0:
            raise BundleError(
                f"{name} points at shard {proto.shard_id}, byte {proto.offset}; {_UNLIKE}"
            )
        shard = files[proto.shard_id]
        length = shard.stat().st_size
        if proto.offset + proto.size > length:
            raise BundleError(
                f"{name} ends at byte {proto.offset + proto.size} of the {length}-byte {shard}: "
                "the .data file is truncated or corrupt; download it again"
            )
    return Entry(proto.dtype, dims, proto.shard_id, proto.offset, proto.size, sliced)


def _bytes(count):
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2g} {unit}"
    return f"{count} bytes"


def _varint(data, pos):
    value = shift = 0
    while shift < 64:
        byte = data[pos]  # IndexError past the end
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise BundleError("a varint longer than 64 bits")


def _handle(data, pos=0):
    offset, pos = _varint(data, pos)
    size, pos = _varint(data, pos)
    return offset, size, pos


def _table(data):
    """The (key, value) pairs of a LevelDB-format table, in order."""
    if len(data) < _FOOTER or struct.unpack_from("<Q", data, len(data) - 8)[0] != _MAGIC:
        raise BundleError("no table footer")
    footer = data[-_FOOTER:]
    _, _, pos = _handle(footer)  # the meta-index block, which TensorFlow does not use
    offset, size, _ = _handle(footer, pos)
    items = []
    for _, value in _block(data, offset, size):
        items += _block(data, *_handle(value)[:2])
    keys = [key for key, _ in items]
    if any(a >= b for a, b in zip(keys, keys[1:], strict=False)):
        raise BundleError("keys out of order")
    return items


def _block(data, offset, size):
    """The entries of one block, read in order as TensorFlow's iterator does; every restart point
    must start an entry with no shared key prefix, so its Seek (a binary search over the restart
    points) lands on the same entries as this scan."""
    if offset + size + 5 > len(data) - _FOOTER or size < 4:
        raise BundleError(f"a block at byte {offset} runs past the end")
    if data[offset + size] != 0:
        raise BundleError("a compressed block (TensorFlow's checkpoint writer compresses none)")
    block = data[offset : offset + size]
    restarts = struct.unpack_from("<I", block, size - 4)[0]
    end = size - 4 - 4 * restarts
    if end < 0:
        raise BundleError(f"a block at byte {offset} claims {restarts} restart points")
    items, key, pos, starts = [], b"", 0, set()
    while pos < end:
        start = pos
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + length > end:
            raise BundleError(f"an entry of the block at byte {offset} runs past it")
        key = key[:shared] + block[pos : pos + unshared]
        items.append((key, block[pos + unshared : pos + unshared + length]))
        pos += unshared + length
        if not shared:
            starts.add(start)
    points = struct.unpack_from(f"<{restarts}I", block, end)
    if items and not set(points) <= starts:
        raise BundleError(f"a restart point of the block at byte {offset} starts no entry")
    return items
