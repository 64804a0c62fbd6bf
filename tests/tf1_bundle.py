"""TF1 (V2-format) checkpoints written byte by byte, so an index can claim what its data is not.

TensorFlow's own writer (SaveV2) derives every entry from a real tensor, so it cannot write an
index that declares a 400,000-class head beside a few bytes of data, a dimension of -1, a second
shard that was never written, or weights that are NaN under a valid checksum. This writes the two
files the way tensorflow/core/util/tensor_bundle does: `<prefix>.index` is a LevelDB-format table
(tsl/lib/io/table_builder.cc: one uncompressed data block, an empty meta-index block, the index
block, the 48-byte footer) mapping "" to a BundleHeaderProto and each name to a BundleEntryProto;
`<prefix>.data-00000-of-0000N` holds the raw little-endian tensor bytes, each with its masked
CRC32C in the entry.
"""

import struct
from pathlib import Path

import numpy as np

_MAGIC = 0xDB4775248B80FB57  # kTableMagicNumber
_POLY = 0x82F63B78  # CRC32C (Castagnoli), reflected
_TABLE = []
for _byte in range(256):
    _crc = _byte
    for _ in range(8):
        _crc = (_crc >> 1) ^ _POLY if _crc & 1 else _crc >> 1
    _TABLE.append(_crc)


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    """crc32c::Mask: rotate right by 15 and add a constant (what bundles and tables store)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value):
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _block(items):
    """A table block with every entry a restart point (no shared key prefixes)."""
    body, restarts = bytearray(), []
    for key, value in items:
        restarts.append(len(body))
        body += _varint(0) + _varint(len(key)) + _varint(len(value)) + key + value
    restarts = restarts or [0]
    body += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
    return bytes(body)


def _table(items):
    """An SSTable of sorted (key, value) byte pairs."""
    out, handles = bytearray(), []
    for block in (_block(items), _block([])):  # data, meta-index
        handles.append(_varint(len(out)) + _varint(len(block)))
        out += block + b"\0" + struct.pack("<I", masked_crc32c(block + b"\0"))
    last = items[-1][0] if items else b""
    index = _block([(last, handles[0])])
    index_handle = _varint(len(out)) + _varint(len(index))
    out += index + b"\0" + struct.pack("<I", masked_crc32c(index + b"\0"))
    footer = (handles[1] + index_handle).ljust(40, b"\0") + struct.pack("<Q", _MAGIC)
    return bytes(out + footer)


def write(prefix, tensors, *, declared=None, dtypes=None, sizes=None, num_shards=1, data_size=None):
    """Writes `prefix.index` and `prefix.data-00000-of-<num_shards>` (only shard 0).

    Args:
        prefix: Checkpoint prefix.
        tensors: {name: np.ndarray}; each array's bytes start its entry's region of shard 0.
        declared: {name: shape} the index declares instead of the array's; its entry then spans
            the bytes that shape needs, left as a hole of zeros (a sparse file: a declared
            3 GB head costs no disk), with a checksum of the array's bytes only.
        dtypes: {name: DataType enum value} the index declares instead of the array's.
        sizes: {name: byte count} the entry claims instead of what its shape needs.
        num_shards: The header's shard count.
        data_size: Length of the written shard, instead of the end of the last entry.

    Returns:
        The prefix, as a string.
    """
    from tensorflow.core.framework import tensor_shape_pb2
    from tensorflow.core.protobuf import tensor_bundle_pb2

    declared, dtypes, sizes = declared or {}, dtypes or {}, sizes or {}
    header = tensor_bundle_pb2.BundleHeaderProto(num_shards=num_shards)
    header.version.producer = 1
    items, regions, offset = [(b"", header.SerializeToString())], [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
        shape = tuple(declared.get(name, array.shape))
        size = sizes.get(name, int(np.prod(shape, dtype=object)) * array.itemsize)
        entry = tensor_bundle_pb2.BundleEntryProto(
            dtype=dtypes.get(name, _dtype(array)),
            shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in shape]
            ),
            shard_id=0,
            offset=offset,
            size=size,
            crc32c=masked_crc32c(raw),
        )
        items.append((name.encode(), entry.SerializeToString()))
        regions.append((offset, raw))
        offset += max(size, 0)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.index").write_bytes(_table(items))
    with open(f"{prefix}.data-00000-of-{num_shards:05d}", "wb") as shard:
        for start, raw in regions:
            shard.seek(start)
            shard.write(raw)
        shard.truncate(offset if data_size is None else data_size)
    return str(prefix)


def _dtype(array):
    import tensorflow as tf

    return tf.as_dtype(array.dtype).as_datatype_enum
