"""The gateway's image records: one small repository interface, SQLite and MongoDB behind it.

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
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

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


def _with_id(doc: Doc) -> Doc:
    """A copy of ``doc`` that has an ``_id`` (a new one unless the caller chose it)."""
    doc = dict(doc)
    doc.setdefault("_id", new_id())
    return doc


def _claimable(doc: Doc) -> Doc:
    """:func:`_with_id` for :meth:`Store.claim`, which only takes in-flight records."""
    doc = _with_id(doc)
    if doc.get("status") not in INFLIGHT:
        raise ValueError("claim() needs an in-flight record")
    return doc


def _criteria(system: str | None, itype: str | None, pulltag: str | None) -> list[tuple[str, str]]:
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

    def _renewer(self) -> _LockRenewer:
        renewer = self.__dict__.get("_lock_renewer")
        if renewer is None:
            with _RENEWER_LOCK:
                renewer = self.__dict__.setdefault("_lock_renewer", _LockRenewer(self))
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


LOCK_LEASE_SECONDS = 30.0  # a lock of a gateway that stopped renewing it is taken over after this
LOCK_WAIT_SECONDS = 3600.0  # a publication of a large image may hold its id's lock for minutes
_RENEWER_LOCK = threading.Lock()


class _LockRenewer:
    """One thread per store that extends the leases of the locks this process holds."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.held: dict[str, tuple[str, float]] = {}
        self.mutex = threading.Lock()
        self.wake = threading.Event()
        self.renewing = threading.Lock()  # held while renewals run; stop() waits for it
        self.stopped = False
        self.thread: threading.Thread | None = None

    def hold(self, name: str, token: str, lease: float) -> None:
        with self.mutex:
            self.held[name] = (token, lease)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="store-lock-renewer", daemon=True)
                self.thread.start()
        self.wake.set()

    def release(self, name: str) -> None:
        with self.mutex:
            self.held.pop(name, None)

    def stop(self) -> None:
        """End the thread; once this returns no renewal runs (the store is closing)."""
        with self.mutex:
            self.stopped = True
            self.held.clear()
        self.wake.set()
        with self.renewing:
            pass

    def _run(self) -> None:
        # lives as long as the store: one thread (and, for SQLite, one connection) per store
        while True:
            with self.mutex:
                if self.stopped:
                    return
                held = dict(self.held)
            if not held:
                self.wake.wait()
                self.wake.clear()
                continue
            with self.renewing:
                if self.stopped:
                    return
                for name, (token, lease) in held.items():
                    try:
                        self.store._renew_lock(name, token, lease)
                    except Exception:  # noqa: BLE001 - the store is down: the lease may lapse, retried next round
                        pass
            self.wake.clear()
            self.wake.wait(min(lease for _, lease in held.values()) / 3)


def open_store(url: str, mongodb_name: str = "Shifter") -> Store:
    """``sqlite:///<path>`` or a ``mongodb://`` URI (see gateway.config)."""
    if url.startswith("sqlite:///"):
        return SqliteStore("/" + url[len("sqlite:///") :].lstrip("/"))
    if url.startswith(("mongodb://", "mongodb+srv://")):
        return MongoStore(url, mongodb_name)
    raise ShifterError(f"unsupported store {url!r}")


# -- SQLite ------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    rid TEXT PRIMARY KEY,
    system TEXT NOT NULL,
    itype TEXT NOT NULL,
    pulltag TEXT NOT NULL,
    status TEXT NOT NULL,
    image_id TEXT,
    inflight TEXT UNIQUE,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_pulltag ON images(system, itype, pulltag);
CREATE INDEX IF NOT EXISTS images_image_id ON images(system, image_id);
CREATE INDEX IF NOT EXISTS images_status ON images(status);
CREATE TABLE IF NOT EXISTS tags (
    system TEXT NOT NULL,
    itype TEXT NOT NULL,
    tag TEXT NOT NULL,
    rid TEXT NOT NULL,
    PRIMARY KEY (system, itype, tag)
);
CREATE INDEX IF NOT EXISTS tags_rid ON tags(rid);
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    system TEXT NOT NULL,
    doc TEXT NOT NULL
);
"""


class SqliteStore(Store):
    """SQLite in WAL mode: readers never wait for the writer; one connection per thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as err:
            raise ShifterError(f"store {path}: cannot create {parent}: {err.strerror}") from None
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        conn = self._conn()
        try:
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise ShifterError(f"store {path}: {err}") from None
        for suffix in ("", "-wal", "-shm"):  # records name private images and their ACLs
            with contextlib.suppress(FileNotFoundError):
                os.chmod(path + suffix, 0o600)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=30000")
            except sqlite3.Error as err:
                raise ShifterError(f"store {self.path}: {err}") from None
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    @staticmethod
    def _load(row: tuple[str, str] | None) -> Doc | None:
        if row is None:
            return None
        doc = json.loads(row[1])
        doc["_id"] = row[0]
        return doc

    def _fetch(self, conn: sqlite3.Connection, rid: str) -> Doc | None:
        return self._load(conn.execute("SELECT rid, doc FROM images WHERE rid = ?", (rid,)).fetchone())

    def _write(self, conn: sqlite3.Connection, doc: Doc) -> None:
        body = {k: v for k, v in doc.items() if k != "_id"}
        conn.execute(
            # an upsert on rid only: a clash on the unique inflight key must raise, never replace
            "INSERT INTO images(rid, system, itype, pulltag, status, image_id, inflight, doc)"
            " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(rid) DO UPDATE SET system=excluded.system,"
            " itype=excluded.itype, pulltag=excluded.pulltag, status=excluded.status,"
            " image_id=excluded.image_id, inflight=excluded.inflight, doc=excluded.doc",
            (
                doc["_id"],
                doc["system"],
                doc["itype"],
                doc["pulltag"],
                doc["status"],
                doc.get("id"),
                inflight_key(doc),
                json.dumps(body, separators=(",", ":")),
            ),
        )
        tags = _tags(doc)
        conn.execute(
            f"DELETE FROM tags WHERE rid = ? AND tag NOT IN ({','.join('?' * len(tags))})",
            (doc["_id"], *tags),
        )

    def claim(self, doc: Doc) -> tuple[Doc, bool]:
        doc = _claimable(doc)
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT rid, doc FROM images WHERE inflight = ?", (inflight_key(doc),)
            ).fetchone()
            if row is not None:
                conn.execute("COMMIT")
                return self._load(row), False  # type: ignore[return-value]
            self._write(conn, doc)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return doc, True

    def insert(self, doc: Doc) -> Doc:
        doc = _with_id(doc)
        conn = self._conn()
        with _transaction(conn):
            self._write(conn, doc)
        return doc

    def get(self, rid: str) -> Doc | None:
        return self._fetch(self._conn(), rid)

    def update(
        self, rid: str, fields: Doc, only_if_status: Iterable[str] | None = None, expect: Doc | None = None
    ) -> bool:
        conn = self._conn()
        with _transaction(conn):
            doc = self._fetch(conn, rid)
            if doc is None or (only_if_status is not None and doc["status"] not in set(only_if_status)):
                return False
            if expect and any(doc.get(k) != v for k, v in expect.items()):
                return False
            doc.update(fields)
            try:
                self._write(conn, doc)
            except sqlite3.IntegrityError:  # another record is already in flight for this pulltag
                return False
        return True

    def delete(self, rid: str) -> None:
        conn = self._conn()
        with _transaction(conn):
            conn.execute("DELETE FROM tags WHERE rid = ?", (rid,))
            conn.execute("DELETE FROM images WHERE rid = ?", (rid,))

    def find_ready(self, system: str, itype: str, tag: str) -> Doc | None:
        row = (
            self._conn()
            .execute(
                "SELECT i.rid, i.doc FROM tags t JOIN images i ON i.rid = t.rid"
                " WHERE t.system = ? AND t.itype = ? AND t.tag = ? AND i.status = 'READY'",
                (system, itype, tag),
            )
            .fetchone()
        )
        return self._load(row)

    def find_ready_by_image_id(self, system: str, image_id: str) -> Doc | None:
        row = (
            self._conn()
            .execute(
                "SELECT rid, doc FROM images WHERE system = ? AND image_id = ? AND status = 'READY'",
                (system, image_id),
            )
            .fetchone()
        )
        return self._load(row)

    def find_inflight(self, system: str, itype: str, pulltag: str) -> Doc | None:
        key = pulltag_key(system, itype, pulltag)
        return self._load(
            self._conn().execute("SELECT rid, doc FROM images WHERE inflight = ?", (key,)).fetchone()
        )

    def find(
        self,
        system: str | None = None,
        itype: str | None = None,
        pulltag: str | None = None,
        statuses: Iterable[str] | None = None,
    ) -> list[Doc]:
        criteria = _criteria(system, itype, pulltag)
        where = [f"{column} = ?" for column, _ in criteria]
        args = [value for _, value in criteria]
        if statuses is not None:
            wanted = sorted(set(statuses))
            if not wanted:
                return []
            where.append(f"status IN ({','.join('?' * len(wanted))})")
            args.extend(wanted)
        sql = (
            "SELECT rid, doc FROM images"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY rowid"
        )
        return [self._load(r) for r in self._conn().execute(sql, args).fetchall()]  # type: ignore[misc]

    def add_tag(
        self, rid: str, tag: str, owner: str | None = None, access: Doc | None = None, fields: Doc | None = None
    ) -> bool:
        conn = self._conn()
        with _transaction(conn):
            doc = self._fetch(conn, rid)
            if doc is None:
                return False
            old = conn.execute(
                "SELECT rid FROM tags WHERE system = ? AND itype = ? AND tag = ?",
                (doc["system"], doc["itype"], tag),
            ).fetchone()
            if old is not None and old[0] != rid:
                other = self._fetch(conn, old[0])
                if other is not None:
                    if not _may_take(other, tag, owner):
                        return False
                    _drop_tag(other, tag)
                    self._write(conn, other)
            elif not _may_take(doc, tag, owner):
                return False
            conn.execute(
                "INSERT OR REPLACE INTO tags(system, itype, tag, rid) VALUES (?,?,?,?)",
                (doc["system"], doc["itype"], tag, rid),
            )
            _set_tag(doc, tag, owner, access)
            doc.update({k: v for k, v in (fields or {}).items() if k not in ("_id", "tag", "tag_access")})
            self._write(conn, doc)
        return True

    def touch(self, updates: dict[str, float]) -> None:
        if not updates:
            return
        conn = self._conn()
        with _transaction(conn):
            for rid, when in updates.items():
                conn.execute(
                    "UPDATE images SET doc = json_set(doc, '$.expiration', ?) WHERE rid = ?", (when, rid)
                )

    def add_metrics(self, docs: list[Doc]) -> None:
        if not docs:
            return
        conn = self._conn()
        with _transaction(conn):
            conn.executemany(
                "INSERT INTO metrics(system, doc) VALUES (?, ?)",
                [(d.get("system", ""), json.dumps(d, separators=(",", ":"))) for d in docs],
            )

    def metrics(self, system: str, limit: int) -> list[Doc]:
        if limit <= 0:
            return []
        rows = (
            self._conn()
            .execute("SELECT doc FROM metrics WHERE system = ? ORDER BY seq DESC LIMIT ?", (system, limit))
            .fetchall()
        )
        return [json.loads(r[0]) for r in reversed(rows)]

    def _take_lock(self, name: str, token: str, lease: float) -> bool:
        conn = self._conn()
        now = time.time()
        with _transaction(conn):
            row = conn.execute("SELECT until FROM locks WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] >= now:
                return False
            conn.execute("INSERT OR REPLACE INTO locks(name, token, until) VALUES (?,?,?)", (name, token, now + lease))
        return True

    def _renew_lock(self, name: str, token: str, lease: float) -> None:
        conn = self._conn()
        with _transaction(conn):
            conn.execute("UPDATE locks SET until = ? WHERE name = ? AND token = ?", (time.time() + lease, name, token))

    def _drop_lock(self, name: str, token: str) -> None:
        conn = self._conn()
        with _transaction(conn):
            conn.execute("DELETE FROM locks WHERE name = ? AND token = ?", (name, token))

    def ping(self) -> None:
        try:
            self._conn().execute("SELECT 1 FROM images LIMIT 1").fetchall()
        except sqlite3.Error as err:
            raise ShifterError(f"store {self.path}: {err}") from None

    def close(self) -> None:
        self._stop_renewing()
        with self._all_lock:
            for conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._local = threading.local()


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): writers take the lock up front."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def tag_entry(doc: Doc, tag: str) -> Doc | None:
    """The ``tag_access`` entry of ``tag`` on a record, if it has one."""
    for entry in doc.get("tag_access") or []:
        if isinstance(entry, dict) and entry.get("tag") == tag:
            return entry
    return None


def _may_take(holder: Doc, tag: str, owner: str | None) -> bool:
    """A tag without a recorded owner (written before owners were recorded) may be moved."""
    held = (tag_entry(holder, tag) or {}).get("owner")
    return held is None or held == owner


def _drop_tag(doc: Doc, tag: str) -> None:
    doc["tag"] = [t for t in _tags(doc) if t != tag]
    doc["tag_access"] = [e for e in doc.get("tag_access") or [] if isinstance(e, dict) and e.get("tag") != tag]


def _set_tag(doc: Doc, tag: str, owner: str | None, access: Doc | None) -> None:
    tags = _tags(doc)
    doc["tag"] = tags if tag in tags else tags + [tag]
    entry = dict(tag_entry(doc, tag) or {"tag": tag})
    if owner is not None:
        entry["owner"] = owner
    if access is not None:
        entry.update({k: access[k] for k in ("private", "userACL", "groupACL") if k in access})
    rest = [e for e in doc.get("tag_access") or [] if isinstance(e, dict) and e.get("tag") != tag]
    doc["tag_access"] = rest + [entry]


def _tags(doc: Doc) -> list[str]:
    tag = doc.get("tag")
    if isinstance(tag, str):
        return [tag]
    return list(tag) if isinstance(tag, list) else []


# -- MongoDB -----------------------------------------------------------------------------------

TAG_LOCK_WAIT = 60.0  # a tag move takes milliseconds: how long add_tag waits for one at another gateway


def _plain_keys(value: Doc) -> bool:
    """Keys that can be named in a dotted path and an aggregation field path."""
    return all(isinstance(k, str) and k and "." not in k and not k.startswith("$") for k in value)


def _equals(path: str, value: Any, top: bool = False) -> list[Doc]:
    """Query conditions for "the field at ``path`` equals ``value``" as Python compares it.

    MongoDB's equality on an embedded document also compares its key order, so a plain
    ``{"owner": {...}}`` match fails for the same owner written in another order. An
    embedded document is compared field by field (dotted paths) instead, plus its type and
    number of fields ($expr, MongoDB 3.6+), so a missing or extra field still differs. A
    None at the top also matches a missing field (``dict.get``); inside a document it must
    be a present null.
    """
    if isinstance(value, dict) and value and _plain_keys(value):
        field = "$" + path
        shape = {
            "$cond": [
                {"$eq": [{"$type": field}, "object"]},
                {"$eq": [{"$size": {"$objectToArray": field}}, len(value)]},
                False,
            ]
        }
        conditions: list[Doc] = [{"$expr": shape}]
        for key, sub in value.items():
            conditions.extend(_equals(f"{path}.{key}", sub))
        return conditions
    if value is None and not top:
        return [{path: {"$exists": True, "$eq": None}}]
    return [{path: {"$eq": value}}]


class MongoStore(Store):
    """MongoDB via pymongo 4 (collection ``images`` like the original, plus ``metrics``).

    Records written by the original gateway (ObjectId ``_id``, scalar ``tag``) are read as-is.
    """

    def __init__(self, uri: str, dbname: str = "Shifter") -> None:
        import pymongo
        from pymongo.errors import PyMongoError

        self._errors = PyMongoError
        self.uri = uri
        try:
            self.client: Any = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000, tz_aware=False)
            self.db = self.client[dbname]
            self.images = self.db["images"]
            self.metrics_coll = self.db["metrics"]
            self.locks = self.db["locks"]
            self.images.create_index(
                "inflight",
                unique=True,
                name="inflight_unique",
                partialFilterExpression={"inflight": {"$type": "string"}},
            )
            self.images.create_index([("system", 1), ("itype", 1), ("tag", 1)], name="lookup")
            self.images.create_index([("system", 1), ("itype", 1), ("pulltag", 1)], name="pulltag")
            self.images.create_index([("system", 1), ("id", 1)], name="image_id")
            self.metrics_coll.create_index([("system", 1), ("time", -1)], name="recent")
        except PyMongoError as err:
            raise ShifterError(f"store {uri}: {err}") from None

    @staticmethod
    def _out(doc: Doc | None) -> Doc | None:
        if doc is None:
            return None
        doc = dict(doc)
        doc["_id"] = str(doc["_id"])
        doc.pop("inflight", None)
        return doc

    @staticmethod
    def _key(rid: str) -> Any:
        from bson import ObjectId

        return {"_id": {"$in": [rid, ObjectId(rid)]}} if ObjectId.is_valid(rid) else {"_id": rid}

    def _in(self, doc: Doc) -> Doc:
        doc = dict(doc)
        key = inflight_key(doc)
        if key is None:
            doc.pop("inflight", None)
        else:
            doc["inflight"] = key
        return doc

    def claim(self, doc: Doc) -> tuple[Doc, bool]:
        from pymongo.errors import DuplicateKeyError

        doc = _claimable(doc)
        for _ in range(10):
            try:
                self.images.insert_one(self._in(doc))
                return doc, True
            except DuplicateKeyError:
                existing = self.images.find_one({"inflight": inflight_key(doc)})
                if existing is not None:
                    return self._out(existing), False  # type: ignore[return-value]
        raise ShifterError("store: could not claim an in-flight slot (contention)")

    def insert(self, doc: Doc) -> Doc:
        doc = _with_id(doc)
        self.images.insert_one(self._in(doc))
        return doc

    def get(self, rid: str) -> Doc | None:
        return self._out(self.images.find_one(self._key(rid)))

    def update(
        self, rid: str, fields: Doc, only_if_status: Iterable[str] | None = None, expect: Doc | None = None
    ) -> bool:
        conditions: list[Doc] = [self._key(rid)]
        if only_if_status is not None:
            conditions.append({"status": {"$in": list(only_if_status)}})
        for key, value in (expect or {}).items():
            conditions.extend(_equals(key, value, top=True))
        query: Doc = conditions[0] if len(conditions) == 1 else {"$and": conditions}
        fields = {k: v for k, v in fields.items() if k != "_id"}
        change: Doc = {"$set": fields}
        if "status" in fields:
            current = self.images.find_one(query, {"system": 1, "itype": 1, "pulltag": 1})
            if current is None:
                return False
            key = inflight_key({**current, "status": fields["status"]})
            if key is None:
                change["$unset"] = {"inflight": ""}
            else:
                change["$set"] = {**fields, "inflight": key}
        from pymongo.errors import DuplicateKeyError

        try:
            return self.images.update_one(query, change).matched_count > 0
        except DuplicateKeyError:  # another record is already in flight for this pulltag
            return False

    def delete(self, rid: str) -> None:
        self.images.delete_one(self._key(rid))

    def find_ready(self, system: str, itype: str, tag: str) -> Doc | None:
        return self._out(
            self.images.find_one({"system": system, "itype": itype, "tag": tag, "status": "READY"})
        )

    def find_ready_by_image_id(self, system: str, image_id: str) -> Doc | None:
        return self._out(self.images.find_one({"system": system, "id": image_id, "status": "READY"}))

    def find_inflight(self, system: str, itype: str, pulltag: str) -> Doc | None:
        return self._out(self.images.find_one({"inflight": pulltag_key(system, itype, pulltag)}))

    def find(
        self,
        system: str | None = None,
        itype: str | None = None,
        pulltag: str | None = None,
        statuses: Iterable[str] | None = None,
    ) -> list[Doc]:
        query: Doc = dict(_criteria(system, itype, pulltag))
        if statuses is not None:
            query["status"] = {"$in": sorted(set(statuses))}
        return [self._out(d) for d in self.images.find(query).sort("_id", 1)]  # type: ignore[misc]

    def add_tag(
        self, rid: str, tag: str, owner: str | None = None, access: Doc | None = None, fields: Doc | None = None
    ) -> bool:
        """Moves of one tag are serialized by a lock document (several gateways may finish pulls
        naming the same tag at once); each record's tag fields change by compare-and-set, since
        moves of other tags and status changes touch the same record without that lock."""
        doc = self.images.find_one(self._key(rid), {"system": 1, "itype": 1})
        if doc is None:
            return False
        with self.lock("tag\x1f" + pulltag_key(doc["system"], doc["itype"], tag), wait=TAG_LOCK_WAIT):
            doc = self.images.find_one({"_id": doc["_id"]})
            if doc is None:
                return False
            holders = [
                h
                for h in self.images.find({"system": doc["system"], "itype": doc["itype"], "tag": tag})
                if h["_id"] != doc["_id"]
            ]
            if not all(_may_take(h, tag, owner) for h in holders or [doc]):
                return False
            # the new holder first: a lookup during the move finds one image or the other, never none
            if not self._change_tags(doc, lambda d: _set_tag(d, tag, owner, access), fields):
                return False
            for other in holders:
                self._change_tags(other, lambda d: _drop_tag(d, tag))
        return True

    def _change_tags(self, doc: Doc, change: Any, fields: Doc | None = None) -> bool:
        """Apply ``change`` to a record's ``tag``/``tag_access`` (and set ``fields``) by
        compare-and-set, re-reading it after a concurrent change; False once the record is gone."""
        from pymongo.errors import DuplicateKeyError

        extra = {k: v for k, v in (fields or {}).items() if k not in ("_id", "tag", "tag_access")}
        for _ in range(100):
            before = {k: {"$eq": doc[k]} if k in doc else {"$exists": False} for k in ("tag", "tag_access")}
            after = dict(doc)
            change(after)
            update: Doc = {"$set": {**extra, "tag": after["tag"], "tag_access": after["tag_access"]}}
            if "status" in extra:
                key = inflight_key({**doc, **extra})
                if key is None:
                    update["$unset"] = {"inflight": ""}
                else:
                    update["$set"]["inflight"] = key
            try:
                result = self.images.update_one({"_id": doc["_id"], **before}, update)
            except DuplicateKeyError:  # ``fields`` put it in flight where another record is
                return False
            if result.matched_count:
                return True
            doc = self.images.find_one({"_id": doc["_id"]})
            if doc is None:
                return False
        raise ShifterError(f"store: record {doc['_id']} keeps changing; its tags were not updated")

    def _take_lock(self, name: str, token: str, lease: float) -> bool:
        """Inserting the unique ``_id`` takes a free lock; a compare-and-set on its expiry takes
        over one whose holder stopped renewing it."""
        from pymongo.errors import DuplicateKeyError

        now = time.time()
        try:
            self.locks.insert_one({"_id": name, "token": token, "until": now + lease})
            return True
        except DuplicateKeyError:
            taken = self.locks.find_one_and_update(
                {"_id": name, "until": {"$lt": now}}, {"$set": {"token": token, "until": now + lease}}
            )
            return taken is not None

    def _renew_lock(self, name: str, token: str, lease: float) -> None:
        self.locks.update_one({"_id": name, "token": token}, {"$set": {"until": time.time() + lease}})

    def _drop_lock(self, name: str, token: str) -> None:
        self.locks.delete_one({"_id": name, "token": token})

    def touch(self, updates: dict[str, float]) -> None:
        from pymongo import UpdateOne

        if updates:
            self.images.bulk_write(
                [UpdateOne(self._key(rid), {"$set": {"expiration": when}}) for rid, when in updates.items()],
                ordered=False,
            )

    def add_metrics(self, docs: list[Doc]) -> None:
        if docs:
            self.metrics_coll.insert_many([dict(d) for d in docs])

    def metrics(self, system: str, limit: int) -> list[Doc]:
        if limit <= 0:
            return []
        # by the lookup's own time: ObjectIds made by several gateways order only to the second
        docs = list(
            self.metrics_coll.find({"system": system}, {"_id": 0}).sort([("time", -1), ("_id", -1)]).limit(limit)
        )
        return list(reversed(docs))

    def ping(self) -> None:
        try:
            self.client.admin.command("ping")
        except self._errors as err:
            raise ShifterError(f"store: {err}") from None

    def close(self) -> None:
        self._stop_renewing()
        self.client.close()
