"""How jobs travel: a small envelope, JSON (msgspec) by default, msgpack optional.

Nothing here unpickles. Arguments are encoded with msgspec, so dataclasses, msgspec
Structs, datetimes, UUIDs, enums and the JSON types work; a task's type annotations
decode them back into those types (each argument is kept raw until its parameter's
type is known).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, Literal

import msgspec

Format = Literal["json", "msgpack"]

CONTENT_TYPES: dict[str, Format] = {
    "application/json": "json",
    "application/msgpack": "msgpack",
    "application/x-msgpack": "msgpack",
}
CONTENT_TYPE: dict[Format, str] = {"json": "application/json", "msgpack": "application/msgpack"}


class FlowLink(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A child's pointer to the parent it is waiting for (see flows.py)."""

    parent_id: str
    parent_queue: str
    #: The parent's own message, encoded; sent when the last child completes.
    parent_body: bytes
    parent_content_type: str
    #: How many children the parent waits for, and this child's place among them.
    siblings: int
    index: int


class Envelope(msgspec.Struct, omit_defaults=True, kw_only=True):
    """The body of every job message."""

    task: str
    id: str
    args: list[msgspec.Raw] = msgspec.field(default_factory=list)
    kwargs: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)
    enqueued_at: float = 0.0
    #: Per-job overrides of the task's options.
    max_attempts: int | None = None
    timeout: float | None = None
    keep_result: bool | None = None
    #: Dedup bookkeeping: ("simple" | "throttle" | "debounce", key).
    dedup_mode: str | None = None
    dedup_key: str | None = None
    #: Set on children of a flow.
    parent: FlowLink | None = None
    #: Set on a parent: how many children it waits for, and how their results reach it
    #: ("none": only via current_job().children_results; "single": prepended as the first
    #: argument (chains); "list": a list of all results as the first argument (chords)).
    children: int = 0
    inject: str = "none"
    #: The schedule that enqueued it, and the tick (epoch seconds).
    schedule: str | None = None
    tick: float | None = None


class Serializer:
    """Encode and decode with one format; decoding follows the message's content type."""

    def __init__(self, fmt: Format = "json") -> None:
        if fmt not in CONTENT_TYPE:
            raise ValueError(f"unknown serializer {fmt!r}: use 'json' or 'msgpack'")
        self.format: Format = fmt
        self.content_type = CONTENT_TYPE[fmt]
        self._json_enc = msgspec.json.Encoder()
        self._mp_enc = msgspec.msgpack.Encoder()
        self._env_json = msgspec.json.Decoder(Envelope)
        self._env_mp = msgspec.msgpack.Decoder(Envelope)

    def encode(self, value: Any) -> bytes:
        return self._json_enc.encode(value) if self.format == "json" else self._mp_enc.encode(value)

    def raw(self, value: Any) -> msgspec.Raw:
        return msgspec.Raw(self.encode(value))

    def decode_envelope(self, body: bytes, content_type: str | None) -> Envelope:
        fmt = fmt_of(content_type)
        return self._env_json.decode(body) if fmt == "json" else self._env_mp.decode(body)


def fmt_of(content_type: str | None) -> Format:
    if content_type is None:
        return "json"
    try:
        return CONTENT_TYPES[content_type]
    except KeyError:
        raise ValueError(f"cannot decode job content type {content_type!r}") from None


def decode_value(raw: bytes | msgspec.Raw, fmt: Format, type_: Any = Any) -> Any:
    data = bytes(raw)
    if fmt == "json":
        return msgspec.json.decode(data, type=type_)
    return msgspec.msgpack.decode(data, type=type_)


def encode_value(value: Any, fmt: Format) -> bytes:
    return msgspec.json.encode(value) if fmt == "json" else msgspec.msgpack.encode(value)


class ArgDecoder:
    """Decodes a task's raw arguments into the types its signature names."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.positional: list[Any] = []
        self.var_positional: Any = None
        self.named: dict[str, Any] = {}
        self.var_keyword: Any = None
        try:
            hints = typing.get_type_hints(fn)
            sig = inspect.signature(fn)
        except Exception:  # unresolvable annotations or no signature: decode untyped
            self.var_positional = self.var_keyword = Any
            return
        for p in sig.parameters.values():
            hint = hints.get(p.name, Any)
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                self.positional.append(hint)
                self.named[p.name] = hint
            elif p.kind == p.KEYWORD_ONLY:
                self.named[p.name] = hint
            elif p.kind == p.VAR_POSITIONAL:
                self.var_positional = hint
            elif p.kind == p.VAR_KEYWORD:
                self.var_keyword = hint

    def decode(
        self, env: Envelope, fmt: Format, prepend: list[Any] | None = None
    ) -> tuple[list[Any], dict[str, Any]]:
        """Decode; ``prepend`` are already-decoded leading values (flow results),
        converted to their parameters' types too."""
        args: list[Any] = []
        lead = prepend or []
        for i, value in enumerate(lead):
            args.append(msgspec.convert(value, self._pos(i), strict=False))
        for j, raw in enumerate(env.args):
            args.append(decode_value(raw, fmt, self._pos(len(lead) + j)))
        kwargs = {
            k: decode_value(raw, fmt, self.named.get(k, self.var_keyword or Any))
            for k, raw in env.kwargs.items()
        }
        return args, kwargs

    def _pos(self, i: int) -> Any:
        if i < len(self.positional):
            return self.positional[i]
        return self.var_positional if self.var_positional is not None else Any
