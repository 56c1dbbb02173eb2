"""Which store a configured ``Store`` URL names: open_store, the one place that knows both backends.

Apart from the package's __init__, which imports nothing, so that importing the interface
(gateway.store.base) does not load both backends.
"""

from __future__ import annotations

from gateway.store.base import Store
from gateway.store.mongo import MongoStore
from gateway.store.sqlite import SqliteStore
from shifter.errors import ShifterError


def open_store(url: str, mongodb_name: str = "Shifter") -> Store:
    """``sqlite:///<path>`` or a ``mongodb://`` URI (the Store key, checked by gateway.configfile)."""
    if url.startswith("sqlite:///"):
        return SqliteStore("/" + url[len("sqlite:///") :].lstrip("/"))
    if url.startswith(("mongodb://", "mongodb+srv://")):
        return MongoStore(url, mongodb_name)
    raise ShifterError(f"unsupported store {url!r}")
