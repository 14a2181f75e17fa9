"""One exception tree for all of conveyor.

    ConveyorError
    ├── InvalidArgument            a value the caller passed is malformed or out of range
    │   ├── InvalidName            queue / exchange / vhost name rejected
    │   └── MessageTooLarge        body above the configured limit
    ├── NotFound                   a named thing does not exist
    │   ├── QueueNotFound
    │   └── ExchangeNotFound
    ├── Conflict                   the request contradicts existing state
    │   ├── QueueExists            created again with different options
    │   ├── ExchangeExists
    │   └── ReceiptInvalid         ack/nack/extend with a receipt that is not the current lease
    ├── QueueFull                  max_length with overflow=reject-new
    ├── LimitExceeded              a configured server limit (queues, connections, ...)
    ├── Unroutable                 (only raised where the caller asked for it, e.g. mandatory)
    ├── Unauthorized               wrong or missing credentials
    ├── StoreError                 the store failed (disk full, corrupt file, schema too new)
    │   ├── StoreFull
    │   ├── StoreCorrupt
    │   └── SchemaTooNew
    ├── ClosedError                the connection / broker has been closed
    └── Unavailable                the server cannot be reached (remote client)

Protocol adapters translate these into their own terms (HTTP status and code, SQS error
codes, AMQP reply codes) at one boundary each; each class carries a stable machine
``code`` for that purpose.
"""

from __future__ import annotations


class ConveyorError(Exception):
    """Base of every error conveyor raises on purpose."""

    code: str = "error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ConveyorError):
    code = "invalid_argument"


class InvalidName(InvalidArgument):
    code = "invalid_name"


class MessageTooLarge(InvalidArgument):
    code = "message_too_large"


class NotFound(ConveyorError):
    code = "not_found"


class QueueNotFound(NotFound):
    code = "queue_not_found"


class ExchangeNotFound(NotFound):
    code = "exchange_not_found"


class Conflict(ConveyorError):
    code = "conflict"


class QueueExists(Conflict):
    code = "queue_exists"


class ExchangeExists(Conflict):
    code = "exchange_exists"


class ReceiptInvalid(Conflict):
    code = "receipt_invalid"


class QueueFull(ConveyorError):
    code = "queue_full"


class LimitExceeded(ConveyorError):
    code = "limit_exceeded"


class Unroutable(ConveyorError):
    code = "unroutable"


class Unauthorized(ConveyorError):
    code = "unauthorized"


class StoreError(ConveyorError):
    code = "store_error"


class StoreFull(StoreError):
    code = "store_full"


class StoreCorrupt(StoreError):
    code = "store_corrupt"


class SchemaTooNew(StoreError):
    code = "schema_too_new"


class ClosedError(ConveyorError):
    code = "closed"


class Unavailable(ConveyorError):
    code = "unavailable"


#: Every concrete error class by its machine code; the remote client uses it to raise
#: the same class the server raised.
BY_CODE: dict[str, type[ConveyorError]] = {
    cls.code: cls
    for cls in (
        ConveyorError,
        InvalidArgument,
        InvalidName,
        MessageTooLarge,
        NotFound,
        QueueNotFound,
        ExchangeNotFound,
        Conflict,
        QueueExists,
        ExchangeExists,
        ReceiptInvalid,
        QueueFull,
        LimitExceeded,
        Unroutable,
        Unauthorized,
        StoreError,
        StoreFull,
        StoreCorrupt,
        SchemaTooNew,
        ClosedError,
        Unavailable,
    )
}
