"""AMQP 0-9-1, sans-I/O: bytes in, events out (see :mod:`.connection`)."""

from .connection import (
    ChannelClosed,
    ChannelOpened,
    ConnectionClosed,
    ConnectionOpened,
    ConnectionTerminated,
    Event,
    MessageReceived,
    MethodReceived,
    ServerConnection,
    State,
)
from .errors import AmqpError, RemoteProtocolError

__all__ = [
    "AmqpError",
    "ChannelClosed",
    "ChannelOpened",
    "ConnectionClosed",
    "ConnectionOpened",
    "ConnectionTerminated",
    "Event",
    "MessageReceived",
    "MethodReceived",
    "RemoteProtocolError",
    "ServerConnection",
    "State",
]
