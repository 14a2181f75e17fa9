"""conveyor: a message queue. Durable work queues, pub/sub exchanges, many protocols.

import conveyor
mq = conveyor.connect("./conveyor-data")
orders = mq.queue("orders", visibility_timeout=30)
orders.send(b"Process order #12345")
for msg in orders.receive(max_messages=10, wait=5):
    msg.ack()
"""

from conveyor.client import (
    AsyncConnection,
    AsyncExchange,
    AsyncMessage,
    AsyncQueue,
    Connection,
    Exchange,
    Message,
    Queue,
    connect,
    connect_async,
)
from conveyor.errors import ConveyorError
from conveyor.model import NewMessage, Properties, QueueOptions

__version__ = "0.1.0"

__all__ = [
    "AsyncConnection",
    "AsyncExchange",
    "AsyncMessage",
    "AsyncQueue",
    "Connection",
    "ConveyorError",
    "Exchange",
    "Message",
    "NewMessage",
    "Properties",
    "Queue",
    "QueueOptions",
    "__version__",
    "connect",
    "connect_async",
]
