"""Two gateway processes on one MongoDB store and one image directory, as two gateway hosts
would run (each with its own cache and scratch directory): real gateways, a real registry, a
real munged and a real MongoDB-wire server (tests/fixtures_mongo.py), no Slurm needed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
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
    run_shifterimg,
    wait_for,
)

from gateway.store.base import INFLIGHT
from localcluster import oci
from shifter.client.gatewayclient import GatewayClient
from shifter.formats.imageref import ImageRef

missing = have("munged", "docker-registry", "tar2sqfs")
pytestmark = pytest.mark.skipif(missing is not None, reason=f"needs {missing}")


class Pair:
    def __init__(self, root: Path, munged: Munged, registry: Registry, gateways: list[GatewayProcess], db: Any):
        self.root = root
        self.munged = munged
        self.registry = registry
        self.gateways = gateways
        self.db = db

    def request(self, gw: GatewayProcess, method: str, path: str) -> tuple[int, bytes]:
        address = gw.url.removeprefix("http://")
        host, port = address.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(method, path, headers={"authentication": bound_credential(
                self.munged.socket, method, path, b"", address)})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def pull_until_done(self, gw: GatewayProcess, tag: str, timeout: float = 180) -> dict[str, Any]:
        path = f"/api/pull/testsys/docker/{tag}/"
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.request(gw, "POST", path)
            rec = json.loads(body)
            assert status == 200, rec
            if rec["status"] in ("READY", "FAILURE"):
                return rec
            assert time.monotonic() < deadline, rec
            time.sleep(0.05)

    def conversions(self) -> int:
        total = 0
        for gw in self.gateways:
            _status, body = self.request(gw, "GET", "/metrics")
            line = next(ln for ln in body.decode().splitlines()
                        if ln.startswith("shifter_gateway_conversion_seconds_count"))
            total += int(float(line.split()[-1]))
        return total


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Munged, Registry]]:
    """munged and a registry for the module; each test's gateways are its own."""
    with munged_and_registry(tmp_path_factory.mktemp("two-gateways")) as services:
        yield services


def two_gateways(services: tuple[Path, Munged, Registry], name: str, mongo_uri: str, dbname: str,
                 hosts: tuple[str, str] | None = None, first: dict[str, Any] | None = None,
                 first_env: dict[str, str] | None = None) -> list[GatewayProcess]:
    """Two gateways (not started) on one database and one imageDir, each with its own cache and
    scratch directory as on two hosts; ``hosts`` gives them host names of their own (root only),
    ``first``/``first_env`` change the first one's config and environment."""
    top, munged, registry = services
    root = top / name
    (root / "images").mkdir(parents=True)
    gateways = []
    for i, gw_name in enumerate(("gw-a", "gw-b")):
        own = root / gw_name
        own.mkdir()
        config = gateway_config(own, registry, munged.socket, Store="mongodb", MongoDBURI=mongo_uri, MongoDB=dbname)
        config["Platforms"]["testsys"]["local"]["imageDir"] = str(root / "images")
        if i == 0 and first:
            config.update(first)
        gateways.append(GatewayProcess(own, config, hostname=hosts[i] if hosts else None,
                                       env=first_env if i == 0 else None))
    return gateways


@pytest.fixture(scope="module")
def pair(services: tuple[Path, Munged, Registry], mongo_uri: str) -> Iterator[Pair]:
    top, munged, registry = services
    dbname = f"Shifter_{uuid.uuid4().hex[:8]}"
    client: pymongo.MongoClient = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    gateways = two_gateways(services, "pair", mongo_uri, dbname)
    try:
        for gw in gateways:
            gw.start()
        yield Pair(top / "pair", munged, registry, gateways, client[dbname])
    finally:
        for gw in gateways:
            gw.stop()
        client.drop_database(dbname)
        client.close()


def test_concurrent_first_pulls_over_two_gateways_make_one_image(pair: Pair) -> None:
    layer = oci.tar_bytes([oci.file("data/blob.bin", os.urandom(3 << 20))])
    oci.push_image(pair.registry.url, "test/shared", "v1", [oci.gzip_bytes(layer)], oci.image_config([layer]))
    before = pair.registry.blob_gets("test/shared")
    conversions = pair.conversions()
    records: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(20)

    def one(i: int) -> None:
        try:
            barrier.wait()
            records.append(pair.pull_until_done(pair.gateways[i % 2], "test%2Fshared%3Av1"))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors[0]
    assert len(records) == 20
    assert {r["status"] for r in records} == {"READY"}
    assert len({r["id"] for r in records}) == 1
    # the config blob and the layer blob fetched once each, one conversion, one record
    assert pair.registry.blob_gets("test/shared") - before == 2
    assert pair.conversions() - conversions == 1
    assert pair.db.images.count_documents({"pulltag": "test/shared:v1"}) == 1
    image_id = records[0]["id"]
    assert sorted(os.listdir(pair.root / "images")) == sorted([f"{image_id}.squashfs", f"{image_id}.meta"])
    # and each gateway answers lookups for it
    for gw in pair.gateways:
        status, body = pair.request(gw, "GET", "/api/lookup/testsys/docker/test%2Fshared%3Av1/")
        assert status == 200 and json.loads(body)["id"] == image_id


def test_tags_of_one_image_finishing_on_both_gateways_share_one_record(pair: Pair) -> None:
    """Different tags naming one image, pulled at once through both gateways: the image id's
    lock is the store's, so one READY record of the id ends up with every tag."""
    layer = oci.tar_bytes([oci.file("data/same.bin", os.urandom(1 << 20))])
    tags = [f"v{i}" for i in range(8)]
    for tag in tags:
        oci.push_image(pair.registry.url, "test/same", tag, [oci.gzip_bytes(layer)], oci.image_config([layer]))
    records: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(tags))

    def one(i: int) -> None:
        try:
            barrier.wait()
            records.append(pair.pull_until_done(pair.gateways[i % 2], f"test%2Fsame%3A{tags[i]}"))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(tags))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors[0]
    assert {r["status"] for r in records} == {"READY"}
    ids = {r["id"] for r in records}
    assert len(ids) == 1
    ready = list(pair.db.images.find({"id": ids.pop(), "status": "READY"}))
    assert len(ready) == 1, [(r["_id"], r["tag"]) for r in ready]
    assert sorted(ready[0]["tag"]) == sorted(f"test/same:{t}" for t in tags)


# -- failures: a gateway killed mid-pull, a gateway down for the clients, the database killed -------

HOSTS = ("gw-host-a", "gw-host-b")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: each gateway gets a host name of its own")
# a tar2sqfs that never converts: it says it started, then waits until the gateway that ran it is gone
STALLED_TAR2SQFS = """#!/bin/sh
touch {dir}/converting
while kill -0 $PPID 2>/dev/null; do sleep 0.1; done
exit 1
"""


def _push(registry: Registry, repo: str, name: str, size: int = 1 << 20) -> bytes:
    """A one-layer image of random bytes; returns its compressed layer."""
    layer = oci.tar_bytes([oci.file(f"data/{name}.bin", os.urandom(size))])
    blob = oci.gzip_bytes(layer)
    oci.push_image(registry.url, repo, "v1", [blob], oci.image_config([layer]))
    return blob


def _visible_images_are_whole(images: Path) -> None:
    """Publication writes ``.meta`` last: every image with a ``.meta`` has its whole squashfs."""
    names = set(os.listdir(images))
    for name in names:
        if name.endswith(".meta") and not name.startswith("."):
            image_id = name.removesuffix(".meta")
            assert f"{image_id}.squashfs" in names, sorted(names)
            assert (images / f"{image_id}.squashfs").read_bytes()[:4] == b"hsqs"


@needs_root
def test_pulls_of_a_killed_gateway_are_taken_over_by_the_other_when_their_lease_runs_out(
        services: tuple[Path, Munged, Registry], mongo_uri: str) -> None:
    """Gateway A (host a) runs two pulls, one stalled mid-download, one mid-conversion, and is
    killed (SIGKILL). Gateway B (host b) cannot see A's processes: it takes both records over
    by the store's lease once it has run out (LEASE_SECONDS after A's last heartbeat, found
    within RECLAIM_SECONDS), finishes them, and no half image is visible meanwhile. A restarted
    afterwards runs neither a second time."""
    from gateway.context import LEASE_SECONDS, RECLAIM_SECONDS

    top, munged, registry = services
    root = top / "takeover"
    stall = root / "stall"
    stall.mkdir(parents=True)
    (stall / "tar2sqfs").write_text(STALLED_TAR2SQFS.format(dir=stall))
    (stall / "tar2sqfs").chmod(0o755)
    downloading = _push(registry, "test/dl", "dl")
    _push(registry, "test/conv", "conv")
    proxy = StallingProxy(registry.url, "sha256:" + hashlib.sha256(downloading).hexdigest())
    dbname = f"Shifter_{uuid.uuid4().hex[:8]}"
    client: pymongo.MongoClient = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    images = client[dbname].images
    locations = {registry.addr: {"remotetype": "dockerv2", "url": proxy.url, "authMethod": "token"}}
    a, b = two_gateways(services, "takeover", mongo_uri, dbname, HOSTS, first={"Locations": locations},
                        first_env={"PATH": f"{stall}:{os.environ['PATH']}"})
    restarted = None
    try:
        a.start()
        b.start()
        pair = Pair(root, munged, registry, [a, b], client[dbname])
        for tag in ("test%2Fdl%3Av1", "test%2Fconv%3Av1"):
            status, body = pair.request(a, "POST", f"/api/pull/testsys/docker/{tag}/")
            assert status == 200, body
        assert proxy.stalled.wait(60), "gateway A never asked for the layer"
        wait_for("a conversion on gateway A", lambda: (stall / "converting").exists(), 60)
        wait_for("both records in their phase", lambda: {
            r["pulltag"]: r["status"] for r in images.find({}, {"pulltag": 1, "status": 1})
        } == {"test/dl:v1": "PULLING", "test/conv:v1": "CONVERSION"}, 30)
        leases = {r["_id"]: r["lease_until"] for r in images.find({})}
        assert {r["owner"]["host"] for r in images.find({})} == {HOSTS[0]}
        a.kill()
        killed = time.time()

        adopted: dict[Any, float] = {}
        deadline = killed + LEASE_SECONDS + RECLAIM_SECONDS + 90
        while True:
            records = list(images.find({}))
            for rec in records:
                if rec["owner"]["host"] == HOSTS[1] and rec["_id"] not in adopted:
                    adopted[rec["_id"]] = time.time()
            _visible_images_are_whole(root / "images")
            for rec in records:  # a lookup never answers with an image before it is whole
                tag = urllib.parse.quote(rec["pulltag"], safe="")
                status, body = pair.request(b, "GET", f"/api/lookup/testsys/docker/{tag}/")
                assert status in (200, 404), body
                if status == 200:
                    _visible_images_are_whole(root / "images")
                    assert (root / "images" / f"{json.loads(body)['id']}.meta").exists()
            if all(r["status"] == "READY" for r in records):
                break
            assert {r["status"] for r in records} <= INFLIGHT | {"READY"}, records
            assert time.time() < deadline, [(r["pulltag"], r["status"], r["owner"]) for r in records]
            time.sleep(0.5)

        for rid, when in adopted.items():
            assert when >= leases[rid] - 1, "taken over while the lease of the killed gateway ran"
            assert when - killed <= LEASE_SECONDS + RECLAIM_SECONDS + 5, when - killed
        assert len(adopted) == 2
        records = list(images.find({}))
        assert [(r["status"], r["attempts"], r["owner"]["host"]) for r in records] == [("READY", 2, HOSTS[1])] * 2
        assert metric(b, "shifter_gateway_conversion_seconds_count") == 2
        ids = sorted(r["id"] for r in records)
        assert sorted(os.listdir(root / "images")) == sorted(f"{i}.{ext}" for i in ids for ext in ("meta", "squashfs"))

        # the killed gateway comes back (the proxy and the stalled converter gone): nothing runs again
        log_before = (a.root / "gateway.log").read_text(errors="replace")
        gets = registry.blob_gets("test/dl") + registry.blob_gets("test/conv")
        config = dict(a.config)
        config["Locations"] = {registry.addr: {"remotetype": "dockerv2", "url": registry.url, "authMethod": "token"}}
        restarted = GatewayProcess(a.root, config, hostname=HOSTS[0]).start()
        time.sleep(RECLAIM_SECONDS / 6)
        assert (a.root / "gateway.log").read_text(errors="replace")[len(log_before):].count("re-queued") == 0
        assert metric(restarted, "shifter_gateway_conversion_seconds_count") == 0
        assert registry.blob_gets("test/dl") + registry.blob_gets("test/conv") == gets
        assert [(r["_id"], r["status"], r["attempts"]) for r in images.find({})] == [
            (r["_id"], "READY", 2) for r in records]
        assert not [p.name for p in (a.root / "expand").iterdir() if p.name.startswith("job-")]
    finally:
        for gw in (a, b, restarted):
            if gw is not None:
                gw.stop()
        proxy.stop()
        client.drop_database(dbname)
        client.close()


@needs_root
def test_database_killed_during_a_pull_ends_it_failure_and_both_gateways_recover(
        services: tuple[Path, Munged, Registry], tmp_path: Path) -> None:
    """The database server is killed (SIGKILL) while gateway A is mid-download. Meanwhile
    both gateways answer 503 with a clear line, never 500, and nothing hangs; A's pull ends
    FAILURE naming the store as soon as the server is back (same storage), not a record left
    in flight; then a new pull through B and lookups through both work."""
    from fixtures_mongo import SecantusServer

    top, munged, registry = services
    root = top / "dbkill"
    blob = _push(registry, "test/dbkill", "dbkill")
    proxy = StallingProxy(registry.url, "sha256:" + hashlib.sha256(blob).hexdigest())
    server = SecantusServer(tmp_path / "mongo", extra=("--sync-on-commit",)).start()
    dbname = "Shifter"
    locations = {registry.addr: {"remotetype": "dockerv2", "url": proxy.url, "authMethod": "token"}}
    a, b = two_gateways(services, "dbkill", server.uri, dbname, HOSTS, first={"Locations": locations})
    client: pymongo.MongoClient = pymongo.MongoClient(server.uri, serverSelectionTimeoutMS=5000)
    try:
        a.start()
        b.start()
        pair = Pair(root, munged, registry, [a, b], client[dbname])
        path = "/api/pull/testsys/docker/test%2Fdbkill%3Av1/"
        status, body = pair.request(a, "POST", path)
        assert status == 200 and json.loads(body)["status"] in ("PENDING", "PULLING"), body
        assert proxy.stalled.wait(60), "gateway A never asked for the layer"
        (rid,) = [r["_id"] for r in client[dbname].images.find({})]

        server.kill()
        for gw in (a, b):
            for method, route in (("GET", "/api/lookup/testsys/docker/test%2Fdbkill%3Av1/"), ("POST", path),
                                  ("GET", "/api/list/testsys/")):
                started = time.monotonic()
                status, body = pair.request(gw, method, route)
                assert status == 503, (gw.url, route, status, body)
                assert json.loads(body)["error"].startswith("store unavailable: "), body
                assert time.monotonic() - started < 15, route
        time.sleep(8)  # A's worker finds the store gone while it reports progress

        server.start()
        deadline = time.monotonic() + 60
        while (rec := client[dbname].images.find_one({"_id": rid}))["status"] in INFLIGHT:
            assert time.monotonic() < deadline, rec
            time.sleep(0.5)
        assert rec["status"] == "FAILURE", rec
        assert rec["status_message"].startswith("store unavailable: ") and "try again" in rec["status_message"], rec
        assert client[dbname].images.count_documents({"status": {"$in": sorted(INFLIGHT)}}) == 0

        time.sleep(3.5)  # the FAILURE stays visible for 3 s, then a pull starts again
        done = pair.pull_until_done(b, "test%2Fdbkill%3Av1", timeout=120)
        assert done["status"] == "READY", done
        for gw in (a, b):
            status, body = pair.request(gw, "GET", "/api/lookup/testsys/docker/test%2Fdbkill%3Av1/")
            assert status == 200 and json.loads(body)["id"] == done["id"], body
        for gw in (a, b):
            log = (gw.root / "gateway.log").read_text(errors="replace")
            assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    finally:
        proxy.stop()
        for gw in (a, b):
            gw.stop()
        client.close()
        server.stop()


GATEWAY_TIMEOUT = 3  # udiRoot.conf gatewayTimeout for the client tests: a frozen gateway costs this, once


def _udiroot_conf(path: Path, gateways: list[GatewayProcess], images: Path) -> Path:
    """A site's udiRoot.conf listing both gateways (root-owned, as shifterimg requires)."""
    path.write_text(
        "system=testsys\n"
        f"imageGateway={' '.join(gw.url for gw in gateways)}\n"
        "imageGatewayUser=root\n"
        f"gatewayTimeout={GATEWAY_TIMEOUT}\n"
        "udiMount=/var/udiMount\nloopMount=/var/udiLoopMount\n"
        f"imagePath={images}\nudiRootPath=/usr/local\netcPath=/usr/local/etc\nrootfsType=tmpfs\n"
    )
    os.chmod(path, 0o644)
    return path


def _through_the_other(conf: Path, munged: Munged, down: GatewayProcess, up: GatewayProcess, reason: str,
                       args: list[str], budget: float) -> subprocess.CompletedProcess[str]:
    """Run ``shifterimg ARGS`` until it has met the gateway that is down first (the client
    shuffles the list): each run succeeds within ``budget`` seconds and names that gateway
    on one stderr line, or not at all when it asked the live one first."""
    line = f"shifterimg: image gateway {down.url} did not answer ({reason}); used {up.url}"
    for _ in range(16):
        started = time.monotonic()
        result = run_shifterimg(conf, munged.socket, *args, home=conf.parent)
        took = time.monotonic() - started
        assert result.returncode == 0, (args, result.stderr)
        assert took < budget, (args, took)
        lines = result.stderr.splitlines()
        assert lines in ([], [line]), (args, lines)
        if lines:
            return result
    raise AssertionError(f"shifterimg {args} never asked {down.url} first in 16 runs")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: udiRoot.conf must be root-owned")
def test_clients_keep_working_through_the_other_gateway_when_one_is_frozen_or_stopped(
        services: tuple[Path, Munged, Registry], mongo_uri: str) -> None:
    """``imageGateway`` lists both; one is frozen (SIGSTOP: it accepts connections and never
    answers), then stopped. ``shifterimg pull/lookup/images`` (the real command) and the
    client library the submission hook and setupRoot use work through the other gateway,
    wait at most gatewayTimeout for the dead one, once per command, and name it on one line."""
    top, munged, registry = services
    root = top / "clients"
    dbname = f"Shifter_{uuid.uuid4().hex[:8]}"
    a, b = two_gateways(services, "clients", mongo_uri, dbname)
    for name in ("frozen", "stopped"):
        _push(registry, f"test/{name}", name, 64 << 10)
    frozen = False
    try:
        a.start()
        b.start()
        conf = _udiroot_conf(root / "udiRoot.conf", [a, b], root / "images")
        os.kill(b.proc.pid, signal.SIGSTOP)
        frozen = True
        for args, budget in ((["pull", "test/frozen:v1"], GATEWAY_TIMEOUT + 60),
                             (["lookup", "test/frozen:v1"], GATEWAY_TIMEOUT + 10),
                             (["images"], GATEWAY_TIMEOUT + 10)):
            result = _through_the_other(conf, munged, b, a, "timed out", args, budget)
        assert "test/frozen:v1" in result.stdout

        # the library the submission hook and setupRoot use: the frozen gateway listed first
        warned: list[str] = []
        client = GatewayClient([b.url, a.url], "testsys", GATEWAY_TIMEOUT, munge_socket=munged.socket,
                               shuffle=False, gateway_user=0, warn=warned.append)
        started = time.monotonic()
        image_id = client.lookup(ImageRef("docker", "test/frozen:v1"))["id"]
        assert GATEWAY_TIMEOUT - 0.5 < time.monotonic() - started < GATEWAY_TIMEOUT + 2
        started = time.monotonic()
        assert client.lookup(ImageRef("docker", "test/frozen:v1"))["id"] == image_id
        assert client.images()
        assert time.monotonic() - started < 1.5  # the frozen one is asked last from now on
        assert warned == [f"image gateway {b.url} did not answer (timed out); used {a.url}"]

        os.kill(b.proc.pid, signal.SIGCONT)
        frozen = False
        b.stop()
        for args, budget in ((["pull", "test/stopped:v1"], 60), (["lookup", "test/stopped:v1"], 10), (["images"], 10)):
            _through_the_other(conf, munged, b, a, "Connection refused", args, budget)
    finally:
        if frozen:
            os.kill(b.proc.pid, signal.SIGCONT)
        for gw in (a, b):
            gw.stop()
