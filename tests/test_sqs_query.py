"""The query protocol (form requests, XML responses) as older SDKs speak it.

Two kinds of clients:

* botocore itself in query mode: the installed SQS model with the query-protocol
  traits of botocore 1.34.89 (the last query release) put back, so botocore's own
  QuerySerializer, SigV4 signer and QueryParser do the work;
* hand-written form and GET requests signed with botocore's SigV4Auth.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import botocore
import botocore.session
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from conveyor.server.sqs import SqsConfig
from sqs_support import KEY_ID, SECRET, InProcessSqs

NS = "{http://queue.amazonaws.com/doc/2012-11-05/}"

# Traits of the query-protocol SQS model (botocore 1.34.89) that the JSON model dropped:
# list member names, map key/value names and member location names.
QUERY_TRAITS: dict[str, Any] = {
    "AWSAccountIdList": {"member": "AWSAccountId"},
    "ActionNameList": {"member": "ActionName"},
    "AttributeNameList": {"member": "AttributeName"},
    "BatchResultErrorEntryList": {"member": "BatchResultErrorEntry"},
    "BinaryList": {"member": "BinaryListValue"},
    "ChangeMessageVisibilityBatchRequestEntryList": {
        "member": "ChangeMessageVisibilityBatchRequestEntry"
    },
    "ChangeMessageVisibilityBatchResultEntryList": {
        "member": "ChangeMessageVisibilityBatchResultEntry"
    },
    "CreateQueueRequest": {
        "members": {"Attributes": {"locationName": "Attribute"}, "tags": {"locationName": "Tag"}}
    },
    "DeleteMessageBatchRequestEntryList": {"member": "DeleteMessageBatchRequestEntry"},
    "DeleteMessageBatchResultEntryList": {"member": "DeleteMessageBatchResultEntry"},
    "GetQueueAttributesResult": {"members": {"Attributes": {"locationName": "Attribute"}}},
    "ListMessageMoveTasksResultEntryList": {"member": "ListMessageMoveTasksResultEntry"},
    "ListQueueTagsResult": {"members": {"Tags": {"locationName": "Tag"}}},
    "Message": {
        "members": {
            "Attributes": {"locationName": "Attribute"},
            "MessageAttributes": {"locationName": "MessageAttribute"},
        }
    },
    "MessageAttributeNameList": {"member": "MessageAttributeName"},
    "MessageAttributeValue": {
        "members": {
            "StringListValues": {"locationName": "StringListValue"},
            "BinaryListValues": {"locationName": "BinaryListValue"},
        }
    },
    "MessageBodyAttributeMap": {"key": "Name", "value": "Value"},
    "MessageBodySystemAttributeMap": {"key": "Name", "value": "Value"},
    "MessageList": {"member": "Message"},
    "MessageSystemAttributeMap": {"locationName": "Attribute", "key": "Name", "value": "Value"},
    "QueueAttributeMap": {"locationName": "Attribute", "key": "Name", "value": "Value"},
    "QueueUrlList": {"member": "QueueUrl"},
    "SendMessageBatchRequestEntry": {
        "members": {
            "MessageAttributes": {"locationName": "MessageAttribute"},
            "MessageSystemAttributes": {"locationName": "MessageSystemAttribute"},
        }
    },
    "SendMessageBatchRequestEntryList": {"member": "SendMessageBatchRequestEntry"},
    "SendMessageBatchResultEntryList": {"member": "SendMessageBatchResultEntry"},
    "SendMessageRequest": {
        "members": {
            "MessageAttributes": {"locationName": "MessageAttribute"},
            "MessageSystemAttributes": {"locationName": "MessageSystemAttribute"},
        }
    },
    "SetQueueAttributesRequest": {"members": {"Attributes": {"locationName": "Attribute"}}},
    "StringList": {"member": "StringListValue"},
    "TagKeyList": {"member": "TagKey"},
    "TagMap": {"locationName": "Tag", "key": "Key", "value": "Value"},
}
# Error codes of the query model (its "error" traits).
QUERY_ERRORS = {
    "QueueDoesNotExist": ("AWS.SimpleQueueService.NonExistentQueue", 400),
    "QueueNameExists": ("QueueAlreadyExists", 400),
    "EmptyBatchRequest": ("AWS.SimpleQueueService.EmptyBatchRequest", 400),
    "PurgeQueueInProgress": ("AWS.SimpleQueueService.PurgeQueueInProgress", 403),
    "ResourceNotFoundException": ("ResourceNotFoundException", 404),
}


def query_model() -> dict[str, Any]:
    path = Path(os.path.dirname(botocore.__file__)) / "data/sqs/2012-11-05/service-2.json.gz"
    model = json.loads(gzip.decompress(path.read_bytes()))
    model = copy.deepcopy(model)
    meta = model["metadata"]
    for key in ("awsQueryCompatible", "jsonVersion", "targetPrefix"):
        meta.pop(key, None)
    meta["protocol"] = "query"
    meta["protocols"] = ["query"]
    meta["xmlNamespace"] = "http://queue.amazonaws.com/doc/2012-11-05/"
    for op in model["operations"].values():
        if "output" in op:
            op["output"]["resultWrapper"] = op["output"]["shape"]
    shapes = model["shapes"]
    for name, traits in QUERY_TRAITS.items():
        shape = shapes[name]
        for key in ("locationName", "flattened"):
            if key in traits:
                shape[key] = traits[key]
        if "member" in traits:
            shape["member"]["locationName"] = traits["member"]
        for part in ("key", "value"):
            if part in traits:
                shape[part]["locationName"] = traits[part]
        for member, extra in traits.get("members", {}).items():
            shape["members"][member].update(extra)
    for name, (code, status) in QUERY_ERRORS.items():
        shapes[name]["error"] = {"code": code, "httpStatusCode": status, "senderFault": True}
    return model


@pytest.fixture(scope="module")
def srv() -> Iterator[InProcessSqs]:
    server = InProcessSqs(SqsConfig(access_keys={KEY_ID: SECRET}, purge_interval=0)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def qsqs(srv: InProcessSqs, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("models")
    target = root / "sqs" / "2012-11-05"
    target.mkdir(parents=True)
    (target / "service-2.json").write_text(json.dumps(query_model()))
    session = botocore.session.get_session()
    loader = session.get_component("data_loader")
    loader.search_paths.insert(0, str(root))
    client = session.create_client(
        "sqs",
        endpoint_url=srv.url,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        config=Config(retries={"max_attempts": 1}),
    )
    assert client.meta.service_model.protocol == "query"
    return client


def test_query_client_round_trip(qsqs: Any, srv: InProcessSqs) -> None:
    url = qsqs.create_queue(
        QueueName="q-roundtrip",
        Attributes={"VisibilityTimeout": "40", "DelaySeconds": "0"},
        tags={"team": "a"},
    )["QueueUrl"]
    assert url == f"{srv.url}/000000000000/q-roundtrip"
    assert qsqs.get_queue_url(QueueName="q-roundtrip")["QueueUrl"] == url
    assert url in qsqs.list_queues(QueueNamePrefix="q-round")["QueueUrls"]
    attrs = {
        "s": {"DataType": "String", "StringValue": "a & <b> \r\n"},
        "n": {"DataType": "Number", "StringValue": "7"},
        "b": {"DataType": "Binary", "BinaryValue": b"\x00\xff"},
    }
    sent = qsqs.send_message(QueueUrl=url, MessageBody="hello <xml> & \"quotes\"",
                             MessageAttributes=attrs)  # fmt: skip
    assert sent["MD5OfMessageAttributes"]
    batch = qsqs.send_message_batch(
        QueueUrl=url,
        Entries=[
            {"Id": "a", "MessageBody": "one"},
            {"Id": "b", "MessageBody": "two", "DelaySeconds": 5000},
        ],
    )
    assert [e["Id"] for e in batch["Successful"]] == ["a"]
    assert batch["Failed"][0]["Id"] == "b"
    assert batch["Failed"][0]["SenderFault"] is True
    got = qsqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"], MessageAttributeNames=["All"]
    )["Messages"]
    assert [m["Body"] for m in got] == ['hello <xml> & "quotes"', "one"]
    assert got[0]["MessageAttributes"] == attrs
    assert got[0]["MD5OfMessageAttributes"] == sent["MD5OfMessageAttributes"]
    assert got[0]["Attributes"]["ApproximateReceiveCount"] == "1"
    vis = qsqs.change_message_visibility_batch(
        QueueUrl=url,
        Entries=[{"Id": "x", "ReceiptHandle": got[1]["ReceiptHandle"], "VisibilityTimeout": 60}],
    )
    assert vis["Successful"] == [{"Id": "x"}]
    qsqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=got[0]["ReceiptHandle"], VisibilityTimeout=60
    )
    deleted = qsqs.delete_message_batch(
        QueueUrl=url, Entries=[{"Id": "d", "ReceiptHandle": got[1]["ReceiptHandle"]}]
    )
    assert deleted["Successful"] == [{"Id": "d"}]
    qsqs.delete_message(QueueUrl=url, ReceiptHandle=got[0]["ReceiptHandle"])
    qa = qsqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert qa["VisibilityTimeout"] == "40"
    qsqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "10"})
    qsqs.tag_queue(QueueUrl=url, Tags={"env": "x"})
    qsqs.untag_queue(QueueUrl=url, TagKeys=["team"])
    assert qsqs.list_queue_tags(QueueUrl=url)["Tags"] == {"env": "x"}
    qsqs.add_permission(QueueUrl=url, Label="p", AWSAccountIds=["1", "2"], Actions=["*"])
    qsqs.remove_permission(QueueUrl=url, Label="p")
    assert qsqs.list_dead_letter_source_queues(QueueUrl=url).get("queueUrls", []) == []
    qsqs.purge_queue(QueueUrl=url)
    arn = qsqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]
    assert qsqs.list_message_move_tasks(SourceArn=arn["QueueArn"]).get("Results", []) == []
    qsqs.delete_queue(QueueUrl=url)


def test_query_client_errors(qsqs: Any) -> None:
    with pytest.raises(qsqs.exceptions.QueueDoesNotExist) as exc:
        qsqs.get_queue_url(QueueName="does-not-exist")
    assert exc.value.response["Error"]["Code"] == "AWS.SimpleQueueService.NonExistentQueue"
    assert exc.value.response["ResponseMetadata"]["RequestId"]
    url = qsqs.create_queue(QueueName="q-errors")["QueueUrl"]
    with pytest.raises(qsqs.exceptions.QueueNameExists):
        qsqs.create_queue(QueueName="q-errors", Attributes={"DelaySeconds": "3"})
    with pytest.raises(qsqs.exceptions.EmptyBatchRequest):
        qsqs.delete_message_batch(QueueUrl=url, Entries=[])
    with pytest.raises(ClientError) as exc:
        qsqs.receive_message(QueueUrl=url, MaxNumberOfMessages=50)
    assert exc.value.response["Error"]["Code"] == "InvalidParameterValue"


def _signed(
    method: str, url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
    secret: str = SECRET,
) -> AWSRequest:  # fmt: skip
    request = AWSRequest(method=method, url=url, data=data, headers=headers or {})
    SigV4Auth(Credentials(KEY_ID, secret), "sqs", "us-east-1").add_auth(request)
    return request


def _send(request: AWSRequest) -> httpx.Response:
    prepared = request.prepare()
    return httpx.request(
        prepared.method, prepared.url, headers=dict(prepared.headers), content=prepared.body
    )


def test_hand_written_signed_form_requests(srv: InProcessSqs) -> None:
    form = {"Action": "CreateQueue", "Version": "2012-11-05", "QueueName": "q-form",
            "Attribute.1.Name": "DelaySeconds", "Attribute.1.Value": "0"}  # fmt: skip
    ctype = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    r = _send(_signed("POST", srv.url + "/", data=urlencode(form).encode(), headers=ctype))
    assert r.status_code == 200, r.text
    root = ET.fromstring(r.text)
    assert root.tag == f"{NS}CreateQueueResponse"
    url = root.findtext(f"{NS}CreateQueueResult/{NS}QueueUrl")
    assert url == f"{srv.url}/000000000000/q-form"
    assert root.findtext(f"{NS}ResponseMetadata/{NS}RequestId") == r.headers["x-amzn-RequestId"]

    form = {
        "Action": "SendMessage", "QueueUrl": url, "MessageBody": "form body",
        "MessageAttribute.1.Name": "color", "MessageAttribute.1.Value.DataType": "String",
        "MessageAttribute.1.Value.StringValue": "blue",
    }  # fmt: skip
    r = _send(_signed("POST", srv.url + "/", data=urlencode(form).encode(), headers=ctype))
    assert r.status_code == 200, r.text
    res = ET.fromstring(r.text).find(f"{NS}SendMessageResult")
    assert res is not None
    assert res.findtext(f"{NS}MD5OfMessageBody") == hashlib.md5(b"form body").hexdigest()
    assert res.findtext(f"{NS}MD5OfMessageAttributes")

    # Old SDKs GET the queue URL with the parameters (and the signature) in the query.
    params = {"Action": "ReceiveMessage", "MessageAttributeName.1": "All",
              "AttributeName.1": "All"}  # fmt: skip
    r = _send(_signed("GET", url + "?" + urlencode(params)))
    assert r.status_code == 200, r.text
    msg = ET.fromstring(r.text).find(f"{NS}ReceiveMessageResult/{NS}Message")
    assert msg is not None
    assert msg.findtext(f"{NS}Body") == "form body"
    attr = msg.find(f"{NS}MessageAttribute")
    assert attr is not None
    assert attr.findtext(f"{NS}Name") == "color"
    assert attr.findtext(f"{NS}Value/{NS}StringValue") == "blue"
    names = {a.findtext(f"{NS}Name") for a in msg.findall(f"{NS}Attribute")}
    assert {"SentTimestamp", "ApproximateReceiveCount"} <= names


def test_query_errors_are_xml(srv: InProcessSqs) -> None:
    ctype = {"Content-Type": "application/x-www-form-urlencoded"}
    form = urlencode({"Action": "GetQueueUrl", "QueueName": "nope-nope"}).encode()
    r = _send(_signed("POST", srv.url + "/", data=form, headers=ctype))
    assert r.status_code == 400
    err = ET.fromstring(r.text)
    assert err.tag == f"{NS}ErrorResponse"
    assert err.findtext(f"{NS}Error/{NS}Code") == "AWS.SimpleQueueService.NonExistentQueue"
    assert err.findtext(f"{NS}Error/{NS}Type") == "Sender"
    assert err.findtext(f"{NS}RequestId")

    r = _send(_signed("POST", srv.url + "/", data=urlencode({"Action": "Bogus"}).encode(),
                      headers=ctype))  # fmt: skip
    assert ET.fromstring(r.text).findtext(f"{NS}Error/{NS}Code") == "InvalidAction"

    r = _send(_signed("POST", srv.url + "/", data=form, headers=ctype, secret="wrong"))
    assert r.status_code == 403
    assert ET.fromstring(r.text).findtext(f"{NS}Error/{NS}Code") == "SignatureDoesNotMatch"

    r = httpx.post(srv.url + "/", content=form, headers=ctype)  # unsigned
    assert r.status_code == 403
    assert ET.fromstring(r.text).findtext(f"{NS}Error/{NS}Code") == "MissingAuthenticationToken"
