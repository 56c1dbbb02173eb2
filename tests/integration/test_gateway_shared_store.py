"""Two gateway processes on one MongoDB store and one image directory, as two gateway hosts
would run (each with its own cache and scratch directory): real gateways, a real registry, a
real munged and a real MongoDB-wire server (tests/fixtures_mongo.py), no Slurm needed.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
from fixtures_registry import GatewayProcess, Munged, Registry, bound_credential, gateway_config, have

from localcluster import oci

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
def pair(tmp_path_factory: pytest.TempPathFactory, mongo_uri: str) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("two-gateways")
    os.chmod(root, 0o755)
    shared_images = root / "images"
    shared_images.mkdir()
    dbname = f"Shifter_{uuid.uuid4().hex[:8]}"
    client: pymongo.MongoClient = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    munged = Munged().start()
    registry = Registry(root).start()
    gateways: list[GatewayProcess] = []
    try:
        for name in ("gw-a", "gw-b"):
            own = root / name
            own.mkdir()
            config = gateway_config(own, registry, munged.socket, Store="mongodb", MongoDBURI=mongo_uri,
                                    MongoDB=dbname)
            config["Platforms"]["testsys"]["local"]["imageDir"] = str(shared_images)
            gateways.append(GatewayProcess(own, config).start())
        yield Pair(root, munged, registry, gateways, client[dbname])
    finally:
        for gw in gateways:
            gw.stop()
        registry.stop()
        munged.stop()
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
