"""Retries: backoff policies (fixed, exponential, custom) with jitter, and the
exceptions a task raises to steer them."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


class Retry(Exception):
    """Raise from a task to retry it (counts as an attempt), optionally after ``delay``
    seconds instead of the task's backoff."""

    def __init__(self, reason: str = "", *, delay: float | None = None) -> None:
        super().__init__(reason or "retry requested")
        self.delay = delay


class NonRetryableError(Exception):
    """Raise (or subclass) to fail a job at once: no further attempts."""


class JobTimeout(Exception):
    """A job ran past its timeout. Retried like any other failure."""


#: A custom backoff: (attempt that just failed, starting at 1; the exception) -> seconds.
BackoffFn = Callable[[int, BaseException], float]


@dataclass(frozen=True)
class Backoff:
    """Delay before retry n (n = the attempt that failed, from 1):
    ``fixed``: ``base``; ``exponential``: ``base * factor**(n-1)``; capped at ``max``.
    ``jitter`` (0..1) takes up to that fraction off at random ("equal jitter" when
    0.5, "full jitter" when 1), so a crowd of failures does not retry in step."""

    kind: str = "exponential"
    base: float = 1.0
    factor: float = 2.0
    max: float = 3600.0
    jitter: float = 0.25
    custom: BackoffFn | None = None

    def delay(self, attempt: int, exc: BaseException) -> float:
        if self.custom is not None:
            d = float(self.custom(attempt, exc))
        elif self.kind == "fixed":
            d = self.base
        else:
            d = self.base * self.factor ** max(0, attempt - 1)
        d = min(max(d, 0.0), self.max)
        if self.jitter > 0:
            d -= d * self.jitter * random.random()
        return d


def fixed(delay: float, *, jitter: float = 0.0) -> Backoff:
    return Backoff("fixed", base=delay, jitter=jitter)


def exponential(
    base: float = 1.0, *, factor: float = 2.0, max: float = 3600.0, jitter: float = 0.25
) -> Backoff:
    return Backoff("exponential", base=base, factor=factor, max=max, jitter=jitter)


def custom(fn: BackoffFn, *, jitter: float = 0.0, max: float = 86400.0) -> Backoff:
    return Backoff("custom", custom=fn, jitter=jitter, max=max)
