"""SIGTERM under load: the server exits 0 and every confirmed message survives."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from serverproc import ServerProcess


def test_sigterm_under_load_loses_nothing_confirmed(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path, durability="fsync", amqp=False).start()
    url = srv.http_url
    httpx.put(f"{url}/v1/queues/load", json={"visibility_timeout": 1}).raise_for_status()

    confirmed: set[str] = set()
    attempted: set[str] = set()
    acked: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    unexpected: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except httpx.HTTPError:
                pass  # the server went away mid-call: that call is unconfirmed
            except BaseException as exc:
                unexpected.append(exc)

        return run

    def producer(p: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            for i in range(1_000_000):
                if stop.is_set():
                    return
                bodies = [f"p{p}-{i}-{j}" for j in range(20)]
                with lock:
                    attempted.update(bodies)
                try:
                    r = c.post(
                        "/v1/queues/load/messages/batch",
                        json={"messages": [{"body": b} for b in bodies]},
                    )
                except httpx.HTTPError:
                    return  # the server went away: this batch is unconfirmed
                if r.status_code != 200:
                    return
                with lock:
                    confirmed.update(bodies)

    def consumer() -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/queues/load/receive", json={"max_messages": 10, "wait": 1})
                    msgs = r.json()["messages"] if r.status_code == 200 else []
                    if not msgs:
                        continue
                    a = c.post(
                        "/v1/queues/load/ack/batch",
                        json={"receipts": [m["receipt"] for m in msgs]},
                    )
                    if a.status_code == 200 and not a.json()["failed"]:
                        with lock:
                            acked.update(m["body"] for m in msgs)
                except httpx.HTTPError:
                    return

    threads = [threading.Thread(target=guarded(lambda p=p: producer(p))) for p in range(4)]
    threads.append(threading.Thread(target=guarded(consumer)))
    for t in threads:
        t.start()
    time.sleep(1.5)
    assert srv.stop(signal.SIGTERM) == 0
    stop.set()
    for t in threads:
        t.join(15)
    assert not unexpected, unexpected
    assert len(confirmed) > 100, "the load never got going"
    out = srv.output()
    assert "Traceback" not in out, out[out.find("Traceback") - 300 :]

    srv.start()  # same data directory, fresh ports
    try:
        got: set[str] = set()
        with httpx.Client(base_url=srv.http_url, timeout=30) as c:
            empty = 0
            while empty < 2:
                r = c.post("/v1/queues/load/receive", json={"max_messages": 100, "wait": 1.2})
                msgs = r.json()["messages"]
                empty = 0 if msgs else empty + 1
                got.update(m["body"] for m in msgs)
                if msgs:
                    c.post(
                        "/v1/queues/load/ack/batch",
                        json={"receipts": [m["receipt"] for m in msgs]},
                    ).raise_for_status()
    finally:
        srv.stop()
    lost = confirmed - acked - got
    assert not lost, f"{len(lost)} confirmed messages lost, e.g. {sorted(lost)[:5]}"
    assert got <= attempted  # nothing invented
    assert not (got & acked), "an acknowledged message came back"
