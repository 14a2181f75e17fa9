"""Stores: where messages live. ``open_store(url)`` picks one by URL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from conveyor.errors import InvalidArgument
from conveyor.model import Durability
from conveyor.store.base import Store

DURABILITIES: tuple[str, ...] = ("fsync", "os", "none")


def open_store(url: str, *, durability: str = "fsync") -> Store:
    """``memory://``, ``sqlite:///abs/dir``, ``sqlite://rel/dir``, a plain directory path,
    or ``postgresql://...``."""
    if durability not in DURABILITIES:
        raise InvalidArgument(f"durability must be one of {', '.join(DURABILITIES)}")
    dur: Durability = durability  # type: ignore[assignment]
    if url.startswith("memory:"):
        from conveyor.store.sqlite import SqliteStore

        return SqliteStore(None, "none")
    if url.startswith(("postgresql:", "postgres:")):
        try:
            from conveyor.store.postgres import PostgresStore
        except ImportError as exc:
            raise InvalidArgument(f"the PostgreSQL store is not available: {exc}") from exc
        store: Store = PostgresStore(url, dur)
        return store
    if url.startswith("sqlite:"):
        parsed = urlparse(url)
        path = unquote(parsed.netloc + parsed.path)
        if not path:
            raise InvalidArgument(f"no path in {url!r}")
        from conveyor.store.sqlite import SqliteStore

        return SqliteStore(Path(path), dur)
    if "://" in url:
        raise InvalidArgument(
            f"unknown store URL {url!r}: use a directory, sqlite:///dir, memory:// or"
            " postgresql://..."
        )
    from conveyor.store.sqlite import SqliteStore

    return SqliteStore(Path(url), dur)


__all__ = ["Store", "open_store"]
