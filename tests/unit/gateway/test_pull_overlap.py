"""The conversion starts on the top layer while the lower layers still download, and never
reads a layer before its digest matched.

A tiny registry on 127.0.0.1 in this process serves a 3-layer image; it can hold a layer's
answer back until the test releases it, or serve bytes that do not match the digest.  The
client, blob cache, flattener and tar2sqfs are real; the squashfs is read back with
``localcluster.oci.read_squashfs``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from gateway import pipeline
from localcluster.oci import file, gzip_bytes, read_squashfs, tar_bytes
from shifter.errors import ShifterError
from tests.unit.gateway.test_pull_bounds import serve_on_loopback

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """``test/img:latest`` with three layers; ``hold`` delays a layer until ``release``."""

    def __init__(self, layers: list[bytes]) -> None:
        self.layers = layers
        self.config = json.dumps({"architecture": "amd64", "os": "linux", "config": {}}).encode()
        self.hold: set[int] = set()          # layer numbers (1-based) whose answer waits
        self.release = threading.Event()
        self.held_too_long = False
        self.corrupt: set[int] = set()       # layer numbers served with other bytes
        self.served: list[int] = []          # layer numbers in the order their answers finished
        self.server, self.url = serve_on_loopback(self.answer)

    def manifest(self) -> bytes:
        return json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": _digest(self.config), "size": len(self.config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": _digest(layer), "size": len(layer)} for layer in self.layers],
        }).encode()

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        number = 0
        if h.path.endswith("/manifests/latest"):
            body = self.manifest()
        elif h.path.endswith(_digest(self.config)):
            body = self.config
        else:
            numbers = [n for n, layer in enumerate(self.layers, 1) if h.path.endswith(_digest(layer))]
            if not numbers:
                h.send_response(404)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            number = numbers[0]
            body = self.layers[number - 1]
            if number in self.hold and not self.release.wait(10):
                self.held_too_long = True
            if number in self.corrupt:  # same length, other bytes: only the digest can tell
                body = bytes(len(body))
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        try:
            h.wfile.write(body)
        except OSError:
            pass  # the client gave up
        if number:
            self.served.append(number)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def registry() -> Iterator[Registry]:
    reg = Registry([gzip_bytes(tar_bytes([file("etc/base", b"bottom\n"), file("etc/shared", b"old\n")])),
                    gzip_bytes(tar_bytes([file("usr/middle", os.urandom(300 << 10))])),
                    gzip_bytes(tar_bytes([file("etc/shared", b"new\n"), file("top", b"top\n")]))])
    yield reg
    reg.close()


def _spec(reg: Registry, tmp_path: Path) -> pipeline.PullSpec:
    return pipeline.PullSpec(location=pipeline.Location(reg.url), repository="test/img",
                             reference="latest", credentials=None, cache_dir=str(tmp_path / "cache"),
                             expand_dir=str(tmp_path / "expand"), pull_deadline=60)


def test_conversion_starts_while_the_lower_layers_still_download(registry: Registry, tmp_path: Path) -> None:
    registry.hold = {1, 2}
    events: list[tuple[str, dict]] = []
    expand = tmp_path / "expand"
    stop = threading.Event()

    def release_once_converting() -> None:
        """The lower layers arrive only once the squashfs output exists (tar2sqfs started)."""
        while not stop.wait(0.01):
            if expand.is_dir() and any(p.suffix == ".squashfs" for p in expand.iterdir()):
                registry.release.set()
                return

    watcher = threading.Thread(target=release_once_converting, daemon=True)
    watcher.start()
    spec = _spec(registry, tmp_path)
    try:
        built = pipeline.build_image(spec, pipeline.resolve(spec), lambda *event: events.append(event))
    finally:
        stop.set()
        watcher.join()
    assert not registry.held_too_long, "the conversion waited for every layer before it started"
    assert registry.served[0] == 3  # the top layer first
    # progress keeps its order: downloads (all three counted last), then the conversion
    phases = [phase for phase, _ in events]
    assert phases[0] == "PULLING" and phases[-1] == "CONVERSION"
    assert [info for phase, info in events if phase == "PULLING"][-1]["layers_done"] == 3
    assert phases.index("CONVERSION") > max(i for i, p in enumerate(phases) if p == "PULLING")
    files = read_squashfs(built.squashfs_path)
    assert files["etc/shared"][1] == b"new\n"
    assert files["etc/base"][1] == b"bottom\n"
    assert len(files["usr/middle"][1]) == 300 << 10


def test_a_lower_layer_with_a_wrong_digest_fails_the_pull_and_leaves_no_image(
        registry: Registry, tmp_path: Path) -> None:
    # zeros instead of gzip: read by the flattener it would fail as bad compression, not on the digest
    registry.corrupt = {1}
    spec = _spec(registry, tmp_path)
    with pytest.raises(ShifterError, match=r"^layer sha256:[0-9a-f]+\.\. digest mismatch$"):
        pipeline.build_image(spec, pipeline.resolve(spec), lambda phase, info: None)
    expand = tmp_path / "expand"
    assert not expand.exists() or os.listdir(expand) == []
    cached = os.listdir(tmp_path / "cache" / "blobs" / "sha256")
    assert _digest(registry.layers[0])[7:] not in cached


def test_a_failed_top_layer_stops_the_pull_before_any_conversion(registry: Registry, tmp_path: Path) -> None:
    registry.corrupt = {3}
    phases: list[str] = []
    spec = _spec(registry, tmp_path)
    with pytest.raises(ShifterError, match=r"digest mismatch$"):
        pipeline.build_image(spec, pipeline.resolve(spec), lambda phase, info: phases.append(phase))
    assert "CONVERSION" not in phases
