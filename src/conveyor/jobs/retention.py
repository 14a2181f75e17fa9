"""Removal policies for finished jobs' records (BullMQ's ``removeOnComplete`` /
``removeOnFail``): keep the newest N, or keep for an age.

``remove_on_complete`` / ``remove_on_fail`` (on ``@app.task`` or as ``App`` defaults):

* ``N`` (an ``int``): keep the records of the newest N jobs of this task that completed
  (failed); older ones are removed. ``0`` or ``True``: remove at once.
* ``seconds`` (a ``float``): keep each record for that long after the job finished.
* ``False``: no limit beyond the app's ``result_ttl``. ``None``: the App's default.

How "keep the newest N" holds across workers, processes and backends, with queue
primitives only:

* Every finished job of task T whose record is kept appends an entry (job id, state,
  record time) to the *index queue* ``<app>.keep.<completed|failed>.<T>``, declared with
  ``max_length=N, overflow=drop-oldest`` and ``dead_letter=<app>.keep.remove``. Nobody
  ever receives from an index queue, so all its entries stay ready and the engine,
  inside the send's own transaction, moves the oldest entries beyond N to the
  *to-remove queue*. The index therefore holds exactly the newest N entries in send
  order, whichever worker sent them.
* Every worker leases entries from ``<app>.keep.remove`` and deletes the status queue
  each one names -- unless the job's latest record is not the one the entry was made
  for (the job was run again, e.g. by ``retry_failed``, and has a newer record with its
  own entry). Then it acks. A worker that dies mid-batch loses its leases; another
  worker removes those queues later.

"Keep for an age" needs no worker: the final record is sent with a message TTL of that
age, so the engine drops it; the emptied status queue is deleted by the broker once it
has been unused for ``result_ttl``. Either way ``result_ttl`` stays an upper bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from conveyor import errors
from conveyor.jobs import state as st

if TYPE_CHECKING:
    from conveyor.client.aio import AsyncMessage, AsyncQueue
    from conveyor.jobs.app import App

#: What ``remove_on_complete`` / ``remove_on_fail`` accept.
RemovalOption = bool | int | float | None

#: Longest age a record may be kept for (the engine's message TTL limit).
MAX_AGE = 10 * 365 * 86400.0
#: Largest N of "keep the newest N".
MAX_COUNT = 10_000_000


@dataclass(frozen=True)
class Policy:
    """A parsed removal option: ``count`` (keep the newest N) or ``age`` (seconds)."""

    count: int | None = None
    age: float | None = None


#: No removal beyond ``result_ttl``.
OFF = Policy()


def parse(value: RemovalOption, what: str) -> Policy | None:
    """``None`` stays ``None`` (use the default); see the module docstring for the rest."""
    if value is None:
        return None
    if value is True:
        return Policy(count=0)
    if value is False:
        return OFF
    if isinstance(value, int):
        if not 0 <= value <= MAX_COUNT:
            raise ValueError(f"{what}: keep between 0 and {MAX_COUNT} jobs, got {value}")
        return Policy(count=value)
    if isinstance(value, float):
        if not 0 < value <= MAX_AGE:  # also rejects NaN
            raise ValueError(f"{what}: an age must be between 0 and {MAX_AGE:g} s, got {value}")
        return Policy(age=value)
    raise TypeError(
        f"{what} must be an int (keep the newest N), a float (seconds), a bool or None;"
        f" got {type(value).__name__}"
    )


def resolve(task_policy: Policy | None, app_policy: Policy | None) -> Policy:
    if task_policy is not None:
        return task_policy
    return app_policy if app_policy is not None else OFF


class Entry(msgspec.Struct, array_like=True):
    """One finished job in an index queue: which record it was made for."""

    id: str
    state: str
    at: float


_encode_entry = msgspec.json.Encoder().encode
_decode_entry = msgspec.json.Decoder(Entry).decode


def remove_queue_options() -> dict[str, Any]:
    return {"visibility_timeout": 60.0}


def index_options(app: App, count: int) -> dict[str, Any]:
    return {
        "max_length": count,
        "overflow": "drop-oldest",
        "dead_letter": app.names.remove_queue(),
        # Every finished job uses it; unused for result_ttl means every status queue it
        # names is gone too (they expire after the same time).
        "expires": app.names.result_ttl,
    }


async def remove_queue(app: App) -> AsyncQueue:
    return await app.runtime().queue(app.names.remove_queue(), remove_queue_options())


async def index(app: App, task: str, rec: st.StatusRecord, count: int) -> None:
    """Append the finished job ``rec`` to its task's index (which keeps ``count``)."""
    await remove_queue(app)  # the dead-letter target must exist before the first drop
    rt = app.runtime()
    q = await rt.queue_updated(app.names.keep(rec.state, task), index_options(app, count))
    await q.send(_encode_entry(Entry(rec.job_id, rec.state, rec.at)))


async def remove(app: App, msgs: Sequence[AsyncMessage]) -> int:
    """Delete the status queues named by to-remove entries; return how many went."""
    from conveyor.jobs.app import gather_limited

    entries: list[Entry] = []
    for m in msgs:
        try:
            entries.append(_decode_entry(m.body))
        except msgspec.DecodeError:
            continue
    done = await gather_limited((_remove_one(app, e) for e in entries), 16)
    return sum(done)


async def _remove_one(app: App, entry: Entry) -> bool:
    rt = app.runtime()
    name = app.names.status(entry.id)
    try:
        q = await rt.conn.get_queue(name)
        recs = await q.peek(10)
        if recs:
            rec = st.decode_status(max(recs, key=lambda d: d.sequence).body)
            if rec.state != entry.state or rec.at != entry.at:
                return False  # the job ran again since: its newer record stays
        await q.delete()
    except errors.QueueNotFound:
        return False
    finally:
        rt.forget(name)
    return True
