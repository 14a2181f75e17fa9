"""AMQP reply codes and the one exception that carries them.

RabbitMQ's reply texts start with the code's name (``NOT_FOUND - no queue 'x' in
vhost '/'``) and client test suites match on that text, so :class:`AmqpError` builds
the same text. Whether an error closes the channel ("soft") or the whole connection
("hard") follows from the code, as in the 0-9-1 specification.
"""

from __future__ import annotations

REPLY_SUCCESS = 200
CONTENT_TOO_LARGE = 311
NO_ROUTE = 312
NO_CONSUMERS = 313
CONNECTION_FORCED = 320
INVALID_PATH = 402
ACCESS_REFUSED = 403
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
FRAME_ERROR = 501
SYNTAX_ERROR = 502
COMMAND_INVALID = 503
CHANNEL_ERROR = 504
UNEXPECTED_FRAME = 505
RESOURCE_ERROR = 506
NOT_ALLOWED = 530
NOT_IMPLEMENTED = 540
INTERNAL_ERROR = 541

REPLY_NAMES: dict[int, str] = {
    REPLY_SUCCESS: "OK",
    CONTENT_TOO_LARGE: "CONTENT_TOO_LARGE",
    NO_ROUTE: "NO_ROUTE",
    NO_CONSUMERS: "NO_CONSUMERS",
    CONNECTION_FORCED: "CONNECTION_FORCED",
    INVALID_PATH: "INVALID_PATH",
    ACCESS_REFUSED: "ACCESS_REFUSED",
    NOT_FOUND: "NOT_FOUND",
    RESOURCE_LOCKED: "RESOURCE_LOCKED",
    PRECONDITION_FAILED: "PRECONDITION_FAILED",
    FRAME_ERROR: "FRAME_ERROR",
    SYNTAX_ERROR: "SYNTAX_ERROR",
    COMMAND_INVALID: "COMMAND_INVALID",
    CHANNEL_ERROR: "CHANNEL_ERROR",
    UNEXPECTED_FRAME: "UNEXPECTED_FRAME",
    RESOURCE_ERROR: "RESOURCE_ERROR",
    NOT_ALLOWED: "NOT_ALLOWED",
    NOT_IMPLEMENTED: "NOT_IMPLEMENTED",
    INTERNAL_ERROR: "INTERNAL_ERROR",
}

#: Codes that close only the channel; every other error code closes the connection.
SOFT_ERRORS = frozenset(
    {
        CONTENT_TOO_LARGE,
        NO_ROUTE,
        NO_CONSUMERS,
        ACCESS_REFUSED,
        NOT_FOUND,
        RESOURCE_LOCKED,
        PRECONDITION_FAILED,
    }
)


class AmqpError(Exception):
    """A protocol-level failure to report as Channel.Close or Connection.Close.

    ``detail`` is the text after the code name; ``class_id``/``method_id`` name the
    method that failed (0, 0 when none did).
    """

    def __init__(self, code: int, detail: str, class_id: int = 0, method_id: int = 0) -> None:
        self.code = code
        self.detail = detail
        self.class_id = class_id
        self.method_id = method_id
        super().__init__(self.reply_text)

    @property
    def reply_text(self) -> str:
        # Reply texts are shortstrs: 255 bytes at most.
        text = f"{REPLY_NAMES.get(self.code, 'ERROR')} - {self.detail}"
        return text.encode()[:255].decode(errors="ignore")

    @property
    def hard(self) -> bool:
        """True when the error closes the connection rather than one channel."""
        return self.code not in SOFT_ERRORS

    def for_method(self, class_id: int, method_id: int) -> AmqpError:
        """Return this error tagged with the method that caused it (when untagged)."""
        if not self.class_id:
            self.class_id, self.method_id = class_id, method_id
        return self


class RemoteProtocolError(AmqpError):
    """The peer broke the framing or the state machine; always closes the connection."""
