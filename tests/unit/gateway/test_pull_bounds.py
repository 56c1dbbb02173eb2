"""Every step of a pull is bounded (issue 10): a registry that trickles, lies about sizes
or declares more than MaxImageBytes, and a converter that hangs or outgrows its limits,
each end the pull with one line naming the step, within the deadline.

The registry is a tiny HTTP server on 127.0.0.1 in this process that speaks the part
of the distribution API a pull uses; the client, cache, flattener and tar2sqfs are real.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gateway import pipeline
from gateway.bounds import Deadline, limited
from gateway.convert import squash_layers
from localcluster.oci import file, gzip_bytes, tar_bytes
from shifter.errors import ShifterError
from tests.layer_blobs import write_layers

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def serve_on_loopback(on_get: Callable[[BaseHTTPRequestHandler], None]) -> tuple[ThreadingHTTPServer, str]:
    """A threaded HTTP server on a free loopback port whose GETs go to ``on_get``; with its URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            on_get(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


class Registry:
    """One image (``test/img:latest``); ``mode`` decides how its layer blob is sent."""

    def __init__(self, layer: bytes) -> None:
        self.layer = layer
        self.config = json.dumps({"architecture": "amd64", "os": "linux", "config": {}}).encode()
        self.mode = "normal"
        self.declared = len(layer)
        self.requests: list[str] = []
        self.server, self.url = serve_on_loopback(self._get)

    def _get(self, handler: BaseHTTPRequestHandler) -> None:
        self.requests.append(handler.path)
        self.answer(handler)

    @staticmethod
    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def manifest(self) -> bytes:
        return json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.digest(self.config), "size": len(self.config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": self.digest(self.layer), "size": self.declared}],
        }).encode()

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        body, kind = b"", "application/octet-stream"
        if h.path.endswith("/manifests/latest"):
            body, kind = self.manifest(), MANIFEST
        elif h.path.endswith(self.digest(self.config)):
            body = self.config
        elif h.path.endswith(self.digest(self.layer)):
            body = self.layer
        else:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        layer = body is self.layer
        h.send_response(200)
        h.send_header("Content-Type", kind)
        sent = body + b"x" * 4096 if layer and self.mode == "oversize" else body
        h.send_header("Content-Length", str(len(sent)))
        h.end_headers()
        try:
            if layer and self.mode == "trickle":
                for i in range(len(sent)):
                    h.wfile.write(sent[i:i + 1])
                    h.wfile.flush()
                    time.sleep(1)
            else:
                h.wfile.write(sent)
        except OSError:
            pass  # the client gave up

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def registry() -> Iterator[Registry]:
    reg = Registry(gzip_bytes(tar_bytes([file("etc/hello", b"hello\n")])))
    yield reg
    reg.close()


def spec_for(reg: Registry, tmp_path: Path, **kw: object) -> pipeline.PullSpec:
    return pipeline.PullSpec(location=pipeline.Location(reg.url), repository="test/img",
                             reference="latest", credentials=None, cache_dir=str(tmp_path / "cache"),
                             expand_dir=str(tmp_path / "expand"), **kw)  # type: ignore[arg-type]


def pull(spec: pipeline.PullSpec) -> pipeline.BuiltImage:
    return pipeline.build_image(spec, pipeline.resolve(spec), lambda phase, info: None)


def blob_leftovers(tmp_path: Path) -> list[str]:
    blobs = tmp_path / "cache" / "blobs" / "sha256"
    return sorted(p.name for p in blobs.iterdir() if not p.name.endswith(".lock")) if blobs.exists() else []


def test_a_normal_pull_through_the_local_registry_works(registry: Registry, tmp_path: Path) -> None:
    built = pull(spec_for(registry, tmp_path))
    assert os.path.getsize(built.squashfs_path) > 0


def test_a_trickling_registry_ends_at_the_pull_deadline(registry: Registry, tmp_path: Path) -> None:
    registry.mode = "trickle"
    started = time.monotonic()
    with pytest.raises(ShifterError) as err:
        pull(spec_for(registry, tmp_path, pull_deadline=3))
    took = time.monotonic() - started
    assert str(err.value).startswith(
        "pull deadline of 3 s (PullDeadline) passed while downloading layer")
    assert took < 6, took
    time.sleep(1.5)  # the download thread notices at its next byte and removes its partial file
    assert blob_leftovers(tmp_path) == [registry.digest(registry.config)[7:]]


def test_layers_declaring_more_than_max_image_bytes_are_refused_before_download(
        registry: Registry, tmp_path: Path) -> None:
    registry.declared = 10 << 20
    with pytest.raises(ShifterError, match=r"^image layers declare 10485760 bytes, more than the size"
                                           r" limit of 1048576 bytes \(MaxImageBytes\)$"):
        pull(spec_for(registry, tmp_path, max_image_bytes=1 << 20))
    assert not any("/blobs/" + registry.digest(registry.layer) in r for r in registry.requests)


def test_a_blob_longer_than_declared_is_an_error(registry: Registry, tmp_path: Path) -> None:
    registry.mode = "oversize"
    with pytest.raises(ShifterError, match=r"is larger than its manifest says"):
        pull(spec_for(registry, tmp_path))
    assert blob_leftovers(tmp_path) == [registry.digest(registry.config)[7:]]


def _fake_tool(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_a_hung_tar2sqfs_is_killed_at_the_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # fake: a tar2sqfs that hangs without reading cannot be provoked from the real one
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "tar2sqfs", "exec sleep 600\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    blobs = write_layers(tmp_path, (tar_bytes([file("big", os.urandom(8 << 20))]),))
    started = time.monotonic()
    with pytest.raises(ShifterError, match=r"^pull deadline of 2 s \(PullDeadline\) passed while converting"):
        squash_layers(blobs, str(tmp_path / "out.squashfs"), None, 1 << 30, deadline=Deadline(2))
    assert time.monotonic() - started < 5
    assert not (tmp_path / "out.squashfs").exists()


def test_tar2sqfs_output_over_its_file_size_limit_fails_with_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.convert

    limit = 4 << 20
    monkeypatch.setattr(gateway.convert, "_OUTPUT_SLACK", (64 << 10) - limit)  # RLIMIT_FSIZE 64 KiB
    blobs = write_layers(tmp_path, (tar_bytes([file("noise", os.urandom(1 << 20))]),))
    with pytest.raises(ShifterError, match=r"^squashfs conversion failed: tar2sqfs: output exceeded"
                                           r" its size limit of 65536 bytes$"):
        squash_layers(blobs, str(tmp_path / "out.squashfs"), None, limit)
    assert not (tmp_path / "out.squashfs").exists()


def test_tools_run_under_cpu_memory_and_size_limits() -> None:
    assert limited(["tar2sqfs", "x"], cpu=1.2, memory=1 << 30, fsize=10) == [
        "prlimit", "--cpu=2:7", f"--as={1 << 30}", "--fsize=10", "--", "tar2sqfs", "x"]
    import subprocess

    done = subprocess.run(limited(["sh", "-c", "while :; do :; done"], cpu=1), timeout=20)
    assert done.returncode == -24  # SIGXCPU: a spinning tool dies on its own
