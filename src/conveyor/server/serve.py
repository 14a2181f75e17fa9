"""``conveyor serve``: one process, one event loop, every listener.

Start-up: open the broker, bind every listener (a taken port is a ListenError naming
the flag), print the banner, write the ready file. On SIGTERM or SIGINT: answer
pending long polls with nothing, stop accepting, let in-flight requests finish (up to
``shutdown_timeout``), then close the broker, which commits everything accepted.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from conveyor.broker import Broker, FakeClock
from conveyor.server.amqp import AmqpServer
from conveyor.server.config import ServerConfig
from conveyor.server.http import add_test_routes, attach_server, build_app, install_log_filters
from conveyor.server.metrics import Metrics
from conveyor.server.streams_http import add_stream_routes, open_streams
from conveyor.streams import StreamEngine

if TYPE_CHECKING:
    from conveyor.server.kafka import KafkaServer

log = logging.getLogger("conveyor.server")


class ListenError(Exception):
    """A listener could not bind; the message names the setting that changes it."""


@dataclass
class Listener:
    name: str
    url: str
    port: int


@dataclass
class RunningServer:
    config: ServerConfig
    broker: Broker
    listeners: list[Listener] = field(default_factory=list)
    #: One-line remarks for the banner (e.g. a listener skipped because its port is taken).
    notes: list[str] = field(default_factory=list)

    def port(self, name: str) -> int | None:
        return next((x.port for x in self.listeners if x.name == name), None)


def version() -> str:
    try:
        from importlib.metadata import version as _v

        return _v("conveyor-mq")
    except Exception:
        return "0+unknown"


def store_url(data: str) -> str:
    """``--data`` takes a directory or a store URL."""
    return data if "://" in data else str(Path(data))


def shown_url(data: str) -> str:
    """The store location for the banner and ready file: a URL's password hidden."""
    if "://" not in data:
        return str(Path(data))
    parts = urlsplit(data)
    if parts.password is None:
        return data
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def bind_listener(
    running: RunningServer, setting: str, port: int, flag: str
) -> socket.socket | None:
    """Bind a protocol listener's socket. A port the user chose must be free (else
    ListenError naming ``flag``); a default port that is taken -- RabbitMQ or Kafka
    already on this machine, say -- skips the listener with a note instead, so a plain
    `conveyor serve` starts anywhere."""
    try:
        return bind_socket(running.config.host, port, flag)
    except ListenError as exc:
        if setting in running.config.explicit or "already in use" not in str(exc):
            raise
        name = setting.removesuffix("_port")
        running.notes.append(f"{name} not started: {exc}")
        log.warning("%s listener not started: %s", name, exc)
        return None


def bind_socket(host: str, port: int, flag: str) -> socket.socket:
    """Bind and listen, turning the OS error into a message that names ``flag``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(
            f"cannot resolve host {host!r} ({exc.strerror}); change it with --host"
        ) from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(
                f"port {port} on {host} is already in use; choose another with {flag}"
            ) from None
        if exc.errno == errno.EACCES:
            raise ListenError(
                f"no permission to listen on port {port} on {host}; choose another with {flag}"
            ) from None
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}; see {flag}") from None
    sock.setblocking(False)
    return sock


def _url(scheme: str, host: str, port: int) -> str:
    shown = host
    if host in ("0.0.0.0", "", "::"):
        shown = socket.gethostname()
    elif ":" in host:
        shown = f"[{host}]"
    return f"{scheme}://{shown}:{port}"


def banner(running: RunningServer, ver: str) -> str:
    c = running.config
    lines = [f"conveyor {ver}"]
    lines.append(f"  data        {shown_url(c.data)}")
    lines.append(f"  durability  {c.durability}")
    if c.config_file:
        lines.append(f"  config      {c.config_file}")
    lines.append(f"  auth        {'bearer token' if c.token else 'open (loopback only)'}")
    for x in running.listeners:
        lines.append(f"  {x.name:<11} {x.url}")
        if x.name == "http":
            lines.append(f"  {'sqs':<11} {x.url} (Amazon SQS API on the HTTP port)")
    lines.extend(f"  note        {n}" for n in running.notes)
    return "\n".join(lines)


def write_ready_file(path: str, running: RunningServer) -> None:
    """Atomically write the bound ports, for scripts and tests that start servers."""
    info = {
        "pid": os.getpid(),
        "http_port": running.port("http"),
        "amqp_port": running.port("amqp"),
        "kafka_port": running.port("kafka"),
        "urls": {x.name: x.url for x in running.listeners},
        "data": shown_url(running.config.data),
        "durability": running.config.durability,
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def check_config(config: ServerConfig) -> None:
    if not config.is_loopback() and not config.token:
        raise ListenError(
            f"refusing to listen on {config.host} without a token: set --token "
            "(or CONVEYOR_TOKEN), or bind to 127.0.0.1"
        )


async def serve(
    config: ServerConfig,
    *,
    out: TextIO | None = None,
    on_ready: Callable[[RunningServer], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set). Raises ListenError on bind failure."""
    check_config(config)
    out = out or sys.stdout
    ver = version()
    stop = stop or asyncio.Event()
    stopping = asyncio.Event()
    install_log_filters()
    max_queues = config.max_queues or None
    if config.test_clock:
        clock = FakeClock()
        broker = await Broker.open(
            store_url(config.data),
            durability=config.durability,
            clock=clock,
            timers=False,
            max_queues=max_queues,
            max_message_size=config.max_message_size,
        )
    else:
        clock = None
        broker = await Broker.open(
            store_url(config.data),
            durability=config.durability,
            max_queues=max_queues,
            max_message_size=config.max_message_size,
        )
    running = RunningServer(config=config, broker=broker)
    runner: web.AppRunner | None = None
    amqp_server: AmqpServer | None = None
    streams: StreamEngine | None = None
    kafka_server: KafkaServer | None = None
    try:
        streams = await open_streams(config.data, config.durability)
        metrics = Metrics()
        app = build_app(broker, config, metrics=metrics, stopping=stopping, version=ver)
        if streams is not None:
            add_stream_routes(app, streams, broker)
        if clock is not None:
            add_test_routes(app, broker, clock)
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=config.shutdown_timeout
        )
        await runner.setup()
        sock = bind_socket(config.host, config.http_port, "--http-port")
        http_port = sock.getsockname()[1]
        await web.SockSite(runner, sock).start()
        running.listeners.append(Listener("http", _url("http", config.host, http_port), http_port))
        server = runner.server
        attach_server(app, server)
        metrics.connection_sources["http"] = lambda: len(server.connections) if server else 0

        amqp_sock = (
            bind_listener(running, "amqp_port", config.amqp_port, "--amqp-port (or --no-amqp)")
            if config.amqp_port is not None
            else None
        )
        if config.amqp_port is not None and amqp_sock is not None:
            amqp = AmqpServer(
                broker,
                users=dict(config.users) or None,
                vhosts=config.vhosts,
                permissions=config.permissions,
                max_connections=config.amqp_max_connections or None,
                channel_max=config.amqp_channel_max,
            )
            amqp_port = await amqp.start(config.host, config.amqp_port, sock=amqp_sock)
            running.listeners.append(
                Listener("amqp", _url("amqp", config.host, amqp_port), amqp_port)
            )
            amqp_server = amqp
            metrics.connection_sources["amqp"] = lambda: len(amqp.connections)

        kafka_sock = (
            bind_listener(running, "kafka_port", config.kafka_port, "--kafka-port (or --no-kafka)")
            if config.kafka_port is not None and streams is not None
            else None
        )
        if config.kafka_port is not None and streams is not None and kafka_sock is not None:
            from conveyor.server.kafka import KafkaServer

            kafka = kafka_server = KafkaServer(streams)
            kafka_port = await kafka.start(config.host, config.kafka_port, sock=kafka_sock)
            running.listeners.append(
                Listener("kafka", _url("kafka", config.host, kafka_port), kafka_port)
            )
            metrics.connection_sources["kafka"] = lambda: len(kafka.connections)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(banner(running, ver), file=out, flush=True)
        _settle_heap()
        if config.ready_file:
            write_ready_file(config.ready_file, running)
        if on_ready is not None:
            on_ready(running)
        await stop.wait()
        log.info("shutting down")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    finally:
        stopping.set()
        if kafka_server is not None:
            await kafka_server.close()  # produces being made durable finish first
        if amqp_server is not None:
            await amqp_server.close()  # unacked AMQP deliveries go back to their queues
        if runner is not None:
            await runner.cleanup()
        if streams is not None:
            await streams.close()
        await broker.close()
    print("conveyor stopped", file=out, flush=True)


#: Young-generation threshold for the cyclic garbage collector while serving. A batch
#: of 100 messages keeps hundreds of container objects alive across a store round, so at
#: CPython's default (700) the server ran ~1,250 young and ~10 full collections per
#: 100k messages, ~10% of its CPU; nearly everything it allocates is freed by reference
#: counting, and the collector only has to find the rare cycle.
GC_YOUNG_THRESHOLD = 10_000


def _settle_heap() -> None:
    """Once started: collect the start-up garbage, then move every object that exists
    now (modules, classes, configuration: they live as long as the server) out of the
    collector's sight, so full collections scan only what serving allocates."""
    gc.collect()
    gc.freeze()
    _, mid, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, mid, old)


def run(config: ServerConfig, *, out: TextIO | None = None) -> None:
    """Run ``serve`` on a fresh loop (uvloop when installed)."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(config, out=out))
