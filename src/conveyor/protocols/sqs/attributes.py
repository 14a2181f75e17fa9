"""SQS queue attributes <-> engine QueueOptions.

Attributes the engine implements map onto QueueOptions fields; the rest (policy, KMS,
FIFO settings the adapter applies, tags) are kept verbatim in
``QueueOptions.attributes`` under ``sqs:`` keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import msgspec

from conveyor.model import QueueOptions, QueueStats
from conveyor.protocols.sqs import errors as E
from conveyor.protocols.sqs.errors import SqsError
from conveyor.protocols.sqs.names import QueueRef, parse_arn, queue_arn

PREFIX = "sqs:"
TAG_PREFIX = "sqs:tag:"

DEFAULT_RETENTION = 345_600
MAX_RETENTION = 1_209_600
DEFAULT_MAX_SIZE = 1_048_576
DEFAULT_VISIBILITY = 30

# Attributes kept as strings in QueueOptions.attributes (validated here).
STORED = (
    "Policy",
    "ReceiveMessageWaitTimeSeconds",
    "KmsMasterKeyId",
    "KmsDataKeyReusePeriodSeconds",
    "SqsManagedSseEnabled",
    "ContentBasedDeduplication",
    "DeduplicationScope",
    "FifoThroughputLimit",
    "RedriveAllowPolicy",
)
ENGINE = (
    "DelaySeconds",
    "MaximumMessageSize",
    "MessageRetentionPeriod",
    "VisibilityTimeout",
    "RedrivePolicy",
    "FifoQueue",
)
SETTABLE = frozenset(STORED + ENGINE)
READ_ONLY = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
    "CreatedTimestamp",
    "LastModifiedTimestamp",
    "QueueArn",
)
ALL = frozenset(SETTABLE | set(READ_ONLY))
FIFO_ONLY = ("ContentBasedDeduplication", "DeduplicationScope", "FifoThroughputLimit")


def _int_in(name: str, value: str, low: int, high: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = low - 1
    if not (low <= n <= high):
        raise SqsError(E.INVALID_ATTRIBUTE_VALUE, f"Invalid value for the parameter {name}.")
    return n


def _bool(name: str, value: str) -> bool:
    low = value.lower()
    if low not in ("true", "false"):
        raise SqsError(E.INVALID_ATTRIBUTE_VALUE, f"Invalid value for the parameter {name}.")
    return low == "true"


def _choice(name: str, value: str, choices: Iterable[str]) -> str:
    if value not in choices:
        raise SqsError(E.INVALID_ATTRIBUTE_VALUE, f"Invalid value for the parameter {name}.")
    return value


def _json_object(name: str, value: str) -> dict[str, object]:
    try:
        doc = json.loads(value)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise SqsError(E.INVALID_ATTRIBUTE_VALUE, f"Invalid value for the parameter {name}.")
    return doc


class Redrive(NamedTuple):
    target: QueueRef
    max_receive_count: int


def parse_redrive_policy(value: str) -> Redrive | None:
    """``{"deadLetterTargetArn", "maxReceiveCount"}``; an empty string removes it."""
    if value == "" or value == "{}":
        return None
    doc = _json_object("RedrivePolicy", value)
    arn = doc.get("deadLetterTargetArn")
    count = doc.get("maxReceiveCount")
    if isinstance(count, str) and count.isdigit():
        count = int(count)
    if not isinstance(arn, str) or not isinstance(count, int) or isinstance(count, bool):
        raise SqsError(
            E.INVALID_PARAMETER_VALUE,
            f"Value {value} for parameter RedrivePolicy is invalid. Reason: Redrive policy "
            "is not a valid JSON map with deadLetterTargetArn and maxReceiveCount.",
        )
    if not (1 <= count <= 1000):
        raise SqsError(
            E.INVALID_PARAMETER_VALUE,
            f"Value {value} for parameter RedrivePolicy is invalid. Reason: Invalid value for "
            "maxReceiveCount: "
            f"{count}, valid values are from 1 to 1000 both inclusive.",
        )
    return Redrive(parse_arn(arn, "RedrivePolicy"), count)


def check_redrive_allow_policy(value: str) -> None:
    if value == "":
        return
    doc = _json_object("RedriveAllowPolicy", value)
    permission = doc.get("redrivePermission")
    if permission not in ("allowAll", "denyAll", "byQueue"):
        raise SqsError(
            E.INVALID_ATTRIBUTE_VALUE, "Invalid value for the parameter RedriveAllowPolicy."
        )
    sources = doc.get("sourceQueueArns")
    if permission == "byQueue":
        if not isinstance(sources, list) or not (1 <= len(sources) <= 10):
            raise SqsError(
                E.INVALID_ATTRIBUTE_VALUE,
                "Invalid value for the parameter RedriveAllowPolicy. Reason: sourceQueueArns "
                "must list 1 to 10 queues when redrivePermission is byQueue.",
            )
    elif sources:
        raise SqsError(
            E.INVALID_ATTRIBUTE_VALUE,
            "Invalid value for the parameter RedriveAllowPolicy. Reason: sourceQueueArns may "
            "only be given when redrivePermission is byQueue.",
        )


def redrive_allowed(allow_policy: str | None, source_arn: str) -> bool:
    """Does a DLQ's RedriveAllowPolicy let ``source_arn`` use it?"""
    if not allow_policy:
        return True
    try:
        doc = json.loads(allow_policy)
    except ValueError:
        return True
    permission = doc.get("redrivePermission", "allowAll")
    if permission == "denyAll":
        return False
    if permission == "byQueue":
        return source_arn in (doc.get("sourceQueueArns") or [])
    return True


def new_queue_options(fifo: bool) -> QueueOptions:
    """An SQS queue's defaults."""
    return QueueOptions(
        visibility_timeout=float(DEFAULT_VISIBILITY),
        message_ttl=float(DEFAULT_RETENTION),
        max_message_size=DEFAULT_MAX_SIZE,
        fifo=fifo,
        dedup_window=300.0,
        attributes={PREFIX + "SqsManagedSseEnabled": "true"},
    )


def apply_attributes(
    options: QueueOptions,
    attributes: Mapping[str, str],
    *,
    fifo: bool,
    dead_letter_name: Callable[[QueueRef], str],
    now: float,
) -> QueueOptions:
    """Validate ``attributes`` and return ``options`` with them applied.

    ``dead_letter_name`` turns a RedrivePolicy's target into an engine queue name
    (the caller checks that it exists).
    """
    changes: dict[str, object] = {}
    stored = dict(options.attributes)
    for name, value in attributes.items():
        if name not in SETTABLE:
            raise SqsError(E.INVALID_ATTRIBUTE_NAME, f"Unknown Attribute {name}.")
        if name in FIFO_ONLY and not fifo:
            raise SqsError(E.INVALID_ATTRIBUTE_NAME, f"Unknown Attribute {name}.")
        if name == "DelaySeconds":
            changes["delay"] = float(_int_in(name, value, 0, 900))
        elif name == "MaximumMessageSize":
            changes["max_message_size"] = _int_in(name, value, 1024, 1_048_576)
        elif name == "MessageRetentionPeriod":
            changes["message_ttl"] = float(_int_in(name, value, 60, MAX_RETENTION))
        elif name == "VisibilityTimeout":
            changes["visibility_timeout"] = float(_int_in(name, value, 0, 43_200))
        elif name == "FifoQueue":
            if _bool(name, value) != fifo:
                raise SqsError(
                    E.INVALID_ATTRIBUTE_VALUE, "Invalid value for the parameter FifoQueue."
                )
        elif name == "RedrivePolicy":
            redrive = parse_redrive_policy(value)
            if redrive is None:
                changes["dead_letter"] = None
                changes["max_receives"] = None
            else:
                changes["dead_letter"] = dead_letter_name(redrive.target)
                changes["max_receives"] = redrive.max_receive_count
        else:
            if name == "ReceiveMessageWaitTimeSeconds":
                value = str(_int_in(name, value, 0, 20))
            elif name == "KmsDataKeyReusePeriodSeconds":
                value = str(_int_in(name, value, 60, 86_400))
            elif name in ("SqsManagedSseEnabled", "ContentBasedDeduplication"):
                value = "true" if _bool(name, value) else "false"
            elif name == "DeduplicationScope":
                _choice(name, value, ("messageGroup", "queue"))
            elif name == "FifoThroughputLimit":
                _choice(name, value, ("perQueue", "perMessageGroupId"))
            elif name == "RedriveAllowPolicy":
                check_redrive_allow_policy(value)
            elif name == "Policy" and value:
                _json_object(name, value)
            if value == "" and name in ("Policy", "RedriveAllowPolicy", "KmsMasterKeyId"):
                stored.pop(PREFIX + name, None)
            else:
                stored[PREFIX + name] = value
    stored[PREFIX + "LastModifiedTimestamp"] = str(int(now))
    changes["attributes"] = stored
    return msgspec.structs.replace(options, **changes)


def current_value(
    name: str, options: QueueOptions, arn_of: Callable[[str], str | None]
) -> str | None:
    """The value a settable attribute has now (for CreateQueue's idempotency check)."""
    if name == "DelaySeconds":
        return str(int(options.delay))
    if name == "MaximumMessageSize":
        return str(options.max_message_size or DEFAULT_MAX_SIZE)
    if name == "MessageRetentionPeriod":
        ttl = options.message_ttl
        return str(int(ttl)) if ttl is not None else str(MAX_RETENTION)
    if name == "VisibilityTimeout":
        return str(int(options.visibility_timeout))
    if name == "FifoQueue":
        return "true" if options.fifo else "false"
    if name == "RedrivePolicy":
        if options.dead_letter is None or options.max_receives is None:
            return None
        arn = arn_of(options.dead_letter)
        if arn is None:
            return None
        return json.dumps(
            {"deadLetterTargetArn": arn, "maxReceiveCount": options.max_receives},
            separators=(",", ":"),
        )
    return options.attributes.get(PREFIX + name)


def same_value(name: str, given: str, current: str | None) -> bool:
    if current is None:
        return given in ("", "false") or (name == "SqsManagedSseEnabled" and given == "true")
    if name in ("RedrivePolicy", "RedriveAllowPolicy", "Policy"):
        try:
            return bool(json.loads(given) == json.loads(current))
        except ValueError:
            return given == current
    if current.lower() in ("true", "false"):
        return given.lower() == current.lower()
    return given == current


def queue_attributes(
    ref: QueueRef,
    options: QueueOptions,
    created_at: float,
    stats: QueueStats | None,
    names: Iterable[str],
    arn_of: Callable[[str], str | None],
) -> dict[str, str]:
    """GetQueueAttributes: validate ``names`` and build the answer."""
    wanted: list[str] = []
    for name in names:
        if name == "All":
            wanted = list(ALL)
            break
        if name not in ALL:
            raise SqsError(E.INVALID_ATTRIBUTE_NAME, f"Unknown Attribute {name}.")
        wanted.append(name)
    out: dict[str, str] = {}
    for name in wanted:
        if name == "QueueArn":
            out[name] = queue_arn(ref)
        elif name == "CreatedTimestamp":
            out[name] = str(int(created_at))
        elif name == "LastModifiedTimestamp":
            out[name] = options.attributes.get(PREFIX + name, str(int(created_at)))
        elif name == "ApproximateNumberOfMessages":
            out[name] = str(stats.ready if stats else 0)
        elif name == "ApproximateNumberOfMessagesNotVisible":
            out[name] = str(stats.in_flight if stats else 0)
        elif name == "ApproximateNumberOfMessagesDelayed":
            out[name] = str(stats.delayed if stats else 0)
        elif name == "FifoQueue":
            if options.fifo:
                out[name] = "true"
        elif name in FIFO_ONLY:
            if options.fifo:
                default = {
                    "ContentBasedDeduplication": "false",
                    "DeduplicationScope": "queue",
                    "FifoThroughputLimit": "perQueue",
                }[name]
                out[name] = options.attributes.get(PREFIX + name, default)
        elif name == "ReceiveMessageWaitTimeSeconds":
            out[name] = options.attributes.get(PREFIX + name, "0")
        else:
            value = current_value(name, options, arn_of)
            if value is not None:
                out[name] = value
    return out


def tags_of(options: QueueOptions) -> dict[str, str]:
    n = len(TAG_PREFIX)
    return {k[n:]: v for k, v in options.attributes.items() if k.startswith(TAG_PREFIX)}


def with_tags(
    options: QueueOptions, add: Mapping[str, str], remove: Iterable[str] = ()
) -> QueueOptions:
    stored = dict(options.attributes)
    for key in remove:
        stored.pop(TAG_PREFIX + key, None)
    for key, value in add.items():
        stored[TAG_PREFIX + key] = value
    if len([k for k in stored if k.startswith(TAG_PREFIX)]) > 50:
        raise SqsError(E.INVALID_PARAMETER_VALUE, "Too many tags added for queue.")
    return msgspec.structs.replace(options, attributes=stored)


def check_tags(tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        if not key or len(key) > 128 or key.lower().startswith("aws:"):
            raise SqsError(E.INVALID_PARAMETER_VALUE, f"Tag key {key!r} is invalid.")
        if len(value) > 256:
            raise SqsError(E.INVALID_PARAMETER_VALUE, f"Tag value for {key!r} is too long.")


def wait_time(options: QueueOptions) -> int:
    try:
        return int(options.attributes.get(PREFIX + "ReceiveMessageWaitTimeSeconds", "0"))
    except ValueError:
        return 0


def flag(options: QueueOptions, name: str) -> bool:
    return options.attributes.get(PREFIX + name, "false") == "true"


def setting(options: QueueOptions, name: str, default: str) -> str:
    return options.attributes.get(PREFIX + name, default)


_ACTIONS = frozenset(
    {
        "*",
        "SendMessage",
        "ReceiveMessage",
        "DeleteMessage",
        "ChangeMessageVisibility",
        "GetQueueAttributes",
        "GetQueueUrl",
        "ListDeadLetterSourceQueues",
        "PurgeQueue",
        "ListQueueTags",
        "CancelMessageMoveTask",
        "StartMessageMoveTask",
        "ListMessageMoveTasks",
    }
)


def add_permission(
    policy: str | None, label: str, accounts: list[str], actions: list[str], arn: str
) -> str:
    """AddPermission: a policy statement with ``Sid`` = label (stored, not enforced)."""
    if not accounts:
        raise E.missing("AWSAccountIds")
    if not actions:
        raise E.missing("Actions")
    for action in actions:
        if action not in _ACTIONS:
            raise E.invalid_value("Actions", action, f"Invalid action name {action}.")
    doc: dict[str, Any] = (
        json.loads(policy) if policy else {"Version": "2012-10-17", "Id": f"{arn}/SQSDefaultPolicy"}
    )
    statements: list[dict[str, Any]] = doc.setdefault("Statement", [])
    if any(s.get("Sid") == label for s in statements):
        raise E.invalid_value("Label", label, "Already exists.")
    principals = [f"arn:aws:iam::{a}:root" for a in accounts]
    statements.append(
        {
            "Sid": label,
            "Effect": "Allow",
            "Principal": {"AWS": principals[0] if len(principals) == 1 else principals},
            "Action": [f"SQS:{a}" for a in actions] if len(actions) > 1 else f"SQS:{actions[0]}",
            "Resource": arn,
        }
    )
    return json.dumps(doc, separators=(",", ":"))


def remove_permission(policy: str | None, label: str) -> str:
    """RemovePermission: drop the statement ``label``; returns the new policy ('' if empty)."""
    doc: dict[str, Any] = json.loads(policy) if policy else {}
    statements: list[dict[str, Any]] = doc.get("Statement", [])
    kept = [s for s in statements if s.get("Sid") != label]
    if len(kept) == len(statements):
        raise E.invalid_value("Label", label, "can't find label.")
    if not kept:
        return ""
    doc["Statement"] = kept
    return json.dumps(doc, separators=(",", ":"))
