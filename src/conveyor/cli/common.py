"""What every client command shares: where to connect, errors, output."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import click
import msgspec
from rich.console import Console

import conveyor
from conveyor import errors
from conveyor.protocols.http import wire

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_URL = "http://127.0.0.1:9324"

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def target_options(fn: Callable[P, R]) -> Callable[P, R]:
    """``--url`` / ``--data`` / ``--token``: a server, or an embedded data directory."""
    fn = click.option(
        "--token", envvar="CONVEYOR_TOKEN", metavar="TOKEN", help="Bearer token for the server."
    )(fn)
    fn = click.option(
        "--data",
        envvar="CONVEYOR_DATA",
        metavar="DIR",
        help="Use this data directory directly (embedded, no server).",
    )(fn)
    fn = click.option(
        "--url",
        envvar="CONVEYOR_URL",
        metavar="URL",
        help=f"Server URL [CONVEYOR_URL or {DEFAULT_URL}].",
    )(fn)
    return fn


@contextmanager
def connection(
    url: str | None, data: str | None, token: str | None
) -> Iterator[conveyor.Connection]:
    if url and data:
        raise click.UsageError("give --url or --data, not both")
    target = data or url or DEFAULT_URL
    kw: dict[str, Any] = {}
    if target.startswith(("http://", "https://")):
        if token:
            kw["token"] = token
    elif token:
        raise click.UsageError("--token applies to a server (--url), not to --data")
    with conveyor.connect(target, **kw) as conn:
        yield conn


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """One readable line and exit 1 for every conveyor error."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except errors.Unavailable as exc:
            hint = " (is `conveyor serve` running? set --url or CONVEYOR_URL)"
            raise click.ClickException(f"{exc}{hint}") from None
        except errors.ClosedError as exc:
            raise click.ClickException(str(exc)) from None
        except errors.ConveyorError as exc:
            raise click.ClickException(str(exc) or exc.code) from None

    return wrapper


def parse_headers(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``k=v`` pairs; values that read as JSON numbers/booleans are typed."""
    headers: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--header")
        headers[key] = _typed(value)
    return headers


def _typed(value: str) -> Any:
    if value in ("true", "false"):
        return value == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def read_body(body: str | None, file: str | None) -> bytes:
    if body is not None and file is not None:
        raise click.UsageError("give a BODY argument or --file, not both")
    if file is not None:
        with click.open_file(file, "rb") as f:
            data: bytes = f.read()
            return data
    if body is not None:
        return body.encode()
    if sys.stdin.isatty():
        raise click.UsageError("give a BODY argument, --file, or pipe the body on stdin")
    return sys.stdin.buffer.read()


def message_json(m: conveyor.Message) -> str:
    d = m.delivery
    return msgspec.json.encode(wire.MessageOut.from_model(d)).decode()


def show_body(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return repr(body)


def age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def backend_call(mq: conveyor.Connection, method: str, *args: Any, **kwargs: Any) -> Any:
    """A Broker call the Connection API does not offer (delete flags, bindings, publishing
    to an exchange without declaring it), run on the connection's own loop."""
    backend = mq.async_connection.backend
    return mq._lt.call(getattr(backend, method)(*args, **kwargs))
