"""Queue names, queue URLs, ARNs, and where an SQS queue lives in the engine.

A queue belongs to one region. Queues of the *default* region (the server's configured
region) are engine queues of the same name, so the native API, AMQP and SQS all see
one queue ``orders``. Queues of any other region are engine queues named
``<region>:<name>`` (``:`` cannot occur in an SQS name).

URLs: ``http://<host>/<account>/<name>`` for the default region and
``http://<host>/queue/<region>/<account>/<name>`` for others (LocalStack's form). A
queue is resolved from the URL's path alone; its host is ignored.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from conveyor.protocols.sqs import errors as E
from conveyor.protocols.sqs.errors import SqsError

MAX_NAME = 80
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,80}$")
_FIFO_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,75}\.fifo$")
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")


class QueueRef(NamedTuple):
    """An SQS queue as a client names it."""

    region: str
    account: str
    name: str

    def engine_name(self, default_region: str) -> str:
        return engine_name(self.region, self.name, default_region)


def is_valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name) or _FIFO_NAME_RE.match(name))


def check_queue_name(name: str, fifo: bool) -> None:
    """AWS's rules for CreateQueue's QueueName."""
    if fifo:
        if not _FIFO_NAME_RE.match(name):
            raise SqsError(
                E.INVALID_PARAMETER_VALUE,
                "The name of a FIFO queue can only include alphanumeric characters, hyphens, "
                "or underscores, must end with .fifo suffix and be 1 to 80 in length.",
            )
        return
    if not _NAME_RE.match(name):
        if name.endswith(".fifo") and _FIFO_NAME_RE.match(name):
            raise SqsError(
                E.INVALID_PARAMETER_VALUE,
                "The queue name ends with .fifo but the FifoQueue attribute is not set to true.",
            )
        raise SqsError(
            E.INVALID_PARAMETER_VALUE,
            "Can only include alphanumeric characters, hyphens, or underscores. 1 to 80 in length",
        )


def engine_name(region: str, name: str, default_region: str) -> str:
    return name if region == default_region else f"{region}:{name}"


def from_engine_name(engine: str, default_region: str) -> tuple[str, str] | None:
    """Engine queue name -> (region, SQS name), or None if SQS cannot name it."""
    region, sep, name = engine.rpartition(":")
    if not sep:
        region, name = default_region, engine
    elif not _REGION_RE.match(region) or region == default_region:
        return None
    return (region, name) if is_valid_name(name) else None


def queue_url(base: str, ref: QueueRef, default_region: str) -> str:
    """``base`` is ``scheme://host[:port]`` of the request."""
    if ref.region == default_region:
        return f"{base}/{ref.account}/{ref.name}"
    return f"{base}/queue/{ref.region}/{ref.account}/{ref.name}"


def parse_queue_url(url: str, default_region: str, region: str, account: str) -> QueueRef:
    """Resolve a QueueUrl (or its path) to a queue.

    Accepted paths: ``/<account>/<name>`` and ``/queue/<name>`` (ElasticMQ's form) name
    a queue of ``default_region``; ``/queue/<region>/<account>/<name>`` names its
    region; a bare ``<name>`` is taken in the request's ``region``.
    """
    if not url:
        raise E.missing("QueueUrl")
    path = urlsplit(url).path if "://" in url else url
    parts = [unquote(p) for p in path.split("/") if p]
    if len(parts) == 1:
        ref = QueueRef(region, account, parts[0])
    elif len(parts) == 2:
        owner = account if parts[0] == "queue" else parts[0]
        ref = QueueRef(default_region, owner, parts[1])
    elif len(parts) == 4 and parts[0] == "queue":
        ref = QueueRef(parts[1], parts[2], parts[3])
    else:
        raise E.no_queue()
    if not is_valid_name(ref.name):
        raise E.no_queue()
    return ref


def queue_arn(ref: QueueRef) -> str:
    return f"arn:aws:sqs:{ref.region}:{ref.account}:{ref.name}"


def parse_arn(arn: str, parameter: str = "QueueArn") -> QueueRef:
    parts = arn.split(":")
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sqs" or not parts[5]:
        raise E.invalid_value(parameter, arn, "Invalid ARN.")
    return QueueRef(parts[3], parts[4], parts[5])
