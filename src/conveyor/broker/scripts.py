"""Transaction scripts: the broker's semantics, run inside a store transaction.

These functions run on the store's writer thread, so they only see immutable
snapshots (``QueueRef``, ``RoutingTable``) handed to them, never the broker's live
state. They decide what happens to each message (deliver, dead-letter, expire, drop)
and call the store's primitives to do it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import msgspec

from conveyor.broker.routing import RoutingTable
from conveyor.model import Death, Meta, QueueOptions
from conveyor.store.base import READY, MessageRow, NewRow, Tx

_encode = msgspec.msgpack.Encoder().encode
_decode_meta = msgspec.msgpack.Decoder(Meta).decode


class QueueRef(NamedTuple):
    """An immutable view of a queue for use on the writer thread."""

    id: int
    name: str
    options: QueueOptions


class Outcome(NamedTuple):
    """What a script did besides its result: queues that gained ready messages."""

    woken: dict[str, int]


Lookup = Callable[[str], QueueRef | None]


def add_death(meta: Meta, queue: str, reason: str, now: float) -> Meta:
    """Record a dead-lettering as RabbitMQ's x-death does: one entry per (queue,
    reason), its count bumped and moved to the front on a repeat."""
    deaths = list(meta.deaths)
    for i, d in enumerate(deaths):
        if d.queue == queue and d.reason == reason:
            entry = Death(
                reason=reason,
                queue=queue,
                time=d.time,
                count=d.count + 1,
                exchange=d.exchange,
                routing_keys=d.routing_keys,
            )
            del deaths[i]
            break
    else:
        entry = Death(
            reason=reason,
            queue=queue,
            time=now,
            exchange=meta.exchange,
            routing_keys=[meta.routing_key],
        )
    deaths.insert(0, entry)
    return Meta(
        headers=meta.headers,
        properties=meta.properties,
        exchange=meta.exchange,
        routing_key=meta.routing_key,
        deaths=deaths,
    )


def dead_letter(
    tx: Tx,
    source: QueueRef,
    rows: Sequence[MessageRow],
    reason: str,
    now: float,
    lookup: Lookup,
    routing: RoutingTable,
    woken: dict[str, int],
) -> None:
    """Send ``rows`` of ``source`` to its dead-letter target, or drop them if none."""
    if not rows:
        return
    opts = source.options
    ids = [r.id for r in rows]
    if reason == "expired":
        tx.count(source.id, "expired", len(rows))
    target = lookup(opts.dead_letter) if opts.dead_letter else None
    if target is not None and target.id != source.id:
        ttl = target.options.message_ttl
        moves = []
        for r in rows:
            meta = add_death(_decode_meta(r.meta), source.name, reason, now)
            moves.append((r.id, _encode(meta)))
        tx.move(moves, target.id, now + ttl if ttl is not None else None)
        tx.count(source.id, "dead", len(rows))
        woken[target.name] = woken.get(target.name, 0) + len(rows)
        return
    if opts.dead_letter_exchange is not None:
        for r in rows:
            meta = _decode_meta(r.meta)
            key = (
                opts.dead_letter_routing_key
                if opts.dead_letter_routing_key is not None
                else meta.routing_key
            )
            new_meta = add_death(meta, source.name, reason, now)
            new_meta.exchange = opts.dead_letter_exchange
            new_meta.routing_key = key
            for qname in routing.route(
                opts.dead_letter_exchange, key, meta.headers, lambda n: lookup(n) is not None
            ):
                dest = lookup(qname)
                if dest is None:
                    continue
                ttl = dest.options.message_ttl
                tx.insert(
                    dest.id,
                    [
                        NewRow(
                            READY,
                            r.priority,
                            None,
                            now + ttl if ttl is not None else None,
                            r.sent_at,
                            r.group_id if dest.options.fifo else None,
                            None,
                            _encode(new_meta),
                            r.body,
                        )
                    ],
                )
                woken[dest.name] = woken.get(dest.name, 0) + 1
        tx.count(source.id, "dead", len(rows))
    tx.delete_ids(ids)


def lease(
    tx: Tx,
    q: QueueRef,
    n: int,
    now: float,
    lease_until: float,
    token: int,
    auto_ack: bool,
    lookup: Lookup,
    routing: RoutingTable,
) -> tuple[list[MessageRow], dict[str, int]]:
    """Lease up to n messages; dead-letter (or drop) expired and over-delivered ones."""
    woken: dict[str, int] = {}
    max_receives = q.options.max_receives
    out: list[MessageRow] = []
    # A few rounds at most: each round removes what it dead-letters from the scan.
    for _ in range(8):
        want = n - len(out)
        if want <= 0:
            break
        cands = (
            tx.fifo_candidates(q.id, want) if q.options.fifo else tx.ready_candidates(q.id, want)
        )
        if not cands:
            break
        deliver: list[int] = []
        expired: list[int] = []
        over: list[int] = []
        for c in cands:
            if c.expires_at is not None and c.expires_at <= now:
                expired.append(c.id)
            elif max_receives is not None and c.receive_count >= max_receives:
                over.append(c.id)
            else:
                deliver.append(c.id)
        if expired:
            dead_letter(tx, q, tx.read_rows(expired), "expired", now, lookup, routing, woken)
        if over:
            rows = tx.read_rows(over)
            dead_letter(tx, q, rows, "delivery_limit", now, lookup, routing, woken)
        if deliver:
            got = (
                tx.take(q.id, deliver, now)
                if auto_ack
                else tx.lease(q.id, deliver, lease_until, token, now)
            )
            out.extend(got)
        # Dead-lettered candidates leave the scan (for FIFO, a dead head exposes the
        # next message of its group): look again for what is still wanted.
        if not expired and not over:
            break
    return out, woken


def expire(
    tx: Tx,
    now: float,
    by_id: Mapping[int, QueueRef],
    lookup: Lookup,
    routing: RoutingTable,
    limit: int = 5000,
) -> dict[str, int]:
    """Dead-letter (or drop) waiting messages whose TTL has passed."""
    woken: dict[str, int] = {}
    per_queue: dict[int, list[int]] = {}
    for qid, mid in tx.expired_ids(now, limit):
        per_queue.setdefault(qid, []).append(mid)
    for qid, ids in per_queue.items():
        q = by_id.get(qid)
        if q is None:
            tx.delete_ids(ids)
            continue
        dead_letter(tx, q, tx.read_rows(ids), "expired", now, lookup, routing, woken)
    return woken
