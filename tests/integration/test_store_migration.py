"""A site's existing MongoDB, as the original gateway left it, served by our gateway.

The database is seeded with documents in the original's shape (``images``: ObjectId
``_id``, the request fields, ``tag`` as a list or, from older versions, a string,
``last_pull``/``expiration`` float epochs, int ACL lists, ``private`` None/bool; ``metrics``:
``{user, uid, system, type, tag, id, time}``) and its image directory holds their
``<id>.squashfs`` and ``<id>.meta``. The real gateway service then runs on that database
(a real MongoDB-wire server, see tests/fixtures_mongo.py) with a real registry and munged:
lookups, listings, ACLs, metrics, a pull of a new tag next to the old records, a pull that
moves a tag away from one, expire and autoexpire. What it writes must keep the original's
field types, so that a site can roll back.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
from bson import ObjectId
from fixtures_registry import PYTHON, GatewayProcess, Munged, Registry, bound_credential, gateway_config, have

from localcluster import oci
from shifter.formats.meta import ImageMeta, read_meta, write_meta

missing = have("munged", "docker-registry", "tar2sqfs", "mksquashfs")
pytestmark = [
    pytest.mark.skipif(missing is not None, reason=f"needs {missing}"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: credentials of another uid (nobody)"),
]

NOBODY = 65534
STRANGER = 4242  # no account, not an admin, in no ACL
ORIGINAL_STATUSES = {"INIT", "PENDING", "PULLING", "EXAMINATION", "CONVERSION", "TRANSFER", "READY", "FAILURE",
                     "EXPIRING", "EXPIRED", "HASHING"}


class Site:
    """The migrated site: its database, image directory, munged, registry and our gateway."""

    def __init__(self, root: Path, db: Any, munged: Munged, registry: Registry, gateway: GatewayProcess) -> None:
        self.root = root
        self.db = db
        self.munged = munged
        self.registry = registry
        self.gateway = gateway
        self.seeded: dict[str, dict[str, Any]] = {}

    @property
    def address(self) -> str:
        return self.gateway.url.removeprefix("http://")

    @property
    def images(self) -> Path:
        return self.root / "images"

    def request(self, method: str, path: str, as_uid: int = 0) -> tuple[int, Any]:
        if as_uid == 0:
            cred = bound_credential(self.munged.socket, method, path, b"", self.address)
        else:  # the original client's unbound credential, from another uid: enough for lookups and lists
            code = f"from shifter.client import munge; print(munge.encode(b'', {self.munged.socket!r}, decoder_uid=0))"
            cred = subprocess.run([PYTHON, "-c", code], user=as_uid, group=as_uid, capture_output=True, text=True,
                                  check=True, cwd="/", timeout=30,
                                  env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])}).stdout.strip()
        host, port = self.address.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(method, path, headers={"authentication": cred})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def pull(self, tag: str, timeout: float = 120) -> dict[str, Any]:
        path = f"/api/pull/testsys/docker/{tag.replace('/', '%2F').replace(':', '%3A')}/"
        deadline = time.monotonic() + timeout
        while True:
            status, rec = self.request("POST", path)
            assert status == 200, rec
            if rec["status"] in ("READY", "FAILURE"):
                return rec
            assert time.monotonic() < deadline, rec
            time.sleep(0.05)

    def raw(self, pulltag: str) -> dict[str, Any]:
        return self.db.images.find_one({"_id": self.seeded[pulltag]["_id"]})


def _publish_original(images: Path, name: str, entry: Any, acl: tuple[list[int], list[int]] = ([], [])) -> str:
    """An image as the original published it: ``<id>.squashfs`` and ``<id>.meta``."""
    tree = images.parent / f"tree-{name}"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_text(f"#!/bin/sh\necho {name}\n")
    squash = images / f"{name}.tmp"
    subprocess.run(["mksquashfs", str(tree), str(squash), "-quiet", "-noappend", "-all-root"], check=True,
                   stdout=subprocess.DEVNULL)
    image_id = hashlib.sha256(squash.read_bytes()).hexdigest()
    squash.rename(images / f"{image_id}.squashfs")
    entrypoint = entry if isinstance(entry, list) else [entry]
    write_meta(str(images / f"{image_id}.meta"), ImageMeta(
        format="squashfs", entrypoint=entrypoint, workdir="/", env=["PATH=/usr/bin:/bin"],
        user_acl=acl[0], group_acl=acl[1]))
    return image_id


def _original_record(pulltag: str, status: str, image_id: str | None, age: float, **fields: Any) -> dict[str, Any]:
    """The original's document: new_pull_record's defaults plus what completion and lookups set."""
    now = time.time()
    doc: dict[str, Any] = {
        "_id": ObjectId(),
        "system": "testsys",
        "itype": "docker",
        "pulltag": pulltag,
        "tag": [pulltag],
        "status": status,
        "format": "squashfs",
        "arch": "amd64",
        "os": "linux",
        "location": "",
        "remotetype": "dockerv2",
        "ostcount": "0",
        "replication": "1",
        "userACL": [],
        "groupACL": [],
        "private": False,
        "status_message": "",
        "last_heartbeat": now - age,
        "last_pull": now - age,
    }
    if image_id is not None:
        doc.update(id=image_id, ENV=["PATH=/usr/bin:/bin"], ENTRY="/bin/tool", WORKDIR="/")
    doc.update(fields)
    return doc


def _push(registry: Registry, repo: str, tag: str, payload: bytes) -> None:
    layer = oci.tar_bytes([oci.directory("bin"), oci.file("bin/tool", payload, 0o755)])
    config = oci.image_config([layer], env=["PATH=/bin"], entrypoint=["/bin/tool"], workdir="/")
    oci.push_image(registry.url, repo, tag, [oci.gzip_bytes(layer)], config)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, mongo_uri: str) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("migrated")
    os.chmod(root, 0o755)
    (root / "images").mkdir()
    dbname = f"Shifter_{uuid.uuid4().hex[:8]}"
    client: pymongo.MongoClient = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    db = client[dbname]
    munged = Munged().start()
    registry = Registry(root).start()
    gateway = None
    try:
        seeded = _seed(root / "images", db)
        _push(registry, "legacy/app", "v2", b"#!/bin/sh\necho v2\n")
        _push(registry, "legacy/moved", "v1", b"#!/bin/sh\necho moved, newer\n")
        _push(registry, "legacy/inflight", "v1", b"#!/bin/sh\necho interrupted\n")
        config = gateway_config(root, registry, munged.socket, Store="mongodb", MongoDBURI=mongo_uri, MongoDB=dbname)
        gateway = GatewayProcess(root, config).start()
        s = Site(root, db, munged, registry, gateway)
        s.seeded = seeded
        yield s
    finally:
        if gateway is not None:
            gateway.stop()
        registry.stop()
        munged.stop()
        client.drop_database(dbname)
        client.close()


def _seed(images: Path, db: Any) -> dict[str, dict[str, Any]]:
    day = 86400.0
    docs = [
        _original_record("legacy/app:v1", "READY", _publish_original(images, "app", "/bin/tool"), 3600,
                         expiration=time.time() + 30 * day),
        _original_record("legacy/private:v1", "READY",
                         _publish_original(images, "private", ["/bin/tool"], ([NOBODY], [NOBODY])), 3600,
                         private=True, userACL=[NOBODY], groupACL=[NOBODY], ENTRY=["/bin/tool"]),
        # an older original wrote a scalar tag; this one's registry tag has moved on since
        _original_record("legacy/moved:v1", "READY", _publish_original(images, "moved", "/bin/tool"), 3600,
                         tag="legacy/moved:v1"),
        _original_record("legacy/old:v1", "READY", _publish_original(images, "old", "/bin/tool"), 200 * day,
                         expiration=time.time() - day),
        _original_record("legacy/broken:v1", "FAILURE", None, 3600, tag=[], status_message="pull failed"),
        _original_record("legacy/gone:v1", "EXPIRED", "f" * 64, 300 * day, tag=[]),
        # the original was stopped during this pull: no owner, no lease
        _original_record("legacy/inflight:v1", "PULLING", None, 20, tag=[], status_message="pulling layers"),
    ]
    db.images.insert_many(docs)
    db.metrics.insert_many([
        {"user": "alice", "uid": 1000, "system": "testsys", "type": "docker", "tag": "legacy/app:v1",
         "id": docs[0]["id"], "time": time.time() - 60 - i}
        for i in range(3)
    ])
    return {d["pulltag"]: d for d in docs}


def _unchanged_but_expiration(before: dict[str, Any], after: dict[str, Any]) -> None:
    strip = {"expiration"}
    assert {k: v for k, v in after.items() if k not in strip} == {k: v for k, v in before.items() if k not in strip}


def test_lookup_serves_original_records_unchanged(site: Site) -> None:
    for pulltag in ("legacy/app:v1", "legacy/moved:v1"):  # not legacy/old:v1: a lookup would refresh it
        status, rec = site.request("GET", f"/api/lookup/testsys/docker/{pulltag.replace('/', '%2F')}/")
        seeded = site.seeded[pulltag]
        assert status == 200, rec
        assert rec["id"] == seeded["id"] and rec["status"] == "READY"
        assert rec["ENTRY"] == "/bin/tool" and rec["ENV"] == ["PATH=/usr/bin:/bin"] and rec["WORKDIR"] == "/"
        assert rec["last_pull"] == seeded["last_pull"] and rec["userACL"] == [] and rec["groupACL"] == []
    assert site.request("GET", "/api/lookup/testsys/docker/legacy%2Fbroken:v1/")[0] == 404
    assert site.request("GET", "/api/lookup/testsys/docker/legacy%2Fgone:v1/")[0] == 404
    # the original's ACLs: root and a stranger are not in them, nobody is
    assert site.request("GET", "/api/lookup/testsys/docker/legacy%2Fprivate:v1/")[0] == 404
    assert site.request("GET", "/api/lookup/testsys/docker/legacy%2Fprivate:v1/", as_uid=STRANGER)[0] == 404
    status, rec = site.request("GET", "/api/lookup/testsys/docker/legacy%2Fprivate:v1/", as_uid=NOBODY)
    assert status == 200 and rec["id"] == site.seeded["legacy/private:v1"]["id"]
    # the lookups' expiration refresh and metrics are written (a metrics request flushes them)
    status, metrics = site.request("GET", "/api/metrics/testsys/?limit=100")
    assert status == 200
    assert [m["user"] for m in metrics[:3]] == ["alice"] * 3, metrics  # the original's documents, oldest first
    assert {m["tag"] for m in metrics[3:]} >= {"legacy/app:v1", "legacy/moved:v1", "legacy/private:v1"}
    for pulltag in ("legacy/app:v1", "legacy/moved:v1", "legacy/private:v1"):
        after = site.raw(pulltag)
        _unchanged_but_expiration(site.seeded[pulltag], after)
        assert isinstance(after["expiration"], float) and after["expiration"] > time.time() + 80 * 86400
    assert site.raw("legacy/moved:v1")["tag"] == "legacy/moved:v1"  # a lookup rewrites nothing


def test_list_shows_original_records_to_those_who_may_read_them(site: Site) -> None:
    status, doc = site.request("GET", "/api/list/testsys/", as_uid=STRANGER)
    assert status == 200
    by_id = {r["id"]: r for r in doc["list"]}
    for pulltag in ("legacy/app:v1", "legacy/old:v1"):
        assert by_id[site.seeded[pulltag]["id"]]["tag"] == [pulltag]
    assert site.seeded["legacy/private:v1"]["id"] not in by_id
    assert "f" * 64 not in by_id
    status, doc = site.request("GET", "/api/list/testsys/", as_uid=NOBODY)
    assert status == 200
    assert site.seeded["legacy/private:v1"]["id"] in {r["id"] for r in doc["list"]}


def test_pull_of_a_new_tag_next_to_original_records(site: Site) -> None:
    before = {tag: site.raw(tag) for tag in site.seeded}
    rec = site.pull("legacy/app:v2")
    assert rec["status"] == "READY", rec
    assert rec["id"] not in {d.get("id") for d in site.seeded.values()}
    assert (site.images / f"{rec['id']}.squashfs").exists()
    assert read_meta(str(site.images / f"{rec['id']}.meta")).entrypoint == ["/bin/tool"]
    for tag, doc in before.items():
        assert site.raw(tag) == doc, tag  # the original's records are left alone
    status, found = site.request("GET", "/api/lookup/testsys/docker/legacy%2Fapp:v1/")
    assert status == 200 and found["id"] == site.seeded["legacy/app:v1"]["id"]


def test_pull_moves_a_tag_away_from_an_original_record(site: Site) -> None:
    old = site.seeded["legacy/moved:v1"]
    rec = site.pull("legacy/moved:v1")
    assert rec["status"] == "READY" and rec["id"] != old["id"], rec
    status, found = site.request("GET", "/api/lookup/testsys/docker/legacy%2Fmoved:v1/")
    assert status == 200 and found["id"] == rec["id"]
    left = site.raw("legacy/moved:v1")
    assert left["status"] == "READY" and left["tag"] == []  # as the original's $pull leaves it: a list
    assert (site.images / f"{old['id']}.squashfs").exists()  # untagged, still published


def test_a_pull_the_original_left_in_flight_is_taken_over(site: Site) -> None:
    """Our gateway adopts it at start-up (re-queued once, as for a dead gateway of ours)."""
    rec = site.pull("legacy/inflight:v1")
    assert rec["status"] == "READY", rec
    doc = site.raw("legacy/inflight:v1")
    assert doc["status"] == "READY" and doc["id"] == rec["id"] and doc["tag"] == ["legacy/inflight:v1"]
    assert doc["attempts"] == 2  # the original's record itself, re-queued: no second record
    assert site.db.images.count_documents({"pulltag": "legacy/inflight:v1"}) == 1


def test_expire_and_autoexpire_of_original_records(site: Site) -> None:
    app = site.seeded["legacy/app:v1"]
    status, doc = site.request("GET", "/api/expire/testsys/docker/legacy%2Fapp:v1/")
    assert status == 200, doc
    old = site.seeded["legacy/old:v1"]
    status, doc = site.request("GET", "/api/autoexpire/testsys/")
    assert status == 200 and old["id"] in doc["status"], doc
    deadline = time.monotonic() + 30
    files = [site.images / f"{i}.{ext}" for i in (app["id"], old["id"]) for ext in ("squashfs", "meta")]
    while any(f.exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(f.exists() for f in files)
    for pulltag in ("legacy/app:v1", "legacy/old:v1"):
        while site.raw(pulltag)["status"] != "EXPIRED" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert site.raw(pulltag)["status"] == "EXPIRED" and site.raw(pulltag)["tag"] == []
    assert site.db.images.find_one({"_id": site.seeded["legacy/broken:v1"]["_id"]}) is None  # a stale FAILURE
    assert site.raw("legacy/gone:v1") == site.seeded["legacy/gone:v1"]
    assert site.request("GET", "/api/lookup/testsys/docker/legacy%2Fapp:v1/")[0] == 404
    # the private image, never looked up by the original and never expired, stays
    assert (site.images / f"{site.seeded['legacy/private:v1']['id']}.squashfs").exists()


# The fields the original reads, with the types it wrote (reference: the original's MongoDB schema).
ORIGINAL_TYPES: dict[str, tuple[type, ...]] = {
    "system": (str,), "itype": (str,), "pulltag": (str,), "status": (str,), "format": (str,),
    "arch": (str,), "os": (str,), "location": (str,), "remotetype": (str,), "ostcount": (str,),
    "replication": (str,), "userACL": (list,), "groupACL": (list,), "private": (bool, type(None)),
    "status_message": (str,), "last_heartbeat": (float,), "last_pull": (float,), "id": (str,),
    "ENV": (list,), "ENTRY": (list, str, type(None)), "WORKDIR": (str, type(None)), "expiration": (float,),
}


def test_what_the_gateway_writes_keeps_the_original_shape(site: Site) -> None:
    """Every record, old or written by us, reads as the original expects: a site can roll back."""
    docs = list(site.db.images.find())
    ours = [d for d in docs if not isinstance(d["_id"], ObjectId)]
    assert ours, "the pulls above wrote records"
    for doc in docs:
        assert isinstance(doc["_id"], ObjectId | str)
        assert doc["status"] in ORIGINAL_STATUSES, doc
        tags = doc["tag"] if isinstance(doc["tag"], list) else [doc["tag"]]
        assert all(isinstance(t, str) for t in tags), doc
        for field, types in ORIGINAL_TYPES.items():
            if field in doc:
                assert isinstance(doc[field], types), (field, doc)
        assert all(isinstance(i, int) for i in doc["userACL"] + doc["groupACL"]), doc
        assert "inflight" not in doc  # only while a pull is in flight
    for doc in ours:
        assert doc["status"] == "READY" and len(doc["id"]) == 64
        for field in ("format", "arch", "os", "remotetype", "ostcount", "replication", "last_pull", "ENV", "ENTRY"):
            assert field in doc, (field, doc)
    # the original's own lookup query finds exactly one READY record per tag
    for tag in ("legacy/app:v2", "legacy/moved:v1", "legacy/private:v1", "legacy/inflight:v1"):
        found = list(site.db.images.find({"system": "testsys", "itype": "docker", "tag": {"$in": [tag]},
                                          "status": "READY"}))
        assert len(found) == 1, (tag, found)
