"""boto3 against a real ``conveyor serve`` process: the SQS API on the HTTP port, next
to the native API, and messages crossing between the two."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.client import connect
from serverproc import ServerProcess
from sqs_support import make_client


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("sqs-serve"), amqp=False) as srv:
        yield srv


@pytest.fixture(scope="module")
def sqs(server: ServerProcess) -> Any:
    return make_client(server.http_url)


def test_seed_snippet(sqs: Any) -> None:
    queue_url = sqs.create_queue(QueueName="my-queue")["QueueUrl"]
    sqs.send_message(QueueUrl=queue_url, MessageBody="Process order #12345")
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)
    assert [m["Body"] for m in messages["Messages"]] == ["Process order #12345"]
    for message in messages["Messages"]:
        sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    assert "Messages" not in sqs.receive_message(QueueUrl=queue_url)


def test_errors_through_the_server(sqs: Any, server: ServerProcess) -> None:
    with pytest.raises(sqs.exceptions.QueueDoesNotExist):
        sqs.get_queue_url(QueueName="not-there")
    # The native API still answers on the same port.
    import httpx

    assert httpx.get(server.http_url + "/healthz").status_code == 200


def test_interop_with_the_python_client(sqs: Any, server: ServerProcess, tmp_path: Path) -> None:
    url = sqs.create_queue(QueueName="interop")["QueueUrl"]
    sqs.send_message(
        QueueUrl=url,
        MessageBody="from sqs",
        MessageAttributes={
            "kind": {"DataType": "String", "StringValue": "order"},
            "qty": {"DataType": "Number", "StringValue": "3"},
        },
    )
    with connect(server.http_url) as conn:
        q = conn.get_queue("interop")
        got = q.receive(1)
        assert got[0].body == b"from sqs"
        assert got[0].headers["kind"] == "order" and got[0].headers["qty"] == 3
        got[0].ack()
        q.send("from native", headers={"kind": "refund", "rush": True})

        # A dead-letter queue configured natively works through SQS.
        conn.queue("interop-dlq")
        src = conn.queue("interop-src", dead_letter="interop-dlq", max_receives=1,
                         visibility_timeout=0)  # fmt: skip
        src.send("poison")
    m = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"])["Messages"][0]
    assert m["Body"] == "from native"
    assert m["MessageAttributes"]["kind"] == {"DataType": "String", "StringValue": "refund"}
    assert m["MessageAttributes"]["rush"] == {"DataType": "String", "StringValue": "true"}

    src_url = sqs.get_queue_url(QueueName="interop-src")["QueueUrl"]
    dlq_url = sqs.get_queue_url(QueueName="interop-dlq")["QueueUrl"]
    policy = sqs.get_queue_attributes(QueueUrl=src_url, AttributeNames=["RedrivePolicy"])
    assert json.loads(policy["Attributes"]["RedrivePolicy"])["maxReceiveCount"] == 1
    assert sqs.receive_message(QueueUrl=src_url)["Messages"][0]["Body"] == "poison"
    assert "Messages" not in sqs.receive_message(QueueUrl=src_url)
    dead = sqs.receive_message(QueueUrl=dlq_url, AttributeNames=["DeadLetterQueueSourceArn"])
    assert dead["Messages"][0]["Body"] == "poison"
    assert dead["Messages"][0]["Attributes"]["DeadLetterQueueSourceArn"].endswith(":interop-src")
