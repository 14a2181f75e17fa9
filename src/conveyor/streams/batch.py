"""RecordBatch v2 (Kafka's "magic 2" format): header parsing and base-offset patching.

Batches are stored exactly as producers send them. The only bytes the broker changes
are BaseOffset (bytes 0-7) and PartitionLeaderEpoch (bytes 12-15), both outside the
CRC, which covers bytes 21.. (attributes to the end). Records are never decoded on the
produce or fetch path; the Python API decodes them with kafka-python's record module.

Layout (big-endian)::

    0  base_offset int64          27 base_timestamp int64
    8  batch_length int32         35 max_timestamp int64
    12 partition_leader_epoch     43 producer_id int64
    16 magic int8 (= 2)           51 producer_epoch int16
    17 crc uint32 (CRC-32C)       53 base_sequence int32
    21 attributes int16           57 records_count int32
    23 last_offset_delta int32    61 records...
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import NamedTuple

HEADER_SIZE = 61
#: base offset + batch length: the part every batch starts with.
LOG_OVERHEAD = 12

_HEADER = struct.Struct(">qiibIhiqqqhii")
_OFFSET = struct.Struct(">q")
_LEN = struct.Struct(">qi")

ATTR_COMPRESSION = 0x07
ATTR_LOG_APPEND_TIME = 0x08
ATTR_TRANSACTIONAL = 0x10
ATTR_CONTROL = 0x20

_crc32c: Callable[[bytes | memoryview], int] | None
try:  # a C implementation; without it CRCs are not checked on produce
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover - depends on the environment
    _crc32c = None


class CorruptBatch(ValueError):
    """The bytes are not a well-formed RecordBatch v2."""


class BatchHeader(NamedTuple):
    base_offset: int
    length: int  # batch_length: bytes after the length field
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    records_count: int

    @property
    def size(self) -> int:
        """Bytes the whole batch takes, headers included."""
        return self.length + LOG_OVERHEAD

    @property
    def compression(self) -> int:
        return self.attributes & ATTR_COMPRESSION

    @property
    def transactional(self) -> bool:
        return bool(self.attributes & ATTR_TRANSACTIONAL)

    @property
    def control(self) -> bool:
        return bool(self.attributes & ATTR_CONTROL)


def parse_header(buf: bytes | bytearray | memoryview, pos: int = 0) -> BatchHeader:
    (
        base,
        length,
        _epoch,
        magic,
        crc,
        attrs,
        lod,
        base_ts,
        max_ts,
        pid,
        pepoch,
        bseq,
        count,
    ) = _HEADER.unpack_from(buf, pos)
    return BatchHeader(
        base, length, magic, crc, attrs, lod, base_ts, max_ts, pid, pepoch, bseq, count
    )


def split_batches(data: bytes, *, check_crc: bool = True) -> list[BatchHeader]:
    """Validate a producer's record set: one or more complete v2 batches, nothing else.

    Raises CorruptBatch. CRCs are checked when a C CRC-32C implementation is installed.
    """
    out: list[BatchHeader] = []
    pos = 0
    n = len(data)
    view = memoryview(data)
    while pos < n:
        if n - pos < HEADER_SIZE:
            raise CorruptBatch("truncated record batch header")
        h = parse_header(data, pos)
        if h.magic != 2:
            raise CorruptBatch(f"unsupported record batch magic {h.magic} (only v2)")
        if h.length < HEADER_SIZE - LOG_OVERHEAD or pos + h.size > n:
            raise CorruptBatch("record batch length does not match the data")
        if h.last_offset_delta < 0 or h.records_count < 0:
            raise CorruptBatch("negative record count")
        if check_crc and _crc32c is not None and _crc32c(view[pos + 21 : pos + h.size]) != h.crc:
            raise CorruptBatch("record batch CRC mismatch")
        out.append(h)
        pos += h.size
    if not out:
        raise CorruptBatch("empty record set")
    return out


def set_base_offset(buf: bytearray, pos: int, base_offset: int) -> None:
    """Patch BaseOffset and zero PartitionLeaderEpoch in place (both outside the CRC)."""
    _OFFSET.pack_into(buf, pos, base_offset)
    struct.pack_into(">i", buf, pos + 12, 0)


def walk(buf: bytes | memoryview, start: int = 0) -> Iterator[tuple[int, BatchHeader]]:
    """(position, header) of each complete batch in ``buf`` from ``start``."""
    pos = start
    n = len(buf)
    while n - pos >= HEADER_SIZE:
        h = parse_header(buf, pos)
        if h.magic != 2 or h.length < HEADER_SIZE - LOG_OVERHEAD or pos + h.size > n:
            return
        yield pos, h
        pos += h.size


def peek_length(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(base_offset, total size) from the first 12 bytes at ``pos``."""
    base, length = _LEN.unpack_from(buf, pos)
    return base, length + LOG_OVERHEAD
