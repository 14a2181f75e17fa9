"""The shared store: PostgreSQL (psycopg 3), for several conveyor servers on one database.

Same schema concepts and the same group commit as the SQLite store (docs/postgres.md
has the full design):

- One writer thread and connection per store runs every script of a round in one
  transaction (store/writer.py). Savepoints are sent lazily, pipelined with the
  script's first statement, so a script costs one network round trip more than its
  own statements only when it fails.
- Leasing takes candidates with ``SELECT ... FOR UPDATE SKIP LOCKED`` over the partial
  ready index, so nodes never wait for each other and never lease the same row.
  Timers (promote delayed, expire leases, TTL and dedup sweeps) lock what they change
  the same way, so every node can run them: a row is promoted, expired or swept once.
- Gauges and totals are per-node delta rows (``queue_counts``, one row per queue and
  node slot) summed on read. A node only ever updates its own row, so busy queues do
  not serialize the nodes on one hot row. Slots are session advisory locks, reused
  after a node stops, so the rows per queue stay bounded by the peak node count.
- Cross-node wake-ups: a commit that made rows ready sends ``NOTIFY conveyor`` inside
  the transaction; catalog changes (queues, exchanges, bindings) notify too. A listener
  connection per store, on its own thread, hands them to the broker's callbacks.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict

from conveyor.errors import (
    ConveyorError,
    QueueNotFound,
    SchemaTooNew,
    StoreError,
    StoreFull,
)
from conveyor.model import Durability
from conveyor.store.base import (
    DELAYED,
    LEASED,
    READY,
    Candidate,
    Counters,
    MessageRow,
    NewRow,
    QueueRow,
    Store,
    Tx,
)
from conveyor.store.writer import GroupCommitWriter

log = logging.getLogger("conveyor.store")

T = TypeVar("T")

#: Version of the PostgreSQL schema (versioned separately from SQLite's).
SCHEMA_VERSION = 1
#: Advisory lock class id ("conv"): (LOCK_CLASS, 0) serializes migrations, (LOCK_CLASS,
#: n >= 1) is node slot n.
LOCK_CLASS = 0x636F6E76
CHANNEL = "conveyor"
#: Savepoints (subtransactions) per transaction before the round commits early: beyond
#: 64 PostgreSQL's per-backend subtransaction cache overflows, which slows every
#: snapshot on the server.
MAX_SUBXACTS = 48
#: Rows a timer statement handles per round; the rest come due again at once.
TIMER_BATCH = 10_000
#: Notification payloads stay below PostgreSQL's 8000-byte limit.
MAX_PAYLOAD = 7000

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            "CREATE TABLE conveyor_meta(key text PRIMARY KEY, value text NOT NULL)",
            """CREATE TABLE queues(
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                name text COLLATE "C" NOT NULL UNIQUE,
                options bytea NOT NULL,
                created_at double precision NOT NULL)""",
            """CREATE TABLE queue_counts(
                queue_id bigint NOT NULL,
                node integer NOT NULL,
                ready bigint NOT NULL DEFAULT 0,
                in_flight bigint NOT NULL DEFAULT 0,
                delayed bigint NOT NULL DEFAULT 0,
                sent_total bigint NOT NULL DEFAULT 0,
                received_total bigint NOT NULL DEFAULT 0,
                acked_total bigint NOT NULL DEFAULT 0,
                nacked_total bigint NOT NULL DEFAULT 0,
                expired_total bigint NOT NULL DEFAULT 0,
                dead_total bigint NOT NULL DEFAULT 0,
                PRIMARY KEY(queue_id, node)) WITH (fillfactor = 50)""",
            """CREATE TABLE messages(
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                queue_id bigint NOT NULL,
                state smallint NOT NULL,
                priority smallint NOT NULL,
                visible_at double precision,
                expires_at double precision,
                sent_at double precision NOT NULL,
                receive_count integer NOT NULL DEFAULT 0,
                first_received_at double precision,
                lease_token bigint,
                group_id text COLLATE "C",
                dedup_id text,
                meta bytea NOT NULL,
                body bytea NOT NULL)
              WITH (fillfactor = 90,
                    autovacuum_vacuum_scale_factor = 0.01,
                    autovacuum_vacuum_threshold = 1000,
                    autovacuum_vacuum_insert_scale_factor = 0.05,
                    autovacuum_analyze_scale_factor = 0.02,
                    autovacuum_vacuum_cost_delay = 1)""",
            "CREATE INDEX msg_ready ON messages(queue_id, priority DESC, id) WHERE state = 0",
            "CREATE INDEX msg_delayed ON messages(visible_at) WHERE state = 2",
            "CREATE INDEX msg_leased ON messages(visible_at) WHERE state = 1",
            "CREATE INDEX msg_expiry ON messages(expires_at) WHERE expires_at IS NOT NULL",
            "CREATE INDEX msg_queue ON messages(queue_id, id)",
            """CREATE INDEX msg_group ON messages(queue_id, group_id, id)
                WHERE group_id IS NOT NULL""",
            """CREATE TABLE fifo_turns(
                queue_id bigint NOT NULL,
                group_id text COLLATE "C" NOT NULL,
                turn bigint NOT NULL,
                PRIMARY KEY(queue_id, group_id)) WITH (fillfactor = 70)""",
            "CREATE INDEX fifo_turn_order ON fifo_turns(queue_id, turn)",
            "CREATE SEQUENCE conveyor_fifo_turn",
            """CREATE TABLE dedup(
                queue_id bigint NOT NULL,
                dedup_id text NOT NULL,
                message_id bigint NOT NULL,
                expires_at double precision NOT NULL,
                PRIMARY KEY(queue_id, dedup_id))""",
            "CREATE INDEX dedup_expiry ON dedup(expires_at)",
            'CREATE TABLE exchanges(name text COLLATE "C" PRIMARY KEY, info bytea NOT NULL)',
            "CREATE TABLE bindings(key bytea PRIMARY KEY, binding bytea NOT NULL)",
        ],
    ),
    # Later versions append (version, [statements]) here, in order.
]

_ROW_COLS = (
    "id, priority, sent_at, receive_count, first_received_at, group_id, dedup_id, meta, body,"
    " expires_at"
)
_GAUGE = {READY: 0, LEASED: 1, DELAYED: 2}
_TOTALS = ("sent", "received", "acked", "nacked", "expired", "dead")
_COUNT_COLS = (
    "ready",
    "in_flight",
    "delayed",
    "sent_total",
    "received_total",
    "acked_total",
    "nacked_total",
    "expired_total",
    "dead_total",
)
_FLUSH_SQL = (
    f"INSERT INTO queue_counts(queue_id, node, {', '.join(_COUNT_COLS)})"
    f" SELECT q, %s, {', '.join('c' + str(i) for i in range(9))}"
    " FROM unnest(%s::bigint[], "
    + ", ".join("%s::bigint[]" for _ in range(9))
    + f") AS u(q, {', '.join('c' + str(i) for i in range(9))})"
    " ON CONFLICT (queue_id, node) DO UPDATE SET "
    + ", ".join(f"{c} = queue_counts.{c} + excluded.{c}" for c in _COUNT_COLS)
)
_BUMP_SQL = (
    "INSERT INTO conveyor_meta(key, value) VALUES ('catalog_version', '1')"
    " ON CONFLICT (key) DO UPDATE SET value = (conveyor_meta.value::bigint + 1)::text"
)
_SUM_SQL = (
    "SELECT "
    + ", ".join(f"coalesce(sum({c}), 0)::bigint" for c in _COUNT_COLS)
    + " FROM queue_counts WHERE queue_id = %s"
)

Stmt = tuple[str, Sequence[Any] | None]


def _dedup_key(queue_id: int, dedup_id: str) -> int:
    digest = hashlib.blake2b(f"{queue_id}:{dedup_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _ordered(rows: list[Any], ids: Sequence[int]) -> list[MessageRow]:
    order = {mid: i for i, mid in enumerate(ids)}
    rows.sort(key=lambda r: order.get(r[0], len(order)))
    return [MessageRow(*r) for r in rows]


class PgTx(Tx):
    """The primitives over one PostgreSQL transaction (the writer thread only)."""

    def __init__(self, backend: _PgBackend) -> None:
        self.b = backend
        self.node = 0
        self.reset()

    def reset(self) -> None:
        # queue_id -> [ready, in_flight, delayed, sent, received, acked, nacked, expired, dead]
        self.deltas: dict[int, list[int]] = {}
        self.readied: dict[int, int] = {}  # queue_id -> rows that became ready
        self.catalog = False  # queues, exchanges or bindings changed
        self.held: set[int] = set()  # queues key-share locked in this transaction
        self.version: int | None = None  # catalog version read in this transaction

    # -- statements ---------------------------------------------------------------------
    def _x(self, sql: str, params: Sequence[Any] | None = None) -> psycopg.Cursor[Any]:
        return self._xs([(sql, params)])[-1]

    def _xs(self, stmts: Sequence[Stmt]) -> list[psycopg.Cursor[Any]]:
        """Run statements, pipelined after whatever the backend has pending (BEGIN,
        SAVEPOINT, RELEASE): one network round trip."""
        conn = self.b.conn
        pre = self.b.take_pending()
        if not pre and len(stmts) == 1:
            return [conn.execute(stmts[0][0], stmts[0][1])]
        with conn.pipeline():
            for s in pre:
                conn.execute(s)
            return [conn.execute(sql, params) for sql, params in stmts]

    # -- bookkeeping --------------------------------------------------------------------
    def _bump(self, queue_id: int, index: int, n: int) -> None:
        if n:
            d = self.deltas.get(queue_id)
            if d is None:
                d = self.deltas[queue_id] = [0] * 9
            d[index] += n

    def _gauge(self, queue_id: int, state: int, n: int) -> None:
        self._bump(queue_id, _GAUGE[state], n)

    def _ready(self, queue_id: int, n: int) -> None:
        if n > 0:
            self.readied[queue_id] = self.readied.get(queue_id, 0) + n

    def count(self, queue_id: int, what: str, n: int = 1) -> None:
        self._bump(queue_id, 3 + _TOTALS.index(what), n)

    def commit_statements(self) -> list[Stmt]:
        """What the commit sends before COMMIT: counter deltas and notifications."""
        out: list[Stmt] = []
        if self.catalog:
            out.append((_BUMP_SQL, None))
        if self.deltas:
            qids = list(self.deltas)
            cols = [[self.deltas[q][i] for q in qids] for i in range(9)]
            out.append((_FLUSH_SQL, [self.node, qids, *cols]))
        for payload in self.payloads():
            out.append(("SELECT pg_notify(%s, %s)", [CHANNEL, payload]))
        return out

    def payloads(self) -> list[str]:
        out: list[str] = []
        if self.catalog:
            out.append(f"c:{self.b.node_id}")
        if self.readied:
            head = f"r:{self.b.node_id}:"
            part: list[str] = []
            size = len(head)
            for qid, n in self.readied.items():
                item = f"{qid}={n}"
                if part and size + len(item) + 1 > MAX_PAYLOAD:
                    out.append(head + ",".join(part))
                    part, size = [], len(head)
                part.append(item)
                size += len(item) + 1
            out.append(head + ",".join(part))
        return out

    def _hold(self, queue_id: int) -> Stmt | None:
        """A key-share lock on the queue row: a concurrent delete of the queue on another
        node waits for this transaction, or this one sees the queue gone."""
        if queue_id in self.held:
            return None
        return ("SELECT id FROM queues WHERE id = %s FOR KEY SHARE", [queue_id])

    def _held(self, queue_id: int, cur: psycopg.Cursor[Any] | None) -> None:
        if cur is None:
            return
        if cur.fetchone() is None:
            raise QueueNotFound(f"queue {queue_id} was deleted")
        self.held.add(queue_id)

    # -- queues -------------------------------------------------------------------------
    def queue_by_name(self, name: str) -> QueueRow | None:
        row = self._x(
            "SELECT id, name, options, created_at FROM queues WHERE name = %s", [name]
        ).fetchone()
        return QueueRow(*row) if row else None

    def list_queues(self) -> list[QueueRow]:
        rows = self._x("SELECT id, name, options, created_at FROM queues ORDER BY name").fetchall()
        return [QueueRow(*r) for r in rows]

    def create_queue(self, name: str, options: bytes, now: float) -> QueueRow:
        row = self._x(
            "INSERT INTO queues(name, options, created_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (name) DO NOTHING RETURNING id",
            [name, options, now],
        ).fetchone()
        self.catalog = True
        if row is not None:
            return QueueRow(int(row[0]), name, options, now)
        # Another node created it at the same moment: that one is the queue.
        existing = self.queue_by_name(name)
        if existing is None:  # created and deleted again meanwhile
            raise StoreError(f"queue {name!r} changed concurrently; retry")
        return existing

    def update_queue(self, queue_id: int, options: bytes) -> None:
        self._x("UPDATE queues SET options = %s WHERE id = %s", [options, queue_id])
        self.catalog = True

    def delete_queue(self, queue_id: int) -> int:
        curs = self._xs(
            [
                ("DELETE FROM queues WHERE id = %s", [queue_id]),
                ("DELETE FROM messages WHERE queue_id = %s", [queue_id]),
                ("DELETE FROM dedup WHERE queue_id = %s", [queue_id]),
                ("DELETE FROM fifo_turns WHERE queue_id = %s", [queue_id]),
                ("DELETE FROM queue_counts WHERE queue_id = %s", [queue_id]),
            ]
        )
        self.deltas.pop(queue_id, None)
        self.readied.pop(queue_id, None)
        self.held.discard(queue_id)
        self.catalog = True
        return int(curs[1].rowcount)

    def counters(self, queue_id: int) -> Counters:
        row = self._x(_SUM_SQL, [queue_id]).fetchone()
        vals = [int(v) for v in row] if row else [0] * 9
        d = self.deltas.get(queue_id)
        if d:
            vals = [a + b for a, b in zip(vals, d, strict=True)]
        return Counters(*vals)

    def oldest_sent_at(self, queue_id: int) -> float | None:
        row = self._x(
            "SELECT sent_at FROM messages WHERE queue_id = %s AND state <> 1 ORDER BY id LIMIT 1",
            [queue_id],
        ).fetchone()
        return float(row[0]) if row else None

    # -- messages -----------------------------------------------------------------------
    def _ensure_turns(self, queue_id: int, groups: Iterable[str]) -> None:
        """Make sure each group has its FIFO turn row, key-share locked until commit, so
        a leaser tidying empty groups cannot delete it under this transaction's rows."""
        pending = sorted(set(groups))
        for _ in range(100):
            if not pending:
                return
            made = {
                r[0]
                for r in self._x(
                    "INSERT INTO fifo_turns(queue_id, group_id, turn)"
                    " SELECT %s, g, 0 FROM unnest(%s::text[]) AS u(g)"
                    " ON CONFLICT (queue_id, group_id) DO NOTHING RETURNING group_id",
                    [queue_id, pending],
                ).fetchall()
            }
            pending = [g for g in pending if g not in made]
            if not pending:
                return
            locked = {
                r[0]
                for r in self._x(
                    "SELECT group_id FROM fifo_turns WHERE queue_id = %s"
                    " AND group_id = ANY(%s::text[]) ORDER BY group_id FOR KEY SHARE",
                    [queue_id, pending],
                ).fetchall()
            }
            pending = [g for g in pending if g not in locked]
        raise StoreError("could not register FIFO groups; retry")

    def insert(self, queue_id: int, rows: Sequence[NewRow]) -> list[int]:
        if not rows:
            return []
        groups = {r.group_id for r in rows if r.group_id is not None}
        if groups:
            self._ensure_turns(queue_id, groups)
        hold = self._hold(queue_id)
        stmts: list[Stmt] = [hold] if hold else []
        stmts.append(
            (
                "INSERT INTO messages(queue_id, state, priority, visible_at, expires_at,"
                " sent_at, group_id, dedup_id, meta, body)"
                " SELECT %s, s, p, v, e, t, g, d, m, b FROM unnest(%s::smallint[],"
                " %s::smallint[], %s::float8[], %s::float8[], %s::float8[], %s::text[],"
                " %s::text[], %s::bytea[], %s::bytea[]) WITH ORDINALITY"
                " AS u(s, p, v, e, t, g, d, m, b, o) ORDER BY o RETURNING id",
                [
                    queue_id,
                    [r.state for r in rows],
                    [r.priority for r in rows],
                    [r.visible_at for r in rows],
                    [r.expires_at for r in rows],
                    [r.sent_at for r in rows],
                    [r.group_id for r in rows],
                    [r.dedup_id for r in rows],
                    [r.meta for r in rows],
                    [r.body for r in rows],
                ],
            )
        )
        curs = self._xs(stmts)
        self._held(queue_id, curs[0] if hold else None)
        # Identity values are drawn in row order: sorted ids match the input order.
        ids = sorted(int(r[0]) for r in curs[-1].fetchall())
        ready = sum(1 for r in rows if r.state == READY)
        self._gauge(queue_id, READY, ready)
        self._gauge(queue_id, DELAYED, len(rows) - ready)
        self._ready(queue_id, ready)
        self.count(queue_id, "sent", len(rows))
        return ids

    def find_dedup(self, queue_id: int, dedup_id: str, now: float) -> int | None:
        # The advisory lock serializes senders of one dedup id across nodes until the
        # first commits; the SELECT after it (a new snapshot) then sees that message.
        curs = self._xs(
            [
                ("SELECT pg_advisory_xact_lock(%s)", [_dedup_key(queue_id, dedup_id)]),
                (
                    "SELECT message_id FROM dedup WHERE queue_id = %s AND dedup_id = %s"
                    " AND expires_at > %s",
                    [queue_id, dedup_id, now],
                ),
            ]
        )
        row = curs[1].fetchone()
        return int(row[0]) if row else None

    def remember_dedup(
        self, queue_id: int, entries: Iterable[tuple[str, int]], expires_at: float
    ) -> None:
        items = list(entries)
        if not items:
            return
        self._x(
            "INSERT INTO dedup(queue_id, dedup_id, message_id, expires_at)"
            " SELECT %s, d, m, %s FROM unnest(%s::text[], %s::bigint[]) AS u(d, m)"
            " ON CONFLICT (queue_id, dedup_id) DO UPDATE"
            " SET message_id = excluded.message_id, expires_at = excluded.expires_at",
            [queue_id, expires_at, [d for d, _ in items], [m for _, m in items]],
        )

    def ready_candidates(self, queue_id: int, limit: int) -> list[Candidate]:
        rows = self._x(
            "SELECT id, receive_count, expires_at FROM messages"
            " WHERE queue_id = %s AND state = 0 ORDER BY priority DESC, id LIMIT %s"
            " FOR UPDATE SKIP LOCKED",
            [queue_id, limit],
        ).fetchall()
        return [Candidate(*r) for r in rows]

    def fifo_candidates(self, queue_id: int, limit: int) -> list[Candidate]:
        # 1. Groups least recently served first, with the state of their head (no locks).
        heads = self._x(
            "SELECT t.group_id, h.state FROM (SELECT group_id, turn FROM fifo_turns"
            " WHERE queue_id = %s ORDER BY turn LIMIT %s) t LEFT JOIN LATERAL"
            " (SELECT state FROM messages m WHERE m.queue_id = %s AND m.group_id = t.group_id"
            " ORDER BY m.id LIMIT 1) h ON true ORDER BY t.turn",
            [queue_id, limit * 4 + 64, queue_id],
        ).fetchall()
        order = {g: i for i, (g, _s) in enumerate(heads)}
        ready = [g for g, s in heads if s == READY][: limit * 2]
        empty = [g for g, s in heads if s is None]
        out: list[Candidate] = []
        if ready:
            # 2. Take the groups: one leaser per group across nodes (senders only hold
            #    key-share locks, which do not conflict).
            got = [
                r[0]
                for r in self._x(
                    "SELECT group_id FROM fifo_turns WHERE queue_id = %s"
                    " AND group_id = ANY(%s::text[]) FOR NO KEY UPDATE SKIP LOCKED",
                    [queue_id, ready],
                ).fetchall()
            ]
            if got:
                # 3. Read the heads again now that the groups are ours.
                rows = self._x(
                    "SELECT u.g, h.id, h.receive_count, h.expires_at, h.state"
                    " FROM unnest(%s::text[]) AS u(g) JOIN LATERAL (SELECT id, receive_count,"
                    " expires_at, state FROM messages m WHERE m.queue_id = %s"
                    " AND m.group_id = u.g ORDER BY m.id LIMIT 1) h ON true",
                    [got, queue_id],
                ).fetchall()
                rows.sort(key=lambda r: order[r[0]])
                out = [Candidate(r[1], r[2], r[3]) for r in rows if r[4] == READY][:limit]
        if empty:
            # Forget empty groups. Lock first, then look again with a fresh snapshot: a
            # sender that held the group has committed by then, so its row is seen.
            gone = [
                r[0]
                for r in self._x(
                    "SELECT group_id FROM fifo_turns WHERE queue_id = %s"
                    " AND group_id = ANY(%s::text[]) FOR UPDATE SKIP LOCKED",
                    [queue_id, empty],
                ).fetchall()
            ]
            if gone:
                self._x(
                    "DELETE FROM fifo_turns t WHERE t.queue_id = %s"
                    " AND t.group_id = ANY(%s::text[]) AND NOT EXISTS (SELECT 1 FROM messages m"
                    " WHERE m.queue_id = t.queue_id AND m.group_id = t.group_id)",
                    [queue_id, gone],
                )
        return out

    def _served(self, queue_id: int, groups: list[str]) -> None:
        """Move these groups (in this order) to the back of the FIFO turn order."""
        # Rows another node holds are skipped, not waited for: on a FIFO queue the
        # served groups are this transaction's already; elsewhere turns are only a hint.
        self._x(
            "UPDATE fifo_turns t SET turn = u.turn FROM (SELECT g, nextval('conveyor_fifo_turn')"
            " AS turn FROM (SELECT g, o FROM unnest(%s::text[]) WITH ORDINALITY AS x(g, o)"
            " ORDER BY o) s) u WHERE t.queue_id = %s AND t.group_id = u.g"
            " AND t.group_id IN (SELECT group_id FROM fifo_turns WHERE queue_id = %s"
            " AND group_id = ANY(%s::text[]) FOR NO KEY UPDATE SKIP LOCKED)",
            [groups, queue_id, queue_id, groups],
        )

    def lease(
        self, queue_id: int, ids: Sequence[int], lease_until: float, token: int, now: float
    ) -> list[MessageRow]:
        if not ids:
            return []
        rows = self._x(
            "UPDATE messages SET state = 1, visible_at = %s, lease_token = %s,"
            " receive_count = receive_count + 1,"
            " first_received_at = coalesce(first_received_at, %s)"
            f" WHERE id = ANY(%s::bigint[]) AND state = 0 RETURNING {_ROW_COLS}",
            [lease_until, token, now, list(ids)],
        ).fetchall()
        self._gauge(queue_id, READY, -len(rows))
        self._gauge(queue_id, LEASED, len(rows))
        self.count(queue_id, "received", len(rows))
        out = _ordered(rows, ids)
        groups = [r.group_id for r in sorted(out, key=lambda r: r.id) if r.group_id is not None]
        if groups:
            self._served(queue_id, groups)
        return out

    def take(self, queue_id: int, ids: Sequence[int], now: float) -> list[MessageRow]:
        if not ids:
            return []
        rows = self._x(
            f"DELETE FROM messages WHERE id = ANY(%s::bigint[]) AND state = 0"
            f" RETURNING {_ROW_COLS}",
            [list(ids)],
        ).fetchall()
        self._gauge(queue_id, READY, -len(rows))
        self.count(queue_id, "received", len(rows))
        self.count(queue_id, "acked", len(rows))
        out = _ordered(rows, ids)
        return [
            r._replace(
                receive_count=r.receive_count + 1, first_received_at=r.first_received_at or now
            )
            for r in out
        ]

    def _per_token(
        self, sql: str, qid: int, leases: Sequence[tuple[int, int]], *args: Any
    ) -> list[Any]:
        """Run ``sql`` (params: *args, ids, token, queue id) once per lease token, all in
        one round trip. Receipts of one receive share a token, so usually once. The ids
        go in as an array, so the plan is a primary-key lookup whatever the statistics."""
        by_token: dict[int, list[int]] = {}
        for mid, tok in leases:
            by_token.setdefault(tok, []).append(mid)
        curs = self._xs([(sql, [*args, ids, tok, qid]) for tok, ids in by_token.items()])
        return [row for cur in curs for row in cur.fetchall()]

    def ack(self, queue_id: int, leases: Sequence[tuple[int, int]]) -> set[int]:
        # A lease that expired but was not yet handed to anyone else may still be acked
        # with its receipt (as SQS allows); a newer delivery has a new token.
        if not leases:
            return set()
        rows = self._per_token(
            "DELETE FROM messages WHERE id = ANY(%s::bigint[]) AND lease_token = %s"
            " AND queue_id = %s AND state IN (0, 1) RETURNING id, state",
            queue_id,
            leases,
        )
        for state in (READY, LEASED):
            self._gauge(queue_id, state, -sum(1 for r in rows if r[1] == state))
        self.count(queue_id, "acked", len(rows))
        return {int(r[0]) for r in rows}

    def release(
        self,
        queue_id: int,
        leases: Sequence[tuple[int, int]],
        visible_at: float | None,
        undo: bool = False,
    ) -> set[int]:
        if not leases:
            return set()
        state = READY if visible_at is None else DELAYED
        rows = self._per_token(
            "UPDATE messages SET state = %s, visible_at = %s, lease_token = NULL,"
            " receive_count = greatest(receive_count - %s, 0)"
            " WHERE id = ANY(%s::bigint[]) AND lease_token = %s AND queue_id = %s"
            " AND state = 1 RETURNING id",
            queue_id,
            leases,
            state,
            visible_at,
            1 if undo else 0,
        )
        n = len(rows)
        if n:
            self._gauge(queue_id, LEASED, -n)
            self._gauge(queue_id, state, n)
            if state == READY:
                self._ready(queue_id, n)
            if undo:
                self.count(queue_id, "received", -n)
            else:
                self.count(queue_id, "nacked", n)
        return {int(r[0]) for r in rows}

    def extend(
        self, queue_id: int, leases: Sequence[tuple[int, int]], lease_until: float
    ) -> set[int]:
        if not leases:
            return set()
        rows = self._per_token(
            "UPDATE messages SET visible_at = %s WHERE id = ANY(%s::bigint[])"
            " AND lease_token = %s AND queue_id = %s AND state = 1 RETURNING id",
            queue_id,
            leases,
            lease_until,
        )
        return {int(r[0]) for r in rows}

    def leased_rows(self, queue_id: int, leases: Sequence[tuple[int, int]]) -> list[MessageRow]:
        if not leases:
            return []
        rows = self._per_token(
            f"SELECT {_ROW_COLS} FROM messages WHERE id = ANY(%s::bigint[])"
            " AND lease_token = %s AND queue_id = %s AND state = 1 ORDER BY id FOR UPDATE",
            queue_id,
            leases,
        )
        rows.sort(key=lambda r: r[0])
        return [MessageRow(*r) for r in rows]

    def read_rows(self, ids: Sequence[int]) -> list[MessageRow]:
        if not ids:
            return []
        rows = self._x(
            f"SELECT {_ROW_COLS} FROM messages WHERE id = ANY(%s::bigint[]) ORDER BY id",
            [list(ids)],
        ).fetchall()
        return [MessageRow(*r) for r in rows]

    def move(
        self, moves: Sequence[tuple[int, bytes]], to_queue: int, expires_at: float | None
    ) -> None:
        if not moves:
            return
        ids = [m[0] for m in moves]
        before = self._x(
            "SELECT id, queue_id, state, group_id FROM messages WHERE id = ANY(%s::bigint[])"
            " ORDER BY id FOR UPDATE",
            [ids],
        ).fetchall()
        if not before:
            return
        groups = {r[3] for r in before if r[3] is not None}
        if groups:
            self._ensure_turns(to_queue, groups)
        present = {int(r[0]) for r in before}
        moves = [m for m in moves if m[0] in present]
        hold = self._hold(to_queue)
        stmts: list[Stmt] = [hold] if hold else []
        stmts.append(
            (
                "UPDATE messages m SET queue_id = %s, state = 0, visible_at = NULL,"
                " lease_token = NULL, receive_count = 0, first_received_at = NULL,"
                " expires_at = %s, meta = u.meta FROM unnest(%s::bigint[], %s::bytea[])"
                " AS u(id, meta) WHERE m.id = u.id AND m.id = ANY(%s::bigint[])",
                [
                    to_queue,
                    expires_at,
                    [m[0] for m in moves],
                    [m[1] for m in moves],
                    [m[0] for m in moves],
                ],
            )
        )
        curs = self._xs(stmts)
        self._held(to_queue, curs[0] if hold else None)
        for _mid, qid, state, _g in before:
            self._gauge(int(qid), int(state), -1)
        self._gauge(to_queue, READY, len(before))
        self._ready(to_queue, len(before))
        self.count(to_queue, "sent", len(before))

    def delete_ids(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        rows = self._x(
            "DELETE FROM messages WHERE id = ANY(%s::bigint[]) RETURNING queue_id, state",
            [list(ids)],
        ).fetchall()
        for qid, state in rows:
            self._gauge(int(qid), int(state), -1)

    def peek(self, queue_id: int, limit: int) -> list[MessageRow]:
        rows = self._x(
            f"SELECT {_ROW_COLS} FROM messages WHERE queue_id = %s AND state = 0"
            " ORDER BY priority DESC, id LIMIT %s",
            [queue_id, limit],
        ).fetchall()
        return [MessageRow(*r) for r in rows]

    def purge(self, queue_id: int, in_flight: bool = False) -> int:
        keep = -1 if in_flight else LEASED
        rows = self._x(
            "WITH d AS (DELETE FROM messages WHERE queue_id = %s AND state <> %s"
            " RETURNING state) SELECT state, count(*) FROM d GROUP BY state",
            [queue_id, keep],
        ).fetchall()
        for state, n in rows:
            self._gauge(queue_id, int(state), -int(n))
        return sum(int(n) for _s, n in rows)

    def ready_count(self, queue_id: int) -> int:
        return self.counters(queue_id).ready

    def oldest_ready(self, queue_id: int, limit: int) -> list[int]:
        return [c.id for c in self.ready_candidates(queue_id, limit)]

    # -- timers -------------------------------------------------------------------------
    def _promote(self, from_state: int, now: float) -> dict[int, int]:
        # SKIP LOCKED: every node may run this at once; each row is promoted once, and a
        # row another transaction holds comes due again on the next round.
        rows = self._x(
            "WITH due AS (SELECT id FROM messages WHERE state = %s AND visible_at <= %s"
            " ORDER BY visible_at LIMIT %s FOR UPDATE SKIP LOCKED),"
            " u AS (UPDATE messages SET state = 0, visible_at = NULL"
            " WHERE id = ANY(ARRAY(SELECT id FROM due)) RETURNING queue_id)"
            " SELECT queue_id, count(*) FROM u GROUP BY queue_id",
            [from_state, now, TIMER_BATCH],
        ).fetchall()
        per = {int(q): int(n) for q, n in rows}
        for qid, n in per.items():
            self._gauge(qid, from_state, -n)
            self._gauge(qid, READY, n)
            self._ready(qid, n)
        return per

    def promote_delayed(self, now: float) -> dict[int, int]:
        return self._promote(DELAYED, now)

    def expire_leases(self, now: float) -> dict[int, int]:
        # The lease token stays: the last receipt may still ack until a new delivery.
        return self._promote(LEASED, now)

    def expired_ids(self, now: float, limit: int) -> list[tuple[int, int]]:
        rows = self._x(
            "SELECT queue_id, id FROM messages WHERE expires_at IS NOT NULL"
            " AND expires_at <= %s AND state <> 1 ORDER BY expires_at LIMIT %s"
            " FOR UPDATE SKIP LOCKED",
            [now, limit],
        ).fetchall()
        return [(int(q), int(i)) for q, i in rows]

    def next_due(self) -> float | None:
        row = self._x(
            "SELECT (SELECT min(visible_at) FROM messages WHERE state = 2),"
            " (SELECT min(visible_at) FROM messages WHERE state = 1),"
            " (SELECT min(expires_at) FROM messages WHERE expires_at IS NOT NULL"
            " AND state <> 1)"
        ).fetchone()
        times = [float(t) for t in (row or ()) if t is not None]
        if not times:
            return None
        # Stagger the nodes a little so they do not all wake for the same row at once;
        # whichever comes first does the work, the others find nothing to do.
        return min(times) + min(self.node - 1, 10) * 0.005 if self.node > 0 else min(times)

    def forget_dedup(self, now: float) -> None:
        self._x(
            "DELETE FROM dedup WHERE ctid = ANY(ARRAY(SELECT ctid FROM dedup"
            " WHERE expires_at <= %s LIMIT %s FOR UPDATE SKIP LOCKED))",
            [now, TIMER_BATCH],
        )

    # -- exchanges and bindings ---------------------------------------------------------
    def catalog_version(self) -> int:
        # Once per transaction: a change committed after this read is concurrent with
        # whatever this transaction routes.
        if self.version is None:
            row = self._x(
                "SELECT value FROM conveyor_meta WHERE key = 'catalog_version'"
            ).fetchone()
            self.version = int(row[0]) if row else 0
        return self.version

    def load_exchanges(self) -> list[tuple[str, bytes]]:
        return [(r[0], r[1]) for r in self._x("SELECT name, info FROM exchanges").fetchall()]

    def save_exchange(self, name: str, info: bytes) -> None:
        self._x(
            "INSERT INTO exchanges(name, info) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET info = excluded.info",
            [name, info],
        )
        self.catalog = True

    def delete_exchange(self, name: str) -> None:
        self._x("DELETE FROM exchanges WHERE name = %s", [name])
        self.catalog = True

    def load_bindings(self) -> list[bytes]:
        return [r[0] for r in self._x("SELECT binding FROM bindings").fetchall()]

    def save_binding(self, key: bytes, binding: bytes) -> None:
        self._x(
            "INSERT INTO bindings(key, binding) VALUES (%s, %s)"
            " ON CONFLICT (key) DO UPDATE SET binding = excluded.binding",
            [key, binding],
        )
        self.catalog = True

    def delete_binding(self, key: bytes) -> None:
        self._x("DELETE FROM bindings WHERE key = %s", [key])
        self.catalog = True


class _PgBackend:
    """The dialect half of group commit for PostgreSQL.

    BEGIN, SAVEPOINT and RELEASE are queued and sent in one pipeline with the next
    real statement (or the COMMIT), so they cost no round trips of their own.
    """

    def __init__(self, url: str, durability: Durability, node_id: str) -> None:
        self.url = url
        self.durability = durability
        self.node_id = node_id
        self.tx = PgTx(self)
        self.pending: list[str] = []
        self.sp_open = False  # the current job's savepoint was sent
        self.subxacts = 0  # savepoints sent in this transaction
        self.sent = False  # anything was sent in this transaction
        self.poisoned: Exception | None = None
        self.conn = self._connect()

    # -- connection ---------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        conn = connect(self.url, self.durability, f"conveyor-{self.node_id[:8]}")
        try:
            row = conn.execute(
                "SELECT s FROM generate_series(1, 100000) AS s"
                " WHERE pg_try_advisory_lock(%s, s) LIMIT 1",
                [LOCK_CLASS],
            ).fetchone()
            self.tx.node = int(row[0]) if row else 0
        except BaseException:
            conn.close()
            raise
        return conn

    def take_pending(self) -> list[str]:
        pre = self.pending
        if pre:
            self.pending = []
            self.sent = True
            if "SAVEPOINT j" in pre:
                self.sp_open = True
                self.subxacts += 1
        else:
            self.sent = True
        return pre

    # -- the writer's protocol ----------------------------------------------------------
    def prepare(self, relaxed: bool) -> None:
        """Every round commits at the store's configured level (see docs/postgres.md)."""

    def begin(self) -> PgTx:
        self.poisoned = None
        if self.conn.closed or self.conn.broken:
            log.warning("reconnecting to PostgreSQL")
            try:
                self.conn.close()
            finally:
                self.conn = self._connect()
        self.tx.reset()
        self.pending = ["BEGIN"]
        self.sent = False
        self.subxacts = 0
        return self.tx

    def savepoint(self) -> None:
        if self.poisoned is not None:
            raise self.poisoned
        self.pending.append("SAVEPOINT j")
        self.sp_open = False

    def release(self) -> None:
        if self.sp_open:
            self.pending.append("RELEASE j")
            self.sp_open = False
        elif self.pending and self.pending[-1] == "SAVEPOINT j":
            self.pending.pop()  # the script sent nothing: no savepoint was needed
        if self.subxacts >= MAX_SUBXACTS:
            self._commit_early()

    def rollback_savepoint(self) -> None:
        if self.poisoned is not None:
            return
        if self.sp_open:
            self.sp_open = False
            self.conn.execute("ROLLBACK TO SAVEPOINT j; RELEASE SAVEPOINT j")
        elif self.pending and self.pending[-1] == "SAVEPOINT j":
            self.pending.pop()

    def snapshot(self, tx: PgTx) -> Any:
        return (
            {k: list(v) for k, v in tx.deltas.items()},
            dict(tx.readied),
            tx.catalog,
            set(tx.held),
        )

    def restore(self, tx: PgTx, snap: Any) -> None:
        tx.deltas, tx.readied, tx.catalog, tx.held = snap

    def _send_commit(self, tx: PgTx) -> None:
        stmts = tx.commit_statements()
        if not self.sent and not stmts:
            self.pending = []  # nothing happened: no transaction was ever opened
            return
        conn = self.conn
        pre, self.pending = self.pending, []
        with conn.pipeline():
            for s in pre:
                conn.execute(s)
            for sql, params in stmts:
                conn.execute(sql, params)
            conn.execute("COMMIT")

    def _commit_early(self) -> None:
        """Too many subtransactions: commit what the round did so far, open another.
        The callers still hear back only after the round's last commit."""
        try:
            self._send_commit(self.tx)
        except Exception as exc:
            self.poisoned = exc
            raise
        self.tx.reset()
        self.pending = ["BEGIN"]
        self.sent = False
        self.subxacts = 0

    def commit(self, tx: PgTx) -> None:
        if self.poisoned is not None:
            raise self.poisoned
        self._send_commit(tx)
        tx.reset()

    def rollback(self) -> None:
        self.tx.reset()
        self.pending = []
        self.sp_open = False
        if self.sent and not self.conn.closed and not self.conn.broken:
            self.conn.execute("ROLLBACK")
        self.sent = False

    def close(self) -> None:
        self.conn.close()

    def translate(self, exc: Exception) -> ConveyorError:
        return translate(exc)


def translate(exc: Exception) -> ConveyorError:
    if isinstance(exc, ConveyorError):
        return exc
    text = str(exc).strip()
    if isinstance(exc, psycopg.errors.DiskFull):
        return StoreFull(f"the PostgreSQL disk is full: {text}")
    if isinstance(exc, psycopg.errors.DeadlockDetected):
        return StoreError(f"a deadlock with another node was broken; retry: {text}")
    if isinstance(exc, psycopg.OperationalError):
        return StoreError(f"PostgreSQL is unavailable: {text}")
    return StoreError(f"store failure: {text}")


# -- connections and migrations ---------------------------------------------------------

_SYNC = {"fsync": "on", "os": "off", "none": "off"}


def describe(url: str) -> str:
    """The URL without its password, for logs and the banner."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://?"
    user = f"{info['user']}@" if info.get("user") else ""
    host = info.get("host") or "localhost"
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{host}{port}/{info.get('dbname', '')}"


def connect(url: str, durability: Durability, app: str) -> psycopg.Connection[Any]:
    """An autocommit connection with conveyor's session settings."""
    try:
        params: dict[str, Any] = dict(conninfo_to_dict(url))
    except psycopg.ProgrammingError as exc:
        raise StoreError(f"bad PostgreSQL URL: {exc}") from None
    # Notice a dead peer (a node's machine gone) in about half a minute, not hours.
    defaults = {
        "application_name": app,
        "connect_timeout": "10",
        "keepalives": "1",
        "keepalives_idle": "10",
        "keepalives_interval": "5",
        "keepalives_count": "3",
    }
    for k, v in defaults.items():
        params.setdefault(k, v)
    try:
        conn = psycopg.connect(autocommit=True, **params)
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to {describe(url)}: {str(exc).strip()}") from None
    try:
        if conn.info.server_version < 120000:
            raise StoreError(
                f"{describe(url)} runs PostgreSQL {conn.info.server_version // 10000};"
                " conveyor needs 12 or newer"
            )
        conn.execute(
            "SELECT set_config('synchronous_commit', %s, false),"
            " set_config('idle_in_transaction_session_timeout', '60s', false)",
            [_SYNC[durability]],
        )
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: psycopg.Connection[Any], where: str) -> int:
    """Bring the schema to SCHEMA_VERSION; refuse a newer one. Returns the old version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", [LOCK_CLASS])
        have = conn.execute("SELECT to_regclass('conveyor_meta')").fetchone()
        version = 0
        if have and have[0] is not None:
            row = conn.execute(
                "SELECT value FROM conveyor_meta WHERE key = 'schema_version'"
            ).fetchone()
            version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{where} has conveyor schema version {version}; this conveyor understands"
                f" up to {SCHEMA_VERSION}. Upgrade conveyor to open it."
            )
        if version < SCHEMA_VERSION:
            log.info("migrating %s from schema %d to %d", where, version, SCHEMA_VERSION)
            for v, statements in MIGRATIONS:
                if v > version:
                    for sql in statements:
                        conn.execute(sql)
            conn.execute(
                "INSERT INTO conveyor_meta(key, value) VALUES ('schema_version', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [str(SCHEMA_VERSION)],
            )
        return version


# -- cross-node notifications ----------------------------------------------------------

ReadyCallback = Callable[[int | None, int], None]
CatalogCallback = Callable[[], None]


class _Listener:
    """LISTEN on its own connection and thread; hands notifications to callbacks.

    On (re)connect it reports a catalog change and "every queue may have ready rows",
    since notifications sent while it was not listening are lost.
    """

    def __init__(self, url: str, node_id: str) -> None:
        self.url = url
        self.node_id = node_id
        self.on_ready: ReadyCallback | None = None
        self.on_catalog: CatalogCallback | None = None
        self.listening = threading.Event()
        self._stop_r, self._stop_w = socket.socketpair()
        self._stopped = False
        self._thread = threading.Thread(target=self._main, name="conveyor-pg-listen", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self.listening.wait(timeout):
            log.warning("the PostgreSQL listener is not connected yet; retrying in background")

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(10)
        self._stop_r.close()
        self._stop_w.close()

    def _main(self) -> None:
        backoff = 0.1
        first = True
        while not self._stopped:
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = connect(self.url, "none", f"conveyor-{self.node_id[:8]}-listen")
                # Notifications that arrive while psycopg runs a query of ours come
                # through this handler; the rest through _pump's low-level reads.
                conn.add_notify_handler(lambda n: self._dispatch(n.payload))
                conn.execute(f"LISTEN {CHANNEL}")
                self.listening.set()
                backoff = 0.1
                # Changes made while not listening were missed (on the first connect:
                # since the broker loaded its catalog).
                self._resync(wake=not first)
                first = False
                if self._pump(conn):
                    return
            except Exception as exc:
                if self._stopped:
                    return
                log.warning("PostgreSQL listener: %s; reconnecting", str(exc).strip())
                self.listening.clear()
                if self._wait(backoff):
                    return
                backoff = min(backoff * 2, 5.0)
            finally:
                if conn is not None:
                    conn.close()

    def _wait(self, seconds: float) -> bool:
        """Sleep unless stopped; True when stopped."""
        r, _w, _x = select.select([self._stop_r], [], [], seconds)
        return bool(r)

    def _pump(self, conn: psycopg.Connection[Any]) -> bool:
        pg = conn.pgconn
        fd, stop = pg.socket, self._stop_r.fileno()
        last = time.monotonic()
        while True:
            r, _w, _x = select.select([fd, stop], [], [], 5.0)
            if stop in r:
                return True
            if fd in r:
                pg.consume_input()
                while (n := pg.notifies()) is not None:
                    self._dispatch(n.extra.decode())
                last = time.monotonic()
            elif time.monotonic() - last >= 5.0:
                conn.execute("SELECT 1")  # notice a dead connection
                last = time.monotonic()

    def _resync(self, wake: bool) -> None:
        try:
            if self.on_catalog is not None:
                self.on_catalog()
            if wake and self.on_ready is not None:
                self.on_ready(None, 0)
        except Exception:
            log.exception("notification callback failed")

    def _dispatch(self, payload: str) -> None:
        try:
            kind, _, rest = payload.partition(":")
            node, _, body = rest.partition(":")
            if kind == "c":
                if self.on_catalog is not None:
                    self.on_catalog()  # own changes too: the broker reloads after commit
            elif kind == "r" and node != self.node_id and self.on_ready is not None:
                for item in body.split(","):
                    qid, _, n = item.partition("=")
                    self.on_ready(int(qid), int(n))
        except Exception:
            log.exception("bad notification %r", payload[:200])


class PostgresStore(Store):
    """Several conveyor servers share one PostgreSQL database through this store."""

    shared = True

    def __init__(self, url: str, durability: Durability = "fsync", writers: int = 4) -> None:
        """``writers``: group-commit writers, each a thread with its own connection.
        A writer has one transaction open at a time; several keep the database busy
        while one waits for its commit to be flushed (see docs/postgres.md)."""
        if durability not in _SYNC:
            raise StoreError(f"durability must be one of fsync, os, none; got {durability!r}")
        self.url = url
        self.location = describe(url)
        self.durability = durability
        self.node_id = secrets.token_hex(8)
        conn = connect(url, durability, f"conveyor-{self.node_id[:8]}-migrate")
        try:
            migrate(conn, self.location)
        except psycopg.Error as exc:
            raise translate(exc) from None
        finally:
            conn.close()
        self._backends: list[_PgBackend] = []
        self._writers: list[GroupCommitWriter[PgTx]] = []
        self._pending: list[int] = []
        try:
            for i in range(max(1, writers)):
                backend = _PgBackend(url, durability, self.node_id)
                self._backends.append(backend)
                self._writers.append(GroupCommitWriter(backend, name=f"conveyor-pg-writer-{i}"))
                self._pending.append(0)
        except BaseException as exc:
            for w in self._writers:
                w.close()
            if isinstance(exc, psycopg.Error):
                raise translate(exc) from None
            raise
        self._listener: _Listener | None = None

    @property
    def node_slots(self) -> list[int]:
        """This store's slots among the nodes (its rows in queue_counts), one a writer."""
        return [b.tx.node for b in self._backends]

    def _listen(self) -> _Listener:
        if self._listener is None:
            self._listener = _Listener(self.url, self.node_id)
        return self._listener

    def set_ready_callback(self, callback: ReadyCallback | None) -> None:
        listener = self._listen()
        listener.on_ready = callback
        if callback is not None and not listener._thread.is_alive() and not listener._stopped:
            listener.start()

    def set_catalog_callback(self, callback: CatalogCallback | None) -> None:
        listener = self._listen()
        listener.on_catalog = callback
        if callback is not None and not listener._thread.is_alive() and not listener._stopped:
            listener.start()

    async def run(self, script: Callable[[Tx], T], *, relaxed: bool = False) -> T:
        # The writer with the least work queued takes it: both group-commit, so under
        # load each round still carries many scripts.
        pending = self._pending
        i = pending.index(min(pending))
        pending[i] += 1
        try:
            return await self._writers[i].run(script)
        finally:
            pending[i] -= 1

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        for w in self._writers:
            w.close()
