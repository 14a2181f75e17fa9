"""boto3 against conveyor, moto's server and a canned-response stub, in one run.

    python benchmarks/bench_sqs.py [--seconds 5] [--durability fsync|os|none]
                                   [--targets stub,conveyor,moto] [--threads 1,4]

Workloads (100-byte bodies, one boto3 client per thread):
  send   send_message_batch of 10
  recv   receive_message (MaxNumberOfMessages=10) + delete_message_batch of what came

Every server runs in its own process on an ephemeral port:
  conveyor  ``conveyor serve --durability fsync`` from this checkout: SQS on the same
            HTTP port as the native API, as shipped
  moto      ``python -m moto.server`` (the peer emulator; needs moto[server])
  stub      an aiohttp server answering each operation with a fixed valid response:
            the ceiling of the client itself

Each thread count runs against every server. With one thread every request waits for
the server's answer, so the figure is the client's time plus the server's latency (for
conveyor: a durable commit with its fdatasync); with several threads the client keeps
requests in flight, as SQS programs with worker threads do, and the figure is bounded
by the client's own CPU. Writes benchmarks/results/sqs.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from conveyor_serve import start_conveyor

RESULTS = Path(__file__).resolve().parent / "results"
BODY = "x" * 100


# -- servers (each runs as `python bench_sqs.py --serve KIND ...`) ---------------------


def serve_stub(port_file: str) -> None:
    from aiohttp import web

    msgs = [
        {
            "MessageId": f"id-{i}",
            "ReceiptHandle": f"rh-{i}",
            "MD5OfBody": "f0b0f9e0c0b7d0f0b0f9e0c0b7d0f0b0",
            "Body": BODY,
        }
        for i in range(10)
    ]
    canned = {
        "CreateQueue": {"QueueUrl": "http://localhost/000000000000/bench"},
        "GetQueueUrl": {"QueueUrl": "http://localhost/000000000000/bench"},
        "SendMessageBatch": {
            "Successful": [
                {"Id": str(i), "MessageId": f"id-{i}", "MD5OfMessageBody": "0" * 32}
                for i in range(10)
            ],
            "Failed": [],
        },
        "ReceiveMessage": {"Messages": msgs},
        "DeleteMessageBatch": {"Successful": [{"Id": str(i)} for i in range(10)], "Failed": []},
    }
    bodies = {k: json.dumps(v).encode() for k, v in canned.items()}

    async def endpoint(request: web.Request) -> web.StreamResponse:
        await request.read()
        op = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        return web.Response(
            body=bodies.get(op, b"{}"),
            content_type="application/x-amz-json-1.0",
            headers={"x-amzn-RequestId": "stub"},
        )

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", endpoint)
        await _run(app, port_file)

    _loop_run(main())


async def _run(app: Any, port_file: str) -> None:
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    Path(port_file).write_text(str(port))
    await asyncio.Event().wait()


def _loop_run(coro: Any) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


# -- driver ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(kind: str, tmp: str, durability: str) -> tuple[subprocess.Popen[bytes], str]:
    if kind == "moto":
        port = free_port()
        args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        _wait_http(url, proc)
        return proc, url
    if kind == "conveyor":
        data = tempfile.mkdtemp(dir=tmp)
        proc, ready = start_conveyor(data, durability)
        return proc, f"http://127.0.0.1:{ready['http_port']}"
    port_file = os.path.join(tmp, f"{kind}.port")
    args = [sys.executable, __file__, "--serve", kind, "--port-file", port_file]
    proc = subprocess.Popen(args)
    _wait_file(port_file, proc)
    return proc, f"http://127.0.0.1:{Path(port_file).read_text()}"


def _wait_file(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path) or not Path(path).read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start (waiting for {path})")
        time.sleep(0.05)


def _wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception as exc:
            if getattr(exc, "code", None):
                return  # any HTTP answer means it is up
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server at {url} did not start") from exc
            time.sleep(0.1)


def client(url: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "sqs",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=Config(retries={"max_attempts": 1}, max_pool_connections=64),
    )


def run_phase(url: str, queue_url: str, phase: str, seconds: float, threads: int) -> float:
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        sqs = client(url)
        entries = [{"Id": str(k), "MessageBody": BODY} for k in range(10)]
        n = 0
        while time.monotonic() < stop:
            if phase == "send":
                sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
                n += 10
            else:
                got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)
                msgs = got.get("Messages", [])
                if msgs:
                    sqs.delete_message_batch(
                        QueueUrl=queue_url,
                        Entries=[
                            {"Id": str(k), "ReceiptHandle": m["ReceiptHandle"]}
                            for k, m in enumerate(msgs)
                        ],
                    )
                    n += len(msgs)
        counts[i] = n

    start_t = time.monotonic()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / (time.monotonic() - start_t)


def bench(kind: str, args: argparse.Namespace, tmp: str) -> dict[int, dict[str, float]]:
    proc, url = start(kind, tmp, args.durability)
    out: dict[int, dict[str, float]] = {}
    try:
        sqs = client(url)
        queue_url = sqs.create_queue(QueueName=f"bench-{kind}")["QueueUrl"]
        for _ in range(20):  # warm up
            sqs.send_message_batch(
                QueueUrl=queue_url,
                Entries=[{"Id": str(k), "MessageBody": BODY} for k in range(10)],
            )
        for threads in args.threads:
            send = run_phase(url, queue_url, "send", args.seconds, threads)
            recv = run_phase(url, queue_url, "recv", args.seconds, threads)
            out[threads] = {"send": send, "recv": recv}
            print(f"{kind:9s} threads={threads}  send_batch {send:9.0f} msg/s"
                  f"   receive+delete_batch {recv:9.0f} msg/s", flush=True)  # fmt: skip
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def report(results: dict[str, dict[int, dict[str, float]]], args: argparse.Namespace) -> str:
    threads = ",".join(map(str, args.threads))
    lines = [
        "# SQS: boto3 against conveyor, moto and a canned-response stub",
        "",
        f"Command: `python benchmarks/bench_sqs.py --seconds {args.seconds:g} --threads {threads}`"
        f" ({os.cpu_count()} CPUs, durability={args.durability}). 100-byte bodies;"
        " send = send_message_batch of 10; recv = receive_message(10) +"
        " delete_message_batch. The stub answers canned responses: the client's ceiling.",
        "",
        "| threads | operation | stub msg/s | conveyor msg/s | moto msg/s"
        " | conveyor / stub | conveyor / moto |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for t in args.threads:
        for phase in ("send", "recv"):
            row = {k: results[k][t][phase] for k in results}
            stub, conv, moto = row.get("stub"), row.get("conveyor"), row.get("moto")
            lines.append(
                f"| {t} | {phase} | {_num(stub)} | {_num(conv)} | {_num(moto)}"
                f" | {_ratio(conv, stub, '{:.0%}')} | {_ratio(conv, moto, '{:.0f}x')} |"
            )
    if "stub" in results and "conveyor" in results:
        lines += ["", "Best of each over the thread counts (the stub's best is its ceiling):", ""]
        for phase in ("send", "recv"):
            stub = max(r[phase] for r in results["stub"].values())
            conv = max(r[phase] for r in results["conveyor"].values())
            lines.append(f"- {phase}: conveyor {conv:,.0f} / stub {stub:,.0f} = {conv / stub:.0%}")
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _ratio(a: float | None, b: float | None, fmt: str) -> str:
    return "-" if a is None or not b else fmt.format(a / b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=lambda v: [int(t) for t in v.split(",")], default=[1, 4])
    parser.add_argument("--durability", default="fsync", choices=["fsync", "os", "none"])
    parser.add_argument("--targets", default="stub,conveyor,moto")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "stub":
        return serve_stub(args.port_file)

    results: dict[str, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.targets.split(","):
            results[kind] = bench(kind, args, tmp)
    text = report(results, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sqs.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
