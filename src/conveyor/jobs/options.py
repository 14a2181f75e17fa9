"""What a caller can say about one enqueue: timing, priority, identity, dedup."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

DedupMode = Literal["simple", "throttle", "debounce"]

#: Longest a simple-dedup lock or a throttle window may last (the key queues that hold
#: them expire when unused for LOCK_QUEUE_EXPIRES).
MAX_LOCK = 86400.0
LOCK_QUEUE_EXPIRES = 2 * 86400.0


@dataclass(frozen=True)
class Dedup:
    """Deduplication by key (BullMQ's three modes).

    * ``simple``: while a job with this key is waiting or running, more are ignored;
      the key is released when that job completes or fails for good (or after
      ``window`` seconds, a safety net for a producer that died mid-enqueue).
    * ``throttle``: at most one job per key per ``window`` seconds.
    * ``debounce``: each enqueue is delayed by ``window``; only the latest one within
      the window runs (the earlier ones finish as ``debounced`` without running).
    """

    key: str
    mode: DedupMode = "simple"
    window: float = 3600.0

    def __post_init__(self) -> None:
        if self.mode not in ("simple", "throttle", "debounce"):
            raise ValueError(f"unknown dedup mode {self.mode!r}")
        if not self.key:
            raise ValueError("a dedup key must not be empty")
        if not 0 < self.window <= MAX_LOCK:
            raise ValueError(f"dedup window must be between 0 and {MAX_LOCK:g} seconds")


def simple(key: str, *, ttl: float = 3600.0) -> Dedup:
    return Dedup(key, "simple", ttl)


def throttle(key: str, window: float) -> Dedup:
    return Dedup(key, "throttle", window)


def debounce(key: str, delay: float) -> Dedup:
    return Dedup(key, "debounce", delay)


@dataclass(frozen=True)
class EnqueueOptions:
    """Per-enqueue options; ``None`` means "the task's default"."""

    delay: float | None = None
    at: datetime | float | None = None
    priority: int | None = None
    job_id: str | None = None
    dedup: Dedup | None = None
    queue: str | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    keep_result: bool | None = None
    #: Drop the job if it has not started within this many seconds.
    ttl: float | None = None

    def merged(self, **changes: object) -> EnqueueOptions:
        return replace(self, **changes)  # type: ignore[arg-type]

    def delay_seconds(self) -> float | None:
        if self.at is not None:
            at = self.at.timestamp() if isinstance(self.at, datetime) else float(self.at)
            return max(0.0, at - time.time())
        return self.delay


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d*)\s*(s|sec|m|min|h|hour|d|day)?\s*$")
_UNIT = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_rate(rate: str | tuple[int, float]) -> tuple[int, float]:
    """``"100/m"``, ``"10/s"``, ``"5/30s"`` or ``(limit, period_seconds)``."""
    if isinstance(rate, tuple):
        limit, period = int(rate[0]), float(rate[1])
    else:
        m = _RATE.match(rate)
        if not m:
            raise ValueError(f"rate limit {rate!r}: expected e.g. '100/m', '10/s', '5/30s'")
        limit = int(m.group(1))
        period = float(m.group(2) or 1) * _UNIT[m.group(3) or "s"]
    if limit < 1 or limit > 10_000 or period <= 0:
        raise ValueError("rate limit: 1..10000 jobs per a positive period")
    return limit, period
