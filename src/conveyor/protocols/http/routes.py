"""Every route of the native API, in one table.

The server registers exactly these routes and the OpenAPI document is generated from
this table, so the two cannot disagree; a test checks the live server against the
document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from conveyor.protocols.http import wire

#: The default exchange ("") cannot appear in a URL path; this name stands for it.
DEFAULT_EXCHANGE_PATH = "amq.default"

API_PREFIX = "/v1"


def exchange_from_path(segment: str) -> str:
    return "" if segment == DEFAULT_EXCHANGE_PATH else segment


def exchange_to_path(name: str) -> str:
    return DEFAULT_EXCHANGE_PATH if name == "" else name


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type: Literal["string", "integer", "boolean"]
    description: str = ""


@dataclass(frozen=True, slots=True)
class Route:
    method: Literal["GET", "PUT", "POST", "PATCH", "DELETE"]
    path: str
    operation: str
    summary: str
    tag: Literal["queues", "messages", "exchanges"]
    request: type | None = None
    response: type | None = None
    query: tuple[Param, ...] = ()
    #: True for calls that may be repeated safely (the remote client retries them).
    idempotent: bool = False

    @property
    def status(self) -> int:
        return 200 if self.response is not None else 204


Q = API_PREFIX + "/queues/{queue}"
X = API_PREFIX + "/exchanges/{exchange}"

ROUTES: tuple[Route, ...] = (
    # queues
    Route("GET", API_PREFIX + "/queues", "listQueues", "List queues", "queues",
          response=wire.QueueList, idempotent=True,
          query=(Param("prefix", "string", "only names starting with this"),)),
    Route("PUT", Q, "createQueue", "Create a queue (idempotent; no body: get or create)",
          "queues",
          request=wire.QueueOptions, response=wire.QueueInfo, idempotent=True),
    Route("GET", Q, "getQueue", "Get a queue and its options", "queues",
          response=wire.QueueInfo, idempotent=True),
    Route("PATCH", Q, "updateQueue", "Change a queue's options", "queues",
          request=wire.QueueOptions, response=wire.QueueInfo, idempotent=True),
    Route("DELETE", Q, "deleteQueue", "Delete a queue and its messages", "queues",
          response=wire.DeletedOut,
          query=(Param("if_unused", "boolean", "refuse if it has consumers"),
                 Param("if_empty", "boolean", "refuse if it holds messages"))),
    Route("POST", Q + "/purge", "purgeQueue", "Remove ready and delayed messages", "queues",
          response=wire.PurgedOut),
    Route("GET", Q + "/stats", "queueStats", "Counts, age of the oldest, totals", "queues",
          response=wire.QueueStats, idempotent=True),
    Route("GET", Q + "/peek", "peek", "Look at ready messages without leasing them", "queues",
          response=wire.MessageList, idempotent=True,
          query=(Param("max_messages", "integer", "at most this many (default 10)"),)),
    Route("POST", Q + "/redrive", "redrive", "Move dead letters back to their queues", "queues",
          request=wire.RedriveIn, response=wire.MovedOut),
    # messages
    Route("POST", Q + "/messages", "send", "Send one message", "messages",
          request=wire.MessageIn, response=wire.SendResult),
    Route("POST", Q + "/messages/batch", "sendBatch", "Send several messages at once",
          "messages", request=wire.SendBatchIn, response=wire.SendBatchOut),
    Route("POST", Q + "/receive", "receive", "Lease messages, long-polling up to `wait` s",
          "messages", request=wire.ReceiveIn, response=wire.MessageList),
    Route("POST", Q + "/ack", "ack", "Acknowledge (delete) a leased message", "messages",
          request=wire.ReceiptIn, idempotent=True),
    Route("POST", Q + "/ack/batch", "ackBatch", "Acknowledge several leases", "messages",
          request=wire.ReceiptsIn, response=wire.AckResult, idempotent=True),
    Route("POST", Q + "/nack", "nack", "Release a lease (optionally after a delay)",
          "messages", request=wire.NackIn),
    Route("POST", Q + "/nack/batch", "nackBatch", "Release several leases", "messages",
          request=wire.NackBatchIn, response=wire.AckResult),
    Route("POST", Q + "/extend", "extend", "Make a lease end `timeout` s from now",
          "messages", request=wire.ExtendIn, idempotent=True),
    Route("POST", Q + "/extend/batch", "extendBatch", "Extend several leases", "messages",
          request=wire.ExtendBatchIn, response=wire.AckResult, idempotent=True),
    # exchanges
    Route("GET", API_PREFIX + "/exchanges", "listExchanges", "List exchanges", "exchanges",
          response=wire.ExchangeList, idempotent=True),
    Route("PUT", X, "declareExchange", "Declare an exchange (idempotent)", "exchanges",
          request=wire.ExchangeIn, response=wire.ExchangeInfo, idempotent=True),
    Route("GET", X, "getExchange", "Get an exchange", "exchanges",
          response=wire.ExchangeInfo, idempotent=True),
    Route("DELETE", X, "deleteExchange", "Delete an exchange and its bindings", "exchanges",
          query=(Param("if_unused", "boolean", "refuse if it has bindings"),),
          idempotent=False),
    Route("POST", X + "/bind", "bind", "Bind the exchange to a queue or exchange",
          "exchanges", request=wire.BindIn, idempotent=True),
    Route("POST", X + "/unbind", "unbind", "Remove a binding", "exchanges",
          request=wire.BindIn, idempotent=True),
    Route("POST", X + "/publish", "publish", "Publish through the exchange", "exchanges",
          request=wire.PublishIn, response=wire.PublishResult),
    Route("POST", X + "/publish/batch", "publishBatch", "Publish several messages",
          "exchanges", request=wire.PublishBatchIn, response=wire.PublishBatchOut),
    Route("GET", API_PREFIX + "/bindings", "listBindings", "List bindings", "exchanges",
          response=wire.BindingList, idempotent=True,
          query=(Param("exchange", "string", "only from this exchange"),
                 Param("queue", "string", "only to this queue"))),
)  # fmt: skip

BY_OPERATION: dict[str, Route] = {r.operation: r for r in ROUTES}
