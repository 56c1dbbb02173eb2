"""Who owns a tag and who may read an image, driven as an attacker would: the real gateway
service, real munge credentials of real users (shifter-rt1, shifter-rt2, nobody), Debian's
docker-registry (one anonymous, one behind htpasswd) and, for blobs that need credentials
while manifests do not, a small authenticating front on the anonymous registry.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_registry import (
    PYTHON,
    GatewayProcess,
    Munged,
    Registry,
    bound_payload,
    forward_to_registry,
    free_port,
    gateway_config,
    have,
)

from localcluster import oci
from shifter.client import munge
from shifter.formats.meta import read_meta
from tests.root.conftest import USERS, Account, Users

missing = have("munged", "docker-registry", "tar2sqfs", "mksquashfs")
pytestmark = [
    pytest.mark.skipif(missing is not None, reason=f"needs {missing}"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: credentials of other users"),
]

LOGIN = ("alice", "s3cret")
BLOB_LOGIN = ("bob", "blobpass")
NOBODY = 65534


RT1 = RT2 = (-1, -1)  # (uid, gid) of the runtime tests' two users; set by _rt_users before any test runs


@pytest.fixture(scope="module", autouse=True)
def _rt_users() -> Iterator[None]:
    """Two unprivileged users, made here on a fresh machine (the runtime tests make them only later)."""
    global RT1, RT2
    made = Users()
    made.ensure()
    RT1, RT2 = ((account.uid, account.gid) for account in map(Account, USERS))
    yield
    made.remove()


class BlobAuthFront:
    """Forwards to a registry; layer blobs (not manifests, not the config) need HTTP Basic."""

    def __init__(self, upstream: str, protected: set[str]) -> None:
        self.upstream = upstream
        self.protected = protected
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.addr}"
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                digest = self.path.rsplit("/", 1)[-1]
                wanted = "Basic " + base64.b64encode(":".join(BLOB_LOGIN).encode()).decode()
                if "/blobs/" in self.path and digest in front.protected \
                        and self.headers.get("Authorization") != wanted:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="blobs"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = forward_to_registry(self, front.upstream)
                if self.command == "GET":
                    self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Site:
    def __init__(self, root: Path, munged: Munged, public: Registry, private: Registry,
                 front: BlobAuthFront, gateway: GatewayProcess) -> None:
        self.root, self.munged, self.public, self.private = root, munged, public, private
        self.front, self.gateway = front, gateway
        self.images = root / "images"

    def cred(self, who: tuple[int, int] | None = None, tokens: dict[str, str] | None = None) -> Any:
        """Who calls: every request gets a fresh credential of theirs, bound to that request
        (munged refuses replays, the gateway refuses a credential naming another request)."""
        return lambda method, path, body: self._encode(who, tokens, method, path, body)

    def _encode(self, who: tuple[int, int] | None, tokens: dict[str, str] | None,
                method: str, path: str, body: bytes) -> str:
        port = int(self.gateway.url.rsplit(":", 1)[1])
        extra = {"authorized_locations": tokens} if tokens else {}
        payload = bound_payload(method, path, body, f"127.0.0.1:{port}", **extra)
        if who is None:
            return munge.encode(payload, self.munged.socket, decoder_uid=0)
        code = ("import sys; from shifter.client import munge; "
                "print(munge.encode(sys.argv[1].encode(), sys.argv[2], decoder_uid=0))")
        out = subprocess.run(
            [PYTHON, "-c", code, payload.decode(), self.munged.socket], user=who[0], group=who[1],
            capture_output=True, text=True, check=True, cwd="/", timeout=30,
            env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        return out.stdout.strip()

    def call(self, method: str, path: str, cred: Any, body: Any = None) -> tuple[int, Any]:
        port = int(self.gateway.url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"authentication": cred(method, path, data or b"")})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def settle(self, method: str, path: str, cred: Any, body: Any = None, timeout: float = 120) -> tuple[int, Any]:
        """Poll a pull or import until it is READY or FAILURE (or answered with an error)."""
        deadline = time.monotonic() + timeout
        while True:
            status, doc = self.call(method, path, cred, body)
            if status != 200 or doc["status"] in ("READY", "FAILURE"):
                return status, doc
            assert time.monotonic() < deadline, doc
            time.sleep(0.05)

    def pull(self, tag: str, cred: Any) -> dict:
        status, doc = self.settle("POST", f"/api/pull/testsys/docker/{tag.replace('/', '%2F')}/", cred)
        assert status == 200, doc
        return doc

    def lookup(self, itype: str, tag: str, cred: Any) -> tuple[int, Any]:
        return self.call("GET", f"/api/lookup/testsys/{itype}/{tag.replace('/', '%2F')}/", cred)

    def doimport(self, tag: str, path: Path, cred: Any, itype: str = "custom") -> tuple[int, Any]:
        body = {"filepath": str(path), "format": "squashfs"}
        return self.settle("POST", f"/api/doimport/testsys/{itype}/{tag}/", cred, body, timeout=60)


def _image(payload: bytes, env: list[str] | None = None, labels: dict[str, str] | None = None) -> tuple[bytes, dict]:
    layer = oci.tar_bytes([oci.directory("bin"), oci.file("bin/hello", payload, 0o755)])
    config = oci.image_config([layer], env=env)
    if labels is not None:
        config["config"]["Labels"] = labels
    return oci.gzip_bytes(layer), config


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    # not under pytest's base directory: the import users must reach their files, and every pytest
    # session makes /tmp/pytest-of-root 0700 again
    root = Path(tempfile.mkdtemp(prefix="shifter-tags-", dir="/tmp"))
    os.chmod(root, 0o755)
    munged = Munged().start()
    public = Registry(root, "public").start()
    private = Registry(root, "private", htpasswd=LOGIN).start()
    front = None
    gateway = None
    try:
        layer, config = _image(b"shared\n")
        oci.push_image(public.url, "lib/shared", "v1", [layer], config)
        oci.push_image(private.url, "copy/shared", "v1", [layer], config, auth=LOGIN)
        layer, config = _image(b"team only\n")
        oci.push_image(private.url, "team/app", "v1", [layer], config, auth=LOGIN)
        layer, config = _image(b"blobs need a login\n")
        oci.push_image(public.url, "blobs/app", "v1", [layer], config)
        front = BlobAuthFront(public.url, {"sha256:" + hashlib.sha256(layer).hexdigest()})
        cfg = gateway_config(root, public, munged.socket, ImportUsers=["root", "shifter-rt1", "shifter-rt2"],
                             MaxImageBytes=64 << 20)
        cfg["Locations"][private.addr] = {"url": private.url, "authMethod": "basic"}
        cfg["Locations"][front.addr] = {"url": front.url, "authMethod": "basic"}
        gateway = GatewayProcess(root, cfg).start()
        yield Site(root, munged, public, private, front, gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        if front is not None:
            front.stop()
        private.stop()
        public.stop()
        munged.stop()
        shutil.rmtree(root, ignore_errors=True)


def _squashfs(site: Site, name: str, owner: tuple[int, int], data: bytes = b"") -> Path:
    tree = site.root / f"tree-{name}"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_text(f"#!/bin/sh\necho {name}\n")
    if data:
        (tree / "data.bin").write_bytes(data)
    out = site.root / f"{name}.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(out), "-noappend", "-quiet", "-noD"], check=True,
                   capture_output=True)
    os.chown(out, *owner)
    os.chmod(out, 0o644)
    return out


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# -- imports only into tags the importer owns -----------------------------------------------------


def test_import_into_a_docker_tag_is_refused_and_the_registry_image_stays(site: Site) -> None:
    root = site.cred()
    public = site.pull(f"{site.public.addr}/lib/shared:v1", root)
    assert public["status"] == "READY", public
    path = _squashfs(site, "hijack-docker", RT1)
    status, doc = site.doimport(f"{site.public.addr}%2Flib%2Fshared:v1", path, site.cred(RT1), itype="docker")
    assert status == 403 and "custom" in doc["error"], doc
    status, doc = site.doimport(f"{site.public.addr}%2Flib%2Fshared:v1", path, root, itype="docker")
    assert status == 403, doc  # not even an admin imports into a registry's tag
    status, found = site.lookup("docker", f"{site.public.addr}/lib/shared:v1", site.cred(RT2))
    assert status == 200 and found["id"] == public["id"]


def test_a_custom_tag_stays_with_the_user_who_imported_it(site: Site) -> None:
    mine = _squashfs(site, "owned-by-rt1", RT1)
    status, rec = site.doimport("tool", mine, site.cred(RT1))
    assert status == 200 and rec["status"] == "READY", rec
    theirs = _squashfs(site, "from-rt2", RT2)
    status, doc = site.doimport("tool", theirs, site.cred(RT2))
    assert status == 403 and "another user" in doc["error"], doc
    status, found = site.lookup("custom", "tool", site.cred(RT2))
    assert status == 200 and found["id"] == rec["id"]
    again = _squashfs(site, "owned-by-rt1-v2", RT1)
    time.sleep(3.2)  # past the window in which the same import is answered with its result
    status, newer = site.doimport("tool", again, site.cred(RT1))
    assert status == 200 and newer["status"] == "READY" and newer["id"] != rec["id"], newer


# -- ids are the whole content; nothing published is overwritten ----------------------------------


def test_files_sharing_their_first_mib_get_different_ids_and_neither_is_replaced(site: Site) -> None:
    from gateway.importer import fasthash

    first = _squashfs(site, "collide-a", RT1, os.urandom(3 << 20))
    second = site.root / "collide-b.squashfs"
    data = bytearray(first.read_bytes())
    data[(1 << 20) + 4096] ^= 0xFF  # inside data.bin's blocks, past the first MiB
    second.write_bytes(bytes(data))
    os.chown(second, *RT1)
    assert fasthash(str(first)) == fasthash(str(second))  # the original's id could not tell them apart
    status, a = site.doimport("collide-a", first, site.cred(RT1))
    assert status == 200 and a["status"] == "READY", a
    status, b = site.doimport("collide-b", second, site.cred(RT1))
    assert status == 200 and b["status"] == "READY", b
    assert a["id"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert b["id"] == hashlib.sha256(second.read_bytes()).hexdigest() != a["id"]
    assert (site.images / f"{a['id']}.squashfs").read_bytes() == first.read_bytes()
    assert site.lookup("custom", "collide-a", site.cred(RT1))[1]["id"] == a["id"]


# -- the import file is opened by the requesting user ---------------------------------------------


def test_import_of_a_file_in_another_users_private_directory_fails(site: Site) -> None:
    private_dir = site.root / "rt2-private"
    private_dir.mkdir()
    os.chown(private_dir, *RT2)
    os.chmod(private_dir, 0o700)
    path = _squashfs(site, "in-rt2-dir", RT2)
    moved = private_dir / path.name
    path.rename(moved)
    assert _mode(moved) == 0o644  # the file's own bits would let anyone read it
    status, rec = site.doimport("stolen", moved, site.cred(RT1))
    assert status == 200 and rec["status"] == "FAILURE", rec
    assert "cannot read" in rec["status_message"], rec
    assert site.lookup("custom", "stolen", site.cred(RT1))[0] == 404


def test_import_through_a_symlink_is_refused(site: Site) -> None:
    secret = _squashfs(site, "root-secret", (0, 0))
    os.chmod(secret, 0o600)
    link = site.root / "innocent.squashfs"
    link.symlink_to(secret)
    status, rec = site.doimport("via-link", link, site.cred(RT1))
    assert status == 200 and rec["status"] == "FAILURE", rec
    assert "symbolic link" in rec["status_message"], rec
    status, rec = site.doimport("root-only", secret, site.cred(RT1))
    assert rec["status"] == "FAILURE" and "cannot read" in rec["status_message"], rec


def test_import_of_a_huge_sparse_file_fails_at_once(site: Site) -> None:
    sparse = site.root / "sparse.squashfs"
    with open(sparse, "wb") as fh:
        fh.write(b"hsqs")
        fh.truncate(10 << 40)  # 10 TiB, no blocks
    os.chown(sparse, *RT1)
    started = time.monotonic()
    status, rec = site.doimport("sparse", sparse, site.cred(RT1))
    assert rec["status"] == "FAILURE" and "MaxImageBytes" in rec["status_message"], rec
    assert time.monotonic() - started < 20
    assert not [p for p in (site.root / "expand").iterdir() if p.name.startswith("job-")]


# -- access belongs to the tag --------------------------------------------------------------------


def test_a_private_copy_of_a_public_image_never_restricts_it(site: Site) -> None:
    public_tag = f"{site.public.addr}/lib/shared:v1"
    copy_tag = f"{site.private.addr}/copy/shared:v1"
    public = site.pull(public_tag, site.cred())
    attacker = site.pull(copy_tag, site.cred(RT1, {site.private.addr: ":".join(LOGIN)}))
    assert attacker["status"] == "READY" and attacker["id"] == public["id"], attacker
    for who in (None, RT2, (NOBODY, NOBODY)):
        status, found = site.lookup("docker", public_tag, site.cred(who))
        assert status == 200 and found["id"] == public["id"], (who, found)
    meta = read_meta(str(site.images / f"{public['id']}.meta"))
    assert meta.user_acl == [] and meta.group_acl == []
    assert _mode(site.images / f"{public['id']}.squashfs") == 0o644
    assert site.lookup("docker", copy_tag, site.cred(RT2))[0] == 404  # the private tag stays private
    status, listing = site.call("GET", "/api/list/testsys/", site.cred(RT2))
    tags = [t for rec in listing["list"] for t in rec["tag"]]
    assert public_tag in tags and copy_tag not in tags


def test_private_pulls_of_one_image_add_their_acls_up(site: Site) -> None:
    tag = f"{site.private.addr}/team/app:v1"
    login = {site.private.addr: ":".join(LOGIN)}
    first = site.pull(tag, site.cred(RT1, login))
    assert first["status"] == "READY", first
    meta_path = site.images / f"{first['id']}.meta"
    assert read_meta(str(meta_path)).user_acl == [RT1[0]]
    assert _mode(site.images / f"{first['id']}.squashfs") == 0o600
    second = site.pull(tag, site.cred(RT2, login))
    assert second["status"] == "READY" and second["id"] == first["id"], second
    assert sorted(read_meta(str(meta_path)).user_acl) == sorted([RT1[0], RT2[0]])
    for who in (RT1, RT2):
        assert site.lookup("docker", tag, site.cred(who))[0] == 200, who
    assert site.lookup("docker", tag, site.cred((NOBODY, NOBODY)))[0] == 404
    assert _mode(meta_path) == 0o600


def test_privacy_learnt_from_the_blobs_makes_the_image_private(site: Site) -> None:
    tag = f"{site.front.addr}/blobs/app:v1"
    anonymous = site.pull(tag, site.cred(RT1))
    assert anonymous["status"] == "FAILURE", anonymous  # the layer needs the login
    time.sleep(3.2)
    rec = site.pull(tag, site.cred(RT1, {site.front.addr: ":".join(BLOB_LOGIN)}))
    assert rec["status"] == "READY", rec
    assert rec["userACL"] == [RT1[0]], rec
    meta = read_meta(str(site.images / f"{rec['id']}.meta"))
    assert meta.user_acl == [RT1[0]]
    assert _mode(site.images / f"{rec['id']}.squashfs") == 0o600
    assert site.lookup("docker", tag, site.cred(RT2))[0] == 404
    # the layers are cached now: another user without the login still gets nothing
    other = site.pull(tag, site.cred(RT2))
    assert other["status"] == "FAILURE" and "needs credentials" in other["status_message"], other
    assert site.lookup("docker", tag, site.cred(RT2))[0] == 404
    assert read_meta(str(site.images / f"{rec['id']}.meta")).user_acl == [RT1[0]]


def test_modes_and_meta_follow_the_image_when_a_public_tag_joins(site: Site) -> None:
    layer, config = _image(b"first private, then public\n")
    oci.push_image(site.private.url, "later/public", "v1", [layer], config, auth=LOGIN)
    oci.push_image(site.public.url, "later/public", "v1", [layer], config)
    private = site.pull(f"{site.private.addr}/later/public:v1", site.cred(RT1, {site.private.addr: ":".join(LOGIN)}))
    image = site.images / f"{private['id']}.squashfs"
    assert _mode(image) == 0o600 and read_meta(str(image.with_suffix(".meta"))).user_acl == [RT1[0]]
    public = site.pull(f"{site.public.addr}/later/public:v1", site.cred(RT2))
    assert public["id"] == private["id"]
    assert _mode(image) == 0o644 and _mode(image.with_suffix(".meta")) == 0o644
    assert read_meta(str(image.with_suffix(".meta"))).user_acl == []


# -- other users' requests are theirs ------------------------------------------------------------


def test_queue_and_pull_answers_hide_other_users_requests(site: Site) -> None:
    from gateway.store.sqlite import SqliteStore

    store = SqliteStore(str(site.root / "gateway.db"))
    stat = Path(f"/proc/{site.gateway.proc.pid}/stat").read_bytes()  # type: ignore[union-attr]
    owner = {"host": os.uname().nodename, "pid": site.gateway.proc.pid,  # type: ignore[union-attr]
             "start": stat.rsplit(b")", 1)[-1].split()[19].decode()}
    rec, _ = store.claim({
        "system": "testsys", "itype": "docker", "pulltag": "secret/project-x:v1", "tag": [],
        "status": "PULLING", "status_message": "pulling: layer /secret/project-x/weights",
        "userACL": [RT1[0]], "groupACL": [], "owner": owner, "last_heartbeat": time.time(),
        "lease_until": time.time() + 600, "last_pull": time.time(),
        "requester": {"user": "shifter-rt1", "uid": RT1[0], "gid": RT1[1]},
    })
    try:
        queue = lambda who: site.call("GET", "/api/queue/testsys/", site.cred(who))[1]["list"]  # noqa: E731
        assert any(e["image"] == "secret/project-x:v1" for e in queue(RT1))
        assert any(e["image"] == "secret/project-x:v1" for e in queue(None))  # root is an admin
        assert not any(e["image"] == "secret/project-x:v1" for e in queue(RT2))
        status, seen = site.call("POST", "/api/pull/testsys/docker/secret%2Fproject-x:v1/", site.cred(RT2))
        assert status == 200 and seen["status"] == "PULLING", seen
        assert "project-x/weights" not in json.dumps(seen) and seen["userACL"] == []
        status, own = site.call("POST", "/api/pull/testsys/docker/secret%2Fproject-x:v1/", site.cred(RT1))
        assert "weights" in own["status_message"]
    finally:
        store.delete(rec["_id"])
        store.close()


# -- what a record carries is bounded -------------------------------------------------------------


def test_huge_env_fails_the_pull_and_labels_are_cut(site: Site) -> None:
    layer, config = _image(b"big env\n", env=[f"V{i}={'x' * 200}" for i in range(5000)])
    oci.push_image(site.public.url, "huge/env", "v1", [layer], config)
    rec = site.pull(f"{site.public.addr}/huge/env:v1", site.cred())
    assert rec["status"] == "FAILURE" and "Env has 5000 entries" in rec["status_message"], rec
    labels = {f"label.{i:05d}": "y" * 1000 for i in range(2000)}
    layer, config = _image(b"many labels\n", labels=labels)
    oci.push_image(site.public.url, "huge/labels", "v1", [layer], config)
    rec = site.pull(f"{site.public.addr}/huge/labels:v1", site.cred())
    assert rec["status"] == "READY", rec
    assert 0 < len(rec["LABELS"]) <= 256 and len(json.dumps(rec["LABELS"])) <= 70 << 10
    assert sorted(rec["LABELS"]) == sorted(labels)[: len(rec["LABELS"])]


# -- expiry and recovery --------------------------------------------------------------------------


def test_expiring_one_record_keeps_files_another_ready_record_uses(site: Site) -> None:
    rec = site.pull(f"{site.public.addr}/lib/shared:v1", site.cred())
    db = sqlite3.connect(site.root / "gateway.db")
    try:  # a second READY record for the same id, as older gateways could leave
        row = db.execute("SELECT rid, system, itype, pulltag, status, image_id, doc FROM images WHERE rid = ?",
                         (rec_rid(db, rec["id"]),)).fetchone()
        doc = json.loads(row[6])
        doc.update(tag=["older/alias:v1"], pulltag="older/alias:v1", tag_access=[])
        db.execute("INSERT INTO images(rid, system, itype, pulltag, status, image_id, inflight, doc)"
                   " VALUES (?,?,?,?,?,?,NULL,?)", ("0" * 32, row[1], row[2], "older/alias:v1", "READY",
                                                    row[5], json.dumps(doc)))
        db.execute("INSERT INTO tags(system, itype, tag, rid) VALUES (?,?,?,?)",
                   ("testsys", "docker", "older/alias:v1", "0" * 32))
        db.commit()
    finally:
        db.close()
    status, _ = site.call("GET", "/api/expire/testsys/docker/older%2Falias:v1/", site.cred())
    assert status == 200
    deadline = time.monotonic() + 30
    while site.lookup("docker", "older/alias:v1", site.cred())[0] != 404:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    assert (site.images / f"{rec['id']}.squashfs").exists() and (site.images / f"{rec['id']}.meta").exists()
    assert site.lookup("docker", f"{site.public.addr}/lib/shared:v1", site.cred())[0] == 200


def rec_rid(db: sqlite3.Connection, image_id: str) -> str:
    return db.execute("SELECT rid FROM images WHERE image_id = ? AND status = 'READY'", (image_id,)).fetchone()[0]
