"""Streams: partitioned append-only logs with consumer groups (Kafka's model)."""

from conveyor.streams.engine import (
    PartitionOffsets,
    StreamEngine,
    StreamRecord,
    TopicInfo,
    check_topic_name,
    streams_dir,
)
from conveyor.streams.errors import (
    CorruptRecords,
    GroupError,
    OffsetOutOfRange,
    PartitionNotFound,
    ProducerFenced,
    TopicExists,
    TopicNotFound,
)
from conveyor.streams.log import TopicConfig

__all__ = [
    "CorruptRecords",
    "GroupError",
    "OffsetOutOfRange",
    "PartitionNotFound",
    "PartitionOffsets",
    "ProducerFenced",
    "StreamEngine",
    "StreamRecord",
    "TopicConfig",
    "TopicExists",
    "TopicInfo",
    "TopicNotFound",
    "check_topic_name",
    "streams_dir",
]
