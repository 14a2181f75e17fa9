"""Disk full: the data directory sits on a small tmpfs the test mounts (root only;
skipped elsewhere). A filler file leaves ~1.5 MB. Producers over the native API, SQS
and AMQP get a clear refusal (HTTP 507 ``store_full``, SQS ``ServiceUnavailable``,
AMQP Basic.Nack / channel error / Connection.Blocked), nothing confirmed is lost, and
once the filler is removed the same server stores messages again (no restart)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import boto3
import httpx
import pika
import pika.exceptions
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from serverproc import ServerProcess

pytestmark = pytest.mark.timeout(90)


def _fill(mnt: Path, leave: int) -> Path:
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_disk_full_refuses_clearly_loses_nothing_and_recovers(small_fs: Path) -> None:
    srv = ServerProcess(small_fs.parent, data=str(small_fs / "data"), durability="fsync")
    srv.start()
    try:
        http = httpx.Client(base_url=srv.http_url, timeout=10)
        sqs = boto3.client(
            "sqs", endpoint_url=srv.http_url, region_name="us-east-1",
            aws_access_key_id="x", aws_secret_access_key="x",
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
        )  # fmt: skip
        for name in ("native", "sqs", "amqp"):
            http.put(f"/v1/queues/{name}").raise_for_status()
        sqs_url = sqs.get_queue_url(QueueName="sqs")["QueueUrl"]
        filler = _fill(small_fs, 1_500_000)
        pad = "x" * 4000
        confirmed: set[str] = set()

        # Native: 507 store_full.
        native_errors: list[httpx.Response] = []
        for i in range(400):
            bodies = [f"n{i}-{j}-{pad}" for j in range(5)]
            r = http.post(
                "/v1/queues/native/messages/batch",
                json={"messages": [{"body": b} for b in bodies]},
            )
            if r.status_code == 200:
                confirmed.update(bodies)
            else:
                native_errors.append(r)
                if len(native_errors) >= 3:
                    break
        assert native_errors, "the disk never filled"
        assert {r.status_code for r in native_errors} == {507}
        assert native_errors[0].json()["error"]["code"] == "store_full"

        # SQS: ServiceUnavailable (503).
        sqs_error: ClientError | None = None
        for i in range(50):
            body = f"s{i}-{pad}"
            try:
                sqs.send_message(QueueUrl=sqs_url, MessageBody=body)
                confirmed.add(body)
            except ClientError as exc:
                sqs_error = exc
                break
        assert sqs_error is not None
        assert sqs_error.response["Error"]["Code"] == "ServiceUnavailable"
        assert sqs_error.response["ResponseMetadata"]["HTTPStatusCode"] == 503

        # AMQP with confirms: a nack, a channel error or Connection.Blocked.
        assert srv.amqp_port is not None
        params = pika.ConnectionParameters(
            "127.0.0.1", srv.amqp_port, blocked_connection_timeout=3, socket_timeout=5
        )
        amqp_refused: BaseException | None = None
        conn = pika.BlockingConnection(params)
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            for i in range(50):
                body = f"a{i}-{pad}"
                try:
                    ch.basic_publish("", "amqp", body.encode())
                    confirmed.add(body)
                except (
                    pika.exceptions.NackError,
                    pika.exceptions.AMQPChannelError,
                    pika.exceptions.AMQPConnectionError,
                ) as exc:
                    amqp_refused = exc
                    break
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        assert amqp_refused is not None
        assert http.get("/healthz").status_code == 200

        # Space returns: the same server stores again, on every front door.
        filler.unlink()
        time.sleep(0.2)
        r = http.post("/v1/queues/native/messages", json={"body": "after-native"})
        assert r.status_code == 200, r.text
        confirmed.add("after-native")
        sqs.send_message(QueueUrl=sqs_url, MessageBody="after-sqs")
        confirmed.add("after-sqs")
        conn = pika.BlockingConnection(params)
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", "amqp", b"after-amqp")
        confirmed.add("after-amqp")
        conn.close()

        got: set[str] = set()
        for name in ("native", "sqs", "amqp"):
            while True:
                r = http.post(f"/v1/queues/{name}/receive", json={"max_messages": 100})
                msgs = r.json()["messages"]
                if not msgs:
                    break
                got.update(m["body"] for m in msgs)
                http.post(
                    f"/v1/queues/{name}/ack/batch",
                    json={"receipts": [m["receipt"] for m in msgs]},
                ).raise_for_status()
        lost = confirmed - got
        assert not lost, f"{len(lost)} confirmed messages lost"
        assert len(confirmed) > 50
        http.close()
    finally:
        srv.stop()
