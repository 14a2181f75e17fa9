"""Job-framework benchmark (issue 6): no-op jobs enqueued, then processed by one worker
process and by four, in one run, for conveyor.jobs and for Celery (RabbitMQ),
Dramatiq (RabbitMQ), RQ (Redis) and arq (Redis).

Each run: empty the queue, enqueue --jobs no-op jobs from this process (timed: the
enqueue rate), start the workers, and time from the first job taken until the queue is
empty (worker start-up is not counted). Every framework keeps no results.

    python benchmarks/bench_jobs.py                  # 20000 jobs per run
    python benchmarks/bench_jobs.py --jobs 5000 --only conveyor,celery

Needs RabbitMQ on 127.0.0.1:5672 (guest/guest) and Redis on 127.0.0.1:6379, and
celery, dramatiq[rabbitmq], rq and arq installed. Writes benchmarks/results/jobs.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path[:0] = [str(ROOT), str(ROOT / "src")]
FRAMEWORKS = ["conveyor", "celery", "dramatiq", "rq", "arq"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), e.get("PYTHONPATH", "")])
    return e


class Framework:
    name = ""
    broker = ""

    def setup(self) -> None: ...
    def purge(self) -> None: ...
    def enqueue(self, n: int) -> None: ...
    def remaining(self) -> int: ...
    def workers(self, procs: int) -> list[list[str]]: ...
    def teardown(self) -> None: ...


class Conveyor(Framework):
    name = "conveyor.jobs"
    broker = "embedded SQLite directory, durability os"

    def setup(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="bench-jobs-")
        os.environ["BENCH_URL"] = self.data = os.path.join(self.dir, "data")
        os.environ["BENCH_DURABILITY"] = "os"
        from benchmarks.jobs.conveyor_app import app

        self.app = app
        app.connect(self.data, durability="os")
        import conveyor

        self.mq = conveyor.connect(self.data, durability="os")

    def purge(self) -> None:
        self.mq.queue("bench.noop", visibility_timeout=30.0, dedup_window=300.0).purge()

    def enqueue(self, n: int) -> None:
        from benchmarks.jobs.conveyor_app import noop

        for i in range(0, n, 1000):
            self.app.enqueue_many([noop.s() for _ in range(min(1000, n - i))])

    def remaining(self) -> int:
        s = self.mq.get_queue("bench.noop").stats()
        return s.ready + s.in_flight + s.delayed

    def workers(self, procs: int) -> list[list[str]]:
        return [[sys.executable, "-m", "conveyor", "worker", "benchmarks.jobs.conveyor_app:app",
                 "--data", self.data, "-p", str(procs), "-c", "64", "--log-level", "warning",
                 "--no-schedules"]]  # fmt: skip

    def teardown(self) -> None:
        self.mq.close()
        self.app.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _rabbit_count(queue: str) -> int:
    import pika

    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    try:
        ch = conn.channel()
        ok = ch.queue_declare(queue, passive=True)
        return int(ok.method.message_count)
    finally:
        conn.close()


def _rabbit_purge(queue: str) -> None:
    import pika

    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    try:
        ch = conn.channel()
        ch.queue_purge(queue)
    except Exception:  # not declared yet: nothing to purge
        pass
    finally:
        conn.close()


class Celery(Framework):
    name = "Celery"
    broker = "RabbitMQ, prefork pool, prefetch x64, ignore_result, no gossip/mingle/heartbeat"

    def setup(self) -> None:
        from benchmarks.jobs.celery_app import app

        self.app = app

    def purge(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.default_channel.queue_declare("bench-celery", durable=True, auto_delete=False)
        _rabbit_purge("bench-celery")

    def enqueue(self, n: int) -> None:
        from benchmarks.jobs.celery_app import noop

        with self.app.producer_or_acquire() as producer:
            for _ in range(n):
                noop.apply_async(producer=producer)

    def remaining(self) -> int:
        return _rabbit_count("bench-celery")

    def workers(self, procs: int) -> list[list[str]]:
        return [[sys.executable, "-m", "celery", "-A", "benchmarks.jobs.celery_app", "worker",
                 "-c", str(procs), "--pool", "prefork", "-Q", "bench-celery", "-l", "warning",
                 "--without-gossip", "--without-mingle", "--without-heartbeat"]]  # fmt: skip


class Dramatiq(Framework):
    name = "Dramatiq"
    broker = "RabbitMQ, 8 threads per process"

    def setup(self) -> None:
        from benchmarks.jobs import dramatiq_app

        self.mod = dramatiq_app

    def purge(self) -> None:
        self.mod.broker.declare_queue("bench-dramatiq")
        _ = self.mod.broker.channel  # opening it declares what declare_queue registered
        for q in ("bench-dramatiq", "bench-dramatiq.DQ", "bench-dramatiq.XQ"):
            _rabbit_purge(q)

    def enqueue(self, n: int) -> None:
        for _ in range(n):
            self.mod.noop.send()

    def remaining(self) -> int:
        return _rabbit_count("bench-dramatiq")

    def workers(self, procs: int) -> list[list[str]]:
        return [[sys.executable, "-m", "dramatiq", "benchmarks.jobs.dramatiq_app",
                 "--processes", str(procs), "--threads", "8"]]  # fmt: skip


class RQ(Framework):
    name = "RQ"
    broker = "Redis, SimpleWorker (no fork per job), enqueue_many, result_ttl=0"

    def setup(self) -> None:
        import redis
        from rq import Queue

        self.r = redis.Redis()
        self.q = Queue("bench-rq", connection=self.r)

    def purge(self) -> None:
        self.q.empty()
        for k in self.r.scan_iter("rq:*"):
            self.r.delete(k)

    def enqueue(self, n: int) -> None:
        from benchmarks.jobs.rq_app import noop
        from rq import Queue

        for i in range(0, n, 1000):
            batch = [
                Queue.prepare_data(noop, result_ttl=0, ttl=None) for _ in range(min(1000, n - i))
            ]
            with self.r.pipeline() as pipe:
                self.q.enqueue_many(batch, pipeline=pipe)
                pipe.execute()

    def remaining(self) -> int:
        from rq.registry import StartedJobRegistry

        return int(self.q.count) + len(StartedJobRegistry(queue=self.q))

    def workers(self, procs: int) -> list[list[str]]:
        return [[sys.executable, "-m", "rq.cli", "worker", "-w", "rq.worker.SimpleWorker",
                 "--url", "redis://127.0.0.1:6379", "-q", "bench-rq"]
                for _ in range(procs)]  # fmt: skip


class Arq(Framework):
    name = "arq"
    broker = "Redis, max_jobs=100, keep_result=0"

    def setup(self) -> None:
        import redis

        self.r = redis.Redis()

    def purge(self) -> None:
        for k in self.r.scan_iter("arq:*"):
            self.r.delete(k)
        self.r.delete("bench-arq")

    def enqueue(self, n: int) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings

        async def go() -> None:
            pool = await create_pool(RedisSettings(), default_queue_name="bench-arq")
            for i in range(0, n, 500):
                await asyncio.gather(*(pool.enqueue_job("noop") for _ in range(min(500, n - i))))
            await pool.aclose()

        asyncio.run(go())

    def remaining(self) -> int:
        pending = int(self.r.zcard("bench-arq"))
        running = sum(1 for _ in self.r.scan_iter("arq:in-progress:*", count=1000))
        return pending + running

    def workers(self, procs: int) -> list[list[str]]:
        return [[sys.executable, "-m", "arq", "benchmarks.jobs.arq_app.WorkerSettings"]
                for _ in range(procs)]  # fmt: skip


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_one(fw: Framework, n: int, procs: int, timeout: float) -> tuple[float, float]:
    """(enqueue jobs/s, processing jobs/s)."""
    fw.purge()
    t0 = time.perf_counter()
    fw.enqueue(n)
    enq = n / (time.perf_counter() - t0)
    start_left = fw.remaining()
    workers = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for cmd in fw.workers(procs)
    ]
    try:
        deadline = time.monotonic() + timeout
        while (left := fw.remaining()) >= start_left:  # wait for the first job taken
            if time.monotonic() > deadline:
                raise RuntimeError(f"{fw.name}: workers never started")
            time.sleep(0.01)
        t1, first_left = time.perf_counter(), left
        while (left := fw.remaining()) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{fw.name}: {left} jobs left after {timeout}s")
            time.sleep(0.01)
        rate = first_left / (time.perf_counter() - t1)
    finally:
        _stop(workers)
    return enq, rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--only", default=",".join(FRAMEWORKS))
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    classes: dict[str, Callable[[], Framework]] = {
        "conveyor": Conveyor, "celery": Celery, "dramatiq": Dramatiq, "rq": RQ, "arq": Arq,
    }  # fmt: skip
    rows: list[tuple[str, str, float, float, float]] = []
    for key in args.only.split(","):
        fw = classes[key]()
        fw.setup()
        try:
            enq1, one = run_one(fw, args.jobs, 1, args.timeout)
            enq4, four = run_one(fw, args.jobs, 4, args.timeout)
        finally:
            fw.teardown()
        rows.append((fw.name, fw.broker, (enq1 + enq4) / 2, one, four))
        print(f"{fw.name:14} enqueue {rows[-1][2]:9.0f}/s  1 proc {one:9.0f}/s  "
              f"4 procs {four:9.0f}/s", flush=True)  # fmt: skip
    write(rows, args.jobs)


def write(rows: list[tuple[str, str, float, float, float]], n: int) -> None:
    ours = next((r for r in rows if r[0] == "conveyor.jobs"), None)
    others = [r for r in rows if r[0] != "conveyor.jobs"]
    lines = [
        "# Jobs benchmark: no-op jobs, enqueued then processed",
        "",
        f"`python benchmarks/bench_jobs.py --jobs {n}` on {platform.machine()},"
        f" {os.cpu_count()} CPUs, Python {platform.python_version()}, one run"
        f" ({time.strftime('%Y-%m-%d')}). {n} jobs per run; processing is timed from the"
        " first job taken until the queue is empty (worker start-up excluded);"
        " the enqueue rate is from one producer in one process.",
        "",
        "| framework | broker / configuration | enqueue jobs/s | 1 process jobs/s |"
        " 4 processes jobs/s |",
        "|---|---|---:|---:|---:|",
    ]
    for name, broker, enq, one, four in rows:
        lines.append(f"| {name} | {broker} | {enq:,.0f} | {one:,.0f} | {four:,.0f} |")
    if ours and others:
        best1 = max(others, key=lambda r: r[3])
        best4 = max(others, key=lambda r: r[4])
        beste = max(others, key=lambda r: r[2])
        lines += [
            "",
            "Ratios, conveyor.jobs / best other:",
            "",
            f"- 1 process: {ours[3] / best1[3]:.2f}x ({best1[0]})",
            f"- 4 processes: {ours[4] / best4[4]:.2f}x ({best4[0]})",
            f"- enqueue: {ours[2] / beste[2]:.2f}x ({beste[0]})",
            "",
            "| vs | 1 process | 4 processes | enqueue |",
            "|---|---:|---:|---:|",
        ]
        for name, _, enq, one, four in others:
            lines.append(
                f"| {name} | {ours[3] / one:.2f}x | {ours[4] / four:.2f}x | {ours[2] / enq:.2f}x |"
            )
    lines += [
        "",
        "Notes: RabbitMQ and Redis run with their default persistence (neither syncs each",
        "message to disk); conveyor runs with durability `os` (a confirmed job survives a",
        "process crash, not a power loss). For RabbitMQ the queue length counts ready",
        "messages only, so the last prefetched batch may still be running when the clock",
        "stops (at most prefetch x processes jobs; negligible at these sizes).",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "jobs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
