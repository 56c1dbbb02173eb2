"""The gateway's image records: the Store interface and its SQLite and MongoDB backends.

A package because one interface has two full implementations and a lease-lock helper
that both share; each lives in its own module so a reader of one backend need not page
through the other.
"""

from __future__ import annotations

from gateway.store.base import Store
from gateway.store.mongo import MongoStore
from gateway.store.sqlite import SqliteStore
from shifter.errors import ShifterError

__all__ = ["open_store"]


def open_store(url: str, mongodb_name: str = "Shifter") -> Store:
    """``sqlite:///<path>`` or a ``mongodb://`` URI (the Store key, checked by gateway.configfile)."""
    if url.startswith("sqlite:///"):
        return SqliteStore("/" + url[len("sqlite:///") :].lstrip("/"))
    if url.startswith(("mongodb://", "mongodb+srv://")):
        return MongoStore(url, mongodb_name)
    raise ShifterError(f"unsupported store {url!r}")
