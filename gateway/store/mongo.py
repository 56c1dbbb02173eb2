"""The MongoDB store (pymongo 4): several gateways on several hosts share one database.

Apart from the interface and the SQLite store so that each backend reads on its own;
records written by the original gateway are read as they are. pymongo is imported only
when a MongoDB store is opened.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

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
    with_id,
)
from shifter.errors import ShifterError

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

        doc = claimable(doc)
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
        doc = with_id(doc)
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
        query: Doc = dict(find_criteria(system, itype, pulltag))
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
            if not all(may_take(h, tag, owner) for h in holders or [doc]):
                return False
            # the new holder first: a lookup during the move finds one image or the other, never none
            if not self._changetags_of(doc, lambda d: set_tag(d, tag, owner, access), fields):
                return False
            for other in holders:
                self._changetags_of(other, lambda d: drop_tag(d, tag))
        return True

    def _changetags_of(self, doc: Doc, change: Any, fields: Doc | None = None) -> bool:
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
