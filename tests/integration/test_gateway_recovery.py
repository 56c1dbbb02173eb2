"""What a killed gateway leaves behind, and who picks it up: the real gateway service, a real
registry and munged, records and partial files written the way a dead process leaves them.
Also gateways sharing one store: two adopting one killed pull (the lease), and two
completions of one image at once (the per-image lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_registry import (
    GatewayProcess,
    Munged,
    Registry,
    StallingProxy,
    bound_credential,
    gateway_config,
    have,
    metric,
    munged_and_registry,
    wait_for,
)

from gateway.publish import host_key
from gateway.store.sqlite import SqliteStore
from localcluster import oci

missing = have("munged", "docker-registry", "tar2sqfs")
pytestmark = pytest.mark.skipif(missing is not None, reason=f"needs {missing}")


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Munged, Registry]]:
    with munged_and_registry(tmp_path_factory.mktemp("recovery")) as services:
        for tag in ("v1", "v2", "v3"):
            layer = oci.tar_bytes([oci.file("bin/hello", f"hello {tag}\n".encode(), 0o755)])
            oci.push_image(services[2].url, "test/small", tag, [oci.gzip_bytes(layer)], oci.image_config([layer]))
        yield services


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


def _status(gw: GatewayProcess, rid: str, db: Path | None = None) -> str | None:
    store = SqliteStore(str(db or gw.root / "gateway.db"))
    try:
        rec = store.get(rid)
        return None if rec is None else rec["status"]
    finally:
        store.close()


def _wait_settled(gw: GatewayProcess, rid: str, timeout: float, db: Path | None = None) -> str | None:
    deadline = time.monotonic() + timeout
    while (status := _status(gw, rid, db)) not in ("READY", "FAILURE", None):
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


# -- two gateways taking over one killed pull ------------------------------------------------------


# nanosleep and clock_nanosleep, by architecture (/proc/<pid>/syscall shows the number)
SLEEP_CALLS = {"x86_64": ("35", "230"), "aarch64": ("101", "115")}.get(os.uname().machine)


def _waiting_for_the_store(pid: int) -> bool:
    """The main thread sleeps in SQLite's busy handler (nanosleep/clock_nanosleep): this
    gateway has read the store and waits for the write lock the test holds."""
    try:
        call = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return bool(call) and call[0] in (SLEEP_CALLS or ())


@pytest.mark.skipif(SLEEP_CALLS is None, reason="sleep system call numbers known for x86_64 and aarch64 only")
def test_two_gateways_restarting_together_adopt_a_killed_pull_once(services: tuple[Path, Munged, Registry]) -> None:
    """A gateway is killed (SIGKILL) mid-download; its restart and a second gateway sharing
    the store, the cache, the expand tree and the imageDir start together and both find the
    dead owner's record. The test holds the store's write lock while they start, so both have
    read the record before either may write: only the compare-and-set on the owner (the
    lease) lets exactly one adopt it. The image is converted once and nothing partial stays."""
    root, munged, registry = services
    shared = root / "takeover"
    for sub in ("cache", "expand", "images"):
        (shared / sub).mkdir(parents=True)
    layer = oci.tar_bytes([oci.file("data.bin", os.urandom(1 << 20))])
    blob = oci.gzip_bytes(layer)
    oci.push_image(registry.url, "test/takeover", "v1", [blob], oci.image_config([layer]))
    proxy = StallingProxy(registry.url, "sha256:" + hashlib.sha256(blob).hexdigest())
    db = shared / "gateway.db"

    def gateway(name: str, url: str) -> GatewayProcess:
        home = shared / name
        home.mkdir(exist_ok=True)
        config = gateway_config(home, registry, munged.socket, CacheDirectory=str(shared / "cache"),
                                ExpandDirectory=str(shared / "expand"), Store=f"sqlite:///{db}")
        config["Platforms"]["testsys"]["local"]["imageDir"] = str(shared / "images")
        config["Locations"][registry.addr]["url"] = url
        return GatewayProcess(home, config)

    first = gateway("a", proxy.url).start()
    restarted, second = gateway("a", registry.url), gateway("b", registry.url)
    lock = None
    try:
        status, doc = _api(first, munged, "POST", "pull", "test/takeover:v1")
        assert status == 200 and doc["status"] in ("PENDING", "PULLING"), doc
        assert proxy.stalled.wait(60), "the first gateway never asked for the layer"
        store = SqliteStore(str(db))
        try:
            (rid,) = [r["_id"] for r in store.find(pulltag="test/takeover:v1")]
        finally:
            store.close()
        blobs = shared / "cache" / "blobs" / "sha256"
        wait_for("a partial download", lambda: any(".partial-" in p.name for p in blobs.iterdir()))
        killed = first.proc.pid
        first.kill()
        assert _status(first, rid, db) in ("PULLING", "CONVERSION")  # killed mid-download
        assert [p.name for p in (shared / "expand").iterdir()] == [f"job-{rid}"]

        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        restarted.launch()
        second.launch()
        pids = [restarted.proc.pid, second.proc.pid]
        deadline = time.monotonic() + 25  # within SQLite's 30 s busy timeout
        steady = 0
        while steady < 10:
            assert time.monotonic() < deadline, "the gateways never reached the store"
            steady = steady + 1 if all(_waiting_for_the_store(p) for p in pids) else 0
            time.sleep(0.02)
        lock.execute("ROLLBACK")
        lock.close()
        lock = None
        restarted.wait_up()
        second.wait_up()
        assert _wait_settled(restarted, rid, 120, db) == "READY"

        logs = [(gw.root / "gateway.log").read_text(errors="replace") for gw in (restarted, second)]
        adopted = [log.count(f"record {rid} (test/takeover:v1) left by a dead gateway: re-queued") for log in logs]
        assert sorted(adopted) == [0, 1], adopted
        store = SqliteStore(str(db))
        try:
            records = store.find(pulltag="test/takeover:v1")
        finally:
            store.close()
        assert [(r["_id"], r["status"]) for r in records] == [(rid, "READY")], records
        image_id = records[0]["id"]
        assert records[0]["owner"]["pid"] in pids and records[0]["owner"]["pid"] != killed
        assert records[0]["attempts"] == 2
        conversions = sum(metric(gw, "shifter_gateway_conversion_seconds_count") for gw in (restarted, second))
        assert conversions == 1
        assert sorted(p.name for p in (shared / "images").iterdir()) == [f"{image_id}.meta", f"{image_id}.squashfs"]
        assert not [p.name for p in blobs.iterdir() if ".partial-" in p.name]
        assert not [p.name for p in (shared / "expand").iterdir() if p.name.startswith("job-")]
    finally:
        if lock is not None:
            lock.close()
        for gw in (first, restarted, second):
            gw.stop()
        proxy.stop()


BARRIER_EXAMINER = """#!/bin/sh
# lines two pulls up before they publish: each announces itself, then waits for the test
touch {dir}/arrived.$$
n=0
while [ ! -e {dir}/release ]; do
    sleep 0.005
    n=$((n + 1))
    [ $n -lt 12000 ] || exit 3
done
"""


@pytest.mark.skipif(have("squashfuse") is not None, reason="needs squashfuse (the examiner's mount)")
def test_concurrent_completions_of_two_tags_of_one_image_make_one_ready_record(
        services: tuple[Path, Munged, Registry]) -> None:
    """Two tags with the same manifest, pulled at once by one gateway with two workers. Its
    examiner (a script of the test's) holds both pulls until both have built the image, then
    lets them publish at the same moment: under the per-image lock the second completion
    finds the first's READY record and adds its tag there. Then expiring one tag never leaves
    a READY record without its files, nor files no READY record uses."""
    top, munged, registry = services
    root = top / "same-image"
    barrier = root / "barrier"
    barrier.mkdir(parents=True)
    examiner = root / "examiner.sh"
    examiner.write_text(BARRIER_EXAMINER.format(dir=barrier))
    examiner.chmod(0o755)
    layer = oci.tar_bytes([oci.directory("bin"), oci.file("bin/hello", b"twins\n", 0o755),
                           oci.file("data.bin", os.urandom(24 << 20))])
    blob = oci.gzip_bytes(layer)
    for tag in ("one", "two"):
        oci.push_image(registry.url, "twins/app", tag, [blob], oci.image_config([layer]))
    gw = GatewayProcess(root, gateway_config(root, registry, munged.socket, WorkerThreads=2,
                                             examiner=str(examiner))).start()
    tags = [f"{registry.addr}/twins/app:{t}" for t in ("one", "two")]
    try:
        for tag in tags:  # both start; neither is done before the other has built
            status, doc = _api(gw, munged, "POST", "pull", tag)
            assert status == 200 and doc["status"] in ("PENDING", "PULLING"), doc
        deadline = time.monotonic() + 120
        while len(list(barrier.glob("arrived.*"))) < 2:
            assert time.monotonic() < deadline, "the examiner did not see both pulls"
            time.sleep(0.02)
        (barrier / "release").touch()
        done = [_settled_pull(gw, munged, tag) for tag in tags]
        assert [d["status"] for d in done] == ["READY", "READY"], done
        image_id = done[0]["id"]
        assert done[1]["id"] == image_id

        db = sqlite3.connect(root / "gateway.db")
        try:
            ready = db.execute("SELECT doc FROM images WHERE image_id = ? AND status = 'READY'",
                               (image_id,)).fetchall()
        finally:
            db.close()
        assert len(ready) == 1, [json.loads(r[0])["tag"] for r in ready]
        assert sorted(json.loads(ready[0][0])["tag"]) == sorted(tags)

        assert _api(gw, munged, "GET", "expire", tags[0])[0] == 200
        deadline = time.monotonic() + 30
        while _api(gw, munged, "GET", "lookup", tags[0])[0] != 404:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        db = sqlite3.connect(root / "gateway.db")
        try:
            while db.execute("SELECT count(*) FROM images WHERE status = 'EXPIRING'").fetchone()[0]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            still = {r[0] for r in db.execute("SELECT image_id FROM images WHERE status = 'READY'")}
        finally:
            db.close()
        published = {p.name.split(".")[0] for p in (root / "images").iterdir()}
        assert published == still  # files exactly for the ids READY records use
        for image in still:
            assert (root / "images" / f"{image}.squashfs").exists() and (root / "images" / f"{image}.meta").exists()
    finally:
        gw.stop()


def _api(gw: GatewayProcess, munged: Munged, method: str, route: str, tag: str) -> tuple[int, Any]:
    """One request to a docker tag's route as root, with a credential bound to it."""
    port = int(gw.url.rsplit(":", 1)[1])
    path = f"/api/{route}/testsys/docker/{tag.replace('/', '%2F')}/"
    cred = bound_credential(munged.socket, method, path, b"", f"127.0.0.1:{port}")
    request = urllib.request.Request(gw.url + path, method=method, headers={"authentication": cred})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _settled_pull(gw: GatewayProcess, munged: Munged, tag: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, doc = _api(gw, munged, "POST", "pull", tag)
        assert status == 200, doc
        if doc["status"] in ("READY", "FAILURE"):
            return doc
        assert time.monotonic() < deadline, doc
        time.sleep(0.05)


NICE_EXAMINER = """#!/bin/sh
# records the CPU priority the gateway gave the pull that runs it
cut -d' ' -f19 /proc/$$/stat > {out}
"""


@pytest.mark.skipif(have("squashfuse") is not None, reason="needs squashfuse (the examiner's mount)")
def test_pulls_run_at_a_lower_cpu_priority_than_the_api(services: tuple[Path, Munged, Registry]) -> None:
    """A pull's tools (here the examiner, a script of the test's) run PULL_NICENESS below the process
    that answers lookups, so a conversion on a small gateway host does not slow job submission."""
    from gateway.context import PULL_NICENESS

    top, munged, registry = services
    root = top / "niceness"
    root.mkdir()
    out = root / "examiner-nice"
    examiner = root / "examiner.sh"
    examiner.write_text(NICE_EXAMINER.format(out=out))
    examiner.chmod(0o755)
    layer = oci.tar_bytes([oci.directory("bin"), oci.file("bin/hello", b"nice\n", 0o755)])
    oci.push_image(registry.url, "nice/app", "v1", [oci.gzip_bytes(layer)], oci.image_config([layer]))
    gw = GatewayProcess(root, gateway_config(root, registry, munged.socket, examiner=str(examiner))).start()
    try:
        tag = f"{registry.addr}/nice/app:v1"
        assert _api(gw, munged, "POST", "pull", tag)[0] == 200
        assert _settled_pull(gw, munged, tag)["status"] == "READY"
        api_nice = int(Path(f"/proc/{gw.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert int(out.read_text()) == min(19, api_nice + PULL_NICENESS)
    finally:
        gw.stop()
