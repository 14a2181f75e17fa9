"""Encode and decode record batches for the Python API (kafka-python's record module).

The Kafka front door never calls this: it stores and serves producers' bytes as-is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from kafka.partitioner.default import murmur2
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords

Header = tuple[str, bytes | None]
Decoded = tuple[int, int, bytes | None, bytes | None, list[Header]]


def build_batch(
    records: Sequence[tuple[bytes | None, bytes | None, list[tuple[str, bytes]], int | None]],
    compression: int = 0,
) -> bytes:
    """One uncompressed (or ``compression``) RecordBatch v2 with offsets from 0."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=compression,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 30,
    )
    now = int(time.time() * 1000)
    for i, (key, value, headers, ts) in enumerate(records):
        builder.append(
            i, timestamp=now if ts is None else ts, key=key, value=value, headers=headers
        )
    return bytes(builder.build())


def decode_records(data: bytes) -> list[Decoded]:
    """(offset, timestamp, key, value, headers) of every data record in ``data``."""
    out: list[Decoded] = []
    mem = MemoryRecords(data)
    while True:
        batch = mem.next_batch()
        if batch is None:
            break
        if getattr(batch, "is_control_batch", False):
            continue
        for r in batch:
            out.append((r.offset, r.timestamp, r.key, r.value, list(r.headers)))
    return out


def partition_for(key: bytes | None, partitions: int, counter: int) -> int:
    """Kafka's default partitioner: murmur2 of the key; round robin without a key."""
    if key is None:
        return counter % partitions
    return int(murmur2(key) & 0x7FFFFFFF) % partitions
