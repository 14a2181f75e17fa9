"""The embedded store: SQLite (stdlib sqlite3) in WAL mode, one writer thread.

Design notes (docs/architecture.md has the full schema):
- One ``messages`` table; the dequeue scan is the partial index ``msg_ready`` over
  (queue_id, priority DESC, id) WHERE state = READY, so delayed and leased rows are
  not in it at all and a million delayed messages cost a ready receive nothing.
- Delayed and leased rows each have a partial index on visible_at, so timers find what
  is due with a range scan.
- Per-queue gauges (ready / in flight / delayed) and totals live in the ``queues`` row,
  updated once per queue per group transaction, so stats cost one row read.
"""

from __future__ import annotations

import functools
import itertools
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

from conveyor.errors import (
    ConveyorError,
    SchemaTooNew,
    StoreCorrupt,
    StoreError,
    StoreFull,
)
from conveyor.model import Durability
from conveyor.store.base import (
    DELAYED,
    LEASED,
    READY,
    SCHEMA_VERSION,
    Candidate,
    Counters,
    MessageRow,
    NewRow,
    QueueRow,
    Store,
    Tx,
)
from conveyor.store.writer import GroupCommitWriter

T = TypeVar("T")

DB_FILE = "conveyor.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS conveyor_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queues(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    options BLOB NOT NULL,
    created_at REAL NOT NULL,
    ready INTEGER NOT NULL DEFAULT 0,
    in_flight INTEGER NOT NULL DEFAULT 0,
    delayed INTEGER NOT NULL DEFAULT 0,
    sent_total INTEGER NOT NULL DEFAULT 0,
    received_total INTEGER NOT NULL DEFAULT 0,
    acked_total INTEGER NOT NULL DEFAULT 0,
    nacked_total INTEGER NOT NULL DEFAULT 0,
    expired_total INTEGER NOT NULL DEFAULT 0,
    dead_total INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue_id INTEGER NOT NULL,
    state INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    visible_at REAL,
    expires_at REAL,
    sent_at REAL NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    first_received_at REAL,
    lease_token INTEGER,
    group_id TEXT,
    dedup_id TEXT,
    meta BLOB NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS msg_ready ON messages(queue_id, priority DESC, id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS msg_delayed ON messages(visible_at) WHERE state = 2;
CREATE INDEX IF NOT EXISTS msg_leased ON messages(visible_at) WHERE state = 1;
CREATE INDEX IF NOT EXISTS msg_expiry ON messages(expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS msg_queue ON messages(queue_id, id);
CREATE INDEX IF NOT EXISTS msg_group ON messages(queue_id, group_id, id)
    WHERE group_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS fifo_turns(
    queue_id INTEGER NOT NULL,
    group_id TEXT NOT NULL,
    turn INTEGER NOT NULL,
    PRIMARY KEY(queue_id, group_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS fifo_turn_order ON fifo_turns(queue_id, turn);
CREATE TABLE IF NOT EXISTS dedup(
    queue_id INTEGER NOT NULL,
    dedup_id TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY(queue_id, dedup_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_expiry ON dedup(expires_at);
CREATE TABLE IF NOT EXISTS exchanges(name TEXT PRIMARY KEY, info BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS bindings(key BLOB PRIMARY KEY, binding BLOB NOT NULL);
"""

_ROW_COLS = (
    "id, priority, sent_at, receive_count, first_received_at, group_id, dedup_id, meta, body,"
    " expires_at"
)
_GAUGE = {READY: 0, LEASED: 1, DELAYED: 2}
_TOTALS = ("sent", "received", "acked", "nacked", "expired", "dead")


def _marks(n: int) -> str:
    return ",".join("?" * n)


# -- binding cheaply ---------------------------------------------------------------------
# CPython's sqlite3 binds int, float, str and bytearray directly, but a None or a bytes
# parameter goes through the adapter protocol (a tuple, a dict lookup, two failing
# attribute lookups): about 1 us each, measured. So the hot statements bind no None (an
# absent column is left out of the statement and takes its NULL default) and pass blobs
# as bytearray (SQLite stores a BLOB either way and reads give bytes back). Copying a
# large blob costs more than the adapter, so those are bound as they are.
_COPY_MAX = 32 * 1024

# NewRow fields a message INSERT may leave out when they are None, with their columns.
_OPTIONAL = ((2, "visible_at"), (3, "expires_at"), (5, "group_id"), (6, "dedup_id"))
_OPTIONAL_OF = itemgetter(*(i for i, _ in _OPTIONAL))
_NONE_SET = (None,) * len(_OPTIONAL)
_STATE_OF = itemgetter(0)
_GROUP_OF_ROW = itemgetter(5)
_ID_OF = itemgetter(0)
# One multi-row INSERT runs the statement once for many rows, which costs about half of
# executemany's once per row. Runs are split into power-of-two parts of at most this many
# rows, so a handful of statements per shape serve every batch size from the statement
# cache.
_INSERT_ROWS = 64


def _shape(optional: tuple[Any, ...]) -> int:
    """Bit i set: the i-th optional column (of _OPTIONAL) has a value."""
    return sum(1 << i for i, v in enumerate(optional) if v is not None)


@functools.cache  # 16 shapes x 7 sizes at most
def _insert_sql(shape: int, n: int) -> str:
    optional = [col for i, (_, col) in enumerate(_OPTIONAL) if shape >> i & 1]
    cols = ["queue_id", "state", "priority", "sent_at", *optional, "meta", "body"]
    # ?1 is the queue id, shared by every row; a bare ? takes the number after the
    # largest one used so far, so each row binds the next len(cols) - 1 values.
    row = "(?1" + ",?" * (len(cols) - 1) + ")"
    return f"INSERT INTO messages({', '.join(cols)}) VALUES {','.join([row] * n)}"


@functools.cache
def _bound_of(shape: int) -> Callable[[NewRow], tuple[Any, ...]]:
    """The NewRow fields, other than the blobs, that a row of this shape binds."""
    return itemgetter(0, 1, 4, *(i for b, (i, _) in enumerate(_OPTIONAL) if shape >> b & 1))


def _part_sizes(n: int) -> Iterable[int]:
    while n:
        size = min(_INSERT_ROWS, 1 << (n.bit_length() - 1))
        yield size
        n -= size


_new = tuple.__new__
# Rows are built with tuple.__new__ on the NamedTuple class: the same object as
# MessageRow(*r), without the generated __new__ (a Python-level call per row).


def _message_rows(rows: Iterable[tuple[Any, ...]]) -> list[MessageRow]:
    return [_new(MessageRow, r) for r in rows]


def _in_order(rows: list[tuple[Any, ...]], ids: Sequence[int]) -> list[tuple[Any, ...]]:
    """``rows`` (id first) sorted into the order of ``ids``. RETURNING gives them in id
    order, which is already the wanted order unless priorities differ: check first."""
    if list(map(_ID_OF, rows)) == list(ids):
        return rows
    order = {mid: i for i, mid in enumerate(ids)}
    rows.sort(key=lambda r: order[r[0]])
    return rows


def _chunks(seq: Sequence[T], size: int = 500) -> Iterable[Sequence[T]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


class SqliteTx(Tx):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.c = conn
        # queue_id -> [ready, in_flight, delayed, sent, received, acked, nacked, expired, dead]
        self.deltas: dict[int, list[int]] = {}

    # -- bookkeeping --------------------------------------------------------------------
    def _bump(self, queue_id: int, index: int, n: int) -> None:
        if n:
            d = self.deltas.get(queue_id)
            if d is None:
                d = self.deltas[queue_id] = [0] * 9
            d[index] += n

    def _gauge(self, queue_id: int, state: int, n: int) -> None:
        self._bump(queue_id, _GAUGE[state], n)

    def count(self, queue_id: int, what: str, n: int = 1) -> None:
        self._bump(queue_id, 3 + _TOTALS.index(what), n)

    def flush(self) -> None:
        if not self.deltas:
            return
        self.c.executemany(
            "UPDATE queues SET ready=ready+?, in_flight=in_flight+?, delayed=delayed+?,"
            " sent_total=sent_total+?, received_total=received_total+?,"
            " acked_total=acked_total+?, nacked_total=nacked_total+?,"
            " expired_total=expired_total+?, dead_total=dead_total+? WHERE id=?",
            [(*d, qid) for qid, d in self.deltas.items()],
        )
        self.deltas = {}

    def _states(self, ids: Sequence[int]) -> list[tuple[int, int, int]]:
        """(id, queue_id, state) for the ids that exist."""
        out: list[tuple[int, int, int]] = []
        for part in _chunks(ids):
            out.extend(
                self.c.execute(
                    f"SELECT id, queue_id, state FROM messages WHERE id IN ({_marks(len(part))})",
                    part,
                )
            )
        return out

    # -- queues -------------------------------------------------------------------------
    def queue_by_name(self, name: str) -> QueueRow | None:
        row = self.c.execute(
            "SELECT id, name, options, created_at FROM queues WHERE name=?", (name,)
        ).fetchone()
        return QueueRow(*row) if row else None

    def list_queues(self) -> list[QueueRow]:
        rows = self.c.execute("SELECT id, name, options, created_at FROM queues ORDER BY name")
        return [QueueRow(*r) for r in rows]

    def create_queue(self, name: str, options: bytes, now: float) -> QueueRow:
        cur = self.c.execute(
            "INSERT INTO queues(name, options, created_at) VALUES (?,?,?)", (name, options, now)
        )
        assert cur.lastrowid is not None
        return QueueRow(cur.lastrowid, name, options, now)

    def update_queue(self, queue_id: int, options: bytes) -> None:
        self.c.execute("UPDATE queues SET options=? WHERE id=?", (options, queue_id))

    def delete_queue(self, queue_id: int) -> int:
        n = self.c.execute("DELETE FROM messages WHERE queue_id=?", (queue_id,)).rowcount
        self.c.execute("DELETE FROM queues WHERE id=?", (queue_id,))
        self.c.execute("DELETE FROM dedup WHERE queue_id=?", (queue_id,))
        self.c.execute("DELETE FROM fifo_turns WHERE queue_id=?", (queue_id,))
        self.deltas.pop(queue_id, None)
        return n

    def counters(self, queue_id: int) -> Counters:
        row = self.c.execute(
            "SELECT ready, in_flight, delayed, sent_total, received_total, acked_total,"
            " nacked_total, expired_total, dead_total FROM queues WHERE id=?",
            (queue_id,),
        ).fetchone()
        if row is None:
            return Counters(0, 0, 0, 0, 0, 0, 0, 0, 0)
        d = self.deltas.get(queue_id)
        if d:
            row = tuple(a + b for a, b in zip(row, d, strict=True))
        return Counters(*row)

    def oldest_sent_at(self, queue_id: int) -> float | None:
        row = self.c.execute(
            "SELECT sent_at FROM messages WHERE queue_id=? AND state<>1 ORDER BY id LIMIT 1",
            (queue_id,),
        ).fetchone()
        return float(row[0]) if row else None

    # -- messages -----------------------------------------------------------------------
    def insert(self, queue_id: int, rows: Sequence[NewRow]) -> list[int]:
        n = len(rows)
        if not n:
            return []
        optional = list(map(_OPTIONAL_OF, rows))
        if optional.count(_NONE_SET) == n:  # the usual case: one shape, no group
            last = self._insert_run(queue_id, 0, rows)
            groups: set[str] = set()
        else:
            # Runs of consecutive rows of one shape, in order: ids follow input order.
            shapes = list(map(_shape, optional))
            start = 0
            for shape, run in itertools.groupby(shapes):
                size = len(list(run))
                last = self._insert_run(queue_id, shape, rows[start : start + size])
                start += size
            groups = {g for g in map(_GROUP_OF_ROW, rows) if g is not None}
        # One writer and AUTOINCREMENT: the rows just inserted have consecutive ids.
        first = last - n + 1
        ready = list(map(_STATE_OF, rows)).count(READY)
        self._gauge(queue_id, READY, ready)
        self._gauge(queue_id, DELAYED, n - ready)
        self.count(queue_id, "sent", n)
        if groups:
            self.c.executemany(
                "INSERT OR IGNORE INTO fifo_turns(queue_id, group_id, turn) VALUES (?,?,0)",
                [(queue_id, g) for g in groups],
            )
        return list(range(first, last + 1))

    def _insert_run(self, queue_id: int, shape: int, rows: Sequence[NewRow]) -> int:
        """Insert rows that all leave the same optional columns out; return the last id."""
        bound = _bound_of(shape)
        start = 0
        last = 0
        for size in _part_sizes(len(rows)):
            params: list[Any] = [queue_id]
            for r in rows[start : start + size]:
                params += bound(r)
                meta, body = r[7], r[8]
                params.append(bytearray(meta) if len(meta) <= _COPY_MAX else meta)
                params.append(bytearray(body) if len(body) <= _COPY_MAX else body)
            start += size
            rowid = self.c.execute(_insert_sql(shape, size), params).lastrowid
            assert rowid is not None
            last = rowid
        return last

    def find_dedup(self, queue_id: int, dedup_id: str, now: float) -> int | None:
        row = self.c.execute(
            "SELECT message_id FROM dedup WHERE queue_id=? AND dedup_id=? AND expires_at>?",
            (queue_id, dedup_id, now),
        ).fetchone()
        return int(row[0]) if row else None

    def remember_dedup(
        self, queue_id: int, entries: Iterable[tuple[str, int]], expires_at: float
    ) -> None:
        self.c.executemany(
            "INSERT OR REPLACE INTO dedup(queue_id, dedup_id, message_id, expires_at)"
            " VALUES (?,?,?,?)",
            [(queue_id, d, mid, expires_at) for d, mid in entries],
        )

    def ready_candidates(self, queue_id: int, limit: int) -> list[Candidate]:
        rows = self.c.execute(
            "SELECT id, receive_count, expires_at FROM messages INDEXED BY msg_ready"
            " WHERE queue_id=? AND state=0 ORDER BY priority DESC, id LIMIT ?",
            (queue_id, limit),
        )
        return [_new(Candidate, r) for r in rows]

    def fifo_candidates(self, queue_id: int, limit: int) -> list[Candidate]:
        out: list[Candidate] = []
        empty: list[str] = []
        # Visit groups least recently served first; a bounded number per call keeps a
        # lease cheap however many groups exist.
        groups = self.c.execute(
            "SELECT group_id FROM fifo_turns WHERE queue_id=? ORDER BY turn LIMIT ?",
            (queue_id, limit * 4 + 64),
        ).fetchall()
        for (group,) in groups:
            head = self.c.execute(
                "SELECT id, receive_count, expires_at, state FROM messages"
                " WHERE queue_id=? AND group_id=? ORDER BY id LIMIT 1",
                (queue_id, group),
            ).fetchone()
            if head is None:
                empty.append(group)
            elif head[3] == READY:
                out.append(Candidate(head[0], head[1], head[2]))
                if len(out) >= limit:
                    break
        if empty:
            self.c.executemany(
                "DELETE FROM fifo_turns WHERE queue_id=? AND group_id=?",
                [(queue_id, g) for g in empty],
            )
        return out

    def _served(self, queue_id: int, ids: Sequence[int]) -> None:
        """Move the groups of these messages to the back of the FIFO turn order."""
        top = self.c.execute(
            "SELECT coalesce(max(turn), 0) FROM fifo_turns WHERE queue_id=?", (queue_id,)
        ).fetchone()[0]
        rows = self._group_of(ids)
        self.c.executemany(
            "UPDATE fifo_turns SET turn=? WHERE queue_id=? AND group_id=?",
            [(top + i + 1, queue_id, g) for i, g in enumerate(rows)],
        )

    def _group_of(self, ids: Sequence[int]) -> list[str]:
        out: list[str] = []
        for part in _chunks(ids):
            out.extend(
                r[0]
                for r in self.c.execute(
                    f"SELECT group_id FROM messages WHERE id IN ({_marks(len(part))})"
                    " AND group_id IS NOT NULL ORDER BY id",
                    part,
                )
            )
        return out

    def lease(
        self, queue_id: int, ids: Sequence[int], lease_until: float, token: int, now: float
    ) -> list[MessageRow]:
        if not ids:
            return []
        rows = self.c.execute(
            "UPDATE messages SET state=1, visible_at=?, lease_token=?,"
            " receive_count=receive_count+1, first_received_at=coalesce(first_received_at, ?)"
            f" WHERE id IN ({_marks(len(ids))}) AND state=0 RETURNING {_ROW_COLS}",
            (lease_until, token, now, *ids),
        ).fetchall()
        self._gauge(queue_id, READY, -len(rows))
        self._gauge(queue_id, LEASED, len(rows))
        self.count(queue_id, "received", len(rows))
        if any(r[5] is not None for r in rows):
            self._served(queue_id, [r[0] for r in rows])
        return _message_rows(_in_order(rows, ids))

    def take(self, queue_id: int, ids: Sequence[int], now: float) -> list[MessageRow]:
        if not ids:
            return []
        rows = self.c.execute(
            f"DELETE FROM messages WHERE id IN ({_marks(len(ids))}) AND state=0"
            f" RETURNING {_ROW_COLS}",
            ids,
        ).fetchall()
        self._gauge(queue_id, READY, -len(rows))
        self.count(queue_id, "received", len(rows))
        self.count(queue_id, "acked", len(rows))
        return [
            _new(MessageRow, (r[0], r[1], r[2], r[3] + 1, r[4] or now, *r[5:]))
            for r in _in_order(rows, ids)
        ]

    def _current(
        self, queue_id: int, leases: Sequence[tuple[int, int]], states: tuple[int, ...]
    ) -> dict[int, int]:
        """Of these (id, token) pairs, those that are the current lease: {id: state}."""
        want = dict(leases)
        found: dict[int, int] = {}
        ids = list(want)
        for part in _chunks(ids):
            for mid, qid, state, tok in self.c.execute(
                "SELECT id, queue_id, state, lease_token FROM messages"
                f" WHERE id IN ({_marks(len(part))})",
                part,
            ):
                if qid == queue_id and tok == want[mid] and state in states:
                    found[mid] = state
        return found

    def ack(self, queue_id: int, leases: Sequence[tuple[int, int]]) -> set[int]:
        # A lease that expired but was not yet handed to anyone else may still be acked
        # with its receipt (as SQS allows); a newer delivery has a new token. Receipts
        # from one receive share a token, so this is usually a single statement.
        by_token: dict[int, list[int]] = {}
        for mid, tok in leases:
            by_token.setdefault(tok, []).append(mid)
        found: dict[int, int] = {}
        for tok, mids in by_token.items():
            for part in _chunks(mids):
                found.update(
                    self.c.execute(
                        f"DELETE FROM messages WHERE id IN ({_marks(len(part))})"
                        " AND lease_token=? AND queue_id=? AND state IN (0, 1) RETURNING id, state",
                        (*part, tok, queue_id),
                    )
                )
        if not found:
            return set()
        ready = list(found.values()).count(READY)
        self._gauge(queue_id, READY, -ready)
        self._gauge(queue_id, LEASED, ready - len(found))  # the rest were LEASED
        self.count(queue_id, "acked", len(found))
        return set(found)

    def release(
        self,
        queue_id: int,
        leases: Sequence[tuple[int, int]],
        visible_at: float | None,
        undo: bool = False,
    ) -> set[int]:
        found = self._current(queue_id, leases, (LEASED,))
        if not found:
            return set()
        state = READY if visible_at is None else DELAYED
        ids = list(found)
        back = 1 if undo else 0
        for part in _chunks(ids):
            self.c.execute(
                "UPDATE messages SET state=?, visible_at=?, lease_token=NULL,"
                " receive_count=max(receive_count-?, 0)"
                f" WHERE id IN ({_marks(len(part))})",
                (state, visible_at, back, *part),
            )
        self._gauge(queue_id, LEASED, -len(found))
        self._gauge(queue_id, state, len(found))
        if undo:
            self.count(queue_id, "received", -len(found))
        else:
            self.count(queue_id, "nacked", len(found))
        return set(found)

    def extend(
        self, queue_id: int, leases: Sequence[tuple[int, int]], lease_until: float
    ) -> set[int]:
        found = self._current(queue_id, leases, (LEASED,))
        ids = list(found)
        for part in _chunks(ids):
            self.c.execute(
                f"UPDATE messages SET visible_at=? WHERE id IN ({_marks(len(part))})",
                (lease_until, *part),
            )
        return set(found)

    def leased_rows(self, queue_id: int, leases: Sequence[tuple[int, int]]) -> list[MessageRow]:
        found = self._current(queue_id, leases, (LEASED,))
        return self.read_rows(list(found))

    def read_rows(self, ids: Sequence[int]) -> list[MessageRow]:
        out: list[MessageRow] = []
        for part in _chunks(ids):
            out.extend(
                _new(MessageRow, r)
                for r in self.c.execute(
                    f"SELECT {_ROW_COLS} FROM messages WHERE id IN ({_marks(len(part))})"
                    " ORDER BY id",
                    part,
                )
            )
        return out

    def move(
        self, moves: Sequence[tuple[int, bytes]], to_queue: int, expires_at: float | None
    ) -> None:
        if not moves:
            return
        before = self._states([m[0] for m in moves])
        for _mid, qid, state in before:
            self._gauge(qid, state, -1)
        self.c.executemany(
            "UPDATE messages SET queue_id=?, state=0, visible_at=NULL, lease_token=NULL,"
            " receive_count=0, first_received_at=NULL, expires_at=?, meta=? WHERE id=?",
            [(to_queue, expires_at, meta, mid) for mid, meta in moves],
        )
        self._gauge(to_queue, READY, len(before))
        self.count(to_queue, "sent", len(before))
        groups = self._group_of([m[0] for m in moves])
        if groups:
            self.c.executemany(
                "INSERT OR IGNORE INTO fifo_turns(queue_id, group_id, turn) VALUES (?,?,0)",
                [(to_queue, g) for g in set(groups)],
            )

    def delete_ids(self, ids: Sequence[int]) -> None:
        before = self._states(ids)
        for _mid, qid, state in before:
            self._gauge(qid, state, -1)
        for part in _chunks(ids):
            self.c.execute(f"DELETE FROM messages WHERE id IN ({_marks(len(part))})", part)

    def peek(self, queue_id: int, limit: int) -> list[MessageRow]:
        rows = self.c.execute(
            f"SELECT {_ROW_COLS} FROM messages INDEXED BY msg_ready"
            " WHERE queue_id=? AND state=0 ORDER BY priority DESC, id LIMIT ?",
            (queue_id, limit),
        )
        return _message_rows(rows)

    def purge(self, queue_id: int, in_flight: bool = False) -> int:
        keep = -1 if in_flight else LEASED
        counts = dict(
            self.c.execute(
                "SELECT state, count(*) FROM messages WHERE queue_id=? AND state<>? GROUP BY state",
                (queue_id, keep),
            ).fetchall()
        )
        self.c.execute("DELETE FROM messages WHERE queue_id=? AND state<>?", (queue_id, keep))
        for state, n in counts.items():
            self._gauge(queue_id, state, -n)
        return sum(counts.values())

    def ready_count(self, queue_id: int) -> int:
        return self.counters(queue_id).ready

    def oldest_ready(self, queue_id: int, limit: int) -> list[int]:
        return [c.id for c in self.ready_candidates(queue_id, limit)]

    # -- timers -------------------------------------------------------------------------
    def _promote(self, sql: str, now: float, from_state: int) -> dict[int, int]:
        per: dict[int, int] = {}
        for (qid,) in self.c.execute(sql, (now,)):
            per[qid] = per.get(qid, 0) + 1
        for qid, n in per.items():
            self._gauge(qid, from_state, -n)
            self._gauge(qid, READY, n)
        return per

    def promote_delayed(self, now: float) -> dict[int, int]:
        return self._promote(
            "UPDATE messages SET state=0, visible_at=NULL WHERE state=2 AND visible_at<=?"
            " RETURNING queue_id",
            now,
            DELAYED,
        )

    def expire_leases(self, now: float) -> dict[int, int]:
        # The lease token stays: the last receipt may still ack until a new delivery.
        return self._promote(
            "UPDATE messages SET state=0, visible_at=NULL WHERE state=1 AND visible_at<=?"
            " RETURNING queue_id",
            now,
            LEASED,
        )

    def outside_changes(self) -> int:
        # Changes exactly when another connection has committed since we last asked.
        return int(self.c.execute("PRAGMA data_version").fetchone()[0])

    def release_session_leases(self, min_token: int) -> int:
        per = self._promote(
            "UPDATE messages SET state=0, visible_at=NULL, lease_token=NULL"
            " WHERE state=1 AND lease_token>=? RETURNING queue_id",
            min_token,
            LEASED,
        )
        return sum(per.values())

    def expired_ids(self, now: float, limit: int) -> list[tuple[int, int]]:
        rows = self.c.execute(
            "SELECT queue_id, id FROM messages WHERE expires_at IS NOT NULL AND expires_at<=?"
            " AND state<>1 ORDER BY expires_at LIMIT ?",
            (now, limit),
        )
        return [(int(q), int(i)) for q, i in rows]

    def next_due(self) -> float | None:
        row = self.c.execute(
            "SELECT (SELECT min(visible_at) FROM messages WHERE state=2),"
            " (SELECT min(visible_at) FROM messages WHERE state=1),"
            # Leased messages do not expire mid-lease (the sweep skips them), so their TTL
            # is not a due time; counting it would spin the timer until the lease ends.
            " (SELECT min(expires_at) FROM messages WHERE expires_at IS NOT NULL AND state<>1)"
        ).fetchone()
        times = [t for t in row if t is not None]
        return min(times) if times else None

    def forget_dedup(self, now: float) -> None:
        self.c.execute("DELETE FROM dedup WHERE expires_at<=?", (now,))

    # -- exchanges and bindings ---------------------------------------------------------
    def load_exchanges(self) -> list[tuple[str, bytes]]:
        return [(r[0], r[1]) for r in self.c.execute("SELECT name, info FROM exchanges")]

    def save_exchange(self, name: str, info: bytes) -> None:
        self.c.execute("INSERT OR REPLACE INTO exchanges(name, info) VALUES (?,?)", (name, info))

    def delete_exchange(self, name: str) -> None:
        self.c.execute("DELETE FROM exchanges WHERE name=?", (name,))

    def load_bindings(self) -> list[bytes]:
        return [r[0] for r in self.c.execute("SELECT binding FROM bindings")]

    def save_binding(self, key: bytes, binding: bytes) -> None:
        self.c.execute("INSERT OR REPLACE INTO bindings(key, binding) VALUES (?,?)", (key, binding))

    def delete_binding(self, key: bytes) -> None:
        self.c.execute("DELETE FROM bindings WHERE key=?", (key,))


class _SqliteBackend:
    """The dialect half of group commit for SQLite."""

    def __init__(self, conn: sqlite3.Connection, wal: str | None) -> None:
        """``wal``: the WAL file to fsync before a durable round is confirmed (durability
        fsync); None when SQLite's own setting is the whole story (os, none, memory)."""
        self.conn = conn
        self.tx = SqliteTx(conn)
        self.wal = wal
        self.wal_fd: int | None = None
        self.relaxed = False

    def prepare(self, relaxed: bool) -> None:
        self.relaxed = relaxed

    def _sync_wal(self) -> None:
        # The connection runs at synchronous=NORMAL: COMMIT writes the WAL frames, and
        # here we fdatasync them -- what synchronous=FULL does, but skipped for rounds made
        # only of relaxed scripts. The WAL is written in order, so this fsync also makes
        # every earlier relaxed commit durable.
        # SQLite deletes the WAL only when its last connection closes, and this
        # connection stays open for the store's life: the file opened once stays it.
        assert self.wal is not None
        if self.wal_fd is None:
            self.wal_fd = os.open(self.wal, os.O_RDONLY)
        # fdatasync, as SQLite itself uses on Linux: the data and the file size, without
        # the timestamps.
        os.fdatasync(self.wal_fd)

    def begin(self) -> SqliteTx:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.tx

    def savepoint(self) -> None:
        self.conn.execute("SAVEPOINT job")

    def release(self) -> None:
        self.conn.execute("RELEASE job")

    def rollback_savepoint(self) -> None:
        self.conn.execute("ROLLBACK TO job")
        self.conn.execute("RELEASE job")

    def snapshot(self, tx: SqliteTx) -> Any:
        return {k: list(v) for k, v in tx.deltas.items()}

    def restore(self, tx: SqliteTx, snap: Any) -> None:
        tx.deltas = snap

    def commit(self, tx: SqliteTx) -> None:
        tx.flush()
        self.conn.execute("COMMIT")
        if self.wal is not None and not self.relaxed:
            self._sync_wal()

    def rollback(self) -> None:
        self.tx.deltas = {}
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        if self.wal_fd is not None:
            os.close(self.wal_fd)
        self.conn.close()

    def translate(self, exc: Exception) -> ConveyorError:
        return translate(exc)


def translate(exc: Exception) -> ConveyorError:
    if isinstance(exc, ConveyorError):
        return exc
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "full" in text:
        return StoreFull(f"the data directory is full: {text}")
    if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text):
        return StoreCorrupt(f"the data file is damaged: {text}")
    return StoreError(f"store failure: {text}")


# fsync runs SQLite at NORMAL and fdatasyncs the WAL itself before confirming a round
# (see _SqliteBackend._sync_wal): the same guarantee as FULL, chosen per round.
_SYNC = {"fsync": "NORMAL", "os": "NORMAL", "none": "OFF"}


def _connect(path: str, durability: Durability) -> sqlite3.Connection:
    # timeout: wait (not fail) while another process holds the write lock, which
    # includes two processes opening the same new directory at once.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    try:
        conn.execute("PRAGMA busy_timeout=10000")
        if path != ":memory:":
            mode = _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            if str(mode).lower() != "wal":
                raise StoreError(f"could not switch {path} to WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous={_SYNC[durability]}")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA cache_size=-16000")  # 16 MiB: bounded, bodies stay on disk
        _retry_locked(lambda: _migrate(conn, path))
    except sqlite3.DatabaseError as exc:
        conn.close()
        err = translate(exc)
        if isinstance(err, StoreCorrupt):
            raise StoreCorrupt(
                f"{path} is not a readable conveyor database ({exc}). Move it aside and"
                f" restore from a backup, or salvage it with `sqlite3 {path} .recover`"
                " (see docs/reliability.md)."
            ) from exc
        raise err from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _retry_locked(fn: Callable[[], T], seconds: float = 10.0) -> T:
    """Run ``fn``, retrying while another process holds a lock SQLite's busy handler
    does not wait for (switching to WAL mode is one)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _migrate(conn: sqlite3.Connection, path: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        have = conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='conveyor_meta'"
        ).fetchone()
        version = 0
        if have:
            row = conn.execute(
                "SELECT value FROM conveyor_meta WHERE key='schema_version'"
            ).fetchone()
            version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{path} has schema version {version}; this conveyor understands up to"
                f" {SCHEMA_VERSION}. Upgrade conveyor to open it."
            )
        if version < SCHEMA_VERSION:
            # Version 1 is the first schema; later versions add steps here, in order.
            # executescript would commit first; run statement by statement instead.
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT OR REPLACE INTO conveyor_meta(key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class SqliteStore(Store):
    def __init__(self, path: str | os.PathLike[str] | None, durability: Durability = "fsync"):
        """``path`` is a data directory (created if missing) or None for memory."""
        if durability not in _SYNC:
            raise StoreError(f"durability must be one of fsync, os, none; got {durability!r}")
        if path is None:
            db = ":memory:"
            self.location = "memory"
            self.durability = "none"
        else:
            folder = Path(path)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create data directory {folder}: {exc}") from exc
            db = str(folder / DB_FILE)
            self.location = str(folder)
            self.durability = durability
        self._conn = _connect(db, self.durability)
        self._writer: GroupCommitWriter[SqliteTx] = GroupCommitWriter(
            _SqliteBackend(self._conn, db + "-wal" if self.durability == "fsync" else None)
        )

    async def run(self, script: Callable[[Tx], T], *, relaxed: bool = False) -> T:
        return await self._writer.run(script, relaxed)

    async def close(self) -> None:
        self._writer.close()
