"""Typed SQS requests and results (the 2012-11-05 API).

Field names are the JSON protocol's member names (``rename="pascal"`` plus a few
explicit ones). The query protocol names some members differently and flattens lists
and maps (``Attribute.1.Name``, ``SendMessageBatchRequestEntry.2.Id``); those names
live in ``XML`` (field -> element/parameter name) and ``XML_MAP`` (field -> the key and
value names of a map entry), taken from the query-protocol service model.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec


class Shape(msgspec.Struct, rename="pascal", kw_only=True, omit_defaults=True):
    #: JSON member name -> query/XML name, where they differ.
    XML: ClassVar[dict[str, str]] = {}
    #: JSON member name of a map -> (key name, value name); default ("Name", "Value").
    XML_MAP: ClassVar[dict[str, tuple[str, str]]] = {}


def _list() -> list[str]:
    return []


def _dict() -> dict[str, str]:
    return {}


# -- shared ---------------------------------------------------------------------------


class MessageAttributeValue(Shape):
    data_type: str
    string_value: str | None = None
    binary_value: bytes | None = None
    string_list_values: list[str] = msgspec.field(default_factory=list)
    binary_list_values: list[bytes] = msgspec.field(default_factory=list)
    XML = {"StringListValues": "StringListValue", "BinaryListValues": "BinaryListValue"}


class BatchResultErrorEntry(Shape):
    id: str
    sender_fault: bool
    code: str
    message: str | None = None


# -- queues ---------------------------------------------------------------------------


class CreateQueueRequest(Shape):
    queue_name: str
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    tags: dict[str, str] = msgspec.field(default_factory=dict, name="tags")
    XML = {"Attributes": "Attribute", "tags": "Tag"}
    XML_MAP = {"tags": ("Key", "Value")}


class CreateQueueResult(Shape):
    queue_url: str


class DeleteQueueRequest(Shape):
    queue_url: str


class GetQueueUrlRequest(Shape):
    queue_name: str
    queue_owner_aws_account_id: str | None = msgspec.field(
        default=None, name="QueueOwnerAWSAccountId"
    )


class GetQueueUrlResult(Shape):
    queue_url: str


class ListQueuesRequest(Shape):
    queue_name_prefix: str | None = None
    next_token: str | None = None
    max_results: int | None = None


class ListQueuesResult(Shape):
    queue_urls: list[str] = msgspec.field(default_factory=list)
    next_token: str | None = None
    XML = {"QueueUrls": "QueueUrl"}


class GetQueueAttributesRequest(Shape):
    queue_url: str
    attribute_names: list[str] = msgspec.field(default_factory=list)
    XML = {"AttributeNames": "AttributeName"}


class GetQueueAttributesResult(Shape):
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    XML = {"Attributes": "Attribute"}


class SetQueueAttributesRequest(Shape):
    queue_url: str
    attributes: dict[str, str]
    XML = {"Attributes": "Attribute"}


class PurgeQueueRequest(Shape):
    queue_url: str


class TagQueueRequest(Shape):
    queue_url: str
    tags: dict[str, str]
    XML = {"Tags": "Tag"}
    XML_MAP = {"Tags": ("Key", "Value")}


class UntagQueueRequest(Shape):
    queue_url: str
    tag_keys: list[str]
    XML = {"TagKeys": "TagKey"}


class ListQueueTagsRequest(Shape):
    queue_url: str


class ListQueueTagsResult(Shape):
    tags: dict[str, str] = msgspec.field(default_factory=dict)
    XML = {"Tags": "Tag"}
    XML_MAP = {"Tags": ("Key", "Value")}


class ListDeadLetterSourceQueuesRequest(Shape):
    queue_url: str
    next_token: str | None = None
    max_results: int | None = None


class ListDeadLetterSourceQueuesResult(Shape):
    # Always present (required in the model), so no default.
    queue_urls: list[str] = msgspec.field(name="queueUrls")
    next_token: str | None = None
    XML = {"queueUrls": "QueueUrl"}


class AddPermissionRequest(Shape):
    queue_url: str
    label: str
    aws_account_ids: list[str] = msgspec.field(name="AWSAccountIds")
    actions: list[str]
    XML = {"AWSAccountIds": "AWSAccountId", "Actions": "ActionName"}


class RemovePermissionRequest(Shape):
    queue_url: str
    label: str


# -- messages -------------------------------------------------------------------------


class SendMessageRequest(Shape):
    queue_url: str
    message_body: str
    delay_seconds: int | None = None
    message_attributes: dict[str, MessageAttributeValue] = msgspec.field(default_factory=dict)
    message_system_attributes: dict[str, MessageAttributeValue] = msgspec.field(
        default_factory=dict
    )
    message_deduplication_id: str | None = None
    message_group_id: str | None = None
    XML = {
        "MessageAttributes": "MessageAttribute",
        "MessageSystemAttributes": "MessageSystemAttribute",
    }


class SendMessageResult(Shape):
    message_id: str
    md5_of_message_body: str = msgspec.field(name="MD5OfMessageBody")
    md5_of_message_attributes: str | None = msgspec.field(
        default=None, name="MD5OfMessageAttributes"
    )
    md5_of_message_system_attributes: str | None = msgspec.field(
        default=None, name="MD5OfMessageSystemAttributes"
    )
    sequence_number: str | None = None


class SendMessageBatchRequestEntry(Shape):
    id: str
    message_body: str
    delay_seconds: int | None = None
    message_attributes: dict[str, MessageAttributeValue] = msgspec.field(default_factory=dict)
    message_system_attributes: dict[str, MessageAttributeValue] = msgspec.field(
        default_factory=dict
    )
    message_deduplication_id: str | None = None
    message_group_id: str | None = None
    XML = SendMessageRequest.XML


class SendMessageBatchRequest(Shape):
    queue_url: str
    entries: list[SendMessageBatchRequestEntry] = msgspec.field(default_factory=list)
    XML = {"Entries": "SendMessageBatchRequestEntry"}


class SendMessageBatchResultEntry(Shape):
    id: str
    message_id: str
    md5_of_message_body: str = msgspec.field(name="MD5OfMessageBody")
    md5_of_message_attributes: str | None = msgspec.field(
        default=None, name="MD5OfMessageAttributes"
    )
    md5_of_message_system_attributes: str | None = msgspec.field(
        default=None, name="MD5OfMessageSystemAttributes"
    )
    sequence_number: str | None = None


class SendMessageBatchResult(Shape):
    successful: list[SendMessageBatchResultEntry]
    failed: list[BatchResultErrorEntry]
    XML = {"Successful": "SendMessageBatchResultEntry", "Failed": "BatchResultErrorEntry"}


class ReceiveMessageRequest(Shape):
    queue_url: str
    attribute_names: list[str] = msgspec.field(default_factory=list)
    message_system_attribute_names: list[str] = msgspec.field(default_factory=list)
    message_attribute_names: list[str] = msgspec.field(default_factory=list)
    max_number_of_messages: int | None = None
    visibility_timeout: int | None = None
    wait_time_seconds: int | None = None
    receive_request_attempt_id: str | None = None
    # Both lists are "AttributeName.N" in the query protocol; the parser fills the first.
    XML = {
        "AttributeNames": "AttributeName",
        "MessageSystemAttributeNames": "MessageSystemAttributeName",
        "MessageAttributeNames": "MessageAttributeName",
    }


class Message(Shape):
    message_id: str
    receipt_handle: str
    md5_of_body: str = msgspec.field(name="MD5OfBody")
    body: str
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    md5_of_message_attributes: str | None = msgspec.field(
        default=None, name="MD5OfMessageAttributes"
    )
    message_attributes: dict[str, MessageAttributeValue] = msgspec.field(default_factory=dict)
    XML = {"Attributes": "Attribute", "MessageAttributes": "MessageAttribute"}


class ReceiveMessageResult(Shape):
    messages: list[Message] = msgspec.field(default_factory=list)
    XML = {"Messages": "Message"}


class DeleteMessageRequest(Shape):
    queue_url: str
    receipt_handle: str


class DeleteMessageBatchRequestEntry(Shape):
    id: str
    receipt_handle: str


class DeleteMessageBatchRequest(Shape):
    queue_url: str
    entries: list[DeleteMessageBatchRequestEntry] = msgspec.field(default_factory=list)
    XML = {"Entries": "DeleteMessageBatchRequestEntry"}


class BatchResultEntry(Shape):
    id: str


class DeleteMessageBatchResult(Shape):
    successful: list[BatchResultEntry]
    failed: list[BatchResultErrorEntry]
    XML = {"Successful": "DeleteMessageBatchResultEntry", "Failed": "BatchResultErrorEntry"}


class ChangeMessageVisibilityRequest(Shape):
    queue_url: str
    receipt_handle: str
    visibility_timeout: int


class ChangeMessageVisibilityBatchRequestEntry(Shape):
    id: str
    receipt_handle: str
    visibility_timeout: int | None = None


class ChangeMessageVisibilityBatchRequest(Shape):
    queue_url: str
    entries: list[ChangeMessageVisibilityBatchRequestEntry] = msgspec.field(default_factory=list)
    XML = {"Entries": "ChangeMessageVisibilityBatchRequestEntry"}


class ChangeMessageVisibilityBatchResult(Shape):
    successful: list[BatchResultEntry]
    failed: list[BatchResultErrorEntry]
    XML = {
        "Successful": "ChangeMessageVisibilityBatchResultEntry",
        "Failed": "BatchResultErrorEntry",
    }


# -- message move tasks ---------------------------------------------------------------


class StartMessageMoveTaskRequest(Shape):
    source_arn: str
    destination_arn: str | None = None
    max_number_of_messages_per_second: int | None = None


class StartMessageMoveTaskResult(Shape):
    task_handle: str


class CancelMessageMoveTaskRequest(Shape):
    task_handle: str


class CancelMessageMoveTaskResult(Shape):
    approximate_number_of_messages_moved: int


class ListMessageMoveTasksRequest(Shape):
    source_arn: str
    max_results: int | None = None


class ListMessageMoveTasksResultEntry(Shape):
    status: str
    source_arn: str
    started_timestamp: int
    task_handle: str | None = None
    destination_arn: str | None = None
    max_number_of_messages_per_second: int | None = None
    approximate_number_of_messages_moved: int = 0
    approximate_number_of_messages_to_move: int | None = None
    failure_reason: str | None = None


class ListMessageMoveTasksResult(Shape):
    results: list[ListMessageMoveTasksResultEntry] = msgspec.field(default_factory=list)
    XML = {"Results": "ListMessageMoveTasksResultEntry"}


class Empty(Shape):
    """The result of operations that return nothing."""


#: Operation name -> (request type, result type or None).
OPERATIONS: dict[str, tuple[type[Shape], type[Shape] | None]] = {
    "AddPermission": (AddPermissionRequest, None),
    "CancelMessageMoveTask": (CancelMessageMoveTaskRequest, CancelMessageMoveTaskResult),
    "ChangeMessageVisibility": (ChangeMessageVisibilityRequest, None),
    "ChangeMessageVisibilityBatch": (
        ChangeMessageVisibilityBatchRequest,
        ChangeMessageVisibilityBatchResult,
    ),
    "CreateQueue": (CreateQueueRequest, CreateQueueResult),
    "DeleteMessage": (DeleteMessageRequest, None),
    "DeleteMessageBatch": (DeleteMessageBatchRequest, DeleteMessageBatchResult),
    "DeleteQueue": (DeleteQueueRequest, None),
    "GetQueueAttributes": (GetQueueAttributesRequest, GetQueueAttributesResult),
    "GetQueueUrl": (GetQueueUrlRequest, GetQueueUrlResult),
    "ListDeadLetterSourceQueues": (
        ListDeadLetterSourceQueuesRequest,
        ListDeadLetterSourceQueuesResult,
    ),
    "ListMessageMoveTasks": (ListMessageMoveTasksRequest, ListMessageMoveTasksResult),
    "ListQueueTags": (ListQueueTagsRequest, ListQueueTagsResult),
    "ListQueues": (ListQueuesRequest, ListQueuesResult),
    "PurgeQueue": (PurgeQueueRequest, None),
    "ReceiveMessage": (ReceiveMessageRequest, ReceiveMessageResult),
    "RemovePermission": (RemovePermissionRequest, None),
    "SendMessage": (SendMessageRequest, SendMessageResult),
    "SendMessageBatch": (SendMessageBatchRequest, SendMessageBatchResult),
    "SetQueueAttributes": (SetQueueAttributesRequest, None),
    "StartMessageMoveTask": (StartMessageMoveTaskRequest, StartMessageMoveTaskResult),
    "TagQueue": (TagQueueRequest, None),
    "UntagQueue": (UntagQueueRequest, None),
}
