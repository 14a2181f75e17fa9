"""The durability seam: what the broker asks of a store.

A store is a transaction runner. The broker hands it *transaction scripts*: plain
functions ``fn(tx) -> result`` that call the primitive operations of ``Tx`` below.
The store runs many scripts, from every connection, in one database transaction
(group commit) on its writer thread and resolves each caller's future only after the
commit is durable at the configured level. Only the store knows SQL: ``Tx`` speaks in
queues, message rows and leases.

States of a message row: READY (in the dequeue scan), LEASED (in flight, visible_at is
the lease end), DELAYED (visible_at is when it becomes ready).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, TypeVar

from conveyor.model import Durability

T = TypeVar("T")

READY = 0
LEASED = 1
DELAYED = 2

#: Bumped whenever the schema changes; stores refuse to open a newer one.
SCHEMA_VERSION = 1


class QueueRow(NamedTuple):
    id: int
    name: str
    options: bytes  # msgpack-encoded QueueOptions
    created_at: float


class NewRow(NamedTuple):
    """A message row to insert."""

    state: int
    priority: int
    visible_at: float | None
    expires_at: float | None
    sent_at: float
    group_id: str | None
    dedup_id: str | None
    meta: bytes
    body: bytes


class MessageRow(NamedTuple):
    """A stored message as read back (for delivery, peek, dead-lettering)."""

    id: int
    priority: int
    sent_at: float
    receive_count: int
    first_received_at: float | None
    group_id: str | None
    dedup_id: str | None
    meta: bytes
    body: bytes
    expires_at: float | None


class Candidate(NamedTuple):
    """A ready message considered for a lease, before the broker decides its fate."""

    id: int
    receive_count: int
    expires_at: float | None


class Counters(NamedTuple):
    ready: int
    in_flight: int
    delayed: int
    sent_total: int
    received_total: int
    acked_total: int
    nacked_total: int
    expired_total: int
    dead_total: int


class Tx(abc.ABC):
    """Primitive operations inside one transaction. Called on the writer thread only."""

    # -- queues -----------------------------------------------------------------------
    @abc.abstractmethod
    def queue_by_name(self, name: str) -> QueueRow | None: ...

    @abc.abstractmethod
    def list_queues(self) -> list[QueueRow]: ...

    @abc.abstractmethod
    def create_queue(self, name: str, options: bytes, now: float) -> QueueRow: ...

    @abc.abstractmethod
    def update_queue(self, queue_id: int, options: bytes) -> None: ...

    @abc.abstractmethod
    def delete_queue(self, queue_id: int) -> int:
        """Delete the queue and all its messages; return how many messages went."""

    @abc.abstractmethod
    def counters(self, queue_id: int) -> Counters: ...

    @abc.abstractmethod
    def oldest_sent_at(self, queue_id: int) -> float | None:
        """sent_at of the oldest message that is waiting (ready or delayed)."""

    # -- messages ---------------------------------------------------------------------
    @abc.abstractmethod
    def insert(self, queue_id: int, rows: Sequence[NewRow]) -> list[int]:
        """Insert rows; return their ids in order (ids grow with send order)."""

    @abc.abstractmethod
    def find_dedup(self, queue_id: int, dedup_id: str, now: float) -> int | None: ...

    @abc.abstractmethod
    def remember_dedup(
        self, queue_id: int, entries: Iterable[tuple[str, int]], expires_at: float
    ) -> None: ...

    @abc.abstractmethod
    def ready_candidates(self, queue_id: int, limit: int) -> list[Candidate]:
        """Ready messages in delivery order: priority descending, then id."""

    @abc.abstractmethod
    def fifo_candidates(self, queue_id: int, limit: int) -> list[Candidate]:
        """For FIFO queues: the head of each group whose head is ready (not leased,
        not delayed), groups served least-recently-first; ungrouped messages count as
        one group each."""

    @abc.abstractmethod
    def lease(
        self, queue_id: int, ids: Sequence[int], lease_until: float, token: int, now: float
    ) -> list[MessageRow]:
        """Mark ready messages leased; return them with receive_count incremented."""

    @abc.abstractmethod
    def take(self, queue_id: int, ids: Sequence[int], now: float) -> list[MessageRow]:
        """Deliver-and-delete (auto-ack): return the rows and delete them."""

    @abc.abstractmethod
    def ack(self, queue_id: int, leases: Sequence[tuple[int, int]]) -> set[int]:
        """Delete messages whose (id, token) is their current lease; return those ids."""

    @abc.abstractmethod
    def release(
        self,
        queue_id: int,
        leases: Sequence[tuple[int, int]],
        visible_at: float | None,
        undo: bool = False,
    ) -> set[int]:
        """End current leases early: ready now (visible_at None) or delayed until then.
        ``undo``: the delivery never reached the consumer; take back its receive count."""

    @abc.abstractmethod
    def extend(
        self, queue_id: int, leases: Sequence[tuple[int, int]], lease_until: float
    ) -> set[int]: ...

    @abc.abstractmethod
    def leased_rows(self, queue_id: int, leases: Sequence[tuple[int, int]]) -> list[MessageRow]:
        """Read currently leased messages (for reject-to-dead-letter)."""

    @abc.abstractmethod
    def read_rows(self, ids: Sequence[int]) -> list[MessageRow]: ...

    @abc.abstractmethod
    def move(
        self,
        moves: Sequence[tuple[int, bytes]],
        to_queue: int,
        expires_at: float | None,
    ) -> None:
        """Move messages (id, new meta) to another queue as ready, receive count reset."""

    @abc.abstractmethod
    def delete_ids(self, ids: Sequence[int]) -> None: ...

    @abc.abstractmethod
    def peek(self, queue_id: int, limit: int) -> list[MessageRow]: ...

    @abc.abstractmethod
    def purge(self, queue_id: int, in_flight: bool = False) -> int:
        """Delete ready and delayed messages (and leased ones with ``in_flight``)."""

    @abc.abstractmethod
    def ready_count(self, queue_id: int) -> int: ...

    @abc.abstractmethod
    def oldest_ready(self, queue_id: int, limit: int) -> list[int]:
        """Ids at the head of the ready scan (for drop-oldest overflow)."""

    # -- timers -----------------------------------------------------------------------
    @abc.abstractmethod
    def promote_delayed(self, now: float) -> dict[int, int]:
        """Delayed messages now due become ready; return {queue_id: count}."""

    @abc.abstractmethod
    def expire_leases(self, now: float) -> dict[int, int]:
        """Leases past their end return to ready; return {queue_id: count}."""

    @abc.abstractmethod
    def expired_ids(self, now: float, limit: int) -> list[tuple[int, int]]:
        """(queue_id, id) of waiting messages whose TTL has passed."""

    @abc.abstractmethod
    def next_due(self) -> float | None:
        """The earliest time a delayed message, a lease or a TTL comes due."""

    @abc.abstractmethod
    def forget_dedup(self, now: float) -> None: ...

    @abc.abstractmethod
    def count(self, queue_id: int, what: str, n: int = 1) -> None:
        """Add to one of the queue's totals: sent, received, acked, nacked, expired, dead."""

    # -- exchanges and bindings -------------------------------------------------------
    def outside_changes(self) -> int:
        """A number that changes when another connection (another process) commits
        to the store; the broker polls it on each timer round. 0 if unknown."""
        return 0

    def release_session_leases(self, min_token: int) -> int:
        """Return to READY every leased message whose lease token is at least
        ``min_token`` (leases held by connections); only called by the store's sole
        user at start-up, so shared stores need not implement it."""
        raise NotImplementedError

    def catalog_version(self) -> int:
        """A number that changes whenever queues, exchanges or bindings change. Only
        stores shared by several processes need it (the broker checks it before
        routing with a cached table); others may return 0."""
        return 0

    @abc.abstractmethod
    def load_exchanges(self) -> list[tuple[str, bytes]]: ...

    @abc.abstractmethod
    def save_exchange(self, name: str, info: bytes) -> None: ...

    @abc.abstractmethod
    def delete_exchange(self, name: str) -> None: ...

    @abc.abstractmethod
    def load_bindings(self) -> list[bytes]: ...

    @abc.abstractmethod
    def save_binding(self, key: bytes, binding: bytes) -> None: ...

    @abc.abstractmethod
    def delete_binding(self, key: bytes) -> None: ...


class Store(abc.ABC):
    """Runs transaction scripts with group commit."""

    durability: Durability
    location: str
    #: True when other processes write the same data (PostgreSQL): the broker then
    #: treats its in-memory catalog as a cache that their changes invalidate.
    shared: bool = False

    def set_ready_callback(  # noqa: B027 - optional: a no-op unless the store is shared
        self, callback: Callable[[int | None, int], None] | None
    ) -> None:
        """Have ``callback(queue_id, n)`` called, from any thread, when another process
        made n messages of that queue ready (``queue_id`` None: any queue may have ready
        messages). A store that no other process writes never calls it."""

    def set_catalog_callback(  # noqa: B027 - optional: a no-op unless the store is shared
        self, callback: Callable[[], None] | None
    ) -> None:
        """Have ``callback()`` called, from any thread, after queues, exchanges or
        bindings changed in the store (by any process, this one included)."""

    @abc.abstractmethod
    async def run(self, script: Callable[[Tx], T], *, relaxed: bool = False) -> T:
        """Run ``script`` in the next group transaction; return after it commits.

        ``relaxed``: losing this script's effect on power loss is harmless (a lease, a
        nack, a timer round: the worst case is a redelivery), so a round made only of
        relaxed scripts need not wait for the disk. Any later durable commit makes it
        durable too, since the log is written in order."""

    @abc.abstractmethod
    async def close(self) -> None: ...
