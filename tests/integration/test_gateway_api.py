"""The real gateway service (subprocess) against a real docker-registry and a real munged.

Nothing is faked: credentials are encoded by our own munged (its own key and socket),
images are pushed to Debian's docker-registry, the gateway converts them with the real
pipeline and publishes into a temporary imageDir.
"""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_registry import PYTHON, GatewayProcess, Munged, Registry, gateway_config, have

from localcluster import oci
from shifter import munge
from shifter.meta import read_meta

missing = have("munged", "docker-registry", "tar2sqfs")
pytestmark = pytest.mark.skipif(missing is not None, reason=f"needs {missing}")

RECORD_KEYS = {
    "id",
    "system",
    "itype",
    "tag",
    "status",
    "userACL",
    "groupACL",
    "ENV",
    "ENTRY",
    "WORKDIR",
    "LABELS",
    "last_pull",
    "status_message",
}


class Env:
    def __init__(self, root: Path, munged: Munged, registry: Registry, gateway: GatewayProcess) -> None:
        self.root = root
        self.munged = munged
        self.registry = registry
        self.gateway = gateway

    @property
    def port(self) -> int:
        return int(self.gateway.url.rsplit(":", 1)[1])

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        cred: str | None | bool = True,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        hdrs = dict(headers or {})
        if cred is True:
            hdrs["authentication"] = munge.encode(b"", self.munged.socket)
        elif isinstance(cred, str):
            hdrs["authentication"] = cred
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        status, headers, body = self.request(method, path, **kw)
        assert headers["content-type"] == "application/json", (path, headers)
        assert int(headers["content-length"]) == len(body)
        return status, json.loads(body)

    def pull_until_done(self, tag: str, body: dict[str, Any] | None = None, timeout: float = 120) -> dict:
        path = f"/api/pull/testsys/docker/{tag}/"
        data = json.dumps(body).encode() if body else None
        deadline = time.monotonic() + timeout
        while True:
            status, rec = self.json("POST", path, body=data)
            assert status == 200, rec
            if rec["status"] in ("READY", "FAILURE"):
                return rec
            assert time.monotonic() < deadline, rec
            time.sleep(0.05)


def _push_small(registry: Registry, repo: str, tag: str, payload: bytes = b"hi\n") -> str:
    layer = oci.tar_bytes(
        [
            oci.directory("bin"),
            oci.file("bin/hello", payload, 0o755),
            oci.file("etc/os-release", b"ID=test\n"),
        ]
    )
    config = oci.image_config(
        [layer], env=["PATH=/bin", "A=b:c"], cmd=["/bin/sh"], entrypoint=["/bin/hello"], workdir="/work"
    )
    return oci.push_image(registry.url, repo, tag, [oci.gzip_bytes(layer)], config)


def _as_user(uid: int, gid: int, socket: str) -> str:
    """A munge credential made by another uid (a child process that drops to it)."""
    import subprocess

    code = f"from shifter import munge; print(munge.encode(b'', {socket!r}))"
    out = subprocess.run(
        [PYTHON, "-c", code],
        user=uid,
        group=gid,
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        timeout=30,
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("gw")
    os.chmod(root, 0o755)
    munged = Munged().start()
    registry = Registry(root).start()
    gateway = None
    try:
        _push_small(registry, "test/small", "v1")
        gateway = GatewayProcess(root, gateway_config(root, registry, munged.socket)).start()
        yield Env(root, munged, registry, gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        registry.stop()
        munged.stop()


# -- protocol details ---------------------------------------------------------------------------------


def test_status_has_exact_content_type_and_length(env: Env) -> None:
    status, headers, body = env.request("GET", "/api/status", cred=None)
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(body))
    assert json.loads(body) == {"status": "up"}


@pytest.mark.parametrize("cred", [None, "garbage", "MUNGE:AAAA:"])
def test_missing_or_bad_credential_is_401(env: Env, cred: str | None) -> None:
    status, doc = env.json("GET", "/api/lookup/testsys/docker/test%2Fsmall%3Av1/", cred=cred)
    assert status == 401
    assert doc["status"] == 401 and doc["error"]


def test_replayed_credential_is_401(env: Env) -> None:
    cred = munge.encode(b"", env.munged.socket)
    assert env.json("GET", "/api/list/testsys/", cred=cred)[0] == 200
    status, doc = env.json("GET", "/api/list/testsys/", cred=cred)
    assert status == 401
    assert "replayed" in doc["error"]


def test_mock_header_is_refused_by_default(env: Env) -> None:
    status, _ = env.json("GET", "/api/list/testsys/", cred="good:root:root::0:0")
    assert status == 401


def test_unknown_system_route_and_method(env: Env) -> None:
    assert env.json("GET", "/api/list/nosuchsystem/")[0] == 404
    assert env.json("GET", "/api/lookup/nosuchsystem/docker/x/")[0] == 404
    assert env.json("GET", "/api/nothing/here")[0] == 404
    assert env.json("DELETE", "/api/list/testsys/")[0] == 405


# -- pull, lookup, list ---------------------------------------------------------------------------------


def test_pull_then_lookup_every_url_form(env: Env) -> None:
    rec = env.pull_until_done("test%2Fsmall%3Av1")
    assert rec["status"] == "READY", rec
    assert set(rec) == RECORD_KEYS
    assert isinstance(rec["last_pull"], float)
    assert rec["tag"] == ["test/small:v1"]
    assert rec["ENV"] == ["PATH=/bin", "A=b:c"] and rec["WORKDIR"] == "/work"
    image_id = rec["id"]
    assert len(image_id) == 64
    for path in (
        "/api/lookup/testsys/docker/test%2Fsmall%3Av1/",
        "/api/lookup/testsys/docker/test%2Fsmall%3Av1",
        "/api/lookup/testsys/docker/test/small:v1",
        "/api/lookup/testsys/docker/test/small:v1/",
    ):
        status, found = env.json("GET", path)
        assert status == 200, path
        assert found["id"] == image_id
        assert set(found) == RECORD_KEYS
    images = env.root / "images"
    assert (images / f"{image_id}.squashfs").stat().st_size > 0
    meta = read_meta(str(images / f"{image_id}.meta"))
    assert meta.entrypoint == ["/bin/hello"] and meta.cmd == ["/bin/sh"] and meta.env == ["PATH=/bin", "A=b:c"]
    assert not [p for p in os.listdir(images) if not p.endswith((".squashfs", ".meta"))]


def test_lookup_adds_latest_and_unknown_is_404(env: Env) -> None:
    status, doc = env.json("GET", "/api/lookup/testsys/docker/test%2Fnever/")
    assert status == 404
    assert "test/never:latest" in doc["error"]


def test_list_queue_and_metrics_shapes(env: Env) -> None:
    env.pull_until_done("test%2Fsmall%3Av1")
    status, doc = env.json("GET", "/api/list/testsys")
    assert status == 200
    assert any("test/small:v1" in r["tag"] for r in doc["list"])
    assert all(set(r) == RECORD_KEYS for r in doc["list"])
    status, doc = env.json("GET", "/api/queue/testsys/")
    assert status == 200 and isinstance(doc["list"], list)
    status, docs = env.json("GET", "/api/metrics/testsys/?limit=3")
    assert status == 200 and isinstance(docs, list) and len(docs) <= 3
    status, headers, body = env.request("GET", "/metrics", cred=None)
    assert status == 200
    text = body.decode()
    assert 'shifter_gateway_lookups_total{result="found"}' in text
    assert "shifter_gateway_queue_depth" in text and "shifter_gateway_pull_seconds_count" in text


def test_failed_pull_reports_failure_with_reason(env: Env) -> None:
    rec = env.pull_until_done("test%2Fabsent%3Av9")
    assert rec["status"] == "FAILURE"
    assert "not found" in rec["status_message"]
    assert env.json("GET", "/api/lookup/testsys/docker/test%2Fabsent%3Av9/")[0] == 404


def test_concurrent_pulls_share_one_job_and_one_download(env: Env) -> None:
    layer = oci.tar_bytes([oci.file("data/blob.bin", os.urandom(3 << 20))])
    config = oci.image_config([layer])
    oci.push_image(env.registry.url, "test/conc", "v1", [oci.gzip_bytes(layer)], config)
    before = env.registry.blob_gets("test/conc")
    conversions = _conversions(env)
    records: list[dict] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            records.append(env.pull_until_done("test%2Fconc%3Av1"))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors[0]
    assert {r["status"] for r in records} == {"READY"}
    assert len({r["id"] for r in records}) == 1
    # one config blob + one layer blob, each fetched once, and one conversion for 50 concurrent pulls
    assert env.registry.blob_gets("test/conc") - before == 2
    assert _conversions(env) - conversions == 1
    db = sqlite3.connect(env.root / "gateway.db")
    rows = db.execute("SELECT count(*) FROM images WHERE pulltag = 'test/conc:v1'").fetchone()[0]
    db.close()
    assert rows == 1


def _conversions(env: Env) -> int:
    _status, _headers, body = env.request("GET", "/metrics", cred=None)
    line = next(ln for ln in body.decode().splitlines() if ln.startswith("shifter_gateway_conversion_seconds_count"))
    return int(float(line.split()[-1]))


def test_repull_of_unchanged_tag_reuses_the_image(env: Env) -> None:
    first = env.pull_until_done("test%2Fsmall%3Av1")
    blobs = env.registry.blob_gets("test/small")
    start = time.monotonic()
    status, rec = env.json("POST", "/api/pull/testsys/docker/test%2Fsmall%3Av1/", body=b'{"refresh": true}')
    assert status == 200
    while not (rec["status"] == "READY" and rec["last_pull"] > first["last_pull"]):
        assert rec["status"] != "FAILURE", rec
        assert time.monotonic() - start < 5
        time.sleep(0.01)
        rec = env.json("POST", "/api/pull/testsys/docker/test%2Fsmall%3Av1/")[1]
    elapsed = time.monotonic() - start
    assert rec["id"] == first["id"]
    assert env.registry.blob_gets("test/small") == blobs  # nothing downloaded
    assert elapsed < 0.3, elapsed


def test_new_tag_for_a_published_image_joins_its_record(env: Env) -> None:
    _push_small(env.registry, "test/small", "v1-alias")
    first = env.pull_until_done("test%2Fsmall%3Av1")
    alias = env.pull_until_done("test%2Fsmall%3Av1-alias")
    assert alias["id"] == first["id"]
    assert set(alias["tag"]) >= {"test/small:v1", "test/small:v1-alias"}


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,body",
    [
        ("/api/pull/testsys/docker/bad%20tag/", None),
        ("/api/pull/testsys/docker/..%2Fx/", None),
        ("/api/pull/testsys/id/abc/", None),
        ("/api/pull/testsys/docker/x/", b"{not json"),
        ("/api/pull/testsys/docker/x/", b"[1,2]"),
        ("/api/pull/testsys/docker/x/", b'{"allowed_uids": "12,abc"}'),
        ("/api/pull/testsys/docker/x/", b'{"refresh": "yes"}'),
        ("/api/lookup/testsys/docker//", None),
    ],
)
def test_bad_requests_are_400(env: Env, path: str, body: bytes | None) -> None:
    method = "GET" if "/lookup/" in path else "POST"
    status, doc = env.json(method, path, body=body)
    assert status == 400, doc
    assert doc["error"]


def test_oversized_body_is_413(env: Env) -> None:
    status, _ = env.json("POST", "/api/pull/testsys/docker/x/", body=b" " * (200 * 1024))
    assert status == 413


# -- admin actions --------------------------------------------------------------------------------------


def test_non_admin_gets_403_for_expire_and_autoexpire(env: Env) -> None:
    env.pull_until_done("test%2Fsmall%3Av1")
    status, _ = env.json(
        "GET", "/api/expire/testsys/docker/test%2Fsmall%3Av1/", cred=_as_user(65534, 65534, env.munged.socket)
    )
    assert status == 403
    status, _ = env.json("GET", "/api/autoexpire/testsys/", cred=_as_user(65534, 65534, env.munged.socket))
    assert status == 403
    # a normal user may still look it up
    status, rec = env.json(
        "GET", "/api/lookup/testsys/docker/test%2Fsmall%3Av1/", cred=_as_user(65534, 65534, env.munged.socket)
    )
    assert status == 200 and rec["status"] == "READY"


def test_admin_expire_removes_files_and_record(env: Env) -> None:
    _push_small(env.registry, "test/gone", "v1", payload=b"unique payload for expiry\n")
    rec = env.pull_until_done("test%2Fgone%3Av1")
    files = [env.root / "images" / f"{rec['id']}.{ext}" for ext in ("squashfs", "meta")]
    assert all(f.exists() for f in files)
    status, doc = env.json("GET", "/api/expire/testsys/docker/test%2Fgone%3Av1")
    assert status == 200 and doc == {"status": True}
    deadline = time.monotonic() + 10
    while any(f.exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(f.exists() for f in files)
    assert env.json("GET", "/api/lookup/testsys/docker/test%2Fgone%3Av1/")[0] == 404
    assert env.json("GET", "/api/expire/testsys/docker/test%2Fgone%3Av1/")[0] == 404


def test_openapi_document_lists_routes(env: Env) -> None:
    status, doc = env.json("GET", "/api/openapi.json", cred=None)
    assert status == 200
    assert doc["openapi"].startswith("3.")
    assert "/api/lookup/{system}/{itype}/{tag}" in doc["paths"]
    assert set(doc["components"]["schemas"]["Record"]["required"]) == RECORD_KEYS


# -- doimport ---------------------------------------------------------------------------------------------


def _squashfs(env: Env, name: str, setup: Any) -> Path:
    import subprocess

    tree = env.root / f"tree-{name}"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_text(f"#!/bin/sh\necho {name}\n")
    setup(tree)
    out = env.root / f"{name}.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(out), "-noappend", "-quiet"], check=True, capture_output=True)
    os.chmod(out, 0o644)
    return out


def _import(env: Env, tag: str, path: Path, cred: str | bool = True) -> tuple[int, dict]:
    body = json.dumps({"filepath": str(path), "format": "squashfs"}).encode()
    deadline = time.monotonic() + 60
    while True:
        status, rec = env.json("POST", f"/api/doimport/testsys/custom/{tag}/", body=body, cred=cred)
        if status != 200 or rec["status"] in ("READY", "FAILURE") or time.monotonic() > deadline:
            return status, rec
        time.sleep(0.05)


def test_import_publishes_a_copy_with_the_fasthash_id(env: Env) -> None:
    from gateway.importer import fasthash

    path = _squashfs(env, "clean", lambda tree: None)
    status, rec = _import(env, "mytool", path)
    assert status == 200 and rec["status"] == "READY", rec
    assert rec["id"] == fasthash(str(path))
    assert path.exists()  # copied, never moved
    published = env.root / "images" / f"{rec['id']}.squashfs"
    assert published.read_bytes() == path.read_bytes()
    assert read_meta(str(env.root / "images" / f"{rec['id']}.meta")).format == "squashfs"
    status, found = env.json("GET", "/api/lookup/testsys/custom/mytool/")
    assert status == 200 and found["id"] == rec["id"]


@pytest.mark.parametrize(
    "name,setup,reason",
    [
        ("setuid", lambda t: (t / "bin" / "tool").chmod(0o4755), "setuid"),
        ("device", lambda t: os.mknod(t / "null", 0o600 | 0o020000, os.makedev(1, 3)), "character device"),
        ("xattr", lambda t: os.setxattr(t / "bin" / "tool", "user.note", b"x"), "extended attributes"),
    ],
)
def test_import_rejects_unsafe_squashfs_with_the_reason(env: Env, name: str, setup: Any, reason: str) -> None:
    path = _squashfs(env, name, setup)
    status, rec = _import(env, f"bad-{name}", path)
    assert status == 200 and rec["status"] == "FAILURE", rec
    assert reason in rec["status_message"]
    assert not [p for p in os.listdir(env.root / "images") if "partial" in p or p.startswith(".")]


def test_import_rejects_a_file_that_is_not_squashfs(env: Env) -> None:
    path = env.root / "notsquash.img"
    path.write_bytes(b"\0" * 8192)
    path.chmod(0o644)
    status, rec = _import(env, "notsquash", path)
    assert rec["status"] == "FAILURE" and "not a squashfs" in rec["status_message"]


def test_import_needs_an_import_user_and_a_filepath(env: Env) -> None:
    path = _squashfs(env, "denied", lambda tree: None)
    status, _ = _import(env, "denied", path, cred=_as_user(65534, 65534, env.munged.socket))
    assert status == 403
    status, doc = env.json("POST", "/api/doimport/testsys/custom/x/", body=b'{"format": "squashfs"}')
    assert status == 400 and "filepath" in doc["error"]


# -- crash recovery and expiry (gateways of their own) -----------------------------------------------------


def _own_gateway(env: Env, name: str, **overrides: Any) -> GatewayProcess:
    root = env.root / name
    root.mkdir()
    return GatewayProcess(root, gateway_config(root, env.registry, env.munged.socket, **overrides))


def _poll(gw: GatewayProcess, env: Env, tag: str, until: Any, timeout: float = 120) -> dict:
    port = int(gw.url.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(
            "POST",
            f"/api/pull/testsys/docker/{tag}/",
            headers={"authentication": munge.encode(b"", env.munged.socket)},
        )
        rec = json.loads(conn.getresponse().read())
        conn.close()
        if until(rec):
            return rec
        assert time.monotonic() < deadline, rec
        time.sleep(0.02)


def test_gateway_killed_mid_pull_recovers_on_restart(env: Env) -> None:
    big = oci.tar_bytes([oci.file(f"data/{i}.bin", os.urandom(4 << 20)) for i in range(12)])
    oci.push_image(env.registry.url, "test/big", "v1", [oci.gzip_bytes(big)], oci.image_config([big]))
    gw = _own_gateway(env, "crash").start()
    try:
        _poll(
            gw,
            env,
            "test%2Fbig%3Av1",
            lambda r: r["status"] in ("PULLING", "CONVERSION", "TRANSFER", "READY"),
        )
        gw.kill()  # SIGKILL: no clean-up code runs
        db = sqlite3.connect(gw.root / "gateway.db")
        (status,) = db.execute("SELECT status FROM images WHERE pulltag = 'test/big:v1'").fetchone()
        db.close()
        assert status in ("PENDING", "PULLING", "CONVERSION", "TRANSFER"), status  # killed mid-pull
        (gw.root / "expand" / "job-leftover-from-a-dead-gateway").mkdir()
        gw.start()
        rec = _poll(gw, env, "test%2Fbig%3Av1", lambda r: r["status"] in ("READY", "FAILURE"))
        assert rec["status"] == "READY", (status, rec)
        images = os.listdir(gw.root / "images")
        assert sorted(images) == sorted([f"{rec['id']}.squashfs", f"{rec['id']}.meta"]), images
        assert os.listdir(gw.root / "expand") == []
    finally:
        gw.stop()


def test_record_left_in_flight_by_a_dead_process_never_stays_in_flight(env: Env) -> None:
    from gateway.store import SqliteStore

    _push_small(env.registry, "test/small", "v1-alias")
    gw = _own_gateway(env, "stale")
    gw.config_path.write_text(json.dumps(gw.config))
    store = SqliteStore(str(gw.root / "gateway.db"))
    dead = {"host": os.uname().nodename, "pid": 2**22 - 1, "start": "1"}
    base = {
        "system": "testsys",
        "itype": "docker",
        "tag": [],
        "userACL": [],
        "groupACL": [],
        "last_pull": time.time(),
        "owner": dead,
    }
    twice, _ = store.claim({**base, "pulltag": "test/small:v1", "status": "CONVERSION", "attempts": 2})
    once, _ = store.claim({**base, "pulltag": "test/small:v1-alias", "status": "PULLING", "attempts": 1})
    store.close()
    gw.start()
    try:
        rec = _poll(gw, env, "test%2Fsmall%3Av1-alias", lambda r: r["status"] in ("READY", "FAILURE"))
        assert rec["status"] == "READY"  # re-queued once and completed
        check = SqliteStore(str(gw.root / "gateway.db"))
        failed = check.get(twice["_id"])
        check.close()
        assert failed["status"] == "FAILURE" and "interrupted" in failed["status_message"]
    finally:
        gw.stop()


def test_autoexpire_removes_images_never_looked_up(env: Env) -> None:
    gw = _own_gateway(env, "expiry", ImageExpirationTimeout="0:0:0:1").start()
    try:
        rec = _poll(gw, env, "test%2Fsmall%3Av1", lambda r: r["status"] in ("READY", "FAILURE"))
        assert rec["status"] == "READY"
        files = [gw.root / "images" / f"{rec['id']}.{ext}" for ext in ("squashfs", "meta")]
        assert all(f.exists() for f in files)
        time.sleep(1.5)
        blobs = gw.root / "cache" / "blobs" / "sha256"
        junk = blobs / ("0" * 64)
        junk.write_bytes(b"a blob no image uses")
        fresh_junk = blobs / ("1" * 64)
        fresh_junk.write_bytes(b"just downloaded by another gateway process")
        hour_ago = time.time() - 7200
        for blob in blobs.iterdir():
            if blob != fresh_junk:
                os.utime(blob, (hour_ago, hour_ago))
        port = int(gw.url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(
            "GET",
            "/api/autoexpire/testsys/",
            headers={"authentication": munge.encode(b"", env.munged.socket)},
        )
        doc = json.loads(conn.getresponse().read())
        conn.close()
        assert doc == {"status": [rec["id"]]}
        deadline = time.monotonic() + 10
        while any(f.exists() for f in files) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(f.exists() for f in files)
        assert not junk.exists()  # unreferenced and old: pruned
        assert fresh_junk.exists()  # unreferenced but recent: kept
    finally:
        gw.stop()


def test_mock_authentication_only_when_configured(env: Env) -> None:
    gw = _own_gateway(env, "mock", Authentication="mock").start()
    try:
        port = int(gw.url.rsplit(":", 1)[1])

        def get(header: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/api/list/testsys/", headers={"authentication": header})
            status = conn.getresponse().status
            conn.close()
            return status

        assert get("good:root:root::0:0") == 200
        assert get("good:alice:users::1000:100") == 200
        assert get("bad:root:root") == 401
        assert get("good:root") == 401
        assert get(munge.encode(b"", env.munged.socket)) == 401  # mock mode does not take munge
    finally:
        gw.stop()


# -- the examiner hook (a gateway of its own) ------------------------------------------------------------

EXAMINER = """#!/bin/sh
# a site's security scanner: records how it was called, refuses images with /etc/forbidden
echo "$1 $2" >> {log}
test -f "$1/bin/hello" || {{ echo "no /bin/hello in $1" >&2; exit 2; }}
cat "$1/bin/hello" >> {log}
sleep 0.3
if test -e "$1/etc/forbidden"; then
    echo "scanning..." >&2
    echo "found a forbidden file: /etc/forbidden" >&2
    exit 1
fi
"""


def _mounted_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as fh:
        return [line.split()[1] for line in fh if line.split()[1].startswith(str(path))]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: squashfuse needs /dev/fuse (0600 here)")
@pytest.mark.skipif(have("squashfuse", "mksquashfs") is not None, reason="needs squashfuse and mksquashfs")
def test_examiner_sees_the_image_tree_and_its_refusal_fails_the_pull(env: Env) -> None:
    import subprocess

    from fixtures_registry import stop_pid

    _push_small(env.registry, "test/scanned", "clean", payload=b"clean image\n")
    bad = oci.tar_bytes([oci.directory("bin"), oci.file("bin/hello", b"bad image\n", 0o755),
                         oci.file("etc/forbidden", b"x")])
    oci.push_image(env.registry.url, "test/scanned", "bad", [oci.gzip_bytes(bad)], oci.image_config([bad]))
    root = env.root / "examiner"
    root.mkdir()
    calls = root / "calls.log"
    script = root / "site-scanner"
    script.write_text(EXAMINER.format(log=calls))
    script.chmod(0o755)
    gw = GatewayProcess(root, gateway_config(root, env.registry, env.munged.socket, examiner=str(script)))
    # a mount left by a gateway that crashed during an examination: start-up removes it
    (root / "tree").mkdir()
    (root / "tree" / "file").write_text("x")
    subprocess.run(["mksquashfs", str(root / "tree"), str(root / "old.sqfs"), "-quiet", "-noappend"],
                   check=True, capture_output=True)
    stale = root / "expand" / "job-from-a-crashed-gateway" / "examine-old"
    stale.mkdir(parents=True)
    fuse = subprocess.Popen(["squashfuse", "-f", str(root / "old.sqfs"), str(stale)])
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(stale):
            assert time.monotonic() < deadline and fuse.poll() is None, "squashfuse did not mount"
            time.sleep(0.01)
        gw.start()
        assert _mounted_under(root) == [] and os.listdir(root / "expand") == []
        fuse.wait(10)  # unmounted: the fuse daemon exits by itself

        seen: set[str] = set()

        def settled(rec: dict) -> bool:
            seen.add(rec["status"])
            return rec["status"] in ("READY", "FAILURE")

        rec = _poll(gw, env, "test%2Fscanned%3Aclean", settled)
        assert rec["status"] == "READY", rec
        assert "EXAMINATION" in seen, seen
        called, content = calls.read_text().splitlines()
        tree, image_id = called.split(" ")
        assert image_id == rec["id"] and content == "clean image"
        assert tree.startswith(str(root / "expand") + "/")  # a temporary directory under ExpandDirectory
        assert not os.path.exists(tree)
        assert sorted(os.listdir(root / "images")) == [f"{rec['id']}.meta", f"{rec['id']}.squashfs"]

        rec = _poll(gw, env, "test%2Fscanned%3Abad", lambda r: r["status"] in ("READY", "FAILURE"))
        assert rec["status"] == "FAILURE", rec
        assert "site-scanner" in rec["status_message"], rec
        assert "found a forbidden file: /etc/forbidden" in rec["status_message"], rec
        assert "scanning" not in rec["status_message"]  # the last stderr line only
        assert len(calls.read_text().splitlines()) == 4  # the examiner ran on the bad image
        assert sorted(os.listdir(root / "images")) == [f"{image_id}.meta", f"{image_id}.squashfs"]
        assert _mounted_under(root) == []
        assert os.listdir(root / "expand") == []
        assert env.json("GET", "/api/lookup/testsys/docker/test%2Fscanned%3Abad/")[0] == 404
    finally:
        gw.stop()
        if fuse.poll() is None:
            subprocess.run(["umount", "-l", str(stale)], capture_output=True)
            stop_pid(fuse.pid)


def test_examiner_without_squashfuse_fails_instead_of_skipping_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.examine import examine
    from shifter.errors import ShifterError

    image = tmp_path / "image.squashfs"
    image.write_bytes(b"not looked at")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without squashfuse
    with pytest.raises(ShifterError, match="squashfuse is not installed"):
        examine("/bin/true", str(image), "0" * 64, str(tmp_path), 10)
    assert [p.name for p in tmp_path.iterdir()] == ["image.squashfs"]  # its mount point removed


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: squashfuse needs /dev/fuse (0600 here)")
@pytest.mark.skipif(have("squashfuse", "mksquashfs") is not None, reason="needs squashfuse and mksquashfs")
def test_examiner_that_hangs_is_killed_at_its_timeout_and_the_mount_removed(tmp_path: Path) -> None:
    import subprocess

    from gateway.examine import examine
    from shifter.errors import ShifterError

    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "file").write_text("x")
    image = tmp_path / "image.squashfs"
    subprocess.run(["mksquashfs", str(tmp_path / "tree"), str(image), "-quiet", "-noappend"],
                   check=True, capture_output=True)
    script = tmp_path / "hang"
    # a background child keeps the tree busy: the whole session must be killed
    script.write_text('#!/bin/sh\ncd "$1" && sleep 60 &\nexec sleep 60\n')
    script.chmod(0o755)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    started = time.monotonic()
    with pytest.raises(ShifterError, match="the examiner hang did not finish within 1 s"):
        examine(str(script), str(image), "0" * 64, str(scratch), 1)
    assert time.monotonic() - started < 10
    assert _mounted_under(scratch) == [] and os.listdir(scratch) == []


def test_a_pull_from_a_trickling_registry_fails_at_the_pull_deadline(env: Env) -> None:
    """issue 10: a registry sending a byte a second kept the pull in flight for ever."""
    from tests.unit.test_pull_bounds import Registry as TrickleRegistry

    slow = TrickleRegistry(oci.gzip_bytes(oci.tar_bytes([oci.file("etc/hello", b"hello\n" * 50)])))
    slow.mode = "trickle"
    addr = slow.url.removeprefix("http://")
    gw = _own_gateway(env, "trickle", PullDeadline=4, DefaultImageLocation=addr,
                      Locations={addr: {"remotetype": "dockerv2", "url": slow.url, "authMethod": "token"}})
    try:
        gw.start()
        started = time.monotonic()
        rec = _poll(gw, env, "test%2Fimg%3Alatest", lambda r: r["status"] in ("READY", "FAILURE"), timeout=60)
        assert rec["status"] == "FAILURE", rec
        assert rec["status_message"].startswith(
            "pull deadline of 4 s (PullDeadline) passed while downloading layer sha256:"), rec
        assert time.monotonic() - started < 15
    finally:
        gw.stop()
        slow.close()
