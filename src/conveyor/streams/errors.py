"""Stream errors (part of the :mod:`conveyor.errors` tree)."""

from __future__ import annotations

from conveyor.errors import Conflict, ConveyorError, InvalidArgument, NotFound


class TopicNotFound(NotFound):
    code = "topic_not_found"


class PartitionNotFound(NotFound):
    code = "partition_not_found"


class TopicExists(Conflict):
    code = "topic_exists"


class OffsetOutOfRange(InvalidArgument):
    code = "offset_out_of_range"


class CorruptRecords(InvalidArgument):
    code = "corrupt_records"


class GroupError(ConveyorError):
    """A consumer-group call was refused; ``kafka_code`` is Kafka's error code."""

    code = "group_error"

    def __init__(self, kafka_code: int, message: str = "") -> None:
        super().__init__(message or f"group error {kafka_code}")
        self.kafka_code = kafka_code


class ProducerFenced(ConveyorError):
    """An idempotent producer's batch was refused (sequence or epoch)."""

    code = "producer_sequence"

    def __init__(self, kafka_code: int, message: str) -> None:
        super().__init__(message)
        self.kafka_code = kafka_code


def _register() -> None:
    """Let remote clients raise these classes from the codes a server answers with."""
    from conveyor.errors import BY_CODE

    for cls in (TopicNotFound, PartitionNotFound, TopicExists, OffsetOutOfRange, CorruptRecords):
        BY_CODE.setdefault(cls.code, cls)


_register()
