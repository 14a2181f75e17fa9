"""Workers as real processes: `conveyor worker` killed with SIGKILL, and workers in
several processes behind a real `conveyor serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs_support import app, pid, slow
from serverproc import ServerProcess, subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def start_worker(target: list[str], *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "conveyor", "worker", "tests.jobs_support:app", *target,
         "--log-level", "warning", *extra],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


@pytest.fixture
def connected(tmp_path: Path) -> Iterator[str]:
    data = str(tmp_path / "data")
    app.connect(data)
    try:
        yield data
    finally:
        app.close()


def wait_for(pred: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_killed_worker_jobs_come_back_after_the_lease(connected: str, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    first = start_worker(["--data", connected], "-c", "2")
    second: subprocess.Popen[bytes] | None = None
    try:
        job = slow.enqueue(str(markers), 60.0)
        wait_for(lambda: any(markers.glob("start-1-*")), 20)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = time.monotonic()
        second = start_worker(["--data", connected])
        assert job.result(timeout=20) == 2
        assert time.monotonic() - killed_at < 15
        starts = sorted(p.name.split("-")[1] for p in markers.iterdir())
        assert starts == ["1", "2"]
        assert f"start-1-{first.pid}" in {p.name for p in markers.iterdir()}
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(20)


def test_worker_processes_behind_a_server(tmp_path: Path) -> None:
    with ServerProcess(tmp_path, amqp=False) as srv:
        app.connect(srv.http_url)
        workers = start_worker(["--url", srv.http_url], "--processes", "2", "-c", "4")
        try:
            jobs = app.enqueue_many([pid.s(i) for i in range(40)])
            results = [j.result(timeout=20) for j in jobs]
            assert [r[0] for r in results] == list(range(40))
            assert os.getpid() not in {r[1] for r in results}
            workers.send_signal(signal.SIGTERM)
            assert workers.wait(30) == 0, workers.stdout.read() if workers.stdout else ""
        finally:
            if workers.poll() is None:
                workers.kill()
            app.close()
