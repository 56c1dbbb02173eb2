"""Pull, convert and publish from a real docker-registry (Debian's distribution 2.8) that
each test starts on a free loopback port with its own storage, and stops by its pid.

Covered: multi-layer images with whiteouts and opaque directories in gzip, zstd and plain
layers; an OCI index with two platforms; a blob whose content does not match its digest;
re-resolving an unchanged tag; a second image sharing the base layer downloading only the
new blob (GETs counted in the registry's access log); htpasswd basic auth over TLS with a
per-location CA file; token auth against a small real token service signing RS256 JWTs;
retries on 503 and http_proxy through a fault-injecting forwarding proxy in front of the
real registry; a tampered manifest; concurrent pulls sharing a base layer (one GET) and
cache pruning; remote publish over ssh/scp to an sshd of our own (root only), on loopback
and inside a cluster node's network namespace (tests/fixtures_sshd.py); where credentials may
go, against recording servers (plain HTTP, and TLS plus plain HTTP on one port).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures_sshd import Sshd, sshd_missing

from gateway import pipeline
from gateway.pipeline import Location, PublishTarget, PullSpec
from localcluster import oci
from localcluster.testing import Cluster
from shifter.errors import ShifterError
from shifter.formats.meta import read_meta

pytestmark = pytest.mark.skipif(shutil.which("docker-registry") is None,
                                reason="docker-registry not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Registry:
    url: str
    storage: Path
    log: Path
    proc: subprocess.Popen

    def blob_gets(self, digest: str) -> int:
        """Successful blob GETs for ``digest`` in the access log."""
        pattern = re.compile(rf'"GET /v2/[^ ]+/blobs/{re.escape(digest)} HTTP/1\.1" 200 ')
        return sum(1 for line in self.log.read_text().splitlines() if pattern.search(line))

    def blob_data(self, digest: str) -> Path:
        hexa = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"


def start_registry(tmp: Path, auth: str = "", tls: tuple[Path, Path] | None = None) -> Registry:
    port = free_port()
    storage = tmp / "storage"
    storage.mkdir(parents=True)
    tls_conf = f"\n  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}" if tls else ""
    config = tmp / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
        f"http:\n  addr: 127.0.0.1:{port}{tls_conf}\n{auth}")
    log = tmp / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=out,
                                stderr=subprocess.STDOUT)
    scheme = "https" if tls else "http"
    registry = Registry(f"{scheme}://127.0.0.1:{port}", storage, log, proc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return registry
        time.sleep(0.05)
    stop(registry.proc)
    raise RuntimeError("docker-registry did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    started: list[Registry] = []

    def factory(**kwargs: object) -> Registry:
        reg = start_registry(tmp_path / f"registry{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(reg)
        return reg

    yield factory
    for reg in started:
        stop(reg.proc)


@pytest.fixture
def registry(registry_factory: Callable[..., Registry]) -> Registry:
    return registry_factory()


def spec_for(tmp_path: Path, url: str, repo: str, ref: str, **kwargs: object) -> PullSpec:
    location = Location(url, **{k: kwargs.pop(k) for k in ("auth_method", "cacert") if k in kwargs})
    return PullSpec(location=location, repository=repo, reference=ref,
                    credentials=kwargs.pop("credentials", None),  # type: ignore[arg-type]
                    cache_dir=str(tmp_path / "cache"), expand_dir=str(tmp_path / "expand"), **kwargs)


def pull(spec: PullSpec, image_dir: Path) -> tuple[pipeline.ResolvedImage, list[tuple[str, dict]]]:
    events: list[tuple[str, dict]] = []
    resolved = pipeline.resolve(spec)
    built = pipeline.build_image(spec, resolved, lambda phase, info: events.append((phase, info)))
    try:
        image_dir.mkdir(exist_ok=True)
        pipeline.publish(built, resolved.image_id, built.meta, PublishTarget(str(image_dir)))
    finally:
        os.unlink(built.squashfs_path)
    return resolved, events


BASE = oci.tar_bytes([oci.directory("etc"), oci.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
                      oci.file("etc/old.conf", b"old"), oci.directory("opt/app"),
                      oci.file("opt/app/v1.txt", b"v1"), oci.file("bin/tool", b"#!/bin/sh\n", 0o4755)])
MIDDLE = oci.tar_bytes([oci.file("etc/.wh.old.conf"), oci.directory("opt/app"),
                        oci.file("opt/app/.wh..wh..opq"), oci.file("opt/app/v2.txt", b"v2")])
TOP = oci.tar_bytes([oci.file("etc/motd", b"hello\n"), oci.symlink("usr/bin/tool", "/bin/tool")])


def test_multilayer_image_with_whiteouts_in_gzip_zstd_and_plain_layers(registry: Registry,
                                                                        tmp_path: Path) -> None:
    config = oci.image_config([BASE, MIDDLE, TOP], env=["PATH=/bin", "A=b:c"], cmd=["/bin/sh"],
                              entrypoint=["/bin/tool", "-x"], workdir="/opt/app")
    digest = oci.push_image(registry.url, "demo/multi", "v1",
                            [oci.gzip_bytes(BASE), oci.zstd_bytes(MIDDLE), TOP], config)
    images = tmp_path / "images"
    resolved, events = pull(spec_for(tmp_path, registry.url, "demo/multi", "v1"), images)
    assert resolved.image_id == digest.split(":")[1] and not resolved.private
    squashfs = images / f"{resolved.image_id}.squashfs"
    entries = oci.read_squashfs(squashfs)
    assert {n for n in entries if n != "."} == {
        "etc", "etc/passwd", "etc/motd", "opt", "opt/app", "opt/app/v2.txt", "bin", "bin/tool",
        "usr", "usr/bin", "usr/bin/tool"}
    assert entries["bin/tool"][0].mode == 0o755
    assert (squashfs.stat().st_mode & 0o777) == 0o644
    meta = read_meta(str(images / f"{resolved.image_id}.meta"))
    assert meta.entrypoint == ["/bin/tool", "-x"] and meta.cmd == ["/bin/sh"]
    assert meta.workdir == "/opt/app" and meta.env == ["PATH=/bin", "A=b:c"]
    phases = [phase for phase, _ in events]
    assert phases[0] == "PULLING" and phases[-1] == "CONVERSION"
    pulled = [info for phase, info in events if phase == "PULLING"][-1]
    assert pulled["layers_done"] == 3 and pulled["bytes"] == pulled["bytes_total"] > 0
    assert not list((tmp_path / "expand").iterdir()), "temporary files left in expand_dir"
    assert not [p for p in images.iterdir() if p.name.startswith(".")], "partial files left"


def test_index_with_two_platforms_selects_the_requested_one(registry: Registry, tmp_path: Path) -> None:
    amd = oci.tar_bytes([oci.file("arch", b"amd64")])
    arm = oci.tar_bytes([oci.file("arch", b"arm64")])
    amd_digest = oci.push_image(registry.url, "demo/multiarch", "amd64",
                                [oci.gzip_bytes(amd)], oci.image_config([amd]))
    arm_digest = oci.push_image(registry.url, "demo/multiarch", "arm64",
                                [oci.gzip_bytes(arm)], oci.image_config([arm], architecture="arm64"))
    oci.push_index(registry.url, "demo/multiarch", "latest",
                   [(arm_digest, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
                    (amd_digest, {"os": "linux", "architecture": "amd64"})])
    resolved, _ = pull(spec_for(tmp_path, registry.url, "demo/multiarch", "latest"), tmp_path / "images")
    assert resolved.image_id == amd_digest.split(":")[1]
    assert oci.read_squashfs(tmp_path / "images" / f"{resolved.image_id}.squashfs")["arch"][1] == b"amd64"
    arm_spec = spec_for(tmp_path, registry.url, "demo/multiarch", "latest", platform=("linux", "arm64", "v8"))
    assert pipeline.resolve(arm_spec).image_id == arm_digest.split(":")[1]
    with pytest.raises(ShifterError, match="no manifest for platform linux/s390x"):
        pipeline.resolve(spec_for(tmp_path, registry.url, "demo/multiarch", "latest",
                                  platform=("linux", "s390x", None)))


def test_blob_whose_content_does_not_match_its_digest_fails(registry: Registry, tmp_path: Path) -> None:
    layer = oci.gzip_bytes(oci.tar_bytes([oci.file("a", b"a" * 1000)]))
    oci.push_image(registry.url, "demo/tampered", "v1", [layer], oci.image_config([layer]))
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    data = registry.blob_data(digest)
    data.write_bytes(bytes(len(layer)))  # same length, different bytes: only hashing can tell
    spec = spec_for(tmp_path, registry.url, "demo/tampered", "v1")
    resolved = pipeline.resolve(spec)
    with pytest.raises(ShifterError, match=rf"layer {digest[:19]}\.\. digest mismatch"):
        pipeline.build_image(spec, resolved, lambda *_: None)
    cache = tmp_path / "cache" / "blobs" / "sha256"
    assert not (cache / digest.split(":")[1]).exists()
    assert not [p for p in cache.iterdir() if ".partial" in p.name]
    assert not list((tmp_path / "expand").glob("*.squashfs"))


def test_unchanged_tag_resolves_to_the_same_id_and_shared_base_downloads_once(
        registry: Registry, tmp_path: Path) -> None:
    base = oci.gzip_bytes(BASE)
    app1 = oci.gzip_bytes(oci.tar_bytes([oci.file("app", b"one")]))
    app2 = oci.zstd_bytes(oci.tar_bytes([oci.file("app", b"two")]))
    oci.push_image(registry.url, "demo/app", "one", [base, app1], oci.image_config([BASE]))
    oci.push_image(registry.url, "demo/app", "two", [base, app2], oci.image_config([BASE, b"2"]))
    spec_one = spec_for(tmp_path, registry.url, "demo/app", "one")
    first, _ = pull(spec_one, tmp_path / "images")
    started = time.monotonic()
    again = pipeline.resolve(spec_one)
    assert time.monotonic() - started < 0.3
    assert again.image_id == first.image_id
    second, _ = pull(spec_for(tmp_path, registry.url, "demo/app", "two"), tmp_path / "images")
    assert second.image_id != first.image_id
    digest = lambda blob: "sha256:" + hashlib.sha256(blob).hexdigest()  # noqa: E731
    assert registry.blob_gets(digest(base)) == 1
    assert registry.blob_gets(digest(app1)) == 1 and registry.blob_gets(digest(app2)) == 1
    squashfs = tmp_path / "images" / f"{second.image_id}.squashfs"
    assert oci.read_squashfs(squashfs)["app"][1] == b"two"


# -- basic auth over TLS ----------------------------------------------------------------------


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def bcrypt_hash(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # libxcrypt's bcrypt: the format docker-registry's htpasswd needs

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))


def test_basic_auth_over_tls_with_a_location_ca_file(registry_factory: Callable[..., Registry],
                                                     tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt_hash('s3cret')}\n")
    registry = registry_factory(tls=(cert, key),
                                auth=f"auth:\n  htpasswd:\n    realm: test\n    path: {htpasswd}\n")
    layer = oci.gzip_bytes(oci.tar_bytes([oci.file("secret", b"private data")]))
    tls_context = __import__("ssl").create_default_context(cafile=str(cert))
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=tls_context))
    urllib.request.install_opener(opener)
    try:
        oci.push_image(registry.url, "team/private", "v1", [layer], oci.image_config([layer]),
                       auth=("alice", "s3cret"))
    finally:
        urllib.request.install_opener(None)  # type: ignore[arg-type]
    with pytest.raises(ShifterError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        pipeline.resolve(spec_for(tmp_path, registry.url, "team/private", "v1",
                                  credentials=("alice", "s3cret")))
    with pytest.raises(ShifterError, match="needs credentials for team/private"):
        pipeline.resolve(spec_for(tmp_path, registry.url, "team/private", "v1", cacert=str(cert)))
    with pytest.raises(ShifterError, match="refused the credentials"):
        pipeline.resolve(spec_for(tmp_path, registry.url, "team/private", "v1", cacert=str(cert),
                                  credentials=("alice", "wrong")))
    spec = spec_for(tmp_path, registry.url, "team/private", "v1", cacert=str(cert),
                    credentials=("alice", "s3cret"), auth_method="basic")
    resolved = pipeline.resolve(spec)
    assert resolved.private
    built = pipeline.build_image(spec, resolved, lambda *_: None)
    meta = built.meta.replace(user_acl=[1000])
    images = tmp_path / "images"
    images.mkdir()
    pipeline.publish(built, resolved.image_id, meta, PublishTarget(str(images)))
    os.unlink(built.squashfs_path)
    assert (images / f"{resolved.image_id}.squashfs").stat().st_mode & 0o777 == 0o600
    assert (images / f"{resolved.image_id}.meta").stat().st_mode & 0o777 == 0o600
    assert read_meta(str(images / f"{resolved.image_id}.meta")).user_acl == [1000]
    pipeline.remove_published(resolved.image_id, PublishTarget(str(images)))
    assert not list(images.iterdir())


# -- token auth ------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """A small real token endpoint: anonymous pull tokens for ``public/*``, tokens for
    ``private/*`` only with alice's password; RS256 JWTs signed by ``openssl dgst``."""

    def __init__(self, directory: Path) -> None:
        self.cert, self.key = make_cert(directory)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.port = free_port()
        self.requests: list[tuple[str, bool]] = []
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                scope = query.get("scope", [""])[0]
                header = self.headers.get("Authorization", "")
                authed = header == "Basic " + base64.b64encode(b"alice:s3cret").decode()
                service.requests.append((scope, authed))
                if header and not authed:
                    self.send_response(401)
                    self.end_headers()
                    return
                _, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                allowed = actions.split(",") if (name.startswith("public/") or authed) else []
                body = json.dumps({"token": service.sign(name, allowed)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def sign(self, name: str, actions: list[str]) -> str:
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self.x5c]}
        claims = {"iss": "test-issuer", "sub": "alice", "aud": "test-registry", "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(),
                  "access": [{"type": "repository", "name": name, "actions": actions}] if actions else []}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                                   input=signing_input.encode(), check=True, capture_output=True).stdout
        return f"{signing_input}.{_b64(signature)}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_token_auth_anonymous_then_with_credentials(registry_factory: Callable[..., Registry],
                                                    tmp_path: Path) -> None:
    tokens = TokenService(tmp_path)
    try:
        registry = registry_factory(auth=(
            "auth:\n  token:\n"
            f"    realm: http://127.0.0.1:{tokens.port}/token\n    service: test-registry\n"
            f"    issuer: test-issuer\n    rootcertbundle: {tokens.cert}\n"))
        public = oci.gzip_bytes(oci.tar_bytes([oci.file("pub", b"public")]))
        private = oci.gzip_bytes(oci.tar_bytes([oci.file("priv", b"private")]))
        for repo, layer in (("public/img", public), ("private/img", private)):
            push_token = tokens.sign(repo, ["pull", "push"])
            opener = urllib.request.build_opener()
            opener.addheaders = [("Authorization", f"Bearer {push_token}")]
            urllib.request.install_opener(opener)
            try:
                oci.push_image(registry.url, repo, "v1", [layer], oci.image_config([layer]))
            finally:
                urllib.request.install_opener(None)  # type: ignore[arg-type]
        resolved, _ = pull(spec_for(tmp_path, registry.url, "public/img", "v1",
                                    credentials=("alice", "s3cret")), tmp_path / "images")
        assert not resolved.private  # anonymous token sufficed: credentials never needed
        assert all(not authed for _, authed in tokens.requests)
        with pytest.raises(ShifterError, match="needs credentials for private/img"):
            pipeline.resolve(spec_for(tmp_path, registry.url, "private/img", "v1"))
        with pytest.raises(ShifterError, match="credentials refused"):
            pipeline.resolve(spec_for(tmp_path, registry.url, "private/img", "v1",
                                      credentials=("alice", "no")))
        resolved, _ = pull(spec_for(tmp_path, registry.url, "private/img", "v1",
                                    credentials=("alice", "s3cret")), tmp_path / "images")
        assert resolved.private
        assert ("repository:private/img:pull", True) in tokens.requests
        entries = oci.read_squashfs(tmp_path / "images" / f"{resolved.image_id}.squashfs")
        assert entries["priv"][1] == b"private"
    finally:
        tokens.close()


# -- retries and proxies -------------------------------------------------------------------------


class FaultProxy:
    """A forward HTTP proxy in front of the real registry that answers 503 (with
    Retry-After) to the first ``failures`` requests, then forwards; counts what it saw."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.seen: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                proxy.seen.append(self.path)
                if len(proxy.seen) <= proxy.failures:
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                target = urllib.parse.urlsplit(self.path)
                conn = http.client.HTTPConnection(target.netloc, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                path = target.path + (f"?{target.query}" if target.query else "")
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                conn.close()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_retries_on_503_through_the_environment_proxy(registry: Registry, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    layer = oci.gzip_bytes(oci.tar_bytes([oci.file("x", b"x")]))
    oci.push_image(registry.url, "demo/proxied", "v1", [layer], oci.image_config([layer]))
    proxy = FaultProxy(failures=2)
    try:
        monkeypatch.setenv("http_proxy", proxy.url)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        resolved, _ = pull(spec_for(tmp_path, registry.url, "demo/proxied", "v1"), tmp_path / "images")
        assert len(proxy.seen) >= 5  # 2 refused + manifest, config and layer through the proxy
        assert all(p.startswith(registry.url + "/v2/") for p in proxy.seen)
        assert resolved.image_id
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        before = len(proxy.seen)
        pipeline.resolve(spec_for(tmp_path, registry.url, "demo/proxied", "v1"))
        assert len(proxy.seen) == before  # bypassed
        proxy.failures = 10**6
        monkeypatch.delenv("no_proxy")
        started = time.monotonic()
        with pytest.raises(ShifterError, match="manifest v1 answered 503"):
            pipeline.resolve(spec_for(tmp_path, registry.url, "demo/proxied", "v1"))
        assert time.monotonic() - started < 10  # bounded retries
    finally:
        proxy.close()


# -- remote publish over a real sshd ----------------------------------------------------------


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """An sshd of our own on a loopback port, accepting one key for root."""
    if sshd_missing():
        pytest.skip(sshd_missing())
    server = Sshd(tmp_path / "ssh").start()
    try:
        yield server
    finally:
        server.stop()


def _build_remote_image(registry: Registry, tmp_path: Path, tag: str) -> tuple[str, pipeline.BuiltImage]:
    layer = oci.gzip_bytes(oci.tar_bytes([oci.file("remote", b"over ssh"), oci.file("big", os.urandom(1 << 20))]))
    oci.push_image(registry.url, "demo/remote", tag, [layer], oci.image_config([layer], cmd=["/x"]))
    spec = spec_for(tmp_path, registry.url, "demo/remote", tag)
    resolved = pipeline.resolve(spec)
    return resolved.image_id, pipeline.build_image(spec, resolved, lambda *_: None)


def test_remote_publish_over_ssh_is_atomic_and_removable(registry: Registry, sshd: Sshd,
                                                        tmp_path: Path) -> None:
    image_id, built = _build_remote_image(registry, tmp_path, "v1")
    remote_dir = tmp_path / "remote images"  # a space: the remote shell must get it quoted
    remote_dir.mkdir()
    target = sshd.target(str(remote_dir))
    with pytest.raises(ShifterError, match="invalid remote imageDir"):
        pipeline.publish(built, image_id, built.meta, target)
    remote_dir = tmp_path / "remote-images"
    remote_dir.mkdir()
    target.image_dir = str(remote_dir)
    pipeline.publish(built, image_id, built.meta, target)
    squashfs = remote_dir / f"{image_id}.squashfs"
    assert oci.read_squashfs(squashfs)["remote"][1] == b"over ssh"
    assert squashfs.stat().st_mode & 0o777 == 0o644
    assert read_meta(str(remote_dir / f"{image_id}.meta")).cmd == ["/x"]
    assert sorted(p.name for p in remote_dir.iterdir()) == [f"{image_id}.meta", squashfs.name]
    private = built.meta.replace(group_acl=[4242])
    pipeline.publish(built, image_id, private, target)
    assert squashfs.stat().st_mode & 0o777 == 0o600
    pipeline.remove_published(image_id, target)
    assert not list(remote_dir.iterdir())
    target.image_dir = str(tmp_path / "missing")
    with pytest.raises(ShifterError, match="transfer of .* failed: ssh"):
        pipeline.publish(built, image_id, built.meta, target)
    os.unlink(built.squashfs_path)


def test_remote_publish_to_an_sshd_on_a_cluster_node(cluster: Cluster, registry: Registry,
                                                     tmp_path: Path) -> None:
    """The issue's proof: a real sshd inside node n1's network namespace (its own address)."""
    from localcluster.settings import Settings

    if sshd_missing():
        pytest.skip(sshd_missing())
    node = cluster.nodes[0]
    netns = f"/run/netns/{Settings.netns(node)}"
    if not os.path.exists(netns):
        pytest.fail(f"the cluster is up but {netns} does not exist")
    image_id, built = _build_remote_image(registry, tmp_path, "node")
    remote_dir = tmp_path / "node-images"
    remote_dir.mkdir()
    server = Sshd(tmp_path / "node-ssh", Settings.node_addr(node), netns=netns).start()
    try:
        # the sshd answering is the node's: its network namespace, not the host's
        assert server.run("stat -L -c %i /proc/self/ns/net").strip() == str(os.stat(netns).st_ino)
        meta = built.meta.replace(user_acl=[1234])
        pipeline.publish(built, image_id, meta, server.target(str(remote_dir)))
        squashfs, meta_file = remote_dir / f"{image_id}.squashfs", remote_dir / f"{image_id}.meta"
        assert sorted(p.name for p in remote_dir.iterdir()) == [meta_file.name, squashfs.name]
        assert squashfs.stat().st_size == os.stat(built.squashfs_path).st_size
        assert _sha256(squashfs) == _sha256(Path(built.squashfs_path))
        assert read_meta(str(meta_file)) == meta
        assert squashfs.stat().st_mode & 0o777 == 0o600  # private: the .meta carries an ACL
        assert meta_file.stat().st_ctime_ns > squashfs.stat().st_ctime_ns  # .meta renamed into place last
        pipeline.remove_published(image_id, server.target(str(remote_dir)))
        assert not list(remote_dir.iterdir())
    finally:
        server.stop()
        os.unlink(built.squashfs_path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def test_concurrent_pulls_sharing_a_base_download_it_once_and_prune_keeps_referenced_blobs(
        registry: Registry, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from gateway.blobcache import prune_cache

    base = oci.gzip_bytes(oci.tar_bytes([oci.file(f"base/{i}", os.urandom(20_000)) for i in range(50)]))
    tags = [f"t{i}" for i in range(4)]
    tops = {tag: oci.gzip_bytes(oci.tar_bytes([oci.file("which", tag.encode())])) for tag in tags}
    for tag in tags:
        oci.push_image(registry.url, "demo/shared", tag, [base, tops[tag]], oci.image_config([b"x", tag.encode()]))

    def build(tag: str) -> str:
        spec = spec_for(tmp_path, registry.url, "demo/shared", tag)
        resolved = pipeline.resolve(spec)
        built = pipeline.build_image(spec, resolved, lambda *_: None)
        content = oci.read_squashfs(built.squashfs_path)["which"][1].decode()
        os.unlink(built.squashfs_path)
        return content

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(build, tags)) == tags
    base_digest = "sha256:" + hashlib.sha256(base).hexdigest()
    assert registry.blob_gets(base_digest) == 1
    cache = str(tmp_path / "cache")
    keep = {base_digest, "sha256:" + hashlib.sha256(tops["t0"]).hexdigest()}
    assert prune_cache(cache, keep, grace_seconds=3600) == []  # everything is fresh
    removed = prune_cache(cache, keep, grace_seconds=0)
    assert {"sha256:" + hashlib.sha256(tops[t]).hexdigest() for t in tags[1:]} <= set(removed)
    left = set(os.listdir(tmp_path / "cache" / "blobs" / "sha256"))
    assert {d.split(":")[1] for d in keep} <= left


def test_manifest_whose_content_does_not_match_its_digest_fails(registry: Registry, tmp_path: Path) -> None:
    layer = oci.gzip_bytes(oci.tar_bytes([oci.file("m", b"m")]))
    digest = oci.push_image(registry.url, "demo/badmanifest", "v1", [layer], oci.image_config([layer]))
    stored = registry.blob_data(digest)
    body = stored.read_bytes()
    stored.write_bytes(body.replace(b'"schemaVersion": 2', b'"schemaVersion":2 '))  # same length, valid JSON
    assert stored.read_bytes() != body
    with pytest.raises(ShifterError, match=rf"manifest {digest[:19]}\.\. digest mismatch"):
        pipeline.resolve(spec_for(tmp_path, registry.url, "demo/badmanifest", "v1"))
    with pytest.raises(ShifterError, match="digest mismatch"):
        pipeline.resolve(spec_for(tmp_path, registry.url, "demo/badmanifest", digest))


def test_remote_partial_files_of_dead_writers_of_this_host_are_removed(sshd: Sshd, tmp_path: Path) -> None:
    from gateway.publish import host_key, remove_remote_leftovers

    remote_dir = tmp_path / "remote-partials"
    remote_dir.mkdir()
    image_id = "ef" * 32
    dead = remote_dir / f".{image_id}.squashfs.partial-h{host_key()}p{2**22 - 1}-Ab12Cd"
    live = remote_dir / f".{image_id}.meta.partial-h{host_key()}p{os.getpid()}-Ef34Gh"
    other_host = remote_dir / f".{image_id}.squashfs.partial-h00000000p{2**22 - 1}-Ij56Kl"
    for path in (dead, live, other_host):
        path.write_bytes(b"partial")
    removed = remove_remote_leftovers(sshd.target(str(remote_dir)), lambda pid: pid == os.getpid())
    assert removed == [dead.name]
    assert not dead.exists() and live.exists() and other_host.exists()


# -- where the registry's credentials may go (issue 10) --------------------------------------------


class Recorder:
    """A tiny HTTP server on 127.0.0.1 that answers with ``answer(path, headers)`` and records
    every request's path and whether it carried an Authorization header."""

    def __init__(self, answer: Callable[[str, dict[str, str]], tuple[int, dict[str, str], bytes]]) -> None:
        self.seen: list[tuple[str, bool]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                headers = {k.lower(): v for k, v in self.headers.items()}
                recorder.seen.append((self.path, "authorization" in headers))
                status, extra, body = answer(self.path, headers)
                self.send_response(status)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_token_realm_on_another_host_never_gets_the_credentials(tmp_path: Path) -> None:
    realm = Recorder(lambda path, headers: (401, {}, b""))  # no anonymous token either
    registry = Recorder(lambda path, headers: (
        401, {"WWW-Authenticate": f'Bearer realm="http://localhost:{realm.port}/token",service="r"'}, b""))
    try:
        with pytest.raises(ShifterError, match=f"not sending credentials to token realm localhost:{realm.port}"):
            pipeline.resolve(spec_for(tmp_path, f"http://127.0.0.1:{registry.port}", "private/img", "v1",
                                      credentials=("alice", "s3cret")))
        assert realm.seen and not any(authed for _path, authed in realm.seen)
    finally:
        realm.close()
        registry.close()


def test_redirect_to_another_host_loses_the_authorization(tmp_path: Path) -> None:
    from gateway.registry import RegistryClient

    blob = b'{"architecture":"amd64"}'
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    cdn = Recorder(lambda path, headers: (200, {}, blob))

    def registry_answer(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if "authorization" not in headers:
            return 401, {"WWW-Authenticate": 'Basic realm="r"'}, b""
        return 307, {"Location": f"http://localhost:{cdn.port}/blob"}, b""

    registry = Recorder(registry_answer)
    try:
        client = RegistryClient(f"http://127.0.0.1:{registry.port}", "private/img", ("alice", "s3cret"),
                                auth_method="basic")
        assert client.blob_bytes(digest, 1 << 20) == blob
        assert registry.seen[-1] == (f"/v2/private/img/blobs/{digest}", True)
        assert cdn.seen == [("/blob", False)]
    finally:
        cdn.close()
        registry.close()


class TlsAndPlainRecorder:
    """A recording server standing in for a registry front: TLS (a certificate made with the
    openssl CLI) and plain HTTP on one loopback port, told apart by the first byte (0x16
    starts a TLS handshake). Records every request's scheme, path and whether it carried
    an Authorization header; ``answer(scheme, path, headers)`` decides the reply."""

    def __init__(self, cert: Path, key: Path,
                 answer: Callable[[str, str, dict[str, str]], tuple[int, dict[str, str], bytes]]) -> None:
        import ssl

        self.seen: list[tuple[str, str, bool]] = []
        recorder = self
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                scheme = "https" if isinstance(self.connection, ssl.SSLSocket) else "http"
                headers = {k.lower(): v for k, v in self.headers.items()}
                recorder.seen.append((scheme, self.path, "authorization" in headers))
                status, extra, body = answer(scheme, self.path, headers)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def finish_request(self, request: Any, client_address: Any) -> None:
                request.settimeout(10)
                try:
                    first = request.recv(1, socket.MSG_PEEK)
                    if first == b"\x16":
                        request = context.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError):
                    return
                Handler(request, client_address, self)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _private_image() -> tuple[bytes, dict[str, tuple[str, bytes]]]:
    """A manifest and its blobs (digest -> (media type, bytes)) of a one-layer image."""
    layer = oci.gzip_bytes(oci.tar_bytes([oci.file("secret", b"private data")]))
    config = json.dumps(oci.image_config([oci.tar_bytes([oci.file("secret", b"private data")])])).encode()
    blobs = {"sha256:" + hashlib.sha256(data).hexdigest(): data for data in (config, layer)}
    config_digest, layer_digest = list(blobs)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                    "size": len(layer)}],
    }).encode()
    return manifest, {d: ("application/octet-stream", b) for d, b in blobs.items()}


@pytest.mark.parametrize("port", ["same", "another"])
def test_blob_redirect_from_https_to_http_on_the_same_host_drops_the_authorization_recording_server(
        tmp_path: Path, port: str) -> None:
    """The registry (https, HTTP Basic) answers every blob with a redirect to plain http on
    its own host (its own port, or another). The documented rule: the redirect is followed
    without the Authorization header, and the blob still has to match its digest. So the
    pull proceeds (the blobs are served anonymously there) and no plain-http request ever
    carries the credentials."""
    cert, key = make_cert(tmp_path)
    manifest, blobs = _private_image()
    login = "Basic " + base64.b64encode(b"alice:s3cret").decode()

    def plain_blob(path: str) -> tuple[int, dict[str, str], bytes]:
        digest = path.rsplit("/", 1)[-1]
        return (200, {}, blobs[digest][1]) if digest in blobs else (404, {}, b"")

    other = Recorder(lambda path, headers: plain_blob(path))

    def answer(scheme: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if scheme == "http":
            return plain_blob(path)
        if headers.get("authorization") != login:
            return 401, {"WWW-Authenticate": 'Basic realm="r"'}, b""
        if path.endswith("/manifests/v1"):
            return 200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, manifest
        digest = path.rsplit("/", 1)[-1]
        target = front.port if port == "same" else other.port
        return 307, {"Location": f"http://127.0.0.1:{target}/storage/{digest}"}, b""

    front = TlsAndPlainRecorder(cert, key, answer)
    try:
        spec = spec_for(tmp_path, f"https://127.0.0.1:{front.port}", "private/img", "v1", cacert=str(cert),
                        credentials=("alice", "s3cret"), auth_method="basic")
        resolved, _events = pull(spec, tmp_path / "images")
        assert resolved.private
        assert (tmp_path / "images" / f"{resolved.image_id}.squashfs").is_file()
        plain = [(path, authed) for scheme, path, authed in front.seen if scheme == "http"] + other.seen
        assert sorted(path for path, _ in plain) == sorted(f"/storage/{d}" for d in blobs)
        assert not any(authed for _path, authed in plain)
        assert any(scheme == "https" and authed for scheme, _path, authed in front.seen)
    finally:
        other.close()
        front.close()


def test_token_service_redirect_to_http_on_the_same_host_is_not_followed_recording_server(
        tmp_path: Path) -> None:
    """The registry (https) sends a Bearer challenge for an https realm on its own host; the
    realm answers the request that carries the user's credentials with a redirect to plain
    http on the same host and port. A token service's answer is never followed: the pull
    fails naming the status, and nothing reaches the plain-http side."""
    cert, key = make_cert(tmp_path)
    manifest, _blobs = _private_image()

    def answer(scheme: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if scheme == "http":
            return 200, {}, b'{"token": "stolen"}'
        if path.startswith("/token"):
            if "authorization" not in headers:
                return 401, {}, b""  # no anonymous token
            return 307, {"Location": f"http://127.0.0.1:{front.port}/token-plain"}, b""
        if headers.get("authorization") == "Bearer stolen":
            return 200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, manifest
        realm = f"https://127.0.0.1:{front.port}/token"
        return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="r",scope="repository:private/img:pull"'}, b""

    front = TlsAndPlainRecorder(cert, key, answer)
    try:
        spec = spec_for(tmp_path, f"https://127.0.0.1:{front.port}", "private/img", "v1", cacert=str(cert),
                        credentials=("alice", "s3cret"))
        with pytest.raises(ShifterError, match=f"registry 127.0.0.1:{front.port}: token service answered 307"):
            pipeline.resolve(spec)
        assert [scheme for scheme, _path, _authed in front.seen] == ["https"] * len(front.seen)
        assert [(p.split("?")[0], a) for s, p, a in front.seen if p.startswith("/token")] == [
            ("/token", False), ("/token", True)]
    finally:
        front.close()


def test_index_digests_are_checked_before_they_reach_a_url(tmp_path: Path) -> None:
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [{"digest": "sha256:../../../other/manifests/x?", "size": 1,
                                       "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    registry = Recorder(lambda path, headers: (
        200, {"Content-Type": "application/vnd.oci.image.index.v1+json"}, index))
    try:
        with pytest.raises(ShifterError, match="is not a tag or sha256 digest"):
            pipeline.resolve(spec_for(tmp_path, f"http://127.0.0.1:{registry.port}", "some/img", "v1"))
        assert [path for path, _ in registry.seen] == ["/v2/some/img/manifests/v1"]
    finally:
        registry.close()


@pytest.mark.parametrize(("registry", "target", "allowed"), [
    ("https://registry-1.docker.io", "https://auth.docker.io/token", True),
    ("https://registry-1.docker.io", "http://auth.docker.io/token", False),  # downgrade
    ("https://registry-1.docker.io", "https://evil.example/token", False),
    ("https://reg.example", "https://reg.example:8443/token", True),
    ("https://reg.example", "https://other.example/token", False),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5001/token", True),  # configured as http
    ("http://127.0.0.1:5000", "http://localhost:5001/token", False),
    ("https://10.0.0.5", "https://10.0.0.6/token", False),
])
def test_credentials_go_only_to_the_registry_host_or_its_domain_over_https(
        registry: str, target: str, allowed: bool) -> None:
    from gateway.registry import credentials_may_go

    assert credentials_may_go(registry, target) is allowed


def test_hostile_layers_from_a_real_registry_fail_the_pull_in_bounded_time(registry: Registry,
                                                                          tmp_path: Path) -> None:
    """issue 10: a pax size of -512 looped for ever; a name 40,000 levels deep took 3 GB;
    a name with escape sequences reached the status message as it was."""
    from tests.layer_blobs import end_of_archive, pax_member, raw_header
    from tests.unit.gateway.test_hostile_layers import time_bound

    next_entry = raw_header(b"next", b"0", b"00000000001\0") + b"x" + bytes(511) + end_of_archive()
    cases = {
        "negative": (pax_member({b"size": b"-512"}, next_entry), oci.gzip_bytes,
                     "layer 2: corrupt pax size for next"),
        "deep": (oci.tar_bytes([oci.file(b"a/" * 40_000 + b"f", b"x")]), oci.gzip_bytes,
                 "layer 2: name longer than 4096 bytes: " + "a/" * 100 + "..."),
        "escapes": (oci.tar_bytes([oci.file("../\x1b]2;owned\x07\n", b"x")]), oci.zstd_bytes,
                    "layer 2: path escapes the image root: ../\\x1b]2;owned\\x07\\n"),
    }
    for tag, (tar, compress, message) in cases.items():
        oci.push_image(registry.url, "demo/hostile", tag, [oci.gzip_bytes(BASE), compress(tar)],
                       oci.image_config([BASE, tar]))
        spec = spec_for(tmp_path, registry.url, "demo/hostile", tag)
        started = time.monotonic()
        with time_bound(60), pytest.raises(ShifterError) as err:
            pipeline.build_image(spec, pipeline.resolve(spec), lambda *_: None)
        assert str(err.value) == message
        assert time.monotonic() - started < 20
        assert not list((tmp_path / "expand").glob("*.squashfs"))
