"""Connection.Blocked / Connection.Unblocked (RabbitMQ's resource alarms) with pika:
the server stops reading from publishing connections and tells clients that announce
the ``connection.blocked`` capability; consumers keep receiving. Alarms come from a
full store (a real SQLite "database or disk is full"), from too many unconfirmed
publishes server-wide, or from ``AmqpServer.raise_alarm``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pytest

from amqp_support import RunningAmqp, amqp_server
from conveyor.server.amqp import AmqpServer

pytestmark = pytest.mark.timeout(60)


def _alarm(srv: RunningAmqp, resource: str, on: bool) -> None:
    server: AmqpServer = srv.server

    async def flip() -> None:
        if on:
            server.raise_alarm(resource)
        else:
            server.clear_alarm(resource)

    srv.call(flip())


def _ready(srv: RunningAmqp, queue: str) -> int:
    return srv.call(srv.broker.stats(queue)).ready


class Watched:
    """A pika BlockingConnection that records Blocked/Unblocked notifications."""

    def __init__(self, srv: RunningAmqp, **params: Any) -> None:
        self.conn = pika.BlockingConnection(pika.ConnectionParameters(srv.host, srv.port, **params))
        self.events: list[str] = []
        self.conn.add_on_connection_blocked_callback(
            lambda _c, frame: self.events.append("blocked: " + frame.method.reason)
        )
        self.conn.add_on_connection_unblocked_callback(
            lambda _c, _frame: self.events.append("unblocked")
        )

    def wait_for(self, what: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, self.events
            self.conn.process_data_events(0.05)


def test_alarm_blocks_publishers_not_consumers() -> None:
    with amqp_server() as srv:
        pub = Watched(srv)
        ch = pub.conn.channel()
        ch.queue_declare("blk")
        ch.basic_publish("", "blk", b"before")
        ch.queue_declare("blk", passive=True)  # round trip: the publish is stored
        assert _ready(srv, "blk") == 1

        cons = Watched(srv)
        cch = cons.conn.channel()
        got: list[bytes] = []

        def on_message(c: Any, m: Any, _p: Any, b: bytes) -> None:
            got.append(b)
            c.basic_ack(m.delivery_tag)

        cch.basic_consume("blk", on_message)
        cons.wait_for(lambda: got == [b"before"])

        _alarm(srv, "memory", True)
        pub.wait_for(lambda: pub.events == ["blocked: low on memory"])
        for i in range(5):
            ch.basic_publish("", "blk", f"held {i}".encode())
        pub.conn.process_data_events(0.3)
        assert got == [b"before"]  # not read while blocked

        # a consumer-only connection is not blocked, and is still served
        assert cons.events == []
        srv.call(srv.broker.send("blk", _msg(b"from the engine")))
        cons.wait_for(lambda: b"from the engine" in got)
        assert cons.events == []

        _alarm(srv, "memory", False)
        pub.wait_for(lambda: pub.events == ["blocked: low on memory", "unblocked"])
        cons.wait_for(lambda: len(got) == 7)
        assert got[2:] == [f"held {i}".encode() for i in range(5)]
        pub.conn.close()
        cons.conn.close()


def _msg(body: bytes) -> Any:
    from conveyor.model import NewMessage

    return NewMessage(body=body)


def test_blocked_connection_timeout() -> None:
    """pika's blocked_connection_timeout: a connection blocked longer is closed by the
    client (ConnectionBlockedTimeout); the server keeps serving others."""
    with amqp_server() as srv:
        pub = Watched(srv, blocked_connection_timeout=0.5)
        ch = pub.conn.channel()
        ch.queue_declare("blk-timeout")
        ch.basic_publish("", "blk-timeout", b"x")
        _alarm(srv, "disk", True)
        with pytest.raises(pika.exceptions.ConnectionBlockedTimeout):
            pub.wait_for(lambda: False, timeout=5)
        assert pub.events == ["blocked: low on disk"]
        _alarm(srv, "disk", False)
        other = pika.BlockingConnection(pika.ConnectionParameters(srv.host, srv.port))
        assert other.channel().queue_declare("blk-timeout", passive=True).method.message_count == 1
        other.close()


def test_unconfirmed_publishes_raise_memory_alarm() -> None:
    """More unconfirmed publishes on the server than publish_high_water: publishers are
    blocked until the store has caught up to half of it; nothing is lost."""
    with amqp_server(publish_high_water=20) as srv:
        pub = Watched(srv)
        ch = pub.conn.channel()
        ch.queue_declare("blk-water")
        body = b"x" * 100
        for _ in range(3000):
            ch.basic_publish("", "blk-water", body)
        pub.wait_for(lambda: "unblocked" in pub.events)
        assert pub.events[0] == "blocked: low on memory"
        assert ch.queue_declare("blk-water", passive=True).method.message_count == 3000
        assert srv.server.pending_publishes == 0 and not srv.server.alarms
        pub.conn.close()


def test_store_full_blocks_until_space_returns() -> None:
    """A full store (a real SQLite SQLITE_FULL: the database may not grow past
    max_page_count) raises the "disk" alarm: the publish is held unconfirmed, the
    publisher blocked; when space returns the batch is stored, confirmed, unblocked."""
    with amqp_server() as srv:
        pub = Watched(srv)
        ch = pub.conn.channel()
        ch.confirm_delivery()
        ch.queue_declare("blk-full")
        ch.basic_publish("", "blk-full", b"fits")  # confirmed: stored

        def limit(pages: int | None) -> Callable[[Any], int]:
            def script(tx: Any) -> int:
                if pages is None:
                    return int(tx.c.execute("PRAGMA page_count").fetchone()[0])
                return int(tx.c.execute(f"PRAGMA max_page_count={pages}").fetchone()[0])

            return script

        used = srv.call(srv.broker.store.run(limit(None)))
        srv.call(srv.broker.store.run(limit(used)))
        seen_alarm: list[set[str]] = []

        def free_space_later() -> None:
            # the server's own view: the disk alarm is on while the batch is held
            deadline = time.monotonic() + 10
            while not srv.server.alarms and time.monotonic() < deadline:
                time.sleep(0.02)
            seen_alarm.append(set(srv.server.alarms))
            time.sleep(0.3)
            srv.call(srv.broker.store.run(limit(1_000_000)))  # space is back

        helper = threading.Thread(target=free_space_later)
        helper.start()
        started = time.monotonic()
        ch.basic_publish("", "blk-full", b"y" * 200_000)  # returns once confirmed
        helper.join()
        assert seen_alarm == [{"disk"}]
        assert time.monotonic() - started >= 0.3
        pub.wait_for(lambda: len(pub.events) == 2)  # BlockingConnection dispatches late
        assert pub.events == ["blocked: low on disk", "unblocked"]
        assert ch.queue_declare("blk-full", passive=True).method.message_count == 2
        pub.conn.close()
