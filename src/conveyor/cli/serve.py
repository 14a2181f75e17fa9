"""``conveyor serve``."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from conveyor.errors import InvalidArgument, StoreError
from conveyor.model import Durability


@click.command()
@click.option("--data", metavar="DIR|URL", help="Data directory or store URL [./conveyor-data].")
@click.option("--host", help="Address to listen on [127.0.0.1].")
@click.option("--http-port", type=int, help="HTTP port: native API, SQS, /metrics [9324].")
@click.option("--amqp-port", type=int, help="AMQP 0-9-1 port; 0 picks a free one [5672].")
@click.option("--no-amqp", is_flag=True, default=None, help="Do not start the AMQP listener.")
@click.option("--kafka-port", type=int, help="Kafka protocol port; 0 picks a free one [9092].")
@click.option("--no-kafka", is_flag=True, default=None, help="Do not start the Kafka listener.")
@click.option(
    "--durability",
    type=click.Choice(["fsync", "os", "none"]),
    help="fsync: survive power loss; os: survive a crash; none: memory speed [fsync].",
)
@click.option("--token", help="Bearer token required on every HTTP request.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file.")
@click.option("--ready-file", type=click.Path(dir_okay=False), help="Write ports as JSON here.")
@click.option("--max-request-size", type=int, help="Largest HTTP request body, bytes [64 MiB].")
@click.option("--max-message-size", type=int, help="Largest message body, bytes [1 MiB].")
@click.option(
    "--max-connections", type=int, help="Open HTTP connections served; 0: no limit [10000]."
)
@click.option("--max-queues", type=int, help="Queues the broker holds; 0: no limit [0].")
@click.option("--max-messages-per-receive", type=int, help="Largest native receive or peek [1000].")
@click.option("--shutdown-timeout", type=float, help="Seconds to finish requests on exit [10].")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log level [info].",
)
@click.option("--test-clock", is_flag=True, default=None, hidden=True)
def serve(
    data: str | None,
    host: str | None,
    http_port: int | None,
    amqp_port: int | None,
    no_amqp: bool | None,
    kafka_port: int | None,
    no_kafka: bool | None,
    durability: Durability | None,
    token: str | None,
    config_file: str | None,
    ready_file: str | None,
    max_request_size: int | None,
    max_message_size: int | None,
    max_connections: int | None,
    max_queues: int | None,
    max_messages_per_receive: int | None,
    shutdown_timeout: float | None,
    log_level: str | None,
    test_clock: bool | None,
) -> None:
    """Run the broker server (settings: flags > CONVEYOR_* > TOML file)."""
    from conveyor.server.config import load_config
    from conveyor.server.serve import ListenError, run

    flags: dict[str, Any] = {
        "data": data,
        "host": host,
        "http_port": http_port,
        "amqp_port": False if no_amqp else amqp_port,
        "kafka_port": False if no_kafka else kafka_port,
        "durability": durability,
        "token": token,
        "ready_file": ready_file,
        "max_request_size": max_request_size,
        "max_message_size": max_message_size,
        "max_connections": max_connections,
        "max_queues": max_queues,
        "max_messages_per_receive": max_messages_per_receive,
        "shutdown_timeout": shutdown_timeout,
        "log_level": log_level,
        "test_clock": test_clock,
    }
    try:
        config = load_config(flags, config_file=config_file)
    except InvalidArgument as exc:
        raise click.UsageError(str(exc)) from None
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        run(config)
    except ListenError as exc:
        raise click.ClickException(str(exc)) from None
    except StoreError as exc:  # corrupt or unreadable data file, schema too new, disk full
        raise click.ClickException(exc.message or str(exc)) from None
