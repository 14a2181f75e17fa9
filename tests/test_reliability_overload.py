"""Overload (docs/reliability.md): 1,000 connections holding long polls; publishers
faster than consumers on a queue with max_length (memory bounded); one slow consumer
does not stall others; limits that exist give clear errors."""

from __future__ import annotations

import asyncio
import resource
import socket
import struct
import time
from pathlib import Path

import aiohttp
import boto3
import httpx
import pika
import pytest
from botocore.exceptions import ClientError

from serverproc import ServerProcess

pytestmark = pytest.mark.timeout(90)

HELD = 1000


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the server inherits it
    if want < HELD + 200:
        pytest.skip(f"fd limit {hard} too low for {HELD} connections")
    s = ServerProcess(
        tmp_path_factory.mktemp("overload"),
        ["--max-request-size", str(256 * 1024)],
        durability="os",
        kafka=False,
    ).start()
    yield s  # type: ignore[misc]
    s.stop()


def test_thousand_long_polls_held_while_others_work(srv: ServerProcess) -> None:
    httpx.put(f"{srv.http_url}/v1/queues/held").raise_for_status()
    httpx.put(f"{srv.http_url}/v1/queues/busy").raise_for_status()

    async def main() -> tuple[int, float, int, int]:
        conn = aiohttp.TCPConnector(limit=0, force_close=True)
        async with (
            aiohttp.ClientSession(connector=conn) as held,
            httpx.AsyncClient(base_url=srv.http_url, timeout=10) as other,
        ):

            async def poll() -> int:
                async with held.post(
                    f"{srv.http_url}/v1/queues/held/receive",
                    json={"max_messages": 1, "wait": 20},
                    timeout=aiohttp.ClientTimeout(total=40),
                ) as r:
                    assert r.status == 200, await r.text()
                    return len((await r.json())["messages"])

            polls = [asyncio.ensure_future(poll()) for _ in range(HELD)]
            # Wait until the server holds them all.
            deadline = time.monotonic() + 20
            while True:
                text = (await other.get("/metrics")).text
                line = next(
                    x for x in text.splitlines()
                    if x.startswith("conveyor_connections") and 'protocol="http"' in x
                )  # fmt: skip
                held_now = int(float(line.split()[-1]))
                if held_now >= HELD or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            # Another client's send/receive/ack round trips stay quick meanwhile.
            t0 = time.monotonic()
            for i in range(20):
                (
                    await other.post("/v1/queues/busy/messages", json={"body": f"b{i}"})
                ).raise_for_status()
                r = await other.post("/v1/queues/busy/receive", json={"max_messages": 1})
                (m,) = r.json()["messages"]
                (
                    await other.post("/v1/queues/busy/ack", json={"receipt": m["receipt"]})
                ).raise_for_status()
            per_round = (time.monotonic() - t0) / 20
            # Feed the held polls: every one is answered with one message.
            for i in range(0, HELD, 100):
                (await other.post(
                    "/v1/queues/held/messages/batch",
                    json={"messages": [{"body": f"h{i + j}"} for j in range(100)]},
                )).raise_for_status()  # fmt: skip
            got = sum(await asyncio.gather(*polls))
            return held_now, per_round, got, _rss_kib(srv.pid, "VmHWM")

    held_now, per_round, got, peak = asyncio.run(main())
    print(f"held={held_now} round_trip={per_round * 1000:.1f}ms delivered={got} peak={peak}KiB")
    assert held_now >= HELD
    assert per_round < 0.5
    assert got == HELD
    assert peak < 400 * 1024  # KiB: bounded with 1,000 connections held


def test_fast_publishers_on_max_length_queue_memory_bounded(srv: ServerProcess) -> None:
    url = srv.http_url
    httpx.put(f"{url}/v1/queues/capped", json={"max_length": 500, "overflow": "drop-oldest"})
    httpx.put(f"{url}/v1/queues/strict", json={"max_length": 100}).raise_for_status()
    body = "x" * 1000

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:

            async def publisher(p: int) -> None:
                for i in range(40):
                    r = await c.post(
                        "/v1/queues/capped/messages/batch",
                        json={"messages": [{"body": f"{p}-{i}-{j}{body}"} for j in range(100)]},
                    )
                    r.raise_for_status()

            async def slow_consumer() -> None:
                for _ in range(20):
                    r = await c.post("/v1/queues/capped/receive", json={"max_messages": 5})
                    msgs = r.json()["messages"]
                    if msgs:
                        await c.post(
                            "/v1/queues/capped/ack/batch",
                            json={"receipts": [m["receipt"] for m in msgs]},
                        )
                    await asyncio.sleep(0.05)

            await asyncio.gather(*(publisher(p) for p in range(4)), slow_consumer())

    before = _rss_kib(srv.pid)
    asyncio.run(main())
    after = _rss_kib(srv.pid)
    stats = httpx.get(f"{url}/v1/queues/capped/stats").json()
    assert stats["ready"] + stats["in_flight"] <= 500
    assert stats["sent_total"] == 16_000
    print(f"rss before={before}KiB after={after}KiB peak={_rss_kib(srv.pid, 'VmHWM')}KiB")
    assert after - before < 100 * 1024  # 16 MB of bodies went through; memory did not follow

    # reject-new: a clear refusal on every front door.
    for i in range(100):
        httpx.post(f"{url}/v1/queues/strict/messages", json={"body": str(i)}).raise_for_status()
    r = httpx.post(f"{url}/v1/queues/strict/messages", json={"body": "one too many"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    sqs = boto3.client(
        "sqs", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="x",
    )  # fmt: skip
    with pytest.raises(ClientError) as err:
        sqs.send_message(QueueUrl=f"{url}/000000000000/strict", MessageBody="x")
    assert err.value.response["Error"]["Code"] == "AWS.SimpleQueueService.OverLimit" or (
        "OverLimit" in err.value.response["Error"]["Code"]
    )
    assert srv.amqp_port is not None
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", srv.amqp_port))
    ch = conn.channel()
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", "strict", b"x")
    conn.close()


def test_slow_consumer_does_not_stall_others(srv: ServerProcess) -> None:
    url = srv.http_url
    httpx.put(f"{url}/v1/queues/shared").raise_for_status()
    httpx.post(
        f"{url}/v1/queues/shared/messages/batch",
        json={"messages": [{"body": str(i)} for i in range(200)]},
    ).raise_for_status()
    assert srv.amqp_port is not None
    # The slow one: an AMQP consumer with prefetch 1 that never acks.
    slow = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", srv.amqp_port))
    sch = slow.channel()
    sch.basic_qos(prefetch_count=1)
    held: list[bytes] = []
    sch.basic_consume("shared", lambda c, m, p, b: held.append(b))
    deadline = time.monotonic() + 5
    while not held and time.monotonic() < deadline:
        slow.process_data_events(0.1)
    assert len(held) == 1
    # Everyone else drains the rest at full speed.
    t0 = time.monotonic()
    got = 0
    with httpx.Client(base_url=url, timeout=10) as c:
        while got < 199 and time.monotonic() - t0 < 10:
            msgs = c.post("/v1/queues/shared/receive", json={"max_messages": 50}).json()["messages"]
            got += len(msgs)
            if msgs:
                c.post(
                    "/v1/queues/shared/ack/batch", json={"receipts": [m["receipt"] for m in msgs]}
                ).raise_for_status()
    assert got == 199
    assert time.monotonic() - t0 < 5
    slow.process_data_events(0.2)
    assert len(held) == 1  # prefetch respected: it never got more than it could take
    slow.close()


def test_existing_limits_give_clear_errors(srv: ServerProcess) -> None:
    url = srv.http_url
    httpx.put(f"{url}/v1/queues/limits").raise_for_status()
    # HTTP request size (--max-request-size 256 KiB): 413 message_too_large.
    r = httpx.post(f"{url}/v1/queues/limits/messages", json={"body": "x" * 300_000})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "message_too_large"
    # SQS MaximumMessageSize.
    sqs = boto3.client(
        "sqs", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="x",
    )  # fmt: skip
    q = sqs.create_queue(QueueName="smallmsgs", Attributes={"MaximumMessageSize": "1024"})
    with pytest.raises(ClientError) as err:
        sqs.send_message(QueueUrl=q["QueueUrl"], MessageBody="x" * 2000)
    assert err.value.response["Error"]["Code"] == "InvalidParameterValue"
    # AMQP: a frame above frame_max is 501 FRAME_ERROR; the server stays up.
    assert srv.amqp_port is not None
    with socket.create_connection(("127.0.0.1", srv.amqp_port), timeout=5) as s:
        s.sendall(b"AMQP\x00\x00\x09\x01")
        s.recv(4096)  # Connection.Start
        s.sendall(struct.pack(">BHI", 1, 0, 10_000_000) + b"\x00" * 64)
        data = b""
        with pytest.raises(OSError):
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionResetError
                data += chunk
    assert httpx.get(f"{url}/healthz").status_code == 200
