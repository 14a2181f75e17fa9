"""boto3 (AWS JSON 1.0 protocol) against a real conveyor SQS endpoint.

One in-process server per module (a Broker plus the SQS handler on an ephemeral port);
every test uses its own queue names.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from conveyor.model import NewMessage, QueueOptions
from conveyor.protocols.sqs.messages import md5_of_attributes
from conveyor.protocols.sqs.shapes import MessageAttributeValue
from conveyor.server.sqs import SqsConfig
from sqs_support import KEY_ID, SECRET, InProcessSqs, make_client


@pytest.fixture(scope="module")
def srv() -> Iterator[InProcessSqs]:
    server = InProcessSqs().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sqs(srv: InProcessSqs) -> Any:
    return srv.client()


def qname(prefix: str = "q") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


# -- the seed example -----------------------------------------------------------------


def test_seed_snippet(srv: InProcessSqs) -> None:
    sqs = make_client(srv.url)
    queue_url = sqs.create_queue(QueueName="my-queue")["QueueUrl"]
    sqs.send_message(QueueUrl=queue_url, MessageBody="Process order #12345")
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)
    assert [m["Body"] for m in messages["Messages"]] == ["Process order #12345"]
    for message in messages["Messages"]:
        sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    assert "Messages" not in sqs.receive_message(QueueUrl=queue_url)
    sqs.delete_queue(QueueUrl=queue_url)


# -- queues ---------------------------------------------------------------------------


def test_create_queue_url_and_idempotency(sqs: Any, srv: InProcessSqs) -> None:
    name = qname()
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "45"})["QueueUrl"]
    assert url == f"{srv.url}/000000000000/{name}"
    # Same attributes: same URL. Different: QueueNameExists.
    again = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "45"})
    assert again["QueueUrl"] == url
    with pytest.raises(sqs.exceptions.QueueNameExists) as exc:
        sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "46"})
    assert error_code(exc) == "QueueAlreadyExists"
    assert sqs.get_queue_url(QueueName=name)["QueueUrl"] == url


@pytest.mark.parametrize(
    ("name", "attributes", "code"),
    [
        ("has space", {}, "InvalidParameterValue"),
        ("x" * 81, {}, "InvalidParameterValue"),
        ("ends.fifo", {}, "InvalidParameterValue"),
        ("nofifosuffix", {"FifoQueue": "true"}, "InvalidParameterValue"),
        ("ok1", {"VisibilityTimeout": "43201"}, "InvalidAttributeValue"),
        ("ok2", {"DelaySeconds": "901"}, "InvalidAttributeValue"),
        ("ok3", {"MessageRetentionPeriod": "59"}, "InvalidAttributeValue"),
        ("ok4", {"MaximumMessageSize": "1023"}, "InvalidAttributeValue"),
        ("ok5", {"ReceiveMessageWaitTimeSeconds": "21"}, "InvalidAttributeValue"),
        ("ok6", {"Bogus": "1"}, "InvalidAttributeName"),
        ("ok7", {"ContentBasedDeduplication": "true"}, "InvalidAttributeName"),
        ("ok8", {"QueueArn": "x"}, "InvalidAttributeName"),
        ("ok9", {"RedrivePolicy": "not json"}, "InvalidAttributeValue"),
    ],
)
def test_create_queue_validation(
    sqs: Any, name: str, attributes: dict[str, str], code: str
) -> None:
    with pytest.raises(ClientError) as exc:
        sqs.create_queue(QueueName=name, Attributes=attributes)
    assert error_code(exc) == code
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert exc.value.response["ResponseMetadata"]["RequestId"]


def test_queue_does_not_exist_everywhere(sqs: Any, srv: InProcessSqs) -> None:
    url = f"{srv.url}/000000000000/{qname('missing')}"
    calls = [
        lambda: sqs.get_queue_url(QueueName="missing-queue-x"),
        lambda: sqs.send_message(QueueUrl=url, MessageBody="x"),
        lambda: sqs.receive_message(QueueUrl=url),
        lambda: sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]),
        lambda: sqs.delete_queue(QueueUrl=url),
        lambda: sqs.purge_queue(QueueUrl=url),
        lambda: sqs.list_queue_tags(QueueUrl=url),
        lambda: sqs.set_queue_attributes(QueueUrl=url, Attributes={"DelaySeconds": "1"}),
    ]
    for call in calls:
        with pytest.raises(sqs.exceptions.QueueDoesNotExist) as exc:
            call()
        assert error_code(exc) == "AWS.SimpleQueueService.NonExistentQueue"
        assert exc.value.response["Error"]["QueryErrorCode"] == "QueueDoesNotExist"


def test_queue_url_host_is_ignored(sqs: Any) -> None:
    name = qname()
    sqs.create_queue(QueueName=name)
    other_host = f"http://sqs.example.invalid:1234/000000000000/{name}"
    sqs.send_message(QueueUrl=other_host, MessageBody="hi")
    got = sqs.receive_message(QueueUrl=other_host)["Messages"]
    assert got[0]["Body"] == "hi"


def test_list_queues_prefix_and_pagination(sqs: Any) -> None:
    prefix = qname("list")
    names = [f"{prefix}-{i:02d}" for i in range(7)]
    for n in names:
        sqs.create_queue(QueueName=n)
    urls = sqs.list_queues(QueueNamePrefix=prefix)["QueueUrls"]
    assert [u.rsplit("/", 1)[1] for u in urls] == names
    seen: list[str] = []
    kwargs: dict[str, Any] = {"QueueNamePrefix": prefix, "MaxResults": 3}
    while True:
        page = sqs.list_queues(**kwargs)
        seen += [u.rsplit("/", 1)[1] for u in page["QueueUrls"]]
        if "NextToken" not in page:
            break
        kwargs["NextToken"] = page["NextToken"]
    assert seen == names
    # boto3's paginator works too
    paginator = sqs.get_paginator("list_queues")
    pages = list(paginator.paginate(QueueNamePrefix=prefix, PaginationConfig={"PageSize": 2}))
    assert sum(len(p["QueueUrls"]) for p in pages) == 7
    assert "QueueUrls" not in sqs.list_queues(QueueNamePrefix=qname("none"))
    with pytest.raises(ClientError) as exc:
        sqs.list_queues(MaxResults=1001)
    assert error_code(exc) == "InvalidParameterValue"


def test_queue_attributes_roundtrip(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname())["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["VisibilityTimeout"] == "30"
    assert attrs["MessageRetentionPeriod"] == "345600"
    assert attrs["MaximumMessageSize"] == "1048576"
    assert attrs["DelaySeconds"] == "0"
    assert attrs["ReceiveMessageWaitTimeSeconds"] == "0"
    assert attrs["QueueArn"].startswith("arn:aws:sqs:us-east-1:000000000000:")
    assert int(attrs["CreatedTimestamp"]) > 1_600_000_000
    assert "FifoQueue" not in attrs
    new = {
        "VisibilityTimeout": "5",
        "DelaySeconds": "2",
        "MessageRetentionPeriod": "600",
        "MaximumMessageSize": "2048",
        "ReceiveMessageWaitTimeSeconds": "3",
        "KmsMasterKeyId": "alias/aws/sqs",
        "KmsDataKeyReusePeriodSeconds": "300",
        "Policy": json.dumps({"Version": "2012-10-17", "Statement": []}),
    }
    sqs.set_queue_attributes(QueueUrl=url, Attributes=new)
    got = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(new))["Attributes"]
    assert got == new
    only = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["DelaySeconds"])
    assert only["Attributes"] == {"DelaySeconds": "2"}
    assert "Attributes" not in sqs.get_queue_attributes(
        QueueUrl=url
    ) or not sqs.get_queue_attributes(QueueUrl=url).get("Attributes")
    with pytest.raises(sqs.exceptions.InvalidAttributeName):
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Nope"])
    with pytest.raises(ClientError) as exc:
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "-1"})
    assert error_code(exc) == "InvalidAttributeValue"


def test_approximate_counts(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname())["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="ready")
    sqs.send_message(QueueUrl=url, MessageBody="ready2")
    sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=600)
    sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1)
    attrs = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=[
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ],
    )["Attributes"]
    assert attrs == {
        "ApproximateNumberOfMessages": "1",
        "ApproximateNumberOfMessagesNotVisible": "1",
        "ApproximateNumberOfMessagesDelayed": "1",
    }


def test_tags(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname(), tags={"team": "a", "env": "dev"})["QueueUrl"]
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "a", "env": "dev"}
    sqs.tag_queue(QueueUrl=url, Tags={"env": "prod", "cost": "1"})
    sqs.untag_queue(QueueUrl=url, TagKeys=["team"])
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"env": "prod", "cost": "1"}
    sqs.untag_queue(QueueUrl=url, TagKeys=["env", "cost"])
    assert "Tags" not in sqs.list_queue_tags(QueueUrl=url)


def test_permissions_stored_in_policy(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname())["QueueUrl"]
    sqs.add_permission(
        QueueUrl=url, Label="l1", AWSAccountIds=["111122223333"], Actions=["SendMessage"]
    )
    policy = json.loads(
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"])["Attributes"]["Policy"]
    )
    assert [s["Sid"] for s in policy["Statement"]] == ["l1"]
    assert policy["Statement"][0]["Action"] == "SQS:SendMessage"
    with pytest.raises(ClientError) as exc:
        sqs.add_permission(
            QueueUrl=url, Label="l1", AWSAccountIds=["111122223333"], Actions=["SendMessage"]
        )
    assert error_code(exc) == "InvalidParameterValue"
    sqs.remove_permission(QueueUrl=url, Label="l1")
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"]).get("Attributes", {})
    assert "Policy" not in attrs
    with pytest.raises(ClientError) as exc:
        sqs.remove_permission(QueueUrl=url, Label="l1")
    assert error_code(exc) == "InvalidParameterValue"


def test_delete_and_purge(sqs: Any, srv: InProcessSqs) -> None:
    url = sqs.create_queue(QueueName=qname())["QueueUrl"]
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
    sqs.purge_queue(QueueUrl=url)
    assert "Messages" not in sqs.receive_message(QueueUrl=url)
    sqs.delete_queue(QueueUrl=url)
    with pytest.raises(sqs.exceptions.QueueDoesNotExist):
        sqs.get_queue_attributes(QueueUrl=url)


def test_purge_once_a_minute() -> None:
    server = InProcessSqs(SqsConfig(purge_interval=60)).start()
    try:
        sqs = server.client()
        url = sqs.create_queue(QueueName="p")["QueueUrl"]
        sqs.purge_queue(QueueUrl=url)
        with pytest.raises(sqs.exceptions.PurgeQueueInProgress) as exc:
            sqs.purge_queue(QueueUrl=url)
        assert error_code(exc) == "AWS.SimpleQueueService.PurgeQueueInProgress"
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    finally:
        server.stop()


# -- messages -------------------------------------------------------------------------

ATTRS: dict[str, Any] = {
    "s": {"DataType": "String", "StringValue": "héllo"},
    "n": {"DataType": "Number", "StringValue": "42"},
    "f": {"DataType": "Number", "StringValue": "1.50"},
    "b": {"DataType": "Binary", "BinaryValue": b"\x00\x01\xff"},
    "c": {"DataType": "String.custom", "StringValue": "x"},
}


def _md5(attrs: dict[str, Any]) -> str | None:
    return md5_of_attributes(
        {
            k: MessageAttributeValue(
                data_type=v["DataType"],
                string_value=v.get("StringValue"),
                binary_value=v.get("BinaryValue"),
            )
            for k, v in attrs.items()
        }
    )


def test_send_receive_attributes_and_md5s(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname())["QueueUrl"]
    body = "body ünïcode ✓"
    sent = sqs.send_message(QueueUrl=url, MessageBody=body, MessageAttributes=ATTRS)
    assert sent["MD5OfMessageBody"] == hashlib.md5(body.encode()).hexdigest()
    assert sent["MD5OfMessageAttributes"] == _md5(ATTRS)
    got = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"], AttributeNames=["All"])[
        "Messages"
    ][0]
    assert got["Body"] == body
    assert got["MD5OfBody"] == sent["MD5OfMessageBody"]
    assert got["MessageId"] == sent["MessageId"]
    assert got["MessageAttributes"] == ATTRS
    assert got["MD5OfMessageAttributes"] == sent["MD5OfMessageAttributes"]
    a = got["Attributes"]
    assert a["ApproximateReceiveCount"] == "1"
    assert abs(int(a["SentTimestamp"]) / 1000 - time.time()) < 60
    assert int(a["ApproximateFirstReceiveTimestamp"]) >= int(a["SentTimestamp"])
    assert a["SenderId"]


def test_receive_attribute_name_filters(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname())["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x", MessageAttributes=ATTRS)
    got = sqs.receive_message(
        QueueUrl=url,
        MessageAttributeNames=["s", "n"],
        MessageSystemAttributeNames=["SentTimestamp"],
    )["Messages"][0]
    assert set(got["MessageAttributes"]) == {"s", "n"}
    assert got["MD5OfMessageAttributes"] == _md5({k: ATTRS[k] for k in ("s", "n")})
    assert set(got["Attributes"]) == {"SentTimestamp"}
    sqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=got["ReceiptHandle"], VisibilityTimeout=0
    )
    plain = sqs.receive_message(QueueUrl=url)["Messages"][0]
    assert "MessageAttributes" not in plain and "MD5OfMessageAttributes" not in plain
    assert "Attributes" not in plain


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"MessageBody": ""}, "MissingParameter"),
        ({"MessageBody": "bad \x00 char"}, "InvalidMessageContents"),
        ({"MessageBody": "x", "DelaySeconds": 901}, "InvalidParameterValue"),
        ({"MessageBody": "x", "MessageDeduplicationId": "d"}, "InvalidParameterValue"),
        (
            {
                "MessageBody": "x",
                "MessageAttributes": {"AWS.x": {"DataType": "String", "StringValue": "v"}},
            },
            "InvalidParameterValue",
        ),
        (
            {
                "MessageBody": "x",
                "MessageAttributes": {"a": {"DataType": "Text", "StringValue": "v"}},
            },
            "InvalidParameterValue",
        ),
        (
            {
                "MessageBody": "x",
                "MessageAttributes": {"a": {"DataType": "Number", "StringValue": "abc"}},
            },
            "InvalidParameterValue",
        ),
        (
            {
                "MessageBody": "x",
                "MessageAttributes": {"a": {"DataType": "String", "StringValue": ""}},
            },
            "InvalidParameterValue",
        ),
        (
            {
                "MessageBody": "x",
                "MessageAttributes": {
                    f"a{i}": {"DataType": "String", "StringValue": "v"} for i in range(11)
                },
            },
            "InvalidParameterValue",
        ),
        ({"MessageBody": "x" * 2049}, "InvalidParameterValue"),
    ],
)
def test_send_validation(sqs: Any, kwargs: dict[str, Any], code: str) -> None:
    url = sqs.create_queue(QueueName="send-validation", Attributes={"MaximumMessageSize": "2048"})[
        "QueueUrl"
    ]
    with pytest.raises(ClientError) as exc:
        sqs.send_message(QueueUrl=url, **kwargs)
    assert error_code(exc) == code


def test_receive_validation(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname())["QueueUrl"]
    for kwargs in ({"MaxNumberOfMessages": 11}, {"MaxNumberOfMessages": 0},
                   {"WaitTimeSeconds": 21}, {"VisibilityTimeout": 43201}):  # fmt: skip
        with pytest.raises(ClientError) as exc:
            sqs.receive_message(QueueUrl=url, **kwargs)
        assert error_code(exc) == "InvalidParameterValue"


def test_visibility_timeout_and_new_receipts(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname(), Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="v")
    first = sqs.receive_message(QueueUrl=url)["Messages"][0]
    assert "Messages" not in sqs.receive_message(QueueUrl=url)
    second = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5)["Messages"][0]
    assert second["MessageId"] == first["MessageId"]
    assert second["ReceiptHandle"] != first["ReceiptHandle"]
    # An outdated receipt: DeleteMessage succeeds without deleting (as on SQS) ...
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])
    # ... and ChangeMessageVisibility refuses.
    with pytest.raises(ClientError) as exc:
        sqs.change_message_visibility(
            QueueUrl=url, ReceiptHandle=first["ReceiptHandle"], VisibilityTimeout=10
        )
    assert error_code(exc) == "InvalidParameterValue"
    sqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=second["ReceiptHandle"], VisibilityTimeout=0
    )
    third = sqs.receive_message(QueueUrl=url, AttributeNames=["ApproximateReceiveCount"])
    msg = third["Messages"][0]
    assert msg["Attributes"]["ApproximateReceiveCount"] == "3"
    sqs.delete_message(QueueUrl=url, ReceiptHandle=msg["ReceiptHandle"])
    with pytest.raises(sqs.exceptions.ReceiptHandleIsInvalid) as exc2:
        sqs.delete_message(QueueUrl=url, ReceiptHandle="garbage")
    assert exc2.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_receive_visibility_override(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname())["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="v")
    sqs.receive_message(QueueUrl=url, VisibilityTimeout=1)
    again = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5)
    assert again["Messages"][0]["Body"] == "v"


def test_delay_queue_and_message_delay(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname(), Attributes={"DelaySeconds": "1"})["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="queue-delay")
    sqs.send_message(QueueUrl=url, MessageBody="no-delay", DelaySeconds=0)
    got = sqs.receive_message(QueueUrl=url)["Messages"]
    assert [m["Body"] for m in got] == ["no-delay"]
    later = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5)["Messages"]
    assert [m["Body"] for m in later] == ["queue-delay"]


def test_long_poll_returns_early_when_a_message_arrives(sqs: Any, srv: InProcessSqs) -> None:
    url = sqs.create_queue(QueueName=qname())["QueueUrl"]
    sender = make_client(srv.url)
    timer = threading.Timer(0.3, lambda: sender.send_message(QueueUrl=url, MessageBody="late"))
    start = time.monotonic()
    timer.start()
    got = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=10)
    elapsed = time.monotonic() - start
    timer.join()
    assert got["Messages"][0]["Body"] == "late"
    assert 0.2 < elapsed < 3


def test_long_poll_from_queue_attribute(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname(), Attributes={"ReceiveMessageWaitTimeSeconds": "1"})[
        "QueueUrl"
    ]
    start = time.monotonic()
    assert "Messages" not in sqs.receive_message(QueueUrl=url)
    assert time.monotonic() - start >= 0.9
    start = time.monotonic()
    sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)
    assert time.monotonic() - start < 0.5


def test_retention_period_expires_messages(srv: InProcessSqs, sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname())["QueueUrl"]
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"MessageRetentionPeriod": "60"})
    info = srv.call(srv.broker.get_queue(url.rsplit("/", 1)[1]))
    assert info.options.message_ttl == 60.0


# -- batches --------------------------------------------------------------------------


def test_batch_partial_failures(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname())["QueueUrl"]
    res = sqs.send_message_batch(
        QueueUrl=url,
        Entries=[
            {"Id": "ok1", "MessageBody": "a"},
            {"Id": "bad", "MessageBody": "x", "DelaySeconds": 1000},
            {
                "Id": "ok2",
                "MessageBody": "b",
                "MessageAttributes": {"k": {"DataType": "String", "StringValue": "v"}},
            },
            {"Id": "bad2", "MessageBody": "\x01"},
        ],
    )
    assert [s["Id"] for s in res["Successful"]] == ["ok1", "ok2"]
    assert res["Successful"][0]["MD5OfMessageBody"] == hashlib.md5(b"a").hexdigest()
    assert "MD5OfMessageAttributes" in res["Successful"][1]
    failed = {f["Id"]: f for f in res["Failed"]}
    assert set(failed) == {"bad", "bad2"}
    assert failed["bad"]["SenderFault"] is True
    assert failed["bad"]["Code"] == "InvalidParameterValue"
    assert failed["bad2"]["Code"] == "InvalidMessageContents"

    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert sorted(m["Body"] for m in got) == ["a", "b"]
    deleted = sqs.delete_message_batch(
        QueueUrl=url,
        Entries=[{"Id": f"d{i}", "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)]
        + [{"Id": "junk", "ReceiptHandle": "not-a-receipt"}],
    )
    assert sorted(s["Id"] for s in deleted["Successful"]) == ["d0", "d1"]
    assert deleted["Failed"][0]["Id"] == "junk"
    assert deleted["Failed"][0]["Code"] == "ReceiptHandleIsInvalid"
    # Both lists are always present.
    empty_fail = sqs.delete_message_batch(
        QueueUrl=url, Entries=[{"Id": "x", "ReceiptHandle": got[0]["ReceiptHandle"]}]
    )
    assert empty_fail["Failed"] == [] and len(empty_fail["Successful"]) == 1


def test_batch_request_errors(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname())["QueueUrl"]
    cases: list[tuple[list[dict[str, Any]], str, str]] = [
        ([], "EmptyBatchRequest", "AWS.SimpleQueueService.EmptyBatchRequest"),
        (
            [{"Id": str(i), "MessageBody": "x"} for i in range(11)],
            "TooManyEntriesInBatchRequest",
            "AWS.SimpleQueueService.TooManyEntriesInBatchRequest",
        ),
        (
            [{"Id": "a", "MessageBody": "x"}, {"Id": "a", "MessageBody": "y"}],
            "BatchEntryIdsNotDistinct",
            "AWS.SimpleQueueService.BatchEntryIdsNotDistinct",
        ),
        (
            [{"Id": "bad id!", "MessageBody": "x"}],
            "InvalidBatchEntryId",
            "AWS.SimpleQueueService.InvalidBatchEntryId",
        ),
        (
            [{"Id": str(i), "MessageBody": "x" * 200_000} for i in range(6)],
            "BatchRequestTooLong",
            "AWS.SimpleQueueService.BatchRequestTooLong",
        ),
    ]
    for entries, shape, code in cases:
        with pytest.raises(getattr(sqs.exceptions, shape)) as exc:
            sqs.send_message_batch(QueueUrl=url, Entries=entries)
        assert error_code(exc) == code


def test_change_visibility_batch(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname())["QueueUrl"]
    sqs.send_message_batch(
        QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": str(i)} for i in range(3)]
    )
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert len(got) == 3
    res = sqs.change_message_visibility_batch(
        QueueUrl=url,
        Entries=[
            {"Id": "a", "ReceiptHandle": got[0]["ReceiptHandle"], "VisibilityTimeout": 0},
            {"Id": "b", "ReceiptHandle": got[1]["ReceiptHandle"], "VisibilityTimeout": 100},
            {"Id": "c", "ReceiptHandle": "garbage", "VisibilityTimeout": 0},
        ],
    )
    assert [s["Id"] for s in res["Successful"]] == ["a", "b"]
    assert [(f["Id"], f["Code"]) for f in res["Failed"]] == [("c", "ReceiptHandleIsInvalid")]
    again = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert [m["MessageId"] for m in again] == [got[0]["MessageId"]]


# -- FIFO -----------------------------------------------------------------------------


def test_fifo_validation(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=qname() + ".fifo", Attributes={"FifoQueue": "true"})[
        "QueueUrl"
    ]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["FifoQueue"] == "true"
    assert attrs["ContentBasedDeduplication"] == "false"
    with pytest.raises(ClientError) as exc:
        sqs.send_message(QueueUrl=url, MessageBody="x", MessageDeduplicationId="d")
    assert error_code(exc) == "MissingParameter"
    with pytest.raises(ClientError) as exc:
        sqs.send_message(QueueUrl=url, MessageBody="x", MessageGroupId="g")
    assert error_code(exc) == "InvalidParameterValue"
    with pytest.raises(ClientError) as exc:
        sqs.send_message(
            QueueUrl=url,
            MessageBody="x",
            MessageGroupId="g",
            MessageDeduplicationId="d",
            DelaySeconds=5,
        )
    assert error_code(exc) == "InvalidParameterValue"


def test_fifo_dedup_and_sequence(sqs: Any) -> None:
    url = sqs.create_queue(
        QueueName=qname() + ".fifo",
        Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "true"},
    )["QueueUrl"]
    a = sqs.send_message(QueueUrl=url, MessageBody="same", MessageGroupId="g")
    b = sqs.send_message(QueueUrl=url, MessageBody="same", MessageGroupId="g")
    c = sqs.send_message(
        QueueUrl=url, MessageBody="same", MessageGroupId="g", MessageDeduplicationId="explicit"
    )
    assert a["MessageId"] == b["MessageId"] != c["MessageId"]
    assert len(a["SequenceNumber"]) == 20
    assert int(c["SequenceNumber"]) > int(a["SequenceNumber"])
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"])
    msgs = got["Messages"]
    # (SQS may return both messages of the group at once; the engine leases one per group.)
    while len(msgs) < 2:
        sqs.delete_message(QueueUrl=url, ReceiptHandle=msgs[-1]["ReceiptHandle"])
        msgs += sqs.receive_message(QueueUrl=url, AttributeNames=["All"])["Messages"]
    assert [m["MessageId"] for m in msgs] == [a["MessageId"], c["MessageId"]]
    first = msgs[0]["Attributes"]
    assert first["MessageGroupId"] == "g"
    assert first["MessageDeduplicationId"] == hashlib.sha256(b"same").hexdigest()
    assert first["SequenceNumber"] == a["SequenceNumber"]


def test_fifo_order_and_one_group_in_flight_under_concurrent_consumers(srv: InProcessSqs) -> None:
    sqs = srv.client()
    url = sqs.create_queue(
        QueueName=qname() + ".fifo",
        Attributes={"FifoQueue": "true", "VisibilityTimeout": "30"},
    )["QueueUrl"]
    groups = ["g1", "g2", "g3"]
    per_group = 12
    for i in range(per_group):
        sqs.send_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": g, "MessageBody": f"{g}:{i}", "MessageGroupId": g,
                 "MessageDeduplicationId": f"{g}-{i}"}
                for g in groups
            ],
        )  # fmt: skip
    order: dict[str, list[int]] = {g: [] for g in groups}
    in_flight: set[str] = set()
    lock = threading.Lock()
    violations: list[str] = []

    def consume() -> None:
        client = srv.client()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with lock:
                if sum(map(len, order.values())) == per_group * len(groups):
                    return
            got = client.receive_message(QueueUrl=url, MaxNumberOfMessages=2)
            msgs = got.get("Messages", [])
            if not msgs:
                time.sleep(0.01)
                continue
            batch_groups = {m["Body"].split(":")[0] for m in msgs}
            with lock:
                for g in batch_groups:
                    if g in in_flight:
                        violations.append(g)
                    in_flight.add(g)
                for m in msgs:
                    g, i = m["Body"].split(":")
                    order[g].append(int(i))
            time.sleep(0.005)
            with lock:
                in_flight.difference_update(batch_groups)
            client.delete_message_batch(
                QueueUrl=url,
                Entries=[{"Id": str(k), "ReceiptHandle": m["ReceiptHandle"]}
                         for k, m in enumerate(msgs)],
            )  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(consume) for _ in range(4)]:
            f.result()
    assert violations == []
    for g in groups:
        assert order[g] == list(range(per_group)), g


# -- dead letters and move tasks ------------------------------------------------------


def test_redrive_policy_moves_after_max_receives(sqs: Any, srv: InProcessSqs) -> None:
    dlq_url = sqs.create_queue(QueueName=qname("dlq"))["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 2})
    src_url = sqs.create_queue(
        QueueName=qname("src"), Attributes={"RedrivePolicy": policy, "VisibilityTimeout": "0"}
    )["QueueUrl"]
    got_policy = sqs.get_queue_attributes(QueueUrl=src_url, AttributeNames=["RedrivePolicy"])
    assert json.loads(got_policy["Attributes"]["RedrivePolicy"]) == json.loads(policy)
    sources = sqs.list_dead_letter_source_queues(QueueUrl=dlq_url)["queueUrls"]
    assert sources == [src_url]

    sqs.send_message(QueueUrl=src_url, MessageBody="poison")
    for _ in range(2):
        assert sqs.receive_message(QueueUrl=src_url)["Messages"][0]["Body"] == "poison"
    assert "Messages" not in sqs.receive_message(QueueUrl=src_url)
    dead = sqs.receive_message(QueueUrl=dlq_url, AttributeNames=["All"])["Messages"][0]
    assert dead["Body"] == "poison"
    src_arn = sqs.get_queue_attributes(QueueUrl=src_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    assert dead["Attributes"]["DeadLetterQueueSourceArn"] == src_arn
    sqs.change_message_visibility(
        QueueUrl=dlq_url, ReceiptHandle=dead["ReceiptHandle"], VisibilityTimeout=0
    )

    # Move it back with a message move task.
    handle = sqs.start_message_move_task(SourceArn=dlq_arn)["TaskHandle"]
    deadline = time.monotonic() + 5
    while True:
        tasks = sqs.list_message_move_tasks(SourceArn=dlq_arn, MaxResults=10)["Results"]
        if tasks[0]["Status"] != "RUNNING" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert tasks[0]["Status"] == "COMPLETED"
    assert tasks[0]["ApproximateNumberOfMessagesMoved"] == 1
    assert "TaskHandle" not in tasks[0]
    with pytest.raises(sqs.exceptions.ResourceNotFoundException):
        sqs.cancel_message_move_task(TaskHandle=handle)
    back = sqs.receive_message(QueueUrl=src_url)["Messages"][0]
    assert back["Body"] == "poison"

    # Removing the policy.
    sqs.set_queue_attributes(QueueUrl=src_url, Attributes={"RedrivePolicy": ""})
    attrs = sqs.get_queue_attributes(QueueUrl=src_url, AttributeNames=["All"])["Attributes"]
    assert "RedrivePolicy" not in attrs


def test_redrive_policy_errors(sqs: Any) -> None:
    missing = "arn:aws:sqs:us-east-1:000000000000:" + qname("nope")
    with pytest.raises(ClientError) as exc:
        sqs.create_queue(
            QueueName=qname(),
            Attributes={
                "RedrivePolicy": json.dumps({"deadLetterTargetArn": missing, "maxReceiveCount": 3})
            },
        )
    assert error_code(exc) == "InvalidParameterValue"
    dlq_url = sqs.create_queue(
        QueueName=qname("dlq"),
        Attributes={"RedriveAllowPolicy": json.dumps({"redrivePermission": "denyAll"})},
    )["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    with pytest.raises(ClientError) as exc:
        sqs.create_queue(
            QueueName=qname(),
            Attributes={
                "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3})
            },
        )
    assert error_code(exc) == "InvalidParameterValue"
    with pytest.raises(ClientError) as exc:
        sqs.create_queue(
            QueueName=qname(),
            Attributes={
                "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 0})
            },
        )
    assert error_code(exc) == "InvalidParameterValue"
    with pytest.raises(ClientError) as exc:
        sqs.start_message_move_task(SourceArn=dlq_arn)
    assert error_code(exc) == "InvalidParameterValue"
    with pytest.raises(sqs.exceptions.ResourceNotFoundException):
        sqs.start_message_move_task(SourceArn=missing)


def test_move_task_with_rate_can_be_cancelled(sqs: Any) -> None:
    dlq_url = sqs.create_queue(QueueName=qname("dlq"))["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 1})
    src_url = sqs.create_queue(QueueName=qname("src"), Attributes={"RedrivePolicy": policy})[
        "QueueUrl"
    ]
    dest_url = sqs.create_queue(QueueName=qname("dest"))["QueueUrl"]
    dest_arn = sqs.get_queue_attributes(QueueUrl=dest_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    assert src_url
    sqs.send_message_batch(
        QueueUrl=dlq_url, Entries=[{"Id": str(i), "MessageBody": str(i)} for i in range(5)]
    )
    handle = sqs.start_message_move_task(
        SourceArn=dlq_arn, DestinationArn=dest_arn, MaxNumberOfMessagesPerSecond=1
    )["TaskHandle"]
    running = sqs.list_message_move_tasks(SourceArn=dlq_arn)["Results"][0]
    assert running["Status"] == "RUNNING" and running["TaskHandle"] == handle
    with pytest.raises(ClientError):
        sqs.start_message_move_task(SourceArn=dlq_arn)
    moved = sqs.cancel_message_move_task(TaskHandle=handle)["ApproximateNumberOfMessagesMoved"]
    assert 0 <= moved < 5
    assert sqs.list_message_move_tasks(SourceArn=dlq_arn)["Results"][0]["Status"] == "CANCELLED"


# -- interop with the engine API --------------------------------------------------------


def test_sqs_to_native_and_back(srv: InProcessSqs, sqs: Any) -> None:
    name = qname("interop")
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.send_message(
        QueueUrl=url,
        MessageBody="from sqs",
        MessageAttributes=ATTRS,
        MessageSystemAttributes={"AWSTraceHeader": {"DataType": "String", "StringValue": "Root=1"}},
    )
    got = srv.call(srv.broker.receive(name, 1))
    d = got[0]
    assert d.body == b"from sqs"
    assert d.headers["s"] == "héllo"
    assert d.headers["n"] == 42
    assert d.headers["b"] == b"\x00\x01\xff"
    assert d.headers["f"] == "1.50"
    assert d.receipt is not None
    srv.call(srv.broker.ack(name, d.receipt))

    srv.call(
        srv.broker.send(
            name,
            NewMessage(body=b"from native", headers={"kind": "order", "qty": 3, "ok": True,
                                                     "ratio": 0.5, "raw": b"\x01"}),
        )
    )  # fmt: skip
    m = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"])["Messages"][0]
    assert m["Body"] == "from native"
    assert m["MessageAttributes"] == {
        "kind": {"DataType": "String", "StringValue": "order"},
        "qty": {"DataType": "Number", "StringValue": "3"},
        "ok": {"DataType": "String", "StringValue": "true"},
        "ratio": {"DataType": "Number", "StringValue": "0.5"},
        "raw": {"DataType": "Binary", "BinaryValue": b"\x01"},
    }
    assert m["MD5OfMessageAttributes"] == _md5(m["MessageAttributes"])


def test_native_dead_letter_queue_visible_to_sqs(srv: InProcessSqs, sqs: Any) -> None:
    dlq, src = qname("ndlq"), qname("nsrc")
    srv.call(srv.broker.declare_queue(dlq))
    srv.call(srv.broker.declare_queue(src, QueueOptions(dead_letter=dlq, max_receives=1)))
    src_url = sqs.get_queue_url(QueueName=src)["QueueUrl"]
    dlq_url = sqs.get_queue_url(QueueName=dlq)["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=src_url, AttributeNames=["RedrivePolicy"])
    policy = json.loads(attrs["Attributes"]["RedrivePolicy"])
    assert policy["maxReceiveCount"] == 1
    assert policy["deadLetterTargetArn"].endswith(":" + dlq)
    assert sqs.list_dead_letter_source_queues(QueueUrl=dlq_url)["queueUrls"] == [src_url]
    # And an SQS-configured DLQ is the engine's dead_letter.
    src2 = qname("s2")
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sqs.create_queue(
        QueueName=src2,
        Attributes={
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 4})
        },
    )
    info = srv.call(srv.broker.get_queue(src2))
    assert info.options.dead_letter == dlq and info.options.max_receives == 4


# -- regions and signatures -----------------------------------------------------------


def test_regions_are_separate(srv: InProcessSqs) -> None:
    east, west = srv.client("us-east-1"), srv.client("us-west-2")
    name = qname("reg")
    east_url = east.create_queue(QueueName=name)["QueueUrl"]
    west_url = west.create_queue(QueueName=name)["QueueUrl"]
    assert west_url.endswith(f"/queue/us-west-2/000000000000/{name}")
    assert east_url != west_url
    west.send_message(QueueUrl=west_url, MessageBody="west")
    assert "Messages" not in east.receive_message(QueueUrl=east_url)
    # A URL names its region, whichever region the client signs for.
    assert east.receive_message(QueueUrl=west_url)["Messages"][0]["Body"] == "west"
    assert [u for u in west.list_queues(QueueNamePrefix=name)["QueueUrls"]] == [west_url]
    assert [u for u in east.list_queues(QueueNamePrefix=name)["QueueUrls"]] == [east_url]
    arn = west.get_queue_attributes(QueueUrl=west_url, AttributeNames=["QueueArn"])
    assert arn["Attributes"]["QueueArn"] == f"arn:aws:sqs:us-west-2:000000000000:{name}"


def test_sigv4_enforced_when_keys_are_configured() -> None:
    server = InProcessSqs(SqsConfig(access_keys={KEY_ID: SECRET}, purge_interval=0)).start()
    try:
        good = server.client()
        url = good.create_queue(QueueName="signed")["QueueUrl"]
        good.send_message(QueueUrl=url, MessageBody=base64.b64encode(b"x" * 100).decode())
        assert good.receive_message(QueueUrl=url)["Messages"]
        wrong_secret = make_client(server.url, secret="not-the-secret")
        with pytest.raises(ClientError) as exc:
            wrong_secret.list_queues()
        assert error_code(exc) == "SignatureDoesNotMatch"
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        unknown_key = make_client(server.url, key="AKIDUNKNOWN")
        with pytest.raises(ClientError) as exc:
            unknown_key.list_queues()
        assert error_code(exc) == "InvalidClientTokenId"
    finally:
        server.stop()


def test_unknown_operation_is_an_error(srv: InProcessSqs) -> None:
    import httpx

    r = httpx.post(
        srv.url + "/",
        headers={"X-Amz-Target": "AmazonSQS.Nope", "Content-Type": "application/x-amz-json-1.0"},
        content=b"{}",
    )
    assert r.status_code == 400
    assert r.headers["x-amzn-query-error"] == "InvalidAction;Sender"
    assert r.headers["x-amzn-RequestId"]
    r = httpx.post(
        srv.url + "/",
        headers={
            "X-Amz-Target": "AmazonSQS.SendMessage",
            "Content-Type": "application/x-amz-json-1.0",
        },
        content=b'{"MessageBody": "x"}',
    )
    assert r.status_code == 400
    assert r.json()["__type"].endswith("#MissingRequiredParameterException")
    assert r.headers["x-amzn-query-error"] == "MissingParameter;Sender"
