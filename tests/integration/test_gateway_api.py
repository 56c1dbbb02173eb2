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
from fixtures_registry import (
    PYTHON,
    GatewayProcess,
    Munged,
    Registry,
    bound_credential,
    bound_payload,
    gateway_config,
    have,
)

from localcluster import oci
from shifter.client import munge
from shifter.formats.meta import read_meta

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

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cred(self, method: str, path: str, body: bytes | None = None) -> str:
        """A credential bound to this request to this gateway, as the real client makes it."""
        return bound_credential(self.munged.socket, method, path, body or b"", self.address)

    def as_user(self, uid: int, gid: int, method: str, path: str, body: bytes | None = None) -> str:
        """A bound credential made by another uid."""
        return _as_user(uid, gid, self.munged.socket, bound_payload(method, path, body or b"", self.address))

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
            hdrs["authentication"] = self.cred(method, path, body)
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


def _as_user(uid: int, gid: int, socket: str, payload: bytes = b"") -> str:
    """A munge credential made by another uid (a child process that drops to it) for root to decode."""
    import subprocess

    code = f"from shifter.client import munge; print(munge.encode({payload!r}, {socket!r}, decoder_uid=0))"
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


# -- credentials bound to their request (issue 10, item 9) ---------------------------------------------

SMALL = "/api/lookup/testsys/docker/test%2Fsmall%3Av1/"
PULL = "/api/pull/testsys/docker/test%2Fsmall%3Av1/"


@pytest.mark.parametrize(
    ("minted", "sent", "differs"),
    [
        (("GET", SMALL, b""), ("GET", "/api/list/testsys/", b""), "path"),
        (("GET", "/api/list/testsys/", b""), ("GET", "/api/autoexpire/testsys/", b""), "path"),
        (("GET", PULL, b""), ("POST", PULL, b""), "method"),
        (("POST", PULL, b'{"allowed_uids":"1000"}'), ("POST", PULL, b'{"allowed_uids":"4242"}'), "body"),
        (("POST", PULL, b""), ("POST", PULL, b'{"refresh":true}'), "body"),
    ],
)
def test_credential_for_another_request_is_401(
    env: Env, minted: tuple[str, str, bytes], sent: tuple[str, str, bytes], differs: str
) -> None:
    """A header captured from one request, replayed (fresh at this munged) on another: refused."""
    cred = env.cred(*minted)
    status, doc = env.json(sent[0], sent[1], body=sent[2] or None, cred=cred)
    assert status == 401, doc
    assert f"its {differs} differs" in doc["error"]


def test_credential_minted_for_gateway_a_is_refused_by_gateway_b(env: Env) -> None:
    gw_b = _own_gateway(env, "gateway-b").start()
    try:
        port_b = int(gw_b.url.rsplit(":", 1)[1])
        for_a = env.cred("GET", "/api/list/testsys/")
        status, _h, body = _send(port_b, "GET", "/api/list/testsys/", for_a)
        assert status == 401 and "another gateway" in json.loads(body)["error"]
        for_b = bound_credential(env.munged.socket, "GET", "/api/list/testsys/", b"", f"127.0.0.1:{port_b}")
        assert _send(port_b, "GET", "/api/list/testsys/", for_b)[0] == 200
    finally:
        gw_b.stop()


def test_credential_only_the_gateway_uid_may_decode(env: Env) -> None:
    from shifter.formats import requestbinding

    payload = bound_payload("GET", "/api/list/testsys/", b"", env.address)
    assert munge.decode(munge.encode(payload, env.munged.socket, decoder_uid=0), env.munged.socket)[2] == payload
    cred = munge.encode(payload, env.munged.socket, decoder_uid=1001)  # meant for another service
    status, doc = env.json("GET", "/api/list/testsys/", cred=cred)
    assert status == 401 and "uid restriction" in doc["error"]
    assert requestbinding.KEY in payload.decode()


def test_unbound_credentials_only_for_read_only_routes_by_default(env: Env) -> None:
    """The original C shifterimg's credentials name no request: lookups yes, pulls and expiry no."""
    old_style = json.dumps({"authorized_locations": {env.registry.addr: "u:p"}}).encode()
    assert env.json("GET", SMALL, cred=munge.encode(b"", env.munged.socket))[0] in (200, 404)
    assert env.json("GET", "/api/list/testsys/", cred=munge.encode(old_style, env.munged.socket))[0] == 200
    writes = (("POST", PULL), ("GET", "/api/autoexpire/testsys/"), ("GET", SMALL.replace("lookup", "expire")))
    for method, path in writes:
        status, doc = env.json(method, path, cred=munge.encode(old_style, env.munged.socket))
        assert status == 401 and "names no request" in doc["error"], (path, doc)


def test_unbound_credentials_switch_and_unreachable_munged(env: Env) -> None:
    """UnboundCredentials "accept" lets old clients pull; a platform whose munged is down answers 503."""
    platforms = {
        "testsys": gateway_config(env.root, env.registry, env.munged.socket)["Platforms"]["testsys"],
        "deadsys": {
            "mungeSocketPath": str(env.root / "no-munged.socket"),
            "accesstype": "local",
            "admins": ["root"],
            "local": {"imageDir": str(env.root / "images")},
        },
    }
    gw = _own_gateway(env, "unbound", UnboundCredentials="accept", Platforms=platforms).start()
    try:
        port = int(gw.url.rsplit(":", 1)[1])
        status, _h, body = _send(port, "POST", PULL, munge.encode(b"", env.munged.socket))
        assert status == 200, body
        status, _h, body = _send(port, "GET", "/api/list/deadsys/", munge.encode(b"", env.munged.socket))
        assert status == 503 and "cannot check credentials" in json.loads(body)["error"]
    finally:
        gw.stop()


def test_client_sends_registry_logins_only_with_a_pull(env: Env, tmp_path: Path) -> None:
    """The real GatewayClient against a recording HTTP server: what each request's credential carries."""
    import http.server

    from shifter.client.gatewayclient import GatewayClient
    from shifter.client.shifterimg import store_credential
    from shifter.formats.imageref import ImageRef

    seen: list[tuple[str, str, dict]] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            uid, _gid, payload = munge.decode(self.headers["authentication"], env.munged.socket)
            doc = json.loads(payload)
            assert doc["shifter_request"]["body"] == requestbinding.body_digest(body)
            seen.append((self.command, self.path, doc))
            out = json.dumps({"id": "x", "status": "READY", "list": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    from shifter.formats import requestbinding

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cred_file = tmp_path / "cred"
        store_credential(str(cred_file), "testsys", "reg.example", munge.encode(b"alice:secret", env.munged.socket))
        url = f"http://127.0.0.1:{server.server_port}"
        client = GatewayClient([url], "testsys", munge_socket=env.munged.socket, cred_file=str(cred_file))
        ref = ImageRef("docker", "test/small:v1")
        client.lookup(ref)
        client.images()
        client.pull(ref, allowed_uids=[1000])
    finally:
        server.shutdown()
        server.server_close()
    assert [m for m, _p, _d in seen] == ["GET", "GET", "POST"]
    for method, path, doc in seen:
        bound = doc["shifter_request"]
        assert bound["method"] == method and bound["target"] == path
        assert bound["gateway"] == f"127.0.0.1:{server.server_port}"
        assert ("authorized_locations" in doc) == (method == "POST"), (path, doc)
    assert seen[2][2]["authorized_locations"] == {"reg.example": "alice:secret"}


def _send(port: int, method: str, path: str, cred: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"authentication": cred})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_cache_expand_and_store_are_the_gateways_alone(env: Env) -> None:
    """Layers of a private image must not be readable through the cache (issue 10, item 7)."""
    env.pull_until_done("test%2Fsmall%3Av1")
    blobs = env.root / "cache" / "blobs" / "sha256"
    assert any(blobs.iterdir())
    for path in (blobs, blobs.parent):
        assert path.stat().st_mode & 0o777 == 0o700, path
    for path in [*blobs.iterdir(), env.root / "gateway.db", env.root / "gateway.db-wal"]:
        if path.exists():
            assert path.stat().st_mode & 0o077 == 0, path
    for path in (env.root / "expand").rglob("*"):
        assert path.stat().st_mode & 0o077 == 0, path
    blob = next(blobs.iterdir())
    import subprocess

    denied = subprocess.run(["cat", str(blob)], user=65534, group=65534, capture_output=True, cwd="/")
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr


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
        # issue 10: each of these was a 500 or silently accepted
        ("/api/pull/testsys/docker/x/", '{"allowed_uids": "²"}'.encode()),
        ("/api/pull/testsys/docker/x/", '{"allowed_uids": "١٢٣"}'.encode()),
        ("/api/pull/testsys/docker/x/", b'{"allowed_gids": "' + b"9" * 5000 + b'"}'),
        ("/api/pull/testsys/docker/x/", b'{"allowed_uids": [' + b"9" * 5000 + b"]}"),
        ("/api/pull/testsys/docker/x/", b'{"allowed_uids": "4294967295"}'),
        ("/api/pull/testsys/docker/x/", b'{"allowed_gids": [4294967296]}'),
        ("/api/pull/testsys/docker/x/", b'{"allowed_uids": [1.5]}'),
        ("/api/pull/testsys/docker/x/", b'{"a": ' + b"[" * 60000),
        ("/api/doimport/testsys/custom/x/", '{"filepath": "/x", "allowed_uids": "²"}'.encode()),
        ("/api/doimport/testsys/custom/x/", b"[" * 60000),
        ("/api/metrics/testsys/?limit=%C2%B2", None),
        ("/api/metrics/testsys/?limit=" + "9" * 5000, None),
    ],
)
def test_bad_requests_are_400(env: Env, path: str, body: bytes | None) -> None:
    method = "GET" if "/lookup/" in path or "/metrics/" in path else "POST"
    status, doc = env.json(method, path, body=body)
    assert status == 400, doc
    assert doc["error"] and "\n" not in doc["error"] and len(doc["error"]) < 200


def test_non_admin_gets_400_for_a_bad_metrics_limit_before_403(env: Env) -> None:
    path = "/api/metrics/testsys/?limit=%C2%B2"
    status, doc = env.json("GET", path, cred=env.as_user(65534, 65534, "GET", path))
    assert status == 400 and "limit" in doc["error"]


def test_client_gone_mid_body_is_a_client_error_not_a_500(env: Env) -> None:
    """A short body (Content-Length 100, 10 bytes sent) and broken chunked framing: 400s, no traceback."""
    import socket

    path = "/api/pull/testsys/docker/test%2Fsmall%3Av1/"
    log_before = (env.root / "gateway.log").read_text()
    heads = [
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n",
        f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n",
    ]
    tails = [b'{"refresh"', b"5\r\nabc"]
    for head, tail in zip(heads, tails, strict=True):
        with socket.create_connection(("127.0.0.1", env.port), timeout=10) as sock:
            cred = env.cred("POST", path, b"")
            sock.sendall(f"{head}authentication: {cred}\r\n\r\n".encode() + tail)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(65536)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _s, _h, metrics = env.request("GET", "/metrics", cred=None)
        if metrics.decode().count('route="pull",status="400"') and time.monotonic() > deadline - 8:
            break
        time.sleep(0.2)
    text = metrics.decode()
    assert 'shifter_gateway_requests_total{route="pull",status="400"}' in text, text
    assert 'route="pull",status="500"' not in text
    new_log = (env.root / "gateway.log").read_text()[len(log_before) :]
    assert "Traceback" not in new_log and "unexpected error" not in new_log, new_log
    assert "left during the body" in new_log


def test_header_read_timeout_closes_a_stalled_connection(env: Env) -> None:
    import socket

    from gateway.service import HEADER_SECONDS

    with socket.create_connection(("127.0.0.1", env.port), timeout=HEADER_SECONDS + 10) as sock:
        sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        started = time.monotonic()
        assert sock.recv(65536) == b""  # closed by the gateway, not by our timeout
        assert HEADER_SECONDS - 1 < time.monotonic() - started < HEADER_SECONDS + 5


def test_lookup_completes_while_a_store_write_is_blocked(env: Env) -> None:
    """Store calls run off the event loop: a pull stuck on SQLite's write lock stalls only itself."""
    env.pull_until_done("test%2Fsmall%3Av1")
    db = sqlite3.connect(env.root / "gateway.db", isolation_level=None, timeout=30)
    db.execute("BEGIN IMMEDIATE")  # hold the write lock, as a busy writer would
    results: list[int] = []
    try:
        def pull(path: str) -> None:
            results.append(env.json("POST", path)[0])

        pulls = [threading.Thread(target=pull, args=(PULL.replace("v1", f"w{i}"),)) for i in range(3)]
        for thread in pulls:
            thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        status, rec = env.json("GET", SMALL)
        assert status == 200 and rec["status"] == "READY"
        assert env.json("GET", "/api/status", cred=None)[0] == 200
        assert time.monotonic() - started < 2.0
        assert not results  # the pulls are still waiting for the lock
    finally:
        db.execute("ROLLBACK")
        db.close()
    for thread in pulls:
        thread.join(60)
    assert len(results) == 3


def test_oversized_body_is_413(env: Env) -> None:
    status, _ = env.json("POST", "/api/pull/testsys/docker/x/", body=b" " * (200 * 1024))
    assert status == 413


# -- admin actions --------------------------------------------------------------------------------------


def test_non_admin_gets_403_for_expire_and_autoexpire(env: Env) -> None:
    env.pull_until_done("test%2Fsmall%3Av1")
    path = "/api/expire/testsys/docker/test%2Fsmall%3Av1/"
    status, _ = env.json("GET", path, cred=env.as_user(65534, 65534, "GET", path))
    assert status == 403
    path = "/api/autoexpire/testsys/"
    status, _ = env.json("GET", path, cred=env.as_user(65534, 65534, "GET", path))
    assert status == 403
    # a normal user may still look it up
    path = "/api/lookup/testsys/docker/test%2Fsmall%3Av1/"
    status, rec = env.json("GET", path, cred=env.as_user(65534, 65534, "GET", path))
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


def test_import_publishes_a_copy_named_by_the_sha256_of_its_content(env: Env) -> None:
    import hashlib

    path = _squashfs(env, "clean", lambda tree: None)
    status, rec = _import(env, "mytool", path)
    assert status == 200 and rec["status"] == "READY", rec
    assert rec["id"] == hashlib.sha256(path.read_bytes()).hexdigest()
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


def test_import_check_runs_unsquashfs_under_limits_and_max_image_paths(env: Env) -> None:
    """unsquashfs lists the user's file under prlimit: a listing longer than MaxImagePaths
    allows is cut by RLIMIT_FSIZE (SIGXFSZ, named in one line), and a short listing with too
    many paths is refused by the count; a file within the limits is imported."""
    from gateway.importer import LISTING_BYTES_PER_PATH

    gw = _own_gateway(env, "import-limits", MaxImagePaths=1000).start()
    port = int(gw.url.rsplit(":", 1)[1])

    def doimport(tag: str, path: Path) -> dict:
        body = json.dumps({"filepath": str(path), "format": "squashfs"}).encode()
        target = f"/api/doimport/testsys/custom/{tag}/"
        deadline = time.monotonic() + 60
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            cred = bound_credential(env.munged.socket, "POST", target, body, f"127.0.0.1:{port}")
            conn.request("POST", target, body=body, headers={"authentication": cred})
            rec = json.loads(conn.getresponse().read())
            conn.close()
            if rec["status"] in ("READY", "FAILURE"):
                return rec
            assert time.monotonic() < deadline, rec
            time.sleep(0.05)

    def files(count: int, name_length: int) -> Any:
        return lambda tree: [(tree / f"{i:05d}".ljust(name_length, "x")).write_bytes(b"") for i in range(count)]

    try:
        long_names = _squashfs(env, "long-listing", files(1100, 240))  # ~1100 x 290 bytes of listing
        started = time.monotonic()
        rec = doimport("long-listing", long_names)
        assert rec["status"] == "FAILURE", rec
        limit = 1000 * LISTING_BYTES_PER_PATH
        assert rec["status_message"] == (
            f"rejected {long_names}: its file list is longer than 1000 paths (MaxImagePaths) allow"
            f" (unsquashfs stopped at {limit} bytes)"), rec
        assert time.monotonic() - started < 30
        many = _squashfs(env, "many-paths", files(1100, 8))  # a short listing, still too many paths
        rec = doimport("many-paths", many)
        assert rec["status"] == "FAILURE", rec
        assert rec["status_message"] == f"rejected {many}: it holds more than 1000 paths (MaxImagePaths)"
        within = _squashfs(env, "within-limits", files(900, 240))
        assert doimport("within-limits", within)["status"] == "READY"
        assert [p.name for p in (gw.root / "expand").iterdir()] == []
    finally:
        gw.stop()


def test_import_needs_an_import_user_and_a_filepath(env: Env) -> None:
    path = _squashfs(env, "denied", lambda tree: None)
    body = json.dumps({"filepath": str(path), "format": "squashfs"}).encode()
    cred = env.as_user(65534, 65534, "POST", "/api/doimport/testsys/custom/denied/", body)
    status, _ = _import(env, "denied", path, cred=cred)
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
        path = f"/api/pull/testsys/docker/{tag}/"
        cred = bound_credential(env.munged.socket, "POST", path, b"", f"127.0.0.1:{port}")
        conn.request("POST", path, headers={"authentication": cred})
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
    from gateway.store.sqlite import SqliteStore

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
        path = "/api/autoexpire/testsys/"
        cred = bound_credential(env.munged.socket, "GET", path, b"", f"127.0.0.1:{port}")
        conn.request("GET", path, headers={"authentication": cred})
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
        assert get("good:root:root::4294967295:0") == 401

        # admin rights follow the uid the names resolve to, not the name a session carries
        def autoexpire(header: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/api/autoexpire/testsys/", headers={"authentication": header})
            status = conn.getresponse().status
            conn.close()
            return status

        assert autoexpire("good:root:root::0:0") == 200
        assert autoexpire("good:root:root::4242:4242") == 403
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
    from tests.unit.gateway.test_pull_bounds import Registry as TrickleRegistry

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
        # the chunk's own check names the layer, the pull thread's twice-a-second check says "layers":
        # whichever sees the deadline first
        assert rec["status_message"].startswith(
            "pull deadline of 4 s (PullDeadline) passed while downloading layer"), rec
        assert time.monotonic() - started < 15
    finally:
        gw.stop()
        slow.close()
