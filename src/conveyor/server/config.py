"""Server configuration: command-line flags > ``CONVEYOR_*`` environment > TOML file.

The TOML file holds the same keys as the flags, flat, with underscores::

    data = "/var/lib/conveyor"
    host = "0.0.0.0"
    http_port = 9324
    amqp_port = 5672        # 0 picks a free port; false disables AMQP
    kafka_port = 9092       # 0 picks a free port; false disables Kafka
    durability = "fsync"
    token = "s3cret"
    shutdown_timeout = 10

    sqs_account_id = "000000000000"
    sqs_region = "us-east-1"

    vhosts = ["/", "billing"]   # AMQP virtual hosts (env: comma list)

    [users]                 # AMQP PLAIN users (user = "password")
    guest = "guest"

    [permissions]           # AMQP vhosts a user may open (unlisted users: every vhost)
    guest = ["/", "billing"]

    [sqs_access_keys]       # SQS SigV4 credentials (access key id = "secret")
    AKIDEXAMPLE = "secret"
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from conveyor.errors import InvalidArgument
from conveyor.model import Durability

DEFAULT_DATA = "conveyor-data"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 9324
DEFAULT_AMQP_PORT = 5672
DEFAULT_KAFKA_PORT = 9092
ENV_PREFIX = "CONVEYOR_"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    #: A data directory, or a store URL (``sqlite:///dir``, ``memory://``, ``postgresql://``).
    data: str = DEFAULT_DATA
    host: str = DEFAULT_HOST
    http_port: int = DEFAULT_HTTP_PORT
    #: None disables the AMQP listener; 0 binds an ephemeral port.
    amqp_port: int | None = DEFAULT_AMQP_PORT
    #: None disables the Kafka listener; 0 binds an ephemeral port.
    kafka_port: int | None = DEFAULT_KAFKA_PORT
    durability: Durability = "fsync"
    #: Bearer token every HTTP request must carry; required off loopback.
    token: str | None = None
    #: Seconds to let in-flight requests finish on SIGTERM before cutting them off.
    shutdown_timeout: float = 10.0
    #: Largest request body the HTTP listener reads, in bytes.
    max_request_size: int = 64 * 1024 * 1024
    #: Largest message body the engine stores (every protocol), in bytes; a queue's own
    #: ``max_message_size`` takes precedence.
    max_message_size: int = 1024 * 1024
    #: Open HTTP connections (native API and SQS) served at once; requests on
    #: connections beyond it get 503 with Retry-After. 0: no limit.
    max_connections: int = 10_000
    #: Queues the broker holds; creating one more fails (LimitExceeded). 0: no limit.
    max_queues: int = 0
    #: Largest ``max_messages`` of one native receive or peek.
    max_messages_per_receive: int = 1000
    #: AMQP PLAIN users (name -> password); none: guest/guest, from loopback only.
    users: Mapping[str, str] = field(default_factory=dict)
    #: AMQP virtual hosts that exist (TOML list, env comma list); "/" is the engine's
    #: own namespace, others are prefixed (docs/amqp.md).
    vhosts: tuple[str, ...] = ("/",)
    #: AMQP user -> the vhosts it may open (TOML ``[permissions]``); unlisted: every one.
    permissions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Open AMQP connections; one more is refused at Connection.Open (530). 0: no limit.
    amqp_max_connections: int = 0
    #: AMQP channels per connection (``channel_max`` offered in Connection.Tune).
    amqp_channel_max: int = 2047
    sqs_account_id: str = "000000000000"
    sqs_region: str = "us-east-1"
    #: SQS access key id -> secret key; SigV4 signatures are checked against these.
    #: Without them SQS requests are not authenticated, so with a ``token`` set the SQS
    #: API stays closed (its clients cannot send the bearer token).
    sqs_access_keys: Mapping[str, str] = field(default_factory=dict)
    log_level: str = "info"
    #: Where to write ``{"pid", "http_port", "amqp_port", ...}`` once listening.
    ready_file: str | None = None
    #: Tests only: a FakeClock moved by ``POST /_test/advance`` instead of real timers.
    test_clock: bool = False
    #: The file the settings came from, if any (for the banner).
    config_file: str | None = None
    #: Settings given explicitly (flag, environment or file) rather than defaulted. A
    #: listener on a *default* port that is taken is skipped with a note; on a port the
    #: user chose, it is an error.
    explicit: frozenset[str] = frozenset()

    def is_loopback(self) -> bool:
        return is_loopback(self.host)


_INT_KEYS = {"http_port", "max_request_size"}
#: Integer settings with their allowed range (low, high; None: unbounded).
_BOUNDED_KEYS: dict[str, tuple[int, int | None]] = {
    "max_message_size": (1, None),
    "max_connections": (0, None),
    "max_queues": (0, None),
    "max_messages_per_receive": (1, 10_000),
    "amqp_max_connections": (0, None),
    "amqp_channel_max": (1, 65535),
}
_FLOAT_KEYS = {"shutdown_timeout"}
_STR_KEYS = {
    "data", "host", "durability", "token", "log_level", "ready_file", "sqs_account_id",
    "sqs_region",
}  # fmt: skip
_TABLE_KEYS = {"users", "sqs_access_keys", "permissions"}
_KEYS = {f.name for f in dataclasses.fields(ServerConfig)} - {"config_file", "explicit"}


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> ServerConfig:
    """Merge the three sources; flags whose value is None count as not given.

    ``config_file`` falls back to ``CONVEYOR_CONFIG``. Raises InvalidArgument with a
    message that names the offending setting.
    """
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    merged: dict[str, Any] = {}
    if path:
        merged.update(_read_toml(Path(path)))
    for key in _KEYS - _TABLE_KEYS:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is not None and raw != "":
            merged[key] = _from_env(key, raw)
    merged.update(flags)
    unknown = set(merged) - _KEYS
    if unknown:
        raise InvalidArgument(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {k: _coerce(k, v) for k, v in merged.items()}
    values["explicit"] = frozenset(merged)
    for user, allowed in values.get("permissions", {}).items():
        unknown_vhosts = set(allowed) - set(values.get("vhosts", ("/",)))
        if unknown_vhosts:
            raise InvalidArgument(
                f"setting 'permissions': user {user!r} is given vhost(s) "
                f"{', '.join(sorted(unknown_vhosts))} that are not in 'vhosts'"
            )
    if path:
        values["config_file"] = str(path)
    return ServerConfig(**values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise InvalidArgument(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config file {str(path)!r}: {exc}") from None


def _from_env(key: str, raw: str) -> Any:
    off = ("off", "false", "no", "none", "disabled")
    if key in ("amqp_port", "kafka_port") and raw.lower() in off:
        return False
    return raw


def _coerce(key: str, value: Any) -> Any:
    where = f"setting {key!r}"
    if key in ("amqp_port", "kafka_port"):
        if value is False:
            return None
        return _port(where, value)
    if key == "http_port":
        return _port(where, value)
    if key == "test_clock":
        return value is True or str(value).lower() in ("1", "true", "yes")
    if key in _INT_KEYS:
        return _int(where, value)
    if key in _BOUNDED_KEYS:
        low, high = _BOUNDED_KEYS[key]
        n = _int(where, value)
        if n < low or (high is not None and n > high):
            bound = f"at least {low}" if high is None else f"from {low} to {high}"
            raise InvalidArgument(f"{where} must be {bound}, got {n}")
        return n
    if key in _FLOAT_KEYS:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{where} must be a number, got {value!r}") from None
    if key == "durability":
        choices = get_args(Durability)
        if value not in choices:
            raise InvalidArgument(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if key == "users":
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise InvalidArgument(f'{where} must be a table of user = "password"')
        return dict(value)
    if key == "vhosts":
        return _vhost_list(where, value)
    if key == "permissions":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise InvalidArgument(f'{where} must be a table of user = ["vhost", ...]')
        return {user: _vhost_list(f"{where} for {user!r}", v) for user, v in value.items()}
    if key in _STR_KEYS:
        if not isinstance(value, str):
            raise InvalidArgument(f"{where} must be a string, got {value!r}")
        return value
    return value


def _vhost_list(where: str, value: Any) -> tuple[str, ...]:
    """A list of vhost names (a TOML list, or a comma list from the environment)."""
    from conveyor.server.amqp import check_vhost_name

    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{where} must be a list of vhost names")
    try:
        return tuple(dict.fromkeys(check_vhost_name(v) for v in value))
    except ValueError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None


def _int(where: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidArgument(f"{where} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{where} must be an integer, got {value!r}") from None


def _port(where: str, value: Any) -> int:
    port = _int(where, value)
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"{where} must be a port between 0 and 65535, got {port}")
    return port


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
