"""Sans-I/O SQS: bytes and values in, objects out (no server, no sockets)."""

from __future__ import annotations

import hashlib
import json
import time
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from conveyor.model import QueueOptions
from conveyor.protocols.sqs import attributes as A
from conveyor.protocols.sqs import codec, sigv4
from conveyor.protocols.sqs import messages as M
from conveyor.protocols.sqs import names as N
from conveyor.protocols.sqs import shapes as S
from conveyor.protocols.sqs.errors import SqsError

V = S.MessageAttributeValue

# -- query-protocol parameters -> typed requests ----------------------------------------

QUERY_CASES: list[tuple[dict[str, str], Any]] = [
    (
        {"Action": "CreateQueue", "QueueName": "q", "Attribute.1.Name": "DelaySeconds",
         "Attribute.1.Value": "5", "Attribute.2.Name": "VisibilityTimeout",
         "Attribute.2.Value": "9", "Tag.1.Key": "team", "Tag.1.Value": "a"},
        S.CreateQueueRequest(queue_name="q",
                             attributes={"DelaySeconds": "5", "VisibilityTimeout": "9"},
                             tags={"team": "a"}),
    ),
    (
        {"Action": "SendMessage", "QueueUrl": "/1/q", "MessageBody": "b", "DelaySeconds": "3",
         "MessageAttribute.1.Name": "n", "MessageAttribute.1.Value.DataType": "Number",
         "MessageAttribute.1.Value.StringValue": "1",
         "MessageAttribute.2.Name": "bin", "MessageAttribute.2.Value.DataType": "Binary",
         "MessageAttribute.2.Value.BinaryValue": "AAE=",
         "MessageSystemAttribute.1.Name": "AWSTraceHeader",
         "MessageSystemAttribute.1.Value.DataType": "String",
         "MessageSystemAttribute.1.Value.StringValue": "Root=1"},
        S.SendMessageRequest(
            queue_url="/1/q", message_body="b", delay_seconds=3,
            message_attributes={"n": V(data_type="Number", string_value="1"),
                                "bin": V(data_type="Binary", binary_value=b"\x00\x01")},
            message_system_attributes={"AWSTraceHeader": V(data_type="String",
                                                            string_value="Root=1")},
        ),
    ),
    (
        {"Action": "SendMessageBatch", "QueueUrl": "u",
         "SendMessageBatchRequestEntry.2.Id": "b",
         "SendMessageBatchRequestEntry.2.MessageBody": "2",
         "SendMessageBatchRequestEntry.1.Id": "a",
         "SendMessageBatchRequestEntry.1.MessageBody": "1",
         "SendMessageBatchRequestEntry.1.MessageGroupId": "g",
         "SendMessageBatchRequestEntry.10.Id": "c",
         "SendMessageBatchRequestEntry.10.MessageBody": "10"},
        S.SendMessageBatchRequest(queue_url="u", entries=[
            S.SendMessageBatchRequestEntry(id="a", message_body="1", message_group_id="g"),
            S.SendMessageBatchRequestEntry(id="b", message_body="2"),
            S.SendMessageBatchRequestEntry(id="c", message_body="10"),
        ]),
    ),
    (
        {"Action": "ReceiveMessage", "QueueUrl": "u", "AttributeName.1": "All",
         "MessageAttributeName.1": "a.*", "MessageAttributeName.2": "b",
         "MaxNumberOfMessages": "10", "WaitTimeSeconds": "20", "VisibilityTimeout": "0"},
        S.ReceiveMessageRequest(queue_url="u", attribute_names=["All"],
                                message_attribute_names=["a.*", "b"],
                                max_number_of_messages=10, wait_time_seconds=20,
                                visibility_timeout=0),
    ),
    (
        {"Action": "DeleteMessageBatch", "QueueUrl": "u",
         "DeleteMessageBatchRequestEntry.1.Id": "x",
         "DeleteMessageBatchRequestEntry.1.ReceiptHandle": "r"},
        S.DeleteMessageBatchRequest(queue_url="u", entries=[
            S.DeleteMessageBatchRequestEntry(id="x", receipt_handle="r")]),
    ),
    (
        {"Action": "ChangeMessageVisibilityBatch", "QueueUrl": "u",
         "ChangeMessageVisibilityBatchRequestEntry.1.Id": "x",
         "ChangeMessageVisibilityBatchRequestEntry.1.ReceiptHandle": "r",
         "ChangeMessageVisibilityBatchRequestEntry.1.VisibilityTimeout": "7"},
        S.ChangeMessageVisibilityBatchRequest(queue_url="u", entries=[
            S.ChangeMessageVisibilityBatchRequestEntry(id="x", receipt_handle="r",
                                                       visibility_timeout=7)]),
    ),
    (
        {"Action": "AddPermission", "QueueUrl": "u", "Label": "l", "AWSAccountId.1": "1",
         "AWSAccountId.2": "2", "ActionName.1": "SendMessage"},
        S.AddPermissionRequest(queue_url="u", label="l", aws_account_ids=["1", "2"],
                               actions=["SendMessage"]),
    ),
    (
        {"Action": "UntagQueue", "QueueUrl": "u", "TagKey.1": "a", "TagKey.2": "b"},
        S.UntagQueueRequest(queue_url="u", tag_keys=["a", "b"]),
    ),
    (
        {"Action": "TagQueue", "QueueUrl": "u", "Tag.1.Key": "a", "Tag.1.Value": ""},
        S.TagQueueRequest(queue_url="u", tags={"a": ""}),
    ),
    (
        {"Action": "ListQueues", "QueueNamePrefix": "p", "MaxResults": "5", "Version": "x"},
        S.ListQueuesRequest(queue_name_prefix="p", max_results=5),
    ),
    (
        {"Action": "GetQueueUrl", "QueueName": "q", "QueueOwnerAWSAccountId": "123"},
        S.GetQueueUrlRequest(queue_name="q", queue_owner_aws_account_id="123"),
    ),
    (
        {"Action": "StartMessageMoveTask", "SourceArn": "a",
         "MaxNumberOfMessagesPerSecond": "9"},
        S.StartMessageMoveTaskRequest(source_arn="a", max_number_of_messages_per_second=9),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("params", "expected"), QUERY_CASES)
def test_parse_query(params: dict[str, str], expected: Any) -> None:
    op, request = codec.parse_query_request(params)
    assert op == params["Action"]
    assert request == expected


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({}, "MissingAction"),
        ({"Action": "Nope"}, "InvalidAction"),
        ({"Action": "SendMessage", "QueueUrl": "u"}, "MissingParameter"),
        ({"Action": "ReceiveMessage", "QueueUrl": "u", "MaxNumberOfMessages": "ten"},
         "InvalidParameterValue"),
        ({"Action": "SendMessageBatch", "QueueUrl": "u",
          "SendMessageBatchRequestEntry.1.Id": "a"}, "MissingParameter"),
    ],
)  # fmt: skip
def test_parse_query_errors(params: dict[str, str], code: str) -> None:
    with pytest.raises(SqsError) as exc:
        codec.parse_query_request(params)
    assert exc.value.code == code


def test_parse_form_body() -> None:
    form = codec.parse_form(b"Action=SendMessage&MessageBody=a%26b+c&Empty=")
    assert form == {"Action": "SendMessage", "MessageBody": "a&b c", "Empty": ""}


# -- JSON 1.0 -------------------------------------------------------------------------


def test_parse_json() -> None:
    body = json.dumps({
        "QueueUrl": "u", "MessageBody": "x", "Unknown": 1,
        "MessageAttributes": {"b": {"DataType": "Binary", "BinaryValue": "AAE="}},
    }).encode()  # fmt: skip
    req = codec.parse_json_request("SendMessage", body)
    assert req == S.SendMessageRequest(
        queue_url="u", message_body="x",
        message_attributes={"b": V(data_type="Binary", binary_value=b"\x00\x01")},
    )  # fmt: skip
    assert codec.operation_from_target("AmazonSQS.ListQueues") == "ListQueues"


@pytest.mark.parametrize(
    ("op", "body", "shape", "code"),
    [
        ("SendMessage", b'{"QueueUrl": "u"}', "MissingRequiredParameterException",
         "MissingParameter"),
        ("SendMessage", b'{"QueueUrl": 1, "MessageBody": "x"}', "InvalidParameterValueException",
         "InvalidParameterValue"),
        ("SendMessage", b"{not json", "SerializationException", "MalformedQueryString"),
        ("Nope", b"{}", "UnknownOperationException", "InvalidAction"),
    ],
)  # fmt: skip
def test_parse_json_errors(op: str, body: bytes, shape: str, code: str) -> None:
    with pytest.raises(SqsError) as exc:
        codec.parse_json_request(op, body)
    assert exc.value.kind.shape == shape
    assert exc.value.code == code


def test_json_results_omit_empty_and_keep_batch_lists() -> None:
    assert codec.encode_json(None) == b"{}"
    assert codec.encode_json(S.ReceiveMessageResult()) == b"{}"
    assert json.loads(codec.encode_json(S.DeleteMessageBatchResult(successful=[], failed=[]))) == {
        "Successful": [], "Failed": []
    }  # fmt: skip
    failed = S.BatchResultErrorEntry(id="a", sender_fault=True, code="C", message="m")
    doc = json.loads(codec.encode_json(S.SendMessageBatchResult(successful=[], failed=[failed])))
    assert doc["Failed"] == [{"Id": "a", "SenderFault": True, "Code": "C", "Message": "m"}]
    ok = S.SendMessageResult(message_id="1", md5_of_message_body="m")
    assert json.loads(codec.encode_json(ok)) == {"MessageId": "1", "MD5OfMessageBody": "m"}


def test_xml_results() -> None:
    result = S.ReceiveMessageResult(messages=[
        S.Message(message_id="1", receipt_handle="r", md5_of_body="m", body="a<b>&\r\n",
                  attributes={"SentTimestamp": "5"},
                  message_attributes={"x": V(data_type="Binary", binary_value=b"\x00")}),
    ])  # fmt: skip
    xml = codec.encode_xml("ReceiveMessage", result, "rid").decode()
    assert "<Body>a&lt;b&gt;&amp;&#xD;\n</Body>" in xml
    ns = "{" + codec.XML_NAMESPACE + "}"
    root = ET.fromstring(xml)
    msg = root.find(f"{ns}ReceiveMessageResult/{ns}Message")
    assert msg is not None
    assert msg.findtext(f"{ns}Body") == "a<b>&\r\n"
    assert msg.findtext(f"{ns}Attribute/{ns}Name") == "SentTimestamp"
    assert msg.findtext(f"{ns}MessageAttribute/{ns}Value/{ns}BinaryValue") == "AA=="
    assert root.findtext(f"{ns}ResponseMetadata/{ns}RequestId") == "rid"
    empty = codec.encode_xml("DeleteQueue", None, "rid").decode()
    assert "<DeleteQueueResponse" in empty and "DeleteQueueResult" not in empty
    batch = S.DeleteMessageBatchResult(
        successful=[S.BatchResultEntry(id="a")],
        failed=[S.BatchResultErrorEntry(id="b", sender_fault=False, code="C")],
    )
    xml = codec.encode_xml("DeleteMessageBatch", batch, "r").decode()
    assert "<DeleteMessageBatchResultEntry><Id>a</Id></DeleteMessageBatchResultEntry>" in xml
    assert "<SenderFault>false</SenderFault>" in xml


def test_errors_both_protocols() -> None:
    err = SqsError(codec.E.QUEUE_DOES_NOT_EXIST, "gone <x>")
    status, headers, body = codec.error_json(err)
    assert status == 400
    assert headers == {"x-amzn-query-error": "AWS.SimpleQueueService.NonExistentQueue;Sender"}
    assert json.loads(body) == {
        "__type": "com.amazonaws.sqs#QueueDoesNotExist", "message": "gone <x>"
    }  # fmt: skip
    status, xml = codec.error_xml(SqsError(codec.E.RECEIPT_HANDLE_IS_INVALID, "bad"), "rid")
    assert status == 404
    assert b"<Code>ReceiptHandleIsInvalid</Code>" in xml and b"<RequestId>rid</RequestId>" in xml


# -- MD5s and attributes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "md5"),
    [
        ({}, None),
        # Vectors cross-checked with moto's implementation.
        ({"a": V(data_type="String", string_value="x")}, "a512aac9938034acb0b3c3d965944bf1"),
        (
            {
                "s": V(data_type="String", string_value="héllo"),
                "n": V(data_type="Number", string_value="42"),
                "b": V(data_type="Binary", binary_value=b"\x00\x01\xff"),
                "c": V(data_type="String.custom", string_value="x"),
            },
            "bae530a0cb99c43632a58671cfd9a545",
        ),
    ],
)
def test_md5_of_attributes(attributes: dict[str, S.MessageAttributeValue], md5: str | None) -> None:
    assert M.md5_of_attributes(attributes) == md5


def test_md5_of_body() -> None:
    assert M.md5_of_body("héllo") == hashlib.md5("héllo".encode()).hexdigest()


@pytest.mark.parametrize(
    ("value", "header"),
    [
        (V(data_type="String", string_value="x"), "x"),
        (V(data_type="Number", string_value="42"), 42),
        (V(data_type="Number", string_value="-7"), -7),
        (V(data_type="Number", string_value="0.5"), 0.5),
        (V(data_type="Number", string_value="1.50"), "1.50"),
        (V(data_type="Number", string_value="007"), "007"),
        (V(data_type="Number", string_value="99999999999999999999"), "99999999999999999999"),
        (V(data_type="Binary", binary_value=b"\x00"), b"\x00"),
        (V(data_type="String.json", string_value="{}"), "{}"),
        (V(data_type="Number.int", string_value="3"), 3),
        (V(data_type="Binary.gz", binary_value=b"z"), b"z"),
    ],
)
def test_attributes_headers_round_trip(value: S.MessageAttributeValue, header: Any) -> None:
    headers = M.attributes_to_headers({"a": value})
    assert headers["a"] == header
    assert type(headers["a"]) is type(header)
    assert M.headers_to_attributes(headers) == {"a": value}


def test_headers_to_attributes_skips_what_sqs_cannot_name() -> None:
    attrs = M.headers_to_attributes(
        {"ok": "v", "has space": "v", "x-death": "v", "AWS.x": "v", "empty": "", "none": None,
         "flag": False, M.TRACE_HEADER: "Root=1"}
    )  # fmt: skip
    assert attrs == {
        "ok": V(data_type="String", string_value="v"),
        "x-death": V(data_type="String", string_value="v"),
        "flag": V(data_type="String", string_value="false"),
    }


@pytest.mark.parametrize(
    ("attributes", "ok"),
    [
        ({"a.b-c_d": V(data_type="String", string_value="v")}, True),
        ({".a": V(data_type="String", string_value="v")}, False),
        ({"a..b": V(data_type="String", string_value="v")}, False),
        ({"amazon.x": V(data_type="String", string_value="v")}, False),
        ({"a": V(data_type="Number", string_value="1e5")}, True),
        ({"a": V(data_type="Number", string_value="1,5")}, False),
        ({"a": V(data_type="Binary")}, False),
        ({"a": V(data_type="Binary", binary_value=b"x")}, True),
        ({"a": V(data_type="String", string_list_values=["x"])}, False),
        ({"a": V(data_type="", string_value="x")}, False),
    ],
)
def test_check_attributes(attributes: dict[str, S.MessageAttributeValue], ok: bool) -> None:
    if ok:
        assert M.check_attributes(attributes) > 0
    else:
        with pytest.raises(SqsError):
            M.check_attributes(attributes)


def test_select_attributes() -> None:
    attrs = {k: V(data_type="String", string_value="v") for k in ("a.1", "a.2", "b", "c")}
    assert set(M.select_attributes(attrs, ["All"])) == set(attrs)
    assert set(M.select_attributes(attrs, [".*"])) == set(attrs)
    assert set(M.select_attributes(attrs, ["a.*", "c"])) == {"a.1", "a.2", "c"}
    assert M.select_attributes(attrs, []) == {}


def test_check_body() -> None:
    M.check_body("ok \t\n\r \U0001f600")
    for bad in ("", "\x00", "\x08", "\ufffe"):
        with pytest.raises(SqsError):
            M.check_body(bad)


# -- names, URLs, ARNs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "ref"),
    [
        ("http://h:1/000000000000/q", ("us-east-1", "000000000000", "q")),
        ("https://sqs.us-east-1.amazonaws.com/123456789012/q.fifo",
         ("us-east-1", "123456789012", "q.fifo")),
        ("http://h/queue/eu-west-1/123/q", ("eu-west-1", "123", "q")),
        ("http://h/queue/q", ("us-east-1", "000000000000", "q")),
        ("/000000000000/q", ("us-east-1", "000000000000", "q")),
        ("q", ("ap-south-1", "000000000000", "q")),
    ],
)  # fmt: skip
def test_parse_queue_url(url: str, ref: tuple[str, str, str]) -> None:
    assert tuple(N.parse_queue_url(url, "us-east-1", "ap-south-1", "000000000000")) == ref


@pytest.mark.parametrize("url", ["http://h/", "http://h/a/b/c", "http://h/1/bad name", ""])
def test_parse_queue_url_errors(url: str) -> None:
    with pytest.raises(SqsError):
        N.parse_queue_url(url, "us-east-1", "us-east-1", "0")


def test_queue_urls_and_engine_names() -> None:
    east = N.QueueRef("us-east-1", "1", "q")
    west = N.QueueRef("us-west-2", "1", "q")
    assert N.queue_url("http://h", east, "us-east-1") == "http://h/1/q"
    assert N.queue_url("http://h", west, "us-east-1") == "http://h/queue/us-west-2/1/q"
    assert east.engine_name("us-east-1") == "q"
    assert west.engine_name("us-east-1") == "us-west-2:q"
    assert N.from_engine_name("q", "us-east-1") == ("us-east-1", "q")
    assert N.from_engine_name("us-west-2:q", "us-east-1") == ("us-west-2", "q")
    assert N.from_engine_name("celery.pidbox", "us-east-1") is None
    assert N.from_engine_name("amq.gen-x", "us-east-1") is None
    assert N.from_engine_name("x:y", "us-east-1") is None
    assert N.queue_arn(west) == "arn:aws:sqs:us-west-2:1:q"
    assert N.parse_arn("arn:aws:sqs:us-west-2:1:q") == west
    with pytest.raises(SqsError):
        N.parse_arn("arn:aws:sns:us-west-2:1:q")


@pytest.mark.parametrize(
    ("name", "fifo", "ok"),
    [
        ("a", False, True), ("a-b_C9", False, True), ("x" * 80, False, True),
        ("x" * 81, False, False), ("a.b", False, False), ("q.fifo", False, False),
        ("q.fifo", True, True), ("q", True, False), ("x" * 75 + ".fifo", True, True),
        ("x" * 76 + ".fifo", True, False), ("", False, False),
    ],
)  # fmt: skip
def test_check_queue_name(name: str, fifo: bool, ok: bool) -> None:
    if ok:
        N.check_queue_name(name, fifo)
    else:
        with pytest.raises(SqsError):
            N.check_queue_name(name, fifo)


# -- queue attributes -------------------------------------------------------------------


def _apply(attrs: dict[str, str], fifo: bool = False) -> QueueOptions:
    return A.apply_attributes(
        A.new_queue_options(fifo), attrs, fifo=fifo, dead_letter_name=lambda r: r.name, now=1.0
    )


def test_apply_attributes_maps_onto_engine_options() -> None:
    opts = _apply({
        "VisibilityTimeout": "10", "DelaySeconds": "5", "MessageRetentionPeriod": "120",
        "MaximumMessageSize": "4096", "ReceiveMessageWaitTimeSeconds": "20",
        "RedrivePolicy":
            '{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:1:dlq","maxReceiveCount":"3"}',
        "Policy": "{}",
    })  # fmt: skip
    assert (opts.visibility_timeout, opts.delay, opts.message_ttl, opts.max_message_size) == (
        10.0, 5.0, 120.0, 4096,
    )  # fmt: skip
    assert (opts.dead_letter, opts.max_receives) == ("dlq", 3)
    assert A.wait_time(opts) == 20
    opts.validate()
    fifo = _apply({"ContentBasedDeduplication": "TRUE"}, fifo=True)
    assert fifo.fifo and A.flag(fifo, "ContentBasedDeduplication")


@pytest.mark.parametrize(
    ("attrs", "code"),
    [
        ({"VisibilityTimeout": "x"}, "InvalidAttributeValue"),
        ({"MaximumMessageSize": "1048577"}, "InvalidAttributeValue"),
        ({"FifoQueue": "true"}, "InvalidAttributeValue"),
        ({"DeduplicationScope": "queue"}, "InvalidAttributeName"),
        ({"ApproximateNumberOfMessages": "1"}, "InvalidAttributeName"),
        ({"RedrivePolicy": '{"deadLetterTargetArn": "arn:aws:sqs:r:1:d"}'},
         "InvalidParameterValue"),
        ({"RedrivePolicy": '{"deadLetterTargetArn": "x", "maxReceiveCount": 1}'},
         "InvalidParameterValue"),
        ({"RedriveAllowPolicy": '{"redrivePermission": "byQueue"}'}, "InvalidAttributeValue"),
        ({"Policy": "[]"}, "InvalidAttributeValue"),
    ],
)  # fmt: skip
def test_apply_attributes_errors(attrs: dict[str, str], code: str) -> None:
    with pytest.raises(SqsError) as exc:
        _apply(attrs)
    assert exc.value.code == code


def test_redrive_allowed() -> None:
    arn = "arn:aws:sqs:us-east-1:1:src"
    assert A.redrive_allowed(None, arn)
    assert A.redrive_allowed('{"redrivePermission":"allowAll"}', arn)
    assert not A.redrive_allowed('{"redrivePermission":"denyAll"}', arn)
    assert A.redrive_allowed(json.dumps({"redrivePermission": "byQueue",
                                         "sourceQueueArns": [arn]}), arn)  # fmt: skip
    assert not A.redrive_allowed(json.dumps({"redrivePermission": "byQueue",
                                             "sourceQueueArns": ["x"]}), arn)  # fmt: skip


def test_queue_attributes_for_a_native_queue() -> None:
    opts = QueueOptions(dead_letter="dlq", max_receives=2)
    ref = N.QueueRef("us-east-1", "1", "q")
    attrs = A.queue_attributes(ref, opts, 100.0, None, ["All"], lambda n: f"arn:x:{n}")
    assert attrs["RedrivePolicy"] == '{"deadLetterTargetArn":"arn:x:dlq","maxReceiveCount":2}'
    assert attrs["MessageRetentionPeriod"] == str(A.MAX_RETENTION)
    assert attrs["CreatedTimestamp"] == attrs["LastModifiedTimestamp"] == "100"


# -- SigV4 ----------------------------------------------------------------------------

CREDS = Credentials("AKID", "SECRET")


def _verify(request: AWSRequest, secret: str | None = "SECRET", now: float | None = None) -> None:
    prepared = request.prepare()
    headers = {k.lower(): v for k, v in prepared.headers.items()}
    netloc, _, rest = prepared.url.split("://", 1)[1].partition("/")
    headers["host"] = netloc  # as the HTTP client sends it
    path, _, query = rest.partition("?")
    query_params = dict(codec.parse_form(query))
    signed = sigv4.read_signature(headers, query_params)
    assert signed is not None
    body = prepared.body or b""
    sigv4.verify(
        signed, secret, method=prepared.method, raw_path="/" + path, raw_query=query,
        headers=headers, body=body if isinstance(body, bytes) else body.encode(), now=now,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("method", "url", "data"),
    [
        ("POST", "http://h:9324/", b'{"QueueName": "q"}'),
        ("POST", "http://h/", b"Action=SendMessage&MessageBody=a%20b"),
        ("GET", "http://h/000000000000/q?Action=ReceiveMessage&AttributeName.1=All", None),
        ("GET", "http://h/000000000000/q?b=2&a=1&a=0&empty=", None),
        ("POST", "http://h/path%20with%20space/x", b""),
    ],
)
def test_sigv4_accepts_botocore_signatures(method: str, url: str, data: bytes | None) -> None:
    request = AWSRequest(method=method, url=url, data=data,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    SigV4Auth(CREDS, "sqs", "eu-west-1").add_auth(request)
    _verify(request)
    signed = sigv4.read_signature({k.lower(): v for k, v in request.headers.items()}, {})
    assert signed is not None and signed.credential.region == "eu-west-1"
    with pytest.raises(SqsError) as exc:
        _verify(request, secret="OTHER")
    assert exc.value.code == "SignatureDoesNotMatch"
    with pytest.raises(SqsError) as exc:
        _verify(request, secret=None)
    assert exc.value.code == "InvalidClientTokenId"
    with pytest.raises(SqsError) as exc:
        _verify(request, now=time.time() + 3600)
    assert exc.value.code == "SignatureDoesNotMatch"


def test_sigv4_tampered_body_and_presigned_urls() -> None:
    request = AWSRequest(method="POST", url="http://h/", data=b"Action=ListQueues")
    SigV4Auth(CREDS, "sqs", "us-east-1").add_auth(request)
    request.data = b"Action=DeleteQueue"
    with pytest.raises(SqsError):
        _verify(request)
    presigned = AWSRequest(method="GET", url="http://h/1/q?Action=ReceiveMessage")
    SigV4QueryAuth(CREDS, "sqs", "us-east-1", expires=60).add_auth(presigned)
    _verify(presigned)


def test_sigv4_unsigned_and_malformed() -> None:
    assert sigv4.read_signature({}, {}) is None
    with pytest.raises(SqsError) as exc:
        sigv4.read_signature({"authorization": "AWS4-HMAC-SHA256 Credential=x"}, {})
    assert exc.value.code == "IncompleteSignature"
    with pytest.raises(SqsError):
        sigv4.read_signature({"authorization": "Basic abc"}, {})
