"""The SQLite store: one file in WAL mode, for a gateway (or several on one host).

Apart from the interface and the MongoDB store so that each backend reads on its own;
both keep the invariants documented in gateway.store.base.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from gateway.store.base import (
    Doc,
    Store,
    claimable,
    drop_tag,
    find_criteria,
    inflight_key,
    may_take,
    pulltag_key,
    set_tag,
    tags_of,
    with_id,
)
from shifter.errors import ShifterError

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


_T = TypeVar("_T")
_UNLOCK_WAIT_SECONDS = 30.0


def _until_unlocked(step: Callable[[], _T]) -> _T:
    """``step``, again while SQLite answers "database is locked".

    Switching a new database to WAL and creating the schema can fail at once, without SQLite's
    busy handler, while another process does the same: several gateways or API processes
    starting together on a fresh store (1 start in 40 failed with four at a time).
    """
    deadline = time.monotonic() + _UNLOCK_WAIT_SECONDS
    while True:
        try:
            return step()
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


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
            _until_unlocked(lambda: conn.executescript(_SCHEMA))
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
                _until_unlocked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
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
        tags = tags_of(doc)
        conn.execute(
            f"DELETE FROM tags WHERE rid = ? AND tag NOT IN ({','.join('?' * len(tags))})",
            (doc["_id"], *tags),
        )

    def claim(self, doc: Doc) -> tuple[Doc, bool]:
        doc = claimable(doc)
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
        doc = with_id(doc)
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
        criteria = find_criteria(system, itype, pulltag)
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
                    if not may_take(other, tag, owner):
                        return False
                    drop_tag(other, tag)
                    self._write(conn, other)
            elif not may_take(doc, tag, owner):
                return False
            conn.execute(
                "INSERT OR REPLACE INTO tags(system, itype, tag, rid) VALUES (?,?,?,?)",
                (doc["system"], doc["itype"], tag, rid),
            )
            set_tag(doc, tag, owner, access)
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
