"""SQS errors as AWS sends them.

Every SQS error has two codes. The *shape* name (``QueueDoesNotExist``) is what the
JSON protocol puts in ``__type`` and what botocore uses to pick the exception class;
the *query* code (``AWS.SimpleQueueService.NonExistentQueue``) is what the query
protocol puts in ``<Code>`` and what the JSON protocol repeats in the
``x-amzn-query-error`` header (botocore then reports it as ``Error.Code``, exactly as
against AWS). Codes and HTTP statuses are the ``awsQueryError`` traits of AWS's own
service model.
"""

from __future__ import annotations

from typing import NamedTuple


class ErrorKind(NamedTuple):
    shape: str
    query_code: str
    status: int = 400
    #: "Sender" (the caller's fault) or "Receiver" (ours).
    fault: str = "Sender"
    #: Prefix of the JSON ``__type``.
    namespace: str = "com.amazonaws.sqs"


def _k(shape: str, query_code: str | None = None, status: int = 400, **kw: str) -> ErrorKind:
    return ErrorKind(shape, query_code or shape, status, **kw)


#: Modeled errors (botocore raises ``client.exceptions.<shape>`` for these).
QUEUE_DOES_NOT_EXIST = _k("QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue")
QUEUE_NAME_EXISTS = _k("QueueNameExists", "QueueAlreadyExists")
QUEUE_DELETED_RECENTLY = _k("QueueDeletedRecently", "AWS.SimpleQueueService.QueueDeletedRecently")
RECEIPT_HANDLE_IS_INVALID = _k("ReceiptHandleIsInvalid", status=404)
MESSAGE_NOT_INFLIGHT = _k("MessageNotInflight", "AWS.SimpleQueueService.MessageNotInflight")
INVALID_ATTRIBUTE_NAME = _k("InvalidAttributeName")
INVALID_ATTRIBUTE_VALUE = _k("InvalidAttributeValue")
INVALID_MESSAGE_CONTENTS = _k("InvalidMessageContents")
INVALID_ID_FORMAT = _k("InvalidIdFormat")
OVER_LIMIT = _k("OverLimit", status=403)
PURGE_IN_PROGRESS = _k(
    "PurgeQueueInProgress", "AWS.SimpleQueueService.PurgeQueueInProgress", status=403
)
EMPTY_BATCH = _k("EmptyBatchRequest", "AWS.SimpleQueueService.EmptyBatchRequest")
TOO_MANY_ENTRIES = _k(
    "TooManyEntriesInBatchRequest", "AWS.SimpleQueueService.TooManyEntriesInBatchRequest"
)
BATCH_IDS_NOT_DISTINCT = _k(
    "BatchEntryIdsNotDistinct", "AWS.SimpleQueueService.BatchEntryIdsNotDistinct"
)
INVALID_BATCH_ENTRY_ID = _k("InvalidBatchEntryId", "AWS.SimpleQueueService.InvalidBatchEntryId")
BATCH_REQUEST_TOO_LONG = _k("BatchRequestTooLong", "AWS.SimpleQueueService.BatchRequestTooLong")
UNSUPPORTED_OPERATION = _k("UnsupportedOperation", "AWS.SimpleQueueService.UnsupportedOperation")
RESOURCE_NOT_FOUND = _k("ResourceNotFoundException", status=404)
INVALID_ADDRESS = _k("InvalidAddress", status=404)
INVALID_SECURITY = _k("InvalidSecurity", status=403)
REQUEST_THROTTLED = _k("RequestThrottled", status=403)

#: Common (unmodeled) errors: botocore raises a plain ClientError with these codes.
INVALID_PARAMETER_VALUE = _k("InvalidParameterValueException", "InvalidParameterValue")
MISSING_PARAMETER = _k("MissingRequiredParameterException", "MissingParameter")
INVALID_ACTION = _k(
    "UnknownOperationException", "InvalidAction", namespace="com.amazon.coral.service"
)
MISSING_ACTION = _k("MissingAction")
MALFORMED_REQUEST = _k("SerializationException", "MalformedQueryString")
INVALID_CLIENT_TOKEN_ID = _k(
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    status=403,
    namespace="com.amazon.coral.service",
)
SIGNATURE_DOES_NOT_MATCH = _k(
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    status=403,
    namespace="com.amazon.coral.service",
)
INCOMPLETE_SIGNATURE = _k(
    "IncompleteSignatureException",
    "IncompleteSignature",
    status=403,
    namespace="com.amazon.coral.service",
)
MISSING_AUTHENTICATION = _k(
    "MissingAuthenticationTokenException",
    "MissingAuthenticationToken",
    status=403,
    namespace="com.amazon.coral.service",
)
INTERNAL_ERROR = _k("InternalFailure", status=500, fault="Receiver")
SERVICE_UNAVAILABLE = _k("ServiceUnavailable", status=503, fault="Receiver")


class SqsError(Exception):
    """An error to send back to the SQS client."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def code(self) -> str:
        """The code a query-protocol client sees (and botocore's ``Error.Code``)."""
        return self.kind.query_code

    @property
    def status(self) -> int:
        return self.kind.status

    @property
    def sender_fault(self) -> bool:
        return self.kind.fault == "Sender"

    def __repr__(self) -> str:
        return f"SqsError({self.kind.shape}, {self.message!r})"


def invalid_value(name: str, value: object, reason: str = "") -> SqsError:
    """AWS's wording for a rejected parameter value."""
    text = f"Value {value} for parameter {name} is invalid."
    if reason:
        text += f" Reason: {reason}"
    return SqsError(INVALID_PARAMETER_VALUE, text)


def missing(name: str) -> SqsError:
    return SqsError(MISSING_PARAMETER, f"The request must contain the parameter {name}.")


def no_queue() -> SqsError:
    return SqsError(QUEUE_DOES_NOT_EXIST, "The specified queue does not exist.")
