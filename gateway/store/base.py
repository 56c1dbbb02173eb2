"""The gateway's image records and the Store interface that the SQLite and MongoDB stores implement.

A record is a plain dict shaped like the original's MongoDB document (``system``,
``itype``, ``pulltag``, ``tag`` list, ``status``, ``id``, ``userACL``, ...) plus a
string key ``_id``. Two invariants are kept atomically by both stores, so that
several gateway processes (or hosts, with MongoDB) can share one store:

* at most one *in-flight* record per (system, itype, pulltag): :meth:`Store.claim`
  either inserts the new record or returns the one already in flight (a unique
  index on an ``inflight`` key that is set only while the status is in flight);
* a tag names at most one READY image per (system, itype): :meth:`Store.add_tag`
  moves it, but never away from a record where another owner holds it.

Each tag a record carries may have an entry in ``tag_access``: ``{"tag", "owner",
"private", "userACL", "groupACL"}``. Access and ownership belong to the tag, not to the
image id (gateway.access derives the image's own privacy from them). A list, not a map,
because tags contain ``.``, which MongoDB update paths cannot name.

The record helpers below (ids, the in-flight key, the tag edits) are shared by both backends
(gateway.store.sqlite, gateway.store.mongo); gateway.store.backend.open_store picks one.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

from gateway.store.lease import LOCK_LEASE_SECONDS, LOCK_WAIT_SECONDS, LockRenewer
from shifter.errors import ShifterError

INFLIGHT = frozenset({"INIT", "PENDING", "PULLING", "EXAMINATION", "CONVERSION", "TRANSFER", "HASHING"})
STATUSES = INFLIGHT | {"READY", "FAILURE", "EXPIRING", "EXPIRED"}

Doc = dict[str, Any]


def outage(err: BaseException) -> str | None:
    """One line for an error of the store's server or driver (the API answers 503 with it), else None.

    pymongo's errors carry the whole topology description; a client needs the first clause.
    SQLite's "database is locked" and disk errors count too: none of them is a gateway bug.
    """
    import sys

    errors = sys.modules.get("pymongo.errors")
    if errors is not None and isinstance(err, errors.PyMongoError):
        text = str(err).split(", Timeout:")[0].split(" (configured timeouts")[0]
        return f"store unavailable: {text.strip()[:200] or type(err).__name__}"
    if isinstance(err, sqlite3.OperationalError):
        return f"store unavailable: {str(err)[:200]}"
    return None


def pulltag_key(system: str, itype: str, pulltag: str) -> str:
    """The value of the unique ``inflight`` key for one pulltag (both stores index it)."""
    return f"{system}\x1f{itype}\x1f{pulltag}"


def inflight_key(doc: Doc) -> str | None:
    """The de-duplication key of an in-flight record, None once it is settled."""
    if doc.get("status") in INFLIGHT:
        return pulltag_key(doc["system"], doc["itype"], doc["pulltag"])
    return None


def new_id() -> str:
    """Unique and ordered by creation time (both stores sort on it)."""
    return f"{time.time_ns():016x}{uuid.uuid4().hex[:16]}"


def with_id(doc: Doc) -> Doc:
    """A copy of ``doc`` that has an ``_id`` (a new one unless the caller chose it)."""
    doc = dict(doc)
    doc.setdefault("_id", new_id())
    return doc


def claimable(doc: Doc) -> Doc:
    """:func:`with_id` for :meth:`Store.claim`, which only takes in-flight records."""
    doc = with_id(doc)
    if doc.get("status") not in INFLIGHT:
        raise ValueError("claim() needs an in-flight record")
    return doc


def find_criteria(system: str | None, itype: str | None, pulltag: str | None) -> list[tuple[str, str]]:
    """The (field, value) pairs :meth:`Store.find` filters on: the ones given."""
    return [(k, v) for k, v in (("system", system), ("itype", itype), ("pulltag", pulltag)) if v is not None]



class Store(ABC):
    """What the manager needs from persistent storage, nothing more."""

    @abstractmethod
    def claim(self, doc: Doc) -> tuple[Doc, bool]:
        """Insert ``doc`` (in flight) unless one is in flight for its pulltag: (record, inserted)."""

    @abstractmethod
    def insert(self, doc: Doc) -> Doc:
        """Insert a settled record (e.g. READY from an import); returns it with its ``_id``."""

    @abstractmethod
    def get(self, rid: str) -> Doc | None:
        """The record with ``_id`` ``rid``."""

    @abstractmethod
    def update(
        self, rid: str, fields: Doc, only_if_status: Iterable[str] | None = None, expect: Doc | None = None
    ) -> bool:
        """Set ``fields`` on a record, optionally only while its status is one of ``only_if_status``
        and each field in ``expect`` still has that value (a compare-and-set: how leases are taken)."""

    @abstractmethod
    def delete(self, rid: str) -> None:
        """Remove a record and its tags."""

    @abstractmethod
    def find_ready(self, system: str, itype: str, tag: str) -> Doc | None:
        """The READY record carrying ``tag``: the lookup path, keep it cheap."""

    @abstractmethod
    def find_ready_by_image_id(self, system: str, image_id: str) -> Doc | None:
        """A READY record of this image id on ``system`` (images are shared between tags)."""

    @abstractmethod
    def find_inflight(self, system: str, itype: str, pulltag: str) -> Doc | None:
        """The in-flight record for ``pulltag``, if any."""

    @abstractmethod
    def find(
        self,
        system: str | None = None,
        itype: str | None = None,
        pulltag: str | None = None,
        statuses: Iterable[str] | None = None,
    ) -> list[Doc]:
        """Records matching every given criterion (used by list, queue, expiry and recovery)."""

    @abstractmethod
    def add_tag(
        self, rid: str, tag: str, owner: str | None = None, access: Doc | None = None, fields: Doc | None = None
    ) -> bool:
        """Move ``tag`` to record ``rid``, taking it from any other record of the same system/itype,
        unless that record's ``tag_access`` names another owner for it: then nothing changes and
        the answer is False. ``access`` (private, userACL, groupACL) becomes the tag's entry.
        ``fields`` are set on ``rid`` in the same write (a pull record becomes READY together
        with its tag, so no reader sees it settled but untagged and starts the pull again)."""

    @abstractmethod
    def touch(self, updates: dict[str, float]) -> None:
        """Set ``expiration`` on many records at once (batched lookups)."""

    @abstractmethod
    def add_metrics(self, docs: list[Doc]) -> None:
        """Append lookup metric documents (original ``Metrics: true``)."""

    @abstractmethod
    def metrics(self, system: str, limit: int) -> list[Doc]:
        """The last ``limit`` metric documents for ``system``, oldest first."""

    @contextlib.contextmanager
    def lock(self, name: str, lease: float | None = None, wait: float | None = None) -> Iterator[None]:
        """A lock shared by every gateway on this store, on any host: work on one image id
        (publish, tag, expire) or one tag move. It is a lease, renewed while held, so the lock
        of a gateway that died is taken over once ``lease`` seconds have passed; gateway hosts'
        clocks must agree to well within that. Not re-entrant."""
        lease = LOCK_LEASE_SECONDS if lease is None else lease
        wait = LOCK_WAIT_SECONDS if wait is None else wait
        token = uuid.uuid4().hex
        deadline = time.monotonic() + wait
        pause = 0.002
        while not self._take_lock(name, token, lease):
            if time.monotonic() > deadline:
                raise ShifterError(f"store: lock {name!r} stayed held by another gateway for {wait:.0f}s")
            time.sleep(random.uniform(pause / 2, pause))
            pause = min(pause * 1.5, 0.25)
        self._renewer().hold(name, token, lease)
        try:
            yield
        finally:
            self._renewer().release(name)
            self._drop_lock(name, token)

    def _stop_renewing(self) -> None:
        """Before the connections close: no lease renewal may run on a closed connection."""
        renewer = self.__dict__.get("_lock_renewer")
        if renewer is not None:
            renewer.stop()

    def _renewer(self) -> LockRenewer:
        renewer = self.__dict__.get("_lock_renewer")
        if renewer is None:
            with _RENEWER_LOCK:
                renewer = self.__dict__.setdefault("_lock_renewer", LockRenewer(self._renew_lock))
        return renewer

    @abstractmethod
    def _take_lock(self, name: str, token: str, lease: float) -> bool:
        """Take lock ``name`` for ``token`` if it is free or its lease has run out."""

    @abstractmethod
    def _renew_lock(self, name: str, token: str, lease: float) -> None:
        """Extend the lease of a lock ``token`` holds."""

    @abstractmethod
    def _drop_lock(self, name: str, token: str) -> None:
        """Release a lock ``token`` holds (nothing if another has taken it over)."""

    @abstractmethod
    def ping(self) -> None:
        """Raise if the store is unusable (health check)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


_RENEWER_LOCK = threading.Lock()  # creates each store's one renewer


def tag_entry(doc: Doc, tag: str) -> Doc | None:
    """The ``tag_access`` entry of ``tag`` on a record, if it has one."""
    for entry in doc.get("tag_access") or []:
        if isinstance(entry, dict) and entry.get("tag") == tag:
            return entry
    return None


def may_take(holder: Doc, tag: str, owner: str | None) -> bool:
    """A tag without a recorded owner (written before owners were recorded) may be moved."""
    held = (tag_entry(holder, tag) or {}).get("owner")
    return held is None or held == owner


def drop_tag(doc: Doc, tag: str) -> None:
    """Remove ``tag`` and its access entry from a record (in place)."""
    doc["tag"] = [t for t in tags_of(doc) if t != tag]
    doc["tag_access"] = [e for e in doc.get("tag_access") or [] if isinstance(e, dict) and e.get("tag") != tag]


def set_tag(doc: Doc, tag: str, owner: str | None, access: Doc | None) -> None:
    """Add ``tag`` to a record (in place), recording its owner and access where given."""
    tags = tags_of(doc)
    doc["tag"] = tags if tag in tags else tags + [tag]
    entry = dict(tag_entry(doc, tag) or {"tag": tag})
    if owner is not None:
        entry["owner"] = owner
    if access is not None:
        entry.update({k: access[k] for k in ("private", "userACL", "groupACL") if k in access})
    rest = [e for e in doc.get("tag_access") or [] if isinstance(e, dict) and e.get("tag") != tag]
    doc["tag_access"] = rest + [entry]


def tags_of(doc: Doc) -> list[str]:
    """A record's tags as a list (the original wrote a single tag as a string)."""
    tag = doc.get("tag")
    if isinstance(tag, str):
        return [tag]
    return list(tag) if isinstance(tag, list) else []
