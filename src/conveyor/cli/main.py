"""The ``conveyor`` command: a server, and a client for servers and data directories.

Every client command takes ``--url`` (or ``CONVEYOR_URL``; default the local server)
or ``--data DIR`` (embedded). Exit codes: 0 success, 1 error (one readable line on
stderr), 2 usage.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click
import msgspec
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import conveyor
from conveyor.cli.common import (
    age,
    backend_call,
    connection,
    err,
    handle_errors,
    message_json,
    out,
    parse_headers,
    read_body,
    show_body,
    target_options,
)
from conveyor.cli.serve import serve
from conveyor.cli.worker import worker
from conveyor.model import QueueOptions, QueueStats

BATCH = 100


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(conveyor.__version__, prog_name="conveyor")
def cli() -> None:
    """conveyor: durable queues and exchanges over HTTP, SQS and AMQP."""


cli.add_command(serve)
cli.add_command(worker)


def _progress(total: int, what: str) -> Progress:
    return Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=total < 1000 or not err.is_terminal,
        transient=True,
    )


# -- queues ------------------------------------------------------------------------------


@cli.command()
@click.option("--prefix", default="", help="Only queues whose name starts with this.")
@click.option(
    "--interval",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds between the two samples rates are measured over (0: no rates).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per queue.")
@target_options
@handle_errors
def queues(
    prefix: str,
    interval: float,
    as_json: bool,
    url: str | None,
    data: str | None,
    token: str | None,
) -> None:
    """List queues: ready, in flight, delayed, dead letters, oldest age, rates."""
    with connection(url, data, token) as mq:
        infos = mq.queues(prefix)
        first = _stats(mq, [q.name for q in infos])
        second = first
        if interval > 0 and infos:
            time.sleep(interval)
            second = _stats(mq, [q.name for q in infos])
    if as_json:
        for info in infos:
            if info.name in second:
                entry = {"name": info.name, "options": info.options, "stats": second[info.name]}
                click.echo(msgspec.json.encode(entry).decode())
        return
    table = Table(box=None, header_style="bold")
    for col in ("queue", "ready", "in flight", "delayed", "dlq", "dead", "oldest"):
        table.add_column(col, justify="left" if col in ("queue", "dlq") else "right")
    if interval > 0:
        table.add_column("in/s", justify="right")
        table.add_column("out/s", justify="right")
    for info in infos:
        s = second.get(info.name)
        if s is None:
            continue
        row = [
            info.name, str(s.ready), str(s.in_flight), str(s.delayed),
            info.options.dead_letter or "-", str(s.dead_lettered), age(s.oldest_age),
        ]  # fmt: skip
        if interval > 0:
            before = first.get(info.name, s)
            row.append(f"{(s.sent_total - before.sent_total) / interval:.1f}")
            row.append(f"{(s.acked_total - before.acked_total) / interval:.1f}")
        table.add_row(*row)
    if not infos:
        err.print("no queues")
        return
    out.print(table)


def _stats(mq: conveyor.Connection, names: list[str]) -> dict[str, QueueStats]:
    got: dict[str, QueueStats] = {}
    for name in names:
        try:
            got[name] = mq.get_queue(name).stats()
        except conveyor.errors.QueueNotFound:
            continue  # deleted meanwhile
    return got


@cli.command()
@click.argument("name")
@click.option("--visibility-timeout", type=float, help="Lease length, seconds [30].")
@click.option("--max-receives", type=int, help="Dead-letter after this many deliveries.")
@click.option("--dead-letter", metavar="QUEUE", help="Dead-letter queue.")
@click.option("--ttl", "message_ttl", type=float, help="Message time-to-live, seconds.")
@click.option("--max-length", type=int, help="Most messages the queue holds.")
@click.option("--overflow", type=click.Choice(["reject-new", "drop-oldest"]))
@click.option("--max-priority", type=int, help="Highest priority [9].")
@click.option("--delay", type=float, help="Default delivery delay, seconds.")
@click.option("--fifo", is_flag=True, default=None, help="Strict order per group.")
@click.option("--expires", type=float, help="Delete the queue after this long unused.")
@target_options
@handle_errors
def create(name: str, url: str | None, data: str | None, token: str | None, **options: Any) -> None:
    """Create a queue (no change if it exists with the same options)."""
    given = {k: v for k, v in options.items() if v is not None}
    try:
        opts = msgspec.convert(given, QueueOptions).validate()
    except msgspec.ValidationError as exc:
        raise click.UsageError(str(exc)) from None
    with connection(url, data, token) as mq:
        q = mq.queue(name, **msgspec.structs.asdict(opts))
    out.print(f"queue {q.name} ready")


@cli.command()
@click.argument("name")
@click.option("--if-empty", is_flag=True, help="Refuse if it holds messages.")
@click.option("--if-unused", is_flag=True, help="Refuse if it has consumers.")
@target_options
@handle_errors
def delete(
    name: str, if_empty: bool, if_unused: bool, url: str | None, data: str | None,
    token: str | None,
) -> None:  # fmt: skip
    """Delete a queue and its messages."""
    with connection(url, data, token) as mq:
        removed = backend_call(mq, "delete_queue", name, if_unused=if_unused, if_empty=if_empty)
    out.print(f"deleted queue {name} ({removed} messages)")


@cli.command()
@click.argument("name")
@target_options
@handle_errors
def purge(name: str, url: str | None, data: str | None, token: str | None) -> None:
    """Remove every ready and delayed message from a queue."""
    with connection(url, data, token) as mq:
        n = mq.get_queue(name).purge()
    out.print(f"purged {n} messages from {name}")


@cli.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@target_options
@handle_errors
def stats(name: str, as_json: bool, url: str | None, data: str | None, token: str | None) -> None:
    """Counts and totals of one queue."""
    with connection(url, data, token) as mq:
        q = mq.get_queue(name)
        s, info = q.stats(), q.info()
    if as_json:
        click.echo(msgspec.json.encode({"name": name, "options": info.options, "stats": s}))
        return
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for field in s.__struct_fields__:
        value = getattr(s, field)
        table.add_row(field.replace("_", " "), age(value) if field == "oldest_age" else str(value))
    out.print(table)


# -- messages ----------------------------------------------------------------------------


def _message_options(fn: Any) -> Any:
    fn = click.option("--header", "headers", multiple=True, metavar="K=V", help="Repeatable.")(fn)
    fn = click.option("--priority", type=int, default=0)(fn)
    fn = click.option("--delay", type=float, help="Deliver after this many seconds.")(fn)
    fn = click.option("--ttl", type=float, help="Expire after this many seconds.")(fn)
    fn = click.option("--content-type", help="Message content type.")(fn)
    fn = click.option("--count", type=click.IntRange(min=1), default=1, help="Send N copies.")(fn)
    fn = click.option("--file", "-f", type=click.Path(dir_okay=False, allow_dash=True))(fn)
    return fn


def _message(
    body: bytes, headers: tuple[str, ...], priority: int, delay: float | None,
    ttl: float | None, content_type: str | None,
) -> conveyor.NewMessage:  # fmt: skip
    return conveyor.NewMessage(
        body=body,
        headers=parse_headers(headers),
        properties=conveyor.Properties(content_type=content_type),
        priority=priority,
        delay=delay,
        ttl=ttl,
    )


@cli.command()
@click.argument("queue")
@click.argument("body", required=False)
@_message_options
@target_options
@handle_errors
def send(
    queue: str, body: str | None, file: str | None, count: int, headers: tuple[str, ...],
    priority: int, delay: float | None, ttl: float | None, content_type: str | None,
    url: str | None, data: str | None, token: str | None,
) -> None:  # fmt: skip
    """Send a message: BODY, --file, or stdin."""
    msg = _message(read_body(body, file), headers, priority, delay, ttl, content_type)
    with connection(url, data, token) as mq:
        q = mq.get_queue(queue)
        if count == 1:
            out.print(q.send(msg))
            return
        with _progress(count, f"sending to {queue}") as bar:
            task = bar.add_task("send", total=count)
            left = count
            while left:
                n = min(BATCH, left)
                q.send_batch([msg] * n)
                left -= n
                bar.advance(task, n)
    out.print(f"sent {count} messages to {queue}")


@cli.command()
@click.argument("exchange")
@click.argument("body", required=False)
@click.option("--key", "-k", "routing_key", default="", help="Routing key.")
@_message_options
@target_options
@handle_errors
def publish(
    exchange: str, body: str | None, routing_key: str, file: str | None, count: int,
    headers: tuple[str, ...], priority: int, delay: float | None, ttl: float | None,
    content_type: str | None, url: str | None, data: str | None, token: str | None,
) -> None:  # fmt: skip
    """Publish through an exchange ("" or amq.default: the default exchange)."""
    name = "" if exchange == "amq.default" else exchange
    msg = _message(read_body(body, file), headers, priority, delay, ttl, content_type)
    with connection(url, data, token) as mq:
        routed = 0
        with _progress(count, f"publishing to {exchange}") as bar:
            task = bar.add_task("publish", total=count)
            left = count
            while left:
                n = min(BATCH, left)
                results = backend_call(mq, "publish_batch", name, [(msg, routing_key)] * n)
                routed += sum(r.routed for r in results)
                left -= n
                bar.advance(task, n)
    out.print(f"published {count} message(s); {routed} queue copies")
    if routed == 0:
        err.print("warning: no queue is bound for that routing key (unroutable)")


@cli.command()
@click.argument("queue")
@click.option("--max", "max_messages", type=click.IntRange(1, 1000), default=1, show_default=True)
@click.option("--wait", type=float, default=0.0, show_default=True, help="Long-poll seconds.")
@click.option("--ack", is_flag=True, help="Acknowledge (delete) what was received.")
@click.option("--visibility-timeout", type=float, help="Lease length for these messages.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
@target_options
@handle_errors
def receive(
    queue: str, max_messages: int, wait: float, ack: bool, visibility_timeout: float | None,
    as_json: bool, url: str | None, data: str | None, token: str | None,
) -> None:  # fmt: skip
    """Receive (lease) messages; without --ack they return after the lease ends."""
    with connection(url, data, token) as mq:
        q = mq.get_queue(queue)
        msgs = q.receive(max_messages, wait, visibility_timeout)
        for m in msgs:
            _print_message(m, as_json)
        if ack and msgs:
            q.ack_batch(msgs)
    if not msgs and not as_json:
        err.print("no messages")


def _print_message(m: conveyor.Message, as_json: bool) -> None:
    if as_json:
        click.echo(message_json(m))
    else:
        click.echo(show_body(m.body))


@cli.command()
@click.argument("queue")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after N messages.")
@target_options
@handle_errors
def tail(
    queue: str, as_json: bool, count: int | None, url: str | None, data: str | None,
    token: str | None,
) -> None:  # fmt: skip
    """Follow a queue: print messages as they arrive, acknowledging each (Ctrl-C stops)."""
    seen = 0
    with connection(url, data, token) as mq:
        q = mq.get_queue(queue)
        try:
            while count is None or seen < count:
                want = 100 if count is None else min(100, count - seen)
                msgs = q.receive(want, wait=5)
                for m in msgs:
                    _print_message(m, as_json)
                if msgs:
                    q.ack_batch(msgs)
                    seen += len(msgs)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            pass


# -- dead letters ----------------------------------------------------------------------


@cli.group()
def dlq() -> None:
    """Dead-letter queues."""


@dlq.command("redrive")
@click.argument("queue")
@click.option("--to", metavar="QUEUE", help="Target queue [where each message died].")
@click.option("--max", "max_messages", type=click.IntRange(min=1), help="Move at most N.")
@target_options
@handle_errors
def redrive(
    queue: str, to: str | None, max_messages: int | None, url: str | None, data: str | None,
    token: str | None,
) -> None:  # fmt: skip
    """Move messages from dead-letter QUEUE back to where they came from (or --to)."""
    with connection(url, data, token) as mq:
        q = mq.get_queue(queue)
        total = q.stats().ready
        if max_messages is not None:
            total = min(total, max_messages)
        moved = 0
        with _progress(total, f"redriving {queue}") as bar:
            task = bar.add_task("redrive", total=total)
            while max_messages is None or moved < max_messages:
                chunk = 1000 if max_messages is None else min(1000, max_messages - moved)
                n = q.redrive(to, chunk)
                moved += n
                bar.advance(task, n)
                if n < chunk:
                    break
    out.print(f"moved {moved} messages out of {queue}")


# -- exchanges ---------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@target_options
@handle_errors
def exchanges(as_json: bool, url: str | None, data: str | None, token: str | None) -> None:
    """List exchanges and their bindings."""
    with connection(url, data, token) as mq:
        xs = mq.exchanges()
        bindings = backend_call(mq, "list_bindings")
    if as_json:
        for x in xs:
            click.echo(msgspec.json.encode(x))
        return
    table = Table(box=None, header_style="bold")
    for col in ("exchange", "type", "bindings"):
        table.add_column(col)
    for x in xs:
        bs = [b for b in bindings if b.source == x.name]
        shown = ", ".join(f"{b.routing_key or '*'} -> {b.destination}" for b in bs) or "-"
        table.add_row(x.name or "(default)", x.type, shown)
    out.print(table)


@cli.command()
@click.argument("exchange")
@click.argument("queue")
@click.option("--key", "-k", "routing_key", default="", help="Routing key or pattern.")
@click.option(
    "--type",
    "exchange_type",
    type=click.Choice(["direct", "fanout", "topic", "headers"]),
    help="Declare the exchange with this type first.",
)
@click.option("--to-exchange", is_flag=True, help="QUEUE names an exchange to bind to.")
@click.option("--unbind", is_flag=True, help="Remove the binding instead.")
@target_options
@handle_errors
def bind(
    exchange: str, queue: str, routing_key: str, exchange_type: str | None, to_exchange: bool,
    unbind: bool, url: str | None, data: str | None, token: str | None,
) -> None:  # fmt: skip
    """Bind EXCHANGE to QUEUE (with --key); --type declares the exchange first."""
    with connection(url, data, token) as mq:
        if exchange_type:
            mq.exchange(exchange, exchange_type)
        method = ("unbind" if unbind else "bind") + ("_exchange" if to_exchange else "")
        backend_call(mq, method, exchange, queue, routing_key)
    verb = "unbound" if unbind else "bound"
    out.print(f"{verb} {exchange} -> {queue}" + (f" ({routing_key})" if routing_key else ""))


def main() -> None:
    cli(prog_name="conveyor")
