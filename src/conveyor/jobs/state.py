"""Job state, results and events, kept in queues.

* Each job that keeps its result has a *status queue* ``<app>.job.<id>``:
  ``max_length=1, overflow=drop-oldest`` so it holds the latest record (progress, then
  completed or failed), and ``expires`` (the app's ``result_ttl``) so the broker
  deletes it once nobody has used it for that long. ``peek`` reads the record without
  taking it; ``result(timeout)`` long-polls the queue for a new one.
* Events go to the topic exchange ``<app>.events`` with routing key
  ``<queue>.<event>``; a subscriber binds its own expiring queue to the keys it wants.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec

from conveyor.jobs.names import Names

NULL = msgspec.Raw(b"null")

EventName = Literal["completed", "failed", "progress", "retried"]
State = Literal["pending", "active", "completed", "failed", "debounced"]
TERMINAL = ("completed", "failed", "debounced")


class StatusRecord(msgspec.Struct, omit_defaults=True, kw_only=True):
    state: str
    job_id: str
    task: str = ""
    queue: str = ""
    at: float = 0.0
    attempts: int = 0
    #: The return value, JSON-encoded.
    result: msgspec.Raw = msgspec.field(default_factory=lambda: NULL)
    progress: Any = None
    error: str | None = None
    error_type: str | None = None
    traceback: str | None = None


class Event(msgspec.Struct, omit_defaults=True, kw_only=True):
    event: str
    job_id: str
    task: str
    queue: str
    at: float
    attempt: int = 0
    result: msgspec.Raw = msgspec.field(default_factory=lambda: NULL)
    progress: Any = None
    error: str | None = None
    #: For "retried": seconds until the next attempt.
    delay: float | None = None

    def result_value(self, type_: Any = Any) -> Any:
        return msgspec.json.decode(self.result, type=type_)


encode = msgspec.json.Encoder().encode
decode_status = msgspec.json.Decoder(StatusRecord).decode
decode_event = msgspec.json.Decoder(Event).decode


def status_options(names: Names) -> dict[str, Any]:
    return {
        "max_length": 1,
        "overflow": "drop-oldest",
        "expires": names.result_ttl,
        "visibility_timeout": 30.0,
    }


def now() -> float:
    return time.time()
