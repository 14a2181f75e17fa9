"""Crash harness: SIGKILL a loaded ``conveyor serve`` again and again; lose nothing.

    python tools/crash_harness.py --kills 50            # the long run (a few minutes)
    python tools/crash_harness.py --kills 3 --json out.json

A real ``conveyor serve`` subprocess (durability ``fsync``, SQLite in a temporary data
directory) runs under continuous load from separate producer and consumer processes,
one pair per front door:

- native: ``conveyor.connect_async(http_url)`` (send_batch / receive / ack_batch)
- sqs: boto3 (SendMessageBatch / ReceiveMessage / DeleteMessageBatch)
- amqp: pika with publisher confirms; acks are confirmed by a synchronous
  ``Queue.Declare(passive)`` on the same channel afterwards (conveyor answers a
  channel's Declare only once its earlier acks are stored; AMQP has no ack confirm)

The server is killed with SIGKILL at random moments and restarted on the same data
directory and the same ports; the clients reconnect. Every worker appends to its own
log, flushed line by line, with a wall-clock time:

    T <t> id...      a send is about to be attempted (so nothing can be invented)
    S <t> id...      the send was confirmed (after the confirm)
    D <t> id...      delivered to a consumer
    A <t> id...      the ack was confirmed

At the end the workers stop, the queues are drained through the native API (waiting
for leases to expire), the server is stopped and the rows still in the database
(leases that had not expired, e.g. AMQP deliveries, which hold a 30-minute lease) are
read directly. The checker reports:

- lost: confirmed sends never delivered, drained or still stored (must be 0)
- acked_redelivered: messages delivered again after their ack was confirmed (must be 0)
- duplicates: extra deliveries of messages whose earlier lease was not acked
  (redeliveries after a crash; counted, allowed)
- invented: deliveries of ids nobody attempted (must be 0)

Exit status 0 when lost, acked_redelivered and invented are all 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(SRC))
PROTOCOLS = ("native", "sqs", "amqp")
QUEUE = {p: f"crash-{p}" for p in PROTOCOLS}
#: Lease of native and SQS receives. Long enough that a confirmed SQS delete cannot
#: hit a lease that expired and was taken by someone else (SQS answers success then).
VISIBILITY = 10


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the server ---------------------------------------------------------------------------


class Server:
    def __init__(self, work: Path, durability: str) -> None:
        self.work = work
        self.data = work / "data"
        self.http_port = _free_port()
        self.amqp_port = _free_port()
        self.ready = work / "ready.json"
        self.log = (work / "serve.log").open("ab")
        self.durability = durability
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss_kb = 0

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> float:
        """Start and wait for /healthz; returns the seconds it took."""
        import httpx

        t0 = time.monotonic()
        self.ready.unlink(missing_ok=True)
        args = [
            sys.executable, "-m", "conveyor", "serve", "--data", str(self.data),
            "--host", "127.0.0.1", "--http-port", str(self.http_port),
            "--amqp-port", str(self.amqp_port), "--durability", self.durability,
            "--ready-file", str(self.ready), "--log-level", "warning",
        ]  # fmt: skip
        deadline = t0 + timeout
        while True:
            env = _env()
            env["CONVEYOR_KAFKA_PORT"] = "off"  # not under test; never take port 9092
            self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
            while not self.ready.exists() and self.proc.poll() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("conveyor serve did not start")
                time.sleep(0.02)
            if self.proc.poll() is None:
                break
            # A port still held (a client's socket in a state the kernel keeps): retry.
            if time.monotonic() > deadline:
                raise RuntimeError(f"conveyor serve exited with {self.proc.returncode}")
            time.sleep(0.2)
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.http_url + "/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise RuntimeError("/healthz never answered")
            time.sleep(0.02)

    def sample_rss(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))

    def kill(self) -> None:
        assert self.proc is not None
        self.sample_rss()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def pause(self, seconds: float) -> None:
        """SIGSTOP the server for ``seconds``, then SIGCONT."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> int:
        assert self.proc is not None
        self.sample_rss()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# -- workers (each its own process) -------------------------------------------------------


class Log:
    def __init__(self, path: str) -> None:
        self.f = open(path, "a", buffering=1)  # noqa: SIM115 - held for the process

    def write(self, kind: str, ids: list[str]) -> None:
        if ids:
            self.f.write(f"{kind} {time.time():.6f} {' '.join(ids)}\n")


class Worker:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.log = Log(a.log)
        self.stop_file = Path(a.stop)
        self.n = 0
        self.errors: Counter[str] = Counter()

    def stopping(self) -> bool:
        return self.stop_file.exists()

    def ids(self, k: int) -> list[str]:
        out = [f"{self.a.name}-{self.n + i}" for i in range(k)]
        self.n += k
        return out

    def failed(self, exc: BaseException) -> None:
        self.errors[type(exc).__name__] += 1
        time.sleep(0.1)

    def finish(self) -> None:
        Path(self.a.log + ".errors").write_text(json.dumps(dict(self.errors)))


def native_producer(w: Worker) -> None:
    import conveyor

    async def main() -> None:
        conn = await conveyor.connect_async(w.a.http, timeout=w.a.client_timeout)
        q = None
        while not w.stopping():
            try:
                if q is None:
                    q = await conn.queue(QUEUE["native"])
                ids = w.ids(w.a.batch)
                w.log.write("T", ids)
                await q.send_batch([i.encode() for i in ids])
                w.log.write("S", ids)
            except Exception as exc:
                w.failed(exc)
                await asyncio.sleep(0.1)
        await conn.close()

    asyncio.run(main())


def native_consumer(w: Worker) -> None:
    import conveyor

    async def main() -> None:
        conn = await conveyor.connect_async(w.a.http, timeout=w.a.client_timeout)
        q = None
        while not w.stopping():
            try:
                if q is None:
                    q = await conn.queue(QUEUE["native"])
                msgs = await q.receive(max_messages=20, wait=1, visibility_timeout=VISIBILITY)
                w.log.write("D", [m.body.decode() for m in msgs])
                if not msgs:
                    continue
                res = await q.ack_batch(msgs)
                failed = set(res.failed)
                w.log.write("A", [m.body.decode() for m in msgs if m.receipt not in failed])
            except Exception as exc:
                w.failed(exc)
                await asyncio.sleep(0.1)
        await conn.close()

    asyncio.run(main())


def _sqs(w: Worker) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "sqs",
        endpoint_url=w.a.http,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(
            # No retries: a retried SendMessageBatch whose first attempt was stored
            # makes a second message with the same body (as on AWS).
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=2,
            read_timeout=w.a.client_timeout,
        ),
    )


def sqs_producer(w: Worker) -> None:
    sqs = _sqs(w)
    url = None
    while not w.stopping():
        try:
            if url is None:
                url = sqs.get_queue_url(QueueName=QUEUE["sqs"])["QueueUrl"]
            ids = w.ids(10)
            w.log.write("T", ids)
            r = sqs.send_message_batch(
                QueueUrl=url,
                Entries=[{"Id": str(k), "MessageBody": i} for k, i in enumerate(ids)],
            )
            w.log.write("S", [ids[int(e["Id"])] for e in r.get("Successful", [])])
        except Exception as exc:
            w.failed(exc)


def sqs_consumer(w: Worker) -> None:
    sqs = _sqs(w)
    url = None
    while not w.stopping():
        try:
            if url is None:
                url = sqs.get_queue_url(QueueName=QUEUE["sqs"])["QueueUrl"]
            msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get(
                "Messages", []
            )
            w.log.write("D", [m["Body"] for m in msgs])
            if not msgs:
                continue
            r = sqs.delete_message_batch(
                QueueUrl=url,
                Entries=[
                    {"Id": str(k), "ReceiptHandle": m["ReceiptHandle"]} for k, m in enumerate(msgs)
                ],
            )
            w.log.write("A", [msgs[int(e["Id"])]["Body"] for e in r.get("Successful", [])])
        except Exception as exc:
            w.failed(exc)


def _amqp_channel(w: Worker) -> Any:
    import pika

    params = pika.ConnectionParameters(
        "127.0.0.1",
        w.a.amqp_port,
        credentials=pika.PlainCredentials("guest", "guest"),
        socket_timeout=w.a.client_timeout,
        blocked_connection_timeout=10,
        connection_attempts=1,
        heartbeat=10,
    )
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    return conn, ch


def amqp_producer(w: Worker) -> None:
    import pika

    conn = ch = None
    props = pika.BasicProperties(delivery_mode=2)
    while not w.stopping():
        try:
            if ch is None:
                conn, ch = _amqp_channel(w)
                ch.confirm_delivery()
            (i,) = w.ids(1)
            w.log.write("T", [i])
            ch.basic_publish("", QUEUE["amqp"], i.encode(), props, mandatory=True)
            w.log.write("S", [i])  # basic_publish returned: the broker confirmed it
        except Exception as exc:
            w.failed(exc)
            with contextlib.suppress(Exception):
                if conn is not None:
                    conn.close()
            conn = ch = None
    with contextlib.suppress(Exception):
        if conn is not None:
            conn.close()


def amqp_consumer(w: Worker) -> None:
    conn = ch = None
    while not w.stopping():
        try:
            if ch is None:
                conn, ch = _amqp_channel(w)
                ch.basic_qos(prefetch_count=50)
            got: list[Any] = []
            for method, _props, body in ch.consume(QUEUE["amqp"], inactivity_timeout=0.5):
                if method is None:
                    break
                got.append((method.delivery_tag, body.decode()))
                if len(got) >= 20:
                    break
            w.log.write("D", [b for _, b in got])
            if not got:
                continue
            ch.basic_ack(got[-1][0], multiple=True)
            # AMQP has no ack confirm: a passive declare on the same channel is answered
            # only after the channel's earlier acks are stored.
            ch.queue_declare(QUEUE["amqp"], passive=True)
            w.log.write("A", [b for _, b in got])
        except Exception as exc:
            w.failed(exc)
            with contextlib.suppress(Exception):
                if conn is not None:
                    conn.close()
            conn = ch = None
    with contextlib.suppress(Exception):
        if conn is not None:
            conn.close()


ROLES = {
    "native-producer": native_producer,
    "native-consumer": native_consumer,
    "sqs-producer": sqs_producer,
    "sqs-consumer": sqs_consumer,
    "amqp-producer": amqp_producer,
    "amqp-consumer": amqp_consumer,
}


def run_worker(a: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    w = Worker(a)
    try:
        ROLES[a.role](w)
    except KeyboardInterrupt:
        pass
    finally:
        w.finish()


# -- the checker -------------------------------------------------------------------------


def read_logs(logs: list[Path]) -> dict[str, Any]:
    attempted: set[str] = set()
    confirmed: set[str] = set()
    deliveries: dict[str, list[float]] = {}
    acked: dict[str, float] = {}
    for path in logs:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue  # a line cut by a worker's exit
            kind, t, ids = parts[0], float(parts[1]), parts[2:]
            if kind == "T":
                attempted.update(ids)
            elif kind == "S":
                confirmed.update(ids)
            elif kind == "D":
                for i in ids:
                    deliveries.setdefault(i, []).append(t)
            elif kind == "A":
                for i in ids:
                    acked.setdefault(i, t)
    return {
        "attempted": attempted,
        "confirmed": confirmed,
        "deliveries": deliveries,
        "acked": acked,
    }


def recovered_after(logs: list[Path], t: float) -> dict[str, bool]:
    """Per worker: did it confirm a send (producers) or an ack (consumers) after ``t``?"""
    out: dict[str, bool] = {}
    for path in logs:
        ok = False
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] in "SA" and float(parts[1]) > t:
                    ok = True
                    break
        out[path.stem] = ok
    return out


def check(logs: dict[str, Any], drained: dict[str, float], stored: set[str]) -> dict[str, Any]:
    attempted: set[str] = logs["attempted"]
    confirmed: set[str] = logs["confirmed"]
    deliveries: dict[str, list[float]] = logs["deliveries"]
    acked: dict[str, float] = logs["acked"]
    for i, t in drained.items():
        deliveries.setdefault(i, []).append(t)
    seen = set(deliveries) | stored
    lost = sorted(confirmed - seen)
    acked_again = sorted(i for i, t in acked.items() if any(d > t for d in deliveries.get(i, ())))
    invented = sorted(seen - attempted)
    duplicates = sum(len(ts) - 1 for ts in deliveries.values())
    by_protocol = {
        proto: {
            "confirmed": sum(1 for i in confirmed if i[0] == proto[0]),
            "acked": sum(1 for i in acked if i[0] == proto[0]),
            "duplicates": sum(len(ts) - 1 for i, ts in deliveries.items() if i[0] == proto[0]),
        }
        for proto in PROTOCOLS
    }
    return {
        "attempted": len(attempted),
        "confirmed": len(confirmed),
        "delivered_unique": len(deliveries),
        "acked": len(acked),
        "drained_at_end": len(drained),
        "stored_leased_at_end": len(stored),
        "unconfirmed_but_stored": len((seen & attempted) - confirmed),
        "lost": len(lost),
        "lost_examples": lost[:10],
        "acked_redelivered": len(acked_again),
        "acked_redelivered_examples": acked_again[:10],
        "duplicates": duplicates,
        "invented": len(invented),
        "invented_examples": invented[:10],
        "by_protocol": by_protocol,
    }


async def drain(url: str, timeout: float) -> dict[str, float]:
    """Receive and ack everything left, waiting out leases; id -> time of delivery."""
    import conveyor

    got: dict[str, float] = {}
    conn = await conveyor.connect_async(url, timeout=30)
    try:
        deadline = time.monotonic() + timeout
        for name in QUEUE.values():
            q = await conn.queue(name)
            while time.monotonic() < deadline:
                msgs = await q.receive(max_messages=100, wait=0.5, visibility_timeout=300)
                for m in msgs:
                    got.setdefault(m.body.decode(), time.time())
                if msgs:
                    await q.ack_batch(msgs)
                    continue
                s = await q.stats()
                if s.ready + s.delayed == 0 and s.in_flight == 0:
                    break
                if name == QUEUE["amqp"] and s.ready + s.delayed == 0:
                    break  # AMQP leases last 30 minutes; the database read below sees them
    finally:
        await conn.close()
    return got


def stored_rows(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {bytes(r[0]).decode() for r in conn.execute("SELECT body FROM messages")}
    finally:
        conn.close()


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


# -- the run -----------------------------------------------------------------------------


def run(a: argparse.Namespace) -> dict[str, Any]:
    import conveyor

    rng = random.Random(a.seed)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="conveyor-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    server = Server(work, a.durability)
    server.start()

    async def setup() -> None:
        conn = await conveyor.connect_async(server.http_url)
        for name in QUEUE.values():
            await conn.queue(name, visibility_timeout=VISIBILITY)
        await conn.close()

    asyncio.run(setup())
    stop = work / "stop"
    stop.unlink(missing_ok=True)
    logs: list[Path] = []
    workers: list[subprocess.Popen[bytes]] = []
    protocols = [p for p in PROTOCOLS if p in a.protocols.split(",")]
    for proto in protocols:
        for role in ("producer", "consumer"):
            for k in range(a.producers if role == "producer" else a.consumers):
                name = f"{proto[0]}{role[0]}{k}"
                log = work / f"{name}.log"
                log.unlink(missing_ok=True)
                logs.append(log)
                args = [
                    sys.executable, __file__, "worker", "--role", f"{proto}-{role}",
                    "--name", name, "--http", server.http_url,
                    "--amqp-port", str(server.amqp_port), "--log", str(log),
                    "--stop", str(stop), "--batch", str(a.batch),
                    "--client-timeout", str(a.client_timeout),
                ]  # fmt: skip
                out = (work / f"{name}.out").open("wb")
                workers.append(
                    subprocess.Popen(args, env=_env(), stdout=out, stderr=subprocess.STDOUT)
                )
    restarts: list[float] = []
    last_fault = 0.0
    t0 = time.monotonic()
    try:
        time.sleep(a.warmup)
        for k in range(a.kills):
            time.sleep(rng.uniform(a.min_up, a.max_up))
            if not a.quiet:
                print(f"{a.fault} {k + 1}/{a.kills}", file=sys.stderr, flush=True)
            if a.fault == "stop":
                server.pause(a.stop_seconds)
            else:
                server.kill()
                restarts.append(server.start())
        last_fault = time.time()
        time.sleep(a.tail)
    finally:
        stop.touch()
        for p in workers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    load_seconds = time.monotonic() - t0
    drained = asyncio.run(drain(server.http_url, timeout=VISIBILITY + 20))
    server.stop()
    db = server.data / "conveyor.db"
    stored = stored_rows(db)
    logged = read_logs(logs)
    recovered = recovered_after(logs, last_fault)
    report = check(logged, drained, stored)
    worker_errors: Counter[str] = Counter()
    for log in logs:
        err = Path(str(log) + ".errors")
        if err.exists():
            worker_errors.update(json.loads(err.read_text()))
    serve_log = (work / "serve.log").read_text(errors="replace")
    report.update(
        {
            "fault": a.fault,
            "kills": a.kills,
            "recovered_after_last_fault": recovered,
            "protocols": protocols,
            "durability": a.durability,
            "load_seconds": round(load_seconds, 1),
            "restart_seconds_max": round(max(restarts, default=0.0), 2),
            "restart_seconds_mean": round(sum(restarts) / len(restarts), 2) if restarts else 0,
            "peak_rss_mib": round(server.peak_rss_kb / 1024, 1),
            "integrity": integrity(db),
            "client_errors": dict(worker_errors),
            "server_tracebacks": serve_log.count("Traceback"),
            "workdir": str(work),
        }
    )
    report["ok"] = (
        report["lost"] == 0
        and report["acked_redelivered"] == 0
        and report["invented"] == 0
        and report["integrity"] == "ok"
        and all(recovered.values())
    )
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--role", choices=sorted(ROLES), required=True)
    w.add_argument("--name", required=True)
    w.add_argument("--http", required=True)
    w.add_argument("--amqp-port", type=int, required=True)
    w.add_argument("--log", required=True)
    w.add_argument("--stop", required=True)
    w.add_argument("--batch", type=int, default=10)
    w.add_argument("--client-timeout", type=float, default=10.0)
    p.add_argument("--kills", type=int, default=50)
    p.add_argument(
        "--fault",
        choices=["kill", "stop"],
        default="kill",
        help="kill: SIGKILL and restart; stop: SIGSTOP for --stop-seconds, then SIGCONT",
    )
    p.add_argument("--stop-seconds", type=float, default=15.0)
    p.add_argument("--client-timeout", type=float, default=10.0, help="client request timeout")
    p.add_argument("--min-up", type=float, default=0.5, help="seconds up before a kill (min)")
    p.add_argument("--max-up", type=float, default=3.0, help="seconds up before a kill (max)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--tail", type=float, default=2.0, help="seconds of load after the last kill")
    p.add_argument("--producers", type=int, default=1, help="producers per protocol")
    p.add_argument("--consumers", type=int, default=1, help="consumers per protocol")
    p.add_argument("--batch", type=int, default=10, help="native send batch size")
    p.add_argument("--protocols", default=",".join(PROTOCOLS))
    p.add_argument("--durability", default="fsync", choices=["fsync", "os", "none"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workdir", help="keep logs and data here (default: a new temp dir)")
    p.add_argument("--json", help="write the report here too")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args()
    if a.cmd == "worker":
        run_worker(a)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    report = run(a)
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
