"""What a killed gateway leaves behind, and who picks it up: the real gateway service, a real
registry and munged, records and partial files written the way a dead process leaves them.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_registry import GatewayProcess, Munged, Registry, gateway_config, have

from gateway.publish import host_key
from gateway.store import SqliteStore
from localcluster import oci

missing = have("munged", "docker-registry", "tar2sqfs")
pytestmark = pytest.mark.skipif(missing is not None, reason=f"needs {missing}")


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Munged, Registry]]:
    root = tmp_path_factory.mktemp("recovery")
    munged = Munged().start()
    registry = Registry(root).start()
    try:
        for tag in ("v1", "v2", "v3"):
            layer = oci.tar_bytes([oci.file("bin/hello", f"hello {tag}\n".encode(), 0o755)])
            oci.push_image(registry.url, "test/small", tag, [oci.gzip_bytes(layer)], oci.image_config([layer]))
        yield root, munged, registry
    finally:
        registry.stop()
        munged.stop()


def _gateway(services: tuple[Path, Munged, Registry], name: str) -> GatewayProcess:
    root, munged, registry = services
    home = root / name
    home.mkdir()
    return GatewayProcess(home, gateway_config(home, registry, munged.socket))


def _zombie() -> tuple[subprocess.Popen[bytes], dict]:
    """A child that has exited and is not reaped: its /proc entry stays, state Z, same start time."""
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while True:
        fields = Path(f"/proc/{child.pid}/stat").read_bytes().rsplit(b")", 1)[-1].split()
        if fields[0] == b"Z":
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return child, {"host": os.uname().nodename, "pid": child.pid, "start": fields[19].decode()}


def _in_flight(gw: GatewayProcess, registry: Registry, tag: str, owner: dict) -> str:
    store = SqliteStore(str(gw.root / "gateway.db"))
    try:
        rec, inserted = store.claim({
            "system": "testsys", "itype": "docker", "pulltag": f"{registry.addr}/test/small:{tag}", "tag": [],
            "status": "PULLING", "userACL": [], "groupACL": [], "owner": owner, "attempts": 1,
            "last_pull": time.time(), "last_heartbeat": time.time(), "lease_until": time.time() + 90,
            "requester": {"user": "root", "uid": 0, "gid": 0},
        })
        assert inserted
        return rec["_id"]
    finally:
        store.close()


def _status(gw: GatewayProcess, rid: str) -> str | None:
    store = SqliteStore(str(gw.root / "gateway.db"))
    try:
        rec = store.get(rid)
        return None if rec is None else rec["status"]
    finally:
        store.close()


def _wait_settled(gw: GatewayProcess, rid: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while (status := _status(gw, rid)) not in ("READY", "FAILURE", None):
        if time.monotonic() > deadline:
            return status
        time.sleep(0.2)
    return status


def test_a_zombie_owner_is_dead_at_start_up(services: tuple[Path, Munged, Registry]) -> None:
    gw = _gateway(services, "zombie-start")
    (gw.root / "cache").mkdir(exist_ok=True)
    child, owner = _zombie()
    try:
        rid = _in_flight(gw, services[2], "v1", owner)
        gw.start()
        assert _wait_settled(gw, rid, 60) == "READY"  # re-queued and pulled, no client asked
    finally:
        gw.stop()
        child.wait()


def test_the_housekeeper_adopts_records_of_owners_that_die_later(services: tuple[Path, Munged, Registry]) -> None:
    gw = _gateway(services, "zombie-later").start()
    child, owner = _zombie()
    try:
        rid = _in_flight(gw, services[2], "v2", owner)
        assert _wait_settled(gw, rid, 75) == "READY"  # the housekeeper looks every 30 s
    finally:
        gw.stop()
        child.wait()


def test_start_up_removes_partial_files_of_dead_writers_only(services: tuple[Path, Munged, Registry]) -> None:
    gw = _gateway(services, "partials")
    images = gw.root / "images"
    blobs = gw.root / "cache" / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    image_id = "ab" * 32
    dead = 2**22 - 1
    left = [
        images / f".{image_id}.squashfs.partial-h{host_key()}p{dead}-x1y2z3",
        images / f".{image_id}.meta.partial-h{host_key()}p{dead}-a1b2c3",
        blobs / f".{'cd' * 32}.partial-q9w8e7",
    ]
    live = images / f".{image_id}.squashfs.partial-h{host_key()}p{os.getpid()}-k1l2m3"
    unrelated = images / ".admin-notes"
    for path in [*left, live, unrelated]:
        path.write_bytes(b"x" * 4096)
    gw.start()
    try:
        assert [p.name for p in left if p.exists()] == []
        assert live.exists() and unrelated.exists()  # a live writer's file, and nothing of ours
    finally:
        gw.stop()
