"""Exchange routing: which queues a publish reaches.

A ``RoutingTable`` is immutable; the broker swaps in a new one whenever exchanges or
bindings change, so the hot publish path reads it without locks (and the store's
writer thread may read a snapshot while the loop builds the next one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from conveyor.model import DEFAULT_EXCHANGE, Binding, ExchangeInfo


@lru_cache(maxsize=4096)
def _words(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split(".")) if pattern else ()


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: words split by '.', ``*`` is exactly one word, ``#`` zero or
    more. An empty routing key is zero words (so ``#`` matches it, ``*`` does not)."""
    return _match(_words(pattern), _words(routing_key))


@lru_cache(maxsize=65536)
def _match(pat: tuple[str, ...], key: tuple[str, ...]) -> bool:
    # Iterative two-pointer match with backtracking to the last '#', as in glob matching.
    p = k = 0
    star_p = -1
    star_k = 0
    while k < len(key):
        if p < len(pat) and pat[p] == "#":
            star_p, star_k = p, k
            p += 1
        elif p < len(pat) and (pat[p] == "*" or pat[p] == key[k]):
            p += 1
            k += 1
        elif star_p >= 0:
            star_k += 1
            k = star_k
            p = star_p + 1
        else:
            return False
    while p < len(pat) and pat[p] == "#":
        p += 1
    return p == len(pat)


def headers_match(arguments: Mapping[str, Any], headers: Mapping[str, Any]) -> bool:
    """RabbitMQ's headers exchange: x-match all (default) / any, and the -with-x forms
    that also compare x- keys. A binding value of None only asks that the key exists."""
    mode = str(arguments.get("x-match", "all"))
    with_x = mode.endswith("-with-x")
    wanted = [
        (k, v)
        for k, v in arguments.items()
        if k != "x-match" and (with_x or not k.startswith("x-"))
    ]
    if mode.startswith("any"):
        return any(_header_ok(headers, k, v) for k, v in wanted)
    return all(_header_ok(headers, k, v) for k, v in wanted)


def _header_ok(headers: Mapping[str, Any], key: str, value: Any) -> bool:
    if key not in headers:
        return False
    return value is None or headers[key] == value


class RoutingTable:
    def __init__(
        self,
        exchanges: Mapping[str, ExchangeInfo],
        bindings: Iterable[Binding],
    ) -> None:
        self.exchanges = dict(exchanges)
        self.bindings: dict[str, tuple[Binding, ...]] = {}
        grouped: dict[str, list[Binding]] = {}
        for b in bindings:
            grouped.setdefault(b.source, []).append(b)
        self.bindings = {k: tuple(v) for k, v in grouped.items()}
        # Direct exchanges are the common case: index them by routing key.
        self._direct: dict[str, dict[str, tuple[Binding, ...]]] = {}
        for name, bs in self.bindings.items():
            info = self.exchanges.get(name)
            if info is not None and info.type == "direct":
                idx: dict[str, list[Binding]] = {}
                for b in bs:
                    idx.setdefault(b.routing_key, []).append(b)
                self._direct[name] = {k: tuple(v) for k, v in idx.items()}

    def route(
        self,
        exchange: str,
        routing_key: str,
        headers: Mapping[str, Any],
        queue_exists: Any = None,
    ) -> list[str]:
        """Queue names a publish reaches, each once, in binding order.

        The default exchange routes to the queue named by the routing key (when
        ``queue_exists`` says it exists). Exchange-to-exchange bindings are followed,
        each exchange visited once, so cycles terminate.
        """
        if exchange == DEFAULT_EXCHANGE:
            if queue_exists is None or queue_exists(routing_key):
                return [routing_key]
            return []
        out: list[str] = []
        seen_q: set[str] = set()
        seen_x: set[str] = set()
        todo = [exchange]
        while todo:
            name = todo.pop(0)
            if name in seen_x:
                continue
            seen_x.add(name)
            for b in self._matching(name, routing_key, headers):
                if b.destination_kind == "queue":
                    if b.destination not in seen_q:
                        seen_q.add(b.destination)
                        out.append(b.destination)
                else:
                    todo.append(b.destination)
        return out

    def _matching(
        self, exchange: str, routing_key: str, headers: Mapping[str, Any]
    ) -> Iterable[Binding]:
        info = self.exchanges.get(exchange)
        if info is None:
            return ()
        if info.type == "direct":
            return self._direct.get(exchange, {}).get(routing_key, ())
        bs = self.bindings.get(exchange, ())
        if info.type == "fanout":
            return bs
        if info.type == "topic":
            return [b for b in bs if topic_matches(b.routing_key, routing_key)]
        if info.type == "headers":
            return [b for b in bs if headers_match(b.arguments, headers)]
        return ()
