"""One partition's log: append-only segment files with a sparse offset index and a
time index.

Files in a partition directory (``<streams>/<topic>/<partition>/``)::

    00000000000000000000.log        record batches, back to back, as producers sent them
    00000000000000000000.index      sparse offset index: (relative offset int32, position int32)
    00000000000000000000.timeindex  time index: (max timestamp before, relative offset)

The name is the segment's base offset. Index entries are added every
``INDEX_INTERVAL`` bytes of log. A time-index entry ``(t, o)`` says every batch before
offset ``o`` in the segment has max timestamp <= ``t``; a search for time ``T`` starts
at the last entry with ``t < T``. Index files of closed segments are written when the
segment is rolled; the active segment's indexes are rebuilt by scanning its batch
headers at open (which also cuts off a torn tail left by a crash).

Everything here runs on the event loop except ``fsync``, which the engine's syncer
thread does. Reads use ``os.pread`` on file descriptors kept open per segment.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import struct
import time
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conveyor.streams.batch import (
    HEADER_SIZE,
    LOG_OVERHEAD,
    BatchHeader,
    CorruptBatch,
    parse_header,
    set_base_offset,
    walk,
)

log = logging.getLogger("conveyor.streams")

INDEX_INTERVAL = 4096
SCAN_CHUNK = 1 << 20
_IDX = struct.Struct(">ii")
_TIDX = struct.Struct(">qi")
#: How many recent batches per producer are remembered to answer retries.
PRODUCER_WINDOW = 5

# Kafka error codes the log reports (the protocol adapter passes them through).
DUPLICATE_SEQUENCE = 46
OUT_OF_ORDER_SEQUENCE = 45
INVALID_PRODUCER_EPOCH = 47


class SequenceError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class TopicConfig:
    partitions: int = 1
    #: Delete closed segments whose newest record is older than this (ms); -1 keeps all.
    retention_ms: int = 7 * 86400 * 1000
    #: Delete the oldest segments while the partition is larger than this; -1: no limit.
    retention_bytes: int = -1
    segment_bytes: int = 128 * 1024 * 1024
    segment_ms: int = 7 * 86400 * 1000
    created_at: float = field(default_factory=time.time)


def _name(base: int, ext: str) -> str:
    return f"{base:020d}.{ext}"


class Segment:
    __slots__ = (
        "base",
        "created",
        "durable_size",
        "idx_off",
        "idx_pos",
        "max_ts",
        "next_offset",
        "path",
        "rfd",
        "since_index",
        "size",
        "t_off",
        "t_ts",
        "wfd",
    )

    def __init__(self, directory: Path, base: int) -> None:
        self.base = base
        self.path = directory / _name(base, "log")
        self.size = 0
        self.durable_size = 0
        self.next_offset = base
        self.max_ts = -1
        self.idx_off = array("q")
        self.idx_pos = array("q")
        self.t_ts = array("q")
        self.t_off = array("q")
        self.since_index = 0
        self.rfd = -1
        self.wfd = -1
        self.created = time.time()

    # -- files ---------------------------------------------------------------------------
    def open_read(self) -> None:
        self.rfd = os.open(self.path, os.O_RDONLY)

    def open_write(self) -> None:
        self.wfd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.rfd = self.wfd = -1

    def delete(self) -> None:
        self.close()
        for ext in ("log", "index", "timeindex"):
            with contextlib.suppress(FileNotFoundError):
                (self.path.parent / _name(self.base, ext)).unlink()

    def pread(self, n: int, pos: int) -> bytes:
        return os.pread(self.rfd, n, pos)

    # -- indexes -------------------------------------------------------------------------
    def note_batch(self, pos: int, h: BatchHeader, base: int) -> None:
        """Account for a batch at ``pos`` (offset ``base``) in the indexes."""
        if self.since_index >= INDEX_INTERVAL:
            self.idx_off.append(base)
            self.idx_pos.append(pos)
            self.t_ts.append(self.max_ts)
            self.t_off.append(base)
            self.since_index = 0
        self.since_index += h.size
        if h.max_timestamp > self.max_ts:
            self.max_ts = h.max_timestamp
        self.next_offset = base + h.last_offset_delta + 1

    def write_indexes(self) -> None:
        d = self.path.parent
        idx = b"".join(
            _IDX.pack(o - self.base, p) for o, p in zip(self.idx_off, self.idx_pos, strict=True)
        )
        tidx = b"".join(
            _TIDX.pack(t, o - self.base) for t, o in zip(self.t_ts, self.t_off, strict=True)
        )
        # a trailer records the segment's max timestamp and next offset
        tidx += _TIDX.pack(self.max_ts, self.next_offset - self.base)
        (d / _name(self.base, "index")).write_bytes(idx)
        (d / _name(self.base, "timeindex")).write_bytes(tidx)

    def load_indexes(self) -> bool:
        """Load a closed segment's index files; False if they are missing or unusable."""
        d = self.path.parent
        try:
            idx = (d / _name(self.base, "index")).read_bytes()
            tidx = (d / _name(self.base, "timeindex")).read_bytes()
        except FileNotFoundError:
            return False
        if len(idx) % _IDX.size or len(tidx) % _TIDX.size or not tidx:
            return False
        for rel, pos in _IDX.iter_unpack(idx):
            self.idx_off.append(self.base + rel)
            self.idx_pos.append(pos)
        entries = list(_TIDX.iter_unpack(tidx))
        for ts, rel in entries[:-1]:
            self.t_ts.append(ts)
            self.t_off.append(self.base + rel)
        self.max_ts, rel_next = entries[-1]
        self.next_offset = self.base + rel_next
        self.size = self.durable_size = os.fstat(self.rfd).st_size
        return True

    def scan(self, start: int = 0) -> Iterator[tuple[int, BatchHeader]]:
        """Walk the batch headers in the file from ``start`` (stops at a torn tail)."""
        pos = start
        end = os.fstat(self.rfd).st_size
        while pos < end:
            buf = self.pread(min(SCAN_CHUNK, end - pos), pos)
            got = 0
            for rel, h in walk(buf):
                yield pos + rel, h
                got = rel + h.size
            if got == 0:
                # a batch bigger than the chunk, or garbage
                if end - pos < HEADER_SIZE:
                    return
                h = parse_header(self.pread(HEADER_SIZE, pos))
                if h.magic != 2 or h.length < HEADER_SIZE - LOG_OVERHEAD or pos + h.size > end:
                    return
                yield pos, h
                got = h.size
            pos += got

    def rebuild(self) -> int:
        """Rebuild the indexes by scanning; returns the valid size of the file."""
        self.idx_off = array("q")
        self.idx_pos = array("q")
        self.t_ts = array("q")
        self.t_off = array("q")
        self.since_index = 0
        self.max_ts = -1
        self.next_offset = self.base
        size = 0
        for pos, h in self.scan():
            self.note_batch(pos, h, h.base_offset)
            size = pos + h.size
        self.size = self.durable_size = size
        return size

    def position_for(self, offset: int) -> int:
        i = bisect.bisect_right(self.idx_off, offset) - 1
        return self.idx_pos[i] if i >= 0 else 0

    def position_for_time(self, ts: int) -> int:
        i = bisect.bisect_left(self.t_ts, ts) - 1
        return self.position_for(self.t_off[i]) if i >= 0 else 0


class _Producer:
    __slots__ = ("epoch", "last_seq", "recent")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.last_seq = -1
        self.recent: deque[tuple[int, int, int]] = deque(maxlen=PRODUCER_WINDOW)


@dataclass
class ReadResult:
    records: bytes
    high_watermark: int
    log_start: int


class OffsetOutOfRange(Exception):
    pass


class PartitionLog:
    """Segments of one partition. ``append`` assigns offsets and writes; what a reader
    sees stops at the high watermark, the end of what is durable at the configured level."""

    def __init__(self, directory: Path, config: TopicConfig, durability: str) -> None:
        self.dir = directory
        self.config = config
        self.durability = durability
        self.segments: list[Segment] = []
        self.bases: list[int] = []
        self.next_offset = 0
        self.hw = 0
        self.producers: dict[int, _Producer] = {}
        self.closed = False

    # -- open / close --------------------------------------------------------------------
    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        bases = sorted(int(p.stem) for p in self.dir.glob("*.log") if p.stem.isdigit())
        if not bases:
            bases = [0]
        for i, base in enumerate(bases):
            seg = Segment(self.dir, base)
            last = i == len(bases) - 1
            if last:
                seg.open_write()
            seg.open_read()
            if not last:
                seg.created = os.fstat(seg.rfd).st_mtime
            if last or not seg.load_indexes():
                valid = seg.rebuild()
                if last and valid < os.fstat(seg.rfd).st_size:
                    log.warning("truncating torn tail of %s at byte %d", seg.path, valid)
                    os.truncate(seg.path, valid)
            self.segments.append(seg)
        self.bases = [s.base for s in self.segments]
        active = self.segments[-1]
        self.next_offset = max(active.next_offset, active.base)
        self.hw = self.next_offset
        # producer state for idempotence, from the active segment's headers
        for _, h in active.scan():
            if h.producer_id >= 0 and h.base_sequence >= 0:
                self._remember(h, h.base_offset)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.segments:
            with contextlib.suppress(OSError):
                self.segments[-1].write_indexes()
        for s in self.segments:
            s.close()

    @property
    def active(self) -> Segment:
        return self.segments[-1]

    @property
    def log_start(self) -> int:
        return self.segments[0].base

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    # -- append --------------------------------------------------------------------------
    def check_producer(self, h: BatchHeader) -> int | None:
        """None to append; an offset if this batch is a retry of one already written.
        Raises SequenceError."""
        if h.producer_id < 0 or h.base_sequence < 0:
            return None
        p = self.producers.get(h.producer_id)
        if p is None:
            return None
        if h.producer_epoch < p.epoch:
            raise SequenceError(INVALID_PRODUCER_EPOCH, "producer epoch is fenced")
        if h.producer_epoch > p.epoch:
            return None
        last = (h.base_sequence + h.last_offset_delta) & 0x7FFFFFFF
        for first_seq, last_seq, base in p.recent:
            if first_seq == h.base_sequence and last_seq == last:
                return base
        if h.base_sequence != (p.last_seq + 1) & 0x7FFFFFFF:
            raise SequenceError(
                OUT_OF_ORDER_SEQUENCE,
                f"expected sequence {p.last_seq + 1}, got {h.base_sequence}",
            )
        return None

    def _remember(self, h: BatchHeader, base: int) -> None:
        p = self.producers.get(h.producer_id)
        if p is None or h.producer_epoch > p.epoch:
            p = self.producers[h.producer_id] = _Producer(h.producer_epoch)
        last = (h.base_sequence + h.last_offset_delta) & 0x7FFFFFFF
        p.last_seq = last
        p.recent.append((h.base_sequence, last, base))

    def _maybe_roll(self, incoming: int) -> None:
        seg = self.active
        if seg.size == 0:
            return
        too_big = seg.size + incoming > self.config.segment_bytes
        too_old = (time.time() - seg.created) * 1000 > self.config.segment_ms
        if too_big or too_old:
            self.roll()

    def roll(self) -> None:
        old = self.active
        old.write_indexes()
        with contextlib.suppress(OSError):
            os.close(old.wfd)
        old.wfd = -1
        seg = Segment(self.dir, self.next_offset)
        seg.open_write()
        seg.open_read()
        self.segments.append(seg)
        self.bases.append(seg.base)

    def append(self, data: bytearray, headers: list[BatchHeader]) -> tuple[int, int]:
        """Assign offsets to the batches in ``data`` (patched in place) and write them.

        Returns (base offset of the first batch, next offset). Not yet visible to
        readers: call ``mark_durable`` once the bytes are durable."""
        self._maybe_roll(len(data))
        seg = self.active
        first = self.next_offset
        pos = 0
        offset = first
        for h in headers:
            set_base_offset(data, pos, offset)
            seg.note_batch(seg.size + pos, h, offset)
            if h.producer_id >= 0 and h.base_sequence >= 0:
                self._remember(h, offset)
            offset += h.last_offset_delta + 1
            pos += h.size
        written = 0
        view = memoryview(data)
        while written < len(data):
            written += os.write(seg.wfd, view[written:])
        seg.size += len(data)
        self.next_offset = offset
        return first, offset

    def pending_sync(self) -> tuple[list[int], list[tuple[Segment, int]], int]:
        """What an fsync must cover now: (fds, (segment, size) marks, next offset)."""
        marks = [(s, s.size) for s in self.segments if s.durable_size < s.size]
        fds = [s.rfd for s, _ in marks]  # fsync through the read fd: it lives until deletion
        return fds, marks, self.next_offset

    def mark_durable(self, marks: list[tuple[Segment, int]], upto: int) -> bool:
        for seg, size in marks:
            if size > seg.durable_size:
                seg.durable_size = size
        if upto > self.hw:
            self.hw = upto
            return True
        return False

    # -- read ----------------------------------------------------------------------------
    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches from the one containing ``offset``, up to ``max_bytes`` (at least
        one batch). Raises OffsetOutOfRange."""
        if offset < self.log_start or offset > self.hw:
            raise OffsetOutOfRange(offset)
        if offset == self.hw:
            return b""
        i = bisect.bisect_right(self.bases, offset) - 1
        while i < len(self.segments) - 1 and offset >= self.segments[i].next_offset:
            i += 1
        seg = self.segments[i]
        limit = seg.durable_size
        pos = seg.position_for(offset)
        while pos < limit:
            want = min(limit - pos, max(max_bytes, HEADER_SIZE) + 2 * INDEX_INTERVAL)
            buf = seg.pread(want, pos)
            start = -1
            end = 0
            for rel, h in walk(buf):
                if start < 0:
                    if h.base_offset + h.last_offset_delta < offset:
                        end = rel + h.size
                        continue
                    start = rel
                elif rel + h.size - start > max_bytes:
                    break
                end = rel + h.size
            if start >= 0:
                return bytes(buf[start:end])
            if end == 0:
                # the next batch is larger than the buffer
                h = parse_header(seg.pread(HEADER_SIZE, pos))
                if h.base_offset + h.last_offset_delta >= offset:
                    return seg.pread(h.size, pos)
                end = h.size
            pos += end
        return b""

    def offset_for_time(self, ts: int) -> tuple[int, int] | None:
        """(base offset, base timestamp) of the first batch with a record at or after
        ``ts`` (ms); None if there is none."""
        for seg in self.segments:
            if seg.max_ts < ts:
                continue
            for _, h in seg.scan(seg.position_for_time(ts)):
                if h.max_timestamp >= ts and h.base_offset < self.hw:
                    return max(h.base_offset, self.log_start), h.base_timestamp
        return None

    def max_timestamp(self) -> tuple[int, int]:
        """(max timestamp, offset of its batch) over the log, (-1, -1) when empty."""
        best = (-1, -1)
        for seg in self.segments:
            if seg.max_ts > best[0]:
                for _, h in seg.scan(seg.position_for_time(seg.max_ts)):
                    if h.max_timestamp == seg.max_ts:
                        best = (seg.max_ts, h.base_offset + h.last_offset_delta)
                        break
        return best

    # -- retention -----------------------------------------------------------------------
    def expired_segments(self, now_ms: int) -> list[Segment]:
        """Detach closed, durable segments that retention deletes (the caller deletes)."""
        cfg = self.config
        gone: list[Segment] = []
        total = self.size
        while len(self.segments) > 1:
            seg = self.segments[0]
            if seg.durable_size < seg.size:
                break
            newest = seg.max_ts if seg.max_ts >= 0 else int(seg.created * 1000)
            old = cfg.retention_ms >= 0 and now_ms - newest > cfg.retention_ms
            big = cfg.retention_bytes >= 0 and total - seg.size >= cfg.retention_bytes
            if not (old or big):
                break
            total -= seg.size
            gone.append(self.segments.pop(0))
            self.bases.pop(0)
        return gone


__all__ = [
    "CorruptBatch",
    "OffsetOutOfRange",
    "PartitionLog",
    "ReadResult",
    "Segment",
    "SequenceError",
    "TopicConfig",
]
