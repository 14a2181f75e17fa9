"""Dramatiq's RabbitmqBroker (pika underneath) against a real ``conveyor serve``: a real
dramatiq Worker (threads, in this process) runs actors; retries with backoff go through
the ``<q>.DQ`` delay queue; exhausted messages are dead-lettered by the server into
``<q>.XQ`` (x-dead-letter-exchange "" + x-dead-letter-routing-key); results through the
stock Results middleware (its StubBackend: dramatiq has no AMQP result backend)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

dramatiq = pytest.importorskip("dramatiq")

from dramatiq.brokers.rabbitmq import RabbitmqBroker  # noqa: E402
from dramatiq.middleware import Retries  # noqa: E402
from dramatiq.results import Results  # noqa: E402
from dramatiq.results.backends import StubBackend  # noqa: E402

from serverproc import ServerProcess  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class App:
    def __init__(self, url: str) -> None:
        self.url = url
        self.broker = RabbitmqBroker(url=url, confirm_delivery=True)
        self.results = StubBackend()
        self.broker.add_middleware(Results(backend=self.results))
        for mw in self.broker.middleware:
            if isinstance(mw, Retries):
                mw.min_backoff = 200  # ms; dramatiq's default is 15 s
                mw.max_backoff = 1000
        dramatiq.set_broker(self.broker)
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.seen: list[int] = []

        @dramatiq.actor(queue_name="dq-tasks", store_results=True)
        def add(x: int, y: int) -> int:
            return x + y

        @dramatiq.actor(queue_name="dq-tasks", max_retries=3, store_results=True)
        def flaky(key: str, fails: int) -> int:
            with self.lock:
                n = self.attempts[key] = self.attempts.get(key, 0) + 1
            if n <= fails:
                raise RuntimeError(f"attempt {n} fails")
            return n

        @dramatiq.actor(queue_name="dq-tasks", max_retries=0)
        def doomed() -> None:
            raise RuntimeError("always fails")

        @dramatiq.actor(queue_name="dq-tasks")
        def record(i: int) -> None:
            with self.lock:
                self.seen.append(i)

        self.add: Any = add
        self.flaky: Any = flaky
        self.doomed: Any = doomed
        self.record: Any = record
        self.worker = dramatiq.Worker(self.broker, worker_threads=2, worker_timeout=100)

    def close(self) -> None:
        self.worker.stop()
        self.broker.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    with ServerProcess(tmp_path_factory.mktemp("dramatiq-serve")) as srv:
        assert srv.amqp_url is not None
        a = App(srv.amqp_url)
        a.worker.start()
        try:
            yield a
        finally:
            a.close()


def _get(ch: Any, queue: str, timeout: float = 10.0) -> tuple[Any, Any, bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is not None:
            return method, props, body
        time.sleep(0.05)
    raise AssertionError(f"nothing arrived on {queue}")


def test_actor_runs_and_result(app: App) -> None:
    message = app.add.send(2, 40)
    assert message.get_result(backend=app.results, block=True, timeout=10_000) == 42


def test_many_messages(app: App) -> None:
    for i in range(100):
        app.record.send(i)
    deadline = time.monotonic() + 20
    while len(app.seen) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(app.seen) == list(range(100))


def test_retries_with_backoff(app: App) -> None:
    started = time.monotonic()
    message = app.flaky.send("k1", 2)
    assert message.get_result(backend=app.results, block=True, timeout=20_000) == 3
    # two retries, each delayed (through dq-tasks.DQ) by the backoff
    assert time.monotonic() - started >= 0.2
    assert app.attempts["k1"] == 3


def test_delayed_message(app: App) -> None:
    started = time.monotonic()
    message = app.add.send_with_options(args=(1, 1), delay=1500)
    assert message.get_result(backend=app.results, block=True, timeout=10_000) == 2
    assert time.monotonic() - started >= 1.4


def test_failed_message_dead_lettered_to_xq(app: App) -> None:
    """The worker rejects (nack requeue=false) a message that ran out of retries;
    conveyor dead-letters it through the default exchange to ``dq-tasks.XQ`` with
    x-death."""
    app.doomed.send()
    conn = pika.BlockingConnection(pika.URLParameters(app.url))
    try:
        ch = conn.channel()
        _method, props, body = _get(ch, "dq-tasks.XQ")
        assert b"doomed" in body
        death = props.headers["x-death"][0]
        assert death["reason"] == "rejected"
        assert death["queue"] == "dq-tasks"
        # the queues dramatiq declared, with its arguments, redeclare as equivalent
        declared = ch.queue_declare(
            "dq-tasks",
            durable=True,
            arguments={
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "dq-tasks.XQ",
            },
        )
        assert declared.method.consumer_count >= 1  # the worker's consumer
    finally:
        conn.close()


def test_queue_counts_and_join(app: App, tmp_path: Path) -> None:
    """RabbitmqBroker.join polls Queue.DeclareOk message counts of q, q.DQ and q.XQ."""
    for i in range(10):
        app.record.send(1000 + i)
    app.broker.join("dq-tasks", min_successes=3, idle_time=50, timeout=15_000)
    assert {1000 + i for i in range(10)} <= set(app.seen)
