"""The Python client: blocking (``connect``) and asyncio (``connect_async``)."""

from conveyor.client.aio import (
    AsyncConnection,
    AsyncExchange,
    AsyncMessage,
    AsyncQueue,
    connect_async,
    make_message,
)
from conveyor.client.sync import Connection, Exchange, Message, Queue, connect

__all__ = [
    "AsyncConnection",
    "AsyncExchange",
    "AsyncMessage",
    "AsyncQueue",
    "Connection",
    "Exchange",
    "Message",
    "Queue",
    "connect",
    "connect_async",
    "make_message",
]
