"""Rate-limited log lines.

Under attack, or while the disk is full, the same failure can repeat thousands of
times a second. :class:`Throttle` lets one line per kind through each ``interval``
seconds and counts the rest; the next line that gets through says how many were not
logged. Thread-safe: the store writer logs from its own thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

#: Distinct kinds remembered before the table is cleared (kinds come from code, not
#: from peers, so this is only a backstop).
_MAX_KINDS = 1024


class Throttle:
    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def admit(self, kind: str) -> tuple[int, float] | None:
        """None: drop this line. Otherwise (lines of this kind dropped since the last
        one logged, seconds since that line)."""
        now = self._clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                self._dropped[kind] = self._dropped.get(kind, 0) + 1
                return None
            if last is None and len(self._last) >= _MAX_KINDS:
                self._last.clear()
                self._dropped.clear()
            self._last[kind] = now
            return self._dropped.pop(kind, 0), (now - last if last is not None else 0.0)

    def log(self, logger: logging.Logger, level: int, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless a line of this ``kind`` went out less than
        ``interval`` seconds ago; returns whether it was logged."""
        if not logger.isEnabledFor(level):
            return False
        admitted = self.admit(kind)
        if admitted is None:
            return False
        logger.log(level, msg + suffix(admitted), *args)
        return True


def suffix(admitted: tuple[int, float]) -> str:
    """`` (N more like this in the last S s not logged)`` for a line :meth:`Throttle.admit`
    let through, or nothing when none were dropped."""
    dropped, seconds = admitted
    if not dropped:
        return ""
    return f" ({dropped} more like this in the last {seconds:.1f} s not logged)"
