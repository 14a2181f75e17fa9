"""Celery end to end against a real ``conveyor serve``: a real ``celery worker``
subprocess (solo pool) with ``broker_url`` pointing at conveyor's AMQP port and the
``rpc://`` result backend. Tasks, retries with countdown, countdown/ETA tasks (with the
prefetch raise that ETA tasks need), ``celery inspect ping`` (pidbox), heartbeats, and
Celery 5.5+'s native delayed delivery (quorum queues, exchange-to-exchange bindings,
chained dead-letter TTL queues)."""

from __future__ import annotations

import datetime
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

celery = pytest.importorskip("celery")

from serverproc import ServerProcess, subprocess_env  # noqa: E402

pytestmark = pytest.mark.timeout(60)

#: The application both the worker and the test load (written to a temporary dir).
APP_SOURCE = """
import os
import time

from celery import Celery

app = Celery("conveyor_celery_test", broker=os.environ["BROKER_URL"], backend="rpc://")
app.conf.update(
    task_default_queue=os.environ.get("CELERY_QUEUE", "celery"),
    worker_prefetch_multiplier=1,
    broker_heartbeat=2,  # negotiated down from conveyor's 60: heartbeats both ways
    broker_connection_retry_on_startup=True,
    result_expires=60,
)
if os.environ.get("CELERY_QUORUM"):
    # Celery >= 5.5 turns on native delayed delivery for quorum queues; it needs a
    # topic exchange (ETA messages are routed back to it by routing key).
    app.conf.task_default_queue_type = "quorum"
    app.conf.task_default_exchange_type = "topic"


@app.task
def add(x, y):
    return x + y


@app.task(bind=True, max_retries=5)
def flaky(self, fails):
    if self.request.retries < fails:
        raise self.retry(countdown=1)
    return self.request.retries


@app.task
def stamp():
    return time.time()


@app.task
def fail():
    raise ValueError("boom")
"""


class Worker:
    """One ``celery worker`` subprocess and a Celery app (same module) for the test."""

    def __init__(self, tmp: Path, broker_url: str, queue: str, quorum: bool) -> None:
        self.dir = tmp
        (tmp / "conveyor_celery_app.py").write_text(APP_SOURCE)
        extra = {"BROKER_URL": broker_url, "CELERY_QUEUE": queue, "C_FORCE_ROOT": "1"}
        if quorum:
            extra["CELERY_QUORUM"] = "1"
        self.env = subprocess_env(extra)
        self.env["PYTHONPATH"] = os.pathsep.join([str(tmp), self.env["PYTHONPATH"]])
        self.node = f"{queue}@conveyor-test"
        self.log_path = tmp / "worker.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "conveyor_celery_app", "worker",
             "-P", "solo", "-c", "1", "-n", self.node, "--without-mingle",
             "--without-gossip", "--loglevel=INFO"],
            cwd=tmp, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        # The test's own app: same module, same settings.
        saved = dict(os.environ)
        os.environ.update(extra)
        sys.path.insert(0, str(tmp))
        try:
            sys.modules.pop("conveyor_celery_app", None)
            self.mod: Any = importlib.import_module("conveyor_celery_app")
        finally:
            sys.path.remove(str(tmp))
            os.environ.clear()
            os.environ.update(saved)
        self.app: Any = self.mod.app

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.output()}")
            if "ready." in self.output():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.app.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("celery-serve")) as srv:
        yield srv


def _worker(server: ServerProcess, tmp: Path, queue: str, quorum: bool = False) -> Iterator[Worker]:
    assert server.amqp_url is not None
    w = Worker(tmp, server.amqp_url, queue, quorum)
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()
    for trouble in ("Connection to broker lost", "CRITICAL", "Cannot connect", "Unrecoverable"):
        assert trouble not in w.output(), w.output()


@pytest.fixture(scope="module")
def worker(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    yield from _worker(server, tmp_path_factory.mktemp("celery-worker"), "celery")


def _queues(server: ServerProcess) -> dict[str, dict[str, Any]]:
    got = httpx.get(server.http_url + "/v1/queues").json()["queues"]
    return {q["name"]: q for q in got}


def test_tasks_and_rpc_results(worker: Worker) -> None:
    mod = worker.mod
    assert mod.add.delay(2, 3).get(timeout=10) == 5
    results = [mod.add.delay(i, i) for i in range(20)]
    assert [r.get(timeout=10) for r in results] == [2 * i for i in range(20)]
    failed = mod.fail.delay()
    with pytest.raises(Exception, match="boom"):
        failed.get(timeout=10)
    assert failed.state == "FAILURE"


def test_rpc_reply_queue_goes_away(worker: Worker, server: ServerProcess) -> None:
    """The rpc backend's reply queue (named by the client's oid) is auto-delete with
    x-expires (result_expires); it goes when the client's result consumer does."""
    from celery import Celery

    app = Celery("rpc-client", broker=worker.app.conf.broker_url, backend="rpc://")
    app.conf.update(task_default_queue="celery", broker_heartbeat=2)
    assert app.send_task("conveyor_celery_app.add", (1, 1)).get(timeout=10) == 2
    oid = app.backend.oid  # the client's reply queue
    info = _queues(server)[oid]
    attrs = info["options"]["attributes"]
    assert attrs["amqp.auto_delete"] == "true"
    assert '"x-expires":' in attrs["amqp.arguments"]
    app.backend.result_consumer.stop()  # cancels the consumer: auto-delete applies
    deadline = time.monotonic() + 10
    while oid in _queues(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert oid not in _queues(server)


def test_retry_with_countdown(worker: Worker) -> None:
    started = time.monotonic()
    assert worker.mod.flaky.delay(2).get(timeout=20) == 2
    assert time.monotonic() - started >= 1.9  # two retries, each after countdown=1


def test_countdown_and_eta(worker: Worker) -> None:
    mod = worker.mod
    sent = time.time()
    ran = mod.stamp.apply_async(countdown=2).get(timeout=15)
    assert 1.9 <= ran - sent < 4
    sent = time.time()
    eta = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=2)
    ran = mod.stamp.apply_async(eta=eta).get(timeout=15)
    assert 1.9 <= ran - sent < 4


def test_eta_task_does_not_block_the_worker(worker: Worker) -> None:
    """With prefetch 1 the worker holds the ETA message and raises its prefetch
    (Basic.Qos) so the next task is delivered at once: the raise must reach the running
    consumer (kombu uses the spec's QoS meaning for a non-RabbitMQ server)."""
    mod = worker.mod
    sent = time.time()
    later = mod.stamp.apply_async(countdown=3)
    now = mod.stamp.delay()
    assert now.get(timeout=10) - sent < 1.5
    assert later.get(timeout=10) - sent >= 2.9


def test_inspect_ping(worker: Worker) -> None:
    """The pidbox: fanout ``celery.pidbox``, per-node exclusive auto-delete queues with
    x-expires and x-message-ttl, replies through ``reply.celery.pidbox``."""
    replies = worker.app.control.ping(timeout=1.0)
    assert {worker.node: {"ok": "pong"}} in replies
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "conveyor_celery_app", "inspect", "ping",
         "--timeout", "1.5"],
        cwd=worker.dir, env=worker.env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pong" in proc.stdout and worker.node in proc.stdout
    stats = worker.app.control.inspect(timeout=1.0).stats()
    assert stats[worker.node]["prefetch_count"] >= 1


def test_idle_connection_survives_heartbeats(worker: Worker) -> None:
    """broker_heartbeat=2: conveyor drops a client silent for 4 s; the worker must be
    kept alive by heartbeats both ways."""
    time.sleep(5)
    assert worker.mod.add.delay(20, 22).get(timeout=10) == 42
    assert "Connection to broker lost" not in worker.output()


def test_native_delayed_delivery(server: ServerProcess, tmp_path: Path) -> None:
    """Celery >= 5.5 with quorum queues: countdown tasks go through the
    celery_delayed_27..0 topic exchanges (exchange-to-exchange bindings) and TTL queues
    that dead-letter into each other, then back to the task queue."""
    for w in _worker(server, tmp_path, "quorum_tasks", quorum=True):
        queues = _queues(server)
        assert "celery_delayed_0" in queues and "celery_delayed_27" in queues
        args = queues["celery_delayed_3"]["options"]["attributes"]["amqp.arguments"]
        assert '"x-queue-type":"quorum"' in args and '"x-message-ttl":8000' in args
        mod = w.mod
        assert mod.add.delay(1, 2).get(timeout=10) == 3
        sent = time.time()
        later = mod.stamp.apply_async(countdown=3)
        now = mod.stamp.delay()
        assert now.get(timeout=10) - sent < 1.5
        ran = later.get(timeout=15)
        assert 2.9 <= ran - sent < 5
        started = time.monotonic()
        assert mod.flaky.delay(1).get(timeout=20) == 1
        assert time.monotonic() - started >= 0.9
        assert "Global QoS is disabled" in w.output()  # Celery's quorum-queue mode
