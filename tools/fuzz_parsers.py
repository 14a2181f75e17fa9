"""Fuzz targets for every parser conveyor exposes to the network.

    python tools/fuzz_parsers.py --fuzz-seconds 60          # every target, 60 s each
    python tools/fuzz_parsers.py --target sqs_query --fuzz-seconds 300

Each target takes arbitrary bytes and must either parse or refuse the input in its
protocol's own terms (AMQP: the connection answers Connection.Close / terminates;
SQS: ``SqsError``; native API: ``InvalidArgument``). Any other exception is a bug.
``tests/test_fuzz_parsers.py`` runs every target for a fixed number of inputs with
hypothesis; this script runs them for as long as asked, mutating seed inputs (valid
requests) and random bytes, and prints how many inputs each target tried.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import msgspec  # noqa: E402
from pamqp import commands, frame  # noqa: E402

from conveyor import errors  # noqa: E402
from conveyor.protocols.amqp import ServerConnection  # noqa: E402
from conveyor.protocols.http import decode_json, exchange_from_path, wire  # noqa: E402
from conveyor.protocols.sqs import codec as sqs_codec  # noqa: E402
from conveyor.protocols.sqs.errors import SqsError  # noqa: E402

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
_AMQP_OPEN = (
    AMQP_HEADER
    + frame.marshal(
        commands.Connection.StartOk(
            client_properties={}, mechanism="PLAIN", response="\0guest\0guest"
        ),
        0,
    )
    + frame.marshal(commands.Connection.TuneOk(2047, 131072, 60), 0)
    + frame.marshal(commands.Connection.Open("/"), 0)
    + frame.marshal(commands.Channel.Open(), 1)
)


def _amqp(prefix: bytes, data: bytes) -> None:
    conn = ServerConnection(authenticate=lambda u, p: (u, p) == ("guest", "guest"))
    conn.receive_data(prefix)
    cut = 1 + (data[0] % 64 if data else 0)
    for i in range(0, len(data), cut):
        conn.receive_data(data[i : i + cut])
        conn.data_to_send()
    conn.data_to_send()


def amqp_handshake(data: bytes) -> None:
    """Raw bytes from the first byte of a connection."""
    _amqp(b"", data)


def amqp_frames(data: bytes) -> None:
    """Frames after a completed handshake and an open channel 1."""
    _amqp(_AMQP_OPEN, data)


_SQS_OPS = sorted(sqs_codec.all_operations())


def sqs_json(data: bytes) -> None:
    """An AWS JSON 1.0 request body for one of the operations (picked by the first byte)."""
    op = _SQS_OPS[data[0] % len(_SQS_OPS)] if data else "SendMessage"
    with contextlib.suppress(SqsError):
        sqs_codec.parse_json_request(op, data[1:])


def sqs_target(data: bytes) -> None:
    """The X-Amz-Target header."""
    try:
        op = sqs_codec.operation_from_target(data.decode("utf-8", "replace"))
        sqs_codec.parse_json_request(op, b"{}")
    except SqsError:
        pass


def sqs_query(data: bytes) -> None:
    """A query-protocol form body (``Action=...&...``)."""
    with contextlib.suppress(SqsError):
        sqs_codec.parse_query_request(sqs_codec.parse_form(data))


_NATIVE_TYPES: list[type[msgspec.Struct]] = [
    wire.MessageIn, wire.PublishIn, wire.PublishBatchIn, wire.SendBatchIn, wire.ReceiveIn,
    wire.ReceiptIn, wire.ReceiptsIn, wire.NackIn, wire.NackBatchIn, wire.ExtendIn,
    wire.ExtendBatchIn, wire.RedriveIn, wire.ExchangeIn, wire.BindIn, wire.QueueOptions,
]  # fmt: skip


def native_json(data: bytes) -> None:
    """A native API request body for one of the request types (by the first byte),
    then the conversion to the engine's message (base64 bodies, tagged headers)."""
    tp = _NATIVE_TYPES[data[0] % len(_NATIVE_TYPES)] if data else wire.MessageIn
    try:
        obj = decode_json(data[1:], tp)
        if isinstance(obj, wire.MessageIn):
            obj.to_model()
        elif isinstance(obj, wire.SendBatchIn | wire.PublishBatchIn):
            for m in obj.messages:
                m.to_model()
        elif isinstance(obj, wire.QueueOptions):
            obj.validate() if hasattr(obj, "validate") else None
    except errors.InvalidArgument:
        pass


def native_path(data: bytes) -> None:
    """An exchange name from a URL path segment."""
    with contextlib.suppress(errors.InvalidArgument):
        exchange_from_path(data.decode("utf-8", "replace"))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "amqp_handshake": amqp_handshake,
    "amqp_frames": amqp_frames,
    "sqs_json": sqs_json,
    "sqs_target": sqs_target,
    "sqs_query": sqs_query,
    "native_json": native_json,
    "native_path": native_path,
}

#: Valid inputs to mutate from.
SEEDS: dict[str, list[bytes]] = {
    "amqp_handshake": [_AMQP_OPEN],
    "amqp_frames": [
        frame.marshal(commands.Queue.Declare(queue="q"), 1),
        frame.marshal(commands.Basic.Publish(routing_key="q"), 1),
        frame.marshal(commands.Basic.Consume(queue="q"), 1),
        frame.marshal(commands.Confirm.Select(), 1),
    ],
    "sqs_json": [
        bytes([_SQS_OPS.index("SendMessage")])
        + b'{"QueueUrl": "http://h/000000000000/q", "MessageBody": "hi",'
        b' "MessageAttributes": {"a": {"DataType": "Number", "StringValue": "1"}}}',
        bytes([_SQS_OPS.index("ReceiveMessage")])
        + b'{"QueueUrl": "q", "MaxNumberOfMessages": 10, "WaitTimeSeconds": 1}',
    ],
    "sqs_target": [b"AmazonSQS.SendMessage"],
    "sqs_query": [
        b"Action=SendMessage&QueueUrl=q&MessageBody=hi&MessageAttribute.1.Name=a"
        b"&MessageAttribute.1.Value.DataType=String&MessageAttribute.1.Value.StringValue=x",
        b"Action=SendMessageBatch&QueueUrl=q&SendMessageBatchRequestEntry.1.Id=1"
        b"&SendMessageBatchRequestEntry.1.MessageBody=b",
    ],
    "native_json": [
        bytes([_NATIVE_TYPES.index(wire.MessageIn)])
        + b'{"body": "AAE=", "body_encoding": "base64", "headers": {"x": {"$base64": "AA=="}}}',
        bytes([_NATIVE_TYPES.index(wire.SendBatchIn)]) + b'{"messages": [{"body": "x"}]}',
    ],
    "native_path": [b"amq.default", b"orders"],
}


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 2 and b:
            del b[pos : pos + rng.randint(1, 16)]
        elif op == 3:
            b[pos:pos] = rng.choice([b"\xff" * 4, b"\x00" * 4, b"{", b"}", b"[", b'"', b"&", b"="])
        else:
            b = b[:pos]
    return bytes(b)


def run(name: str, seconds: float, seed: int | None) -> int:
    """Run one target for ``seconds``; returns the number of inputs tried."""
    target = TARGETS[name]
    rng = random.Random(seed)
    seeds = SEEDS.get(name) or [b""]
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(100):
            if rng.random() < 0.2:
                data = rng.randbytes(rng.randint(0, 400))
            else:
                data = mutate(rng, rng.choice(seeds))
            try:
                target(data)
            except Exception:
                print(f"{name}: unhandled exception for input {data!r}", file=sys.stderr)
                raise
            n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", choices=sorted(TARGETS), action="append")
    p.add_argument("--fuzz-seconds", type=float, default=10.0, help="per target")
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args()
    counts = {name: run(name, a.fuzz_seconds, a.seed) for name in a.target or TARGETS}
    print(json.dumps({"inputs": counts, "total": sum(counts.values())}, indent=2))


if __name__ == "__main__":
    main()
