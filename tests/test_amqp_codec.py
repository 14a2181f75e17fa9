"""The hand-built hot frames are byte-for-byte what pamqp marshals."""

from __future__ import annotations

import pytest
from pamqp import commands, frame

from conveyor.protocols.amqp import codec


@pytest.mark.parametrize("channel", [1, 7, 65535])
@pytest.mark.parametrize("tag", [1, 255, 2**32 + 5, 2**63 - 1])
@pytest.mark.parametrize("multiple", [False, True])
def test_basic_ack_frame_matches_pamqp(channel: int, tag: int, multiple: bool) -> None:
    expected = frame.marshal(commands.Basic.Ack(tag, multiple), channel)
    assert codec.basic_ack_frame(channel, tag, multiple) == expected


@pytest.mark.parametrize(
    ("consumer_tag", "exchange", "routing_key"),
    [
        ("ctag-1", "", "tasks"),
        ("amq.ctag-x", "amq.topic", "a.b.c"),
        ("", "", ""),
        ("tâche", "orders", "clé.routage"),  # shortstr lengths count UTF-8 bytes
        ("c" * 255, "e" * 127, "k" * 255),  # the longest pamqp accepts for each
    ],
)
@pytest.mark.parametrize("redelivered", [False, True])
def test_basic_deliver_frame_matches_pamqp(
    consumer_tag: str, exchange: str, routing_key: str, redelivered: bool
) -> None:
    for channel, tag in ((1, 1), (300, 2**40 + 3)):
        method = commands.Basic.Deliver(consumer_tag, tag, redelivered, exchange, routing_key)
        expected = frame.marshal(method, channel)
        got = codec.basic_deliver_frame(
            channel, consumer_tag, tag, redelivered, exchange, routing_key
        )
        assert got == expected
        # and a client reading it back sees the same method
        _, ch, parsed = frame.unmarshal(got)
        assert ch == channel
        assert isinstance(parsed, commands.Basic.Deliver)
        assert (parsed.consumer_tag, parsed.delivery_tag, parsed.redelivered) == (
            consumer_tag,
            tag,
            redelivered,
        )
        assert (parsed.exchange, parsed.routing_key) == (exchange, routing_key)
