"""One contract for every gateway store: SQLite, and MongoDB on a real MongoDB-wire server.

The MongoDB runs use ``secantusd-py`` (the test extra's ``secantusdb``, see tests/fixtures_mongo.py),
once presenting itself as a one-node replica set and once as a standalone ``mongod``: the store
must need neither transactions nor a replica set.  ``SHIFTER_TEST_MONGODB_URI`` points both at a
real MongoDB instead.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.store.base import INFLIGHT, Store
from gateway.store.mongo import MongoStore
from gateway.store.sqlite import SqliteStore
from shifter.errors import ShifterError


@pytest.fixture(params=["sqlite", "mongodb", "mongodb-standalone"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s: Store = SqliteStore(str(tmp_path / "store.db"))
        yield s
        s.close()
        return
    uri = request.getfixturevalue("mongo_standalone_uri" if request.param == "mongodb-standalone" else "mongo_uri")
    dbname = f"shifter_test_{uuid.uuid4().hex[:8]}"
    ms = MongoStore(uri, dbname)
    yield ms
    ms.client.drop_database(dbname)
    ms.close()


@pytest.fixture
def twin(store: Store) -> Iterator[Store]:
    """A second store object on the same database: another gateway process, or host."""
    other: Store = SqliteStore(store.path) if isinstance(store, SqliteStore) else MongoStore(
        store.uri, store.db.name  # type: ignore[attr-defined]
    )
    yield other
    other.close()


def pull_doc(tag: str = "ubuntu:22.04", system: str = "sys", status: str = "PENDING") -> dict:
    return {
        "system": system,
        "itype": "docker",
        "pulltag": tag,
        "tag": [],
        "status": status,
        "userACL": [],
        "groupACL": [],
        "last_pull": time.time(),
    }


def make_ready(store: Store, tag: str, image_id: str, system: str = "sys") -> dict:
    rec, inserted = store.claim(pull_doc(tag, system))
    assert inserted
    assert store.update(rec["_id"], {"status": "READY", "id": image_id})
    store.add_tag(rec["_id"], tag)
    return store.get(rec["_id"])  # type: ignore[return-value]


def test_claim_inserts_once_per_pulltag(store: Store) -> None:
    first, inserted = store.claim(pull_doc())
    assert inserted
    second, inserted2 = store.claim(pull_doc())
    assert not inserted2
    assert second["_id"] == first["_id"]
    other, inserted3 = store.claim(pull_doc(system="other"))
    assert inserted3 and other["_id"] != first["_id"]


def test_claim_is_atomic_under_contention(store: Store) -> None:
    barrier = threading.Barrier(16)

    def one(_: int) -> tuple[str, bool]:
        barrier.wait()
        rec, inserted = store.claim(pull_doc("race:1"))
        return rec["_id"], inserted

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert sum(1 for _, ins in results if ins) == 1
    assert len({rid for rid, _ in results}) == 1


def test_settled_record_frees_the_slot(store: Store) -> None:
    rec, _ = store.claim(pull_doc())
    assert store.find_inflight("sys", "docker", "ubuntu:22.04")["_id"] == rec["_id"]
    store.update(rec["_id"], {"status": "FAILURE"})
    assert store.find_inflight("sys", "docker", "ubuntu:22.04") is None
    again, inserted = store.claim(pull_doc())
    assert inserted and again["_id"] != rec["_id"]


def test_update_never_takes_an_occupied_inflight_slot(store: Store) -> None:
    first, _ = store.claim(pull_doc())
    store.update(first["_id"], {"status": "FAILURE"})
    second, inserted = store.claim(pull_doc())
    assert inserted
    assert not store.update(first["_id"], {"status": "PENDING"})  # the slot belongs to the second
    assert store.get(first["_id"])["status"] == "FAILURE"
    assert store.get(second["_id"])["status"] == "PENDING"


def test_claim_refuses_settled_records(store: Store) -> None:
    with pytest.raises(ValueError):
        store.claim(pull_doc(status="READY"))


def test_update_with_status_condition(store: Store) -> None:
    rec, _ = store.claim(pull_doc())
    assert not store.update(rec["_id"], {"status": "READY"}, only_if_status=["READY"])
    assert store.get(rec["_id"])["status"] == "PENDING"
    assert store.update(rec["_id"], {"status": "PULLING", "status_message": "x"}, only_if_status=INFLIGHT)
    got = store.get(rec["_id"])
    assert got["status"] == "PULLING" and got["status_message"] == "x"
    assert not store.update("no-such-id", {"status": "READY"})


def test_find_ready_by_tag_and_id(store: Store) -> None:
    rec = make_ready(store, "ubuntu:22.04", "a" * 64)
    assert store.find_ready("sys", "docker", "ubuntu:22.04")["_id"] == rec["_id"]
    assert store.find_ready("sys", "docker", "ubuntu:24.04") is None
    assert store.find_ready("other", "docker", "ubuntu:22.04") is None
    assert store.find_ready_by_image_id("sys", "a" * 64)["_id"] == rec["_id"]
    store.update(rec["_id"], {"status": "EXPIRED"})
    assert store.find_ready("sys", "docker", "ubuntu:22.04") is None


def test_add_tag_moves_a_tag_to_the_newest_image(store: Store) -> None:
    old = make_ready(store, "app:latest", "a" * 64)
    store.add_tag(old["_id"], "app:v1")
    new = make_ready(store, "app:latest", "b" * 64)
    assert store.find_ready("sys", "docker", "app:latest")["_id"] == new["_id"]
    assert store.get(old["_id"])["tag"] == ["app:v1"]
    assert store.get(new["_id"])["tag"] == ["app:latest"]
    store.add_tag(new["_id"], "app:latest")  # idempotent
    assert store.get(new["_id"])["tag"] == ["app:latest"]


def test_find_filters_and_delete(store: Store) -> None:
    make_ready(store, "a:1", "a" * 64)
    rec, _ = store.claim(pull_doc("b:1"))
    assert {r["pulltag"] for r in store.find(system="sys")} == {"a:1", "b:1"}
    assert [r["pulltag"] for r in store.find(statuses=["READY"])] == ["a:1"]
    assert [r["pulltag"] for r in store.find(pulltag="b:1", statuses=INFLIGHT)] == ["b:1"]
    assert store.find(statuses=[]) == []
    store.delete(rec["_id"])
    assert store.get(rec["_id"]) is None
    assert store.find_inflight("sys", "docker", "b:1") is None


def test_insert_settled_and_touch(store: Store) -> None:
    rec = store.insert({**pull_doc("imp:1", status="READY"), "id": "c" * 64})
    store.touch({rec["_id"]: 12345.5})
    assert store.get(rec["_id"])["expiration"] == 12345.5


def test_metrics_keep_order_and_limit(store: Store) -> None:
    store.add_metrics([{"system": "sys", "tag": f"t{i}", "time": float(i)} for i in range(5)])
    store.add_metrics([{"system": "other", "tag": "x", "time": 9.0}])
    docs = store.metrics("sys", 3)
    assert [d["tag"] for d in docs] == ["t2", "t3", "t4"]
    assert store.metrics("sys", 0) == []
    store.ping()


def test_sqlite_store_is_shared_between_processes(tmp_path: Path) -> None:
    """Two store objects (as two gateway processes would have) see one in-flight slot."""
    a = SqliteStore(str(tmp_path / "shared.db"))
    b = SqliteStore(str(tmp_path / "shared.db"))
    try:
        rec, inserted = a.claim(pull_doc("shared:1"))
        other, inserted2 = b.claim(pull_doc("shared:1"))
        assert inserted and not inserted2 and other["_id"] == rec["_id"]
    finally:
        a.close()
        b.close()


def test_update_with_expected_fields_is_a_compare_and_set(store: Store) -> None:
    rec, _ = store.claim({**pull_doc("lease:v1"), "owner": {"host": "h", "pid": 1, "start": "1"}})
    dead = {"host": "h", "pid": 1, "start": "1"}
    contenders = [{"host": "h", "pid": 100 + i, "start": "7"} for i in range(8)]

    def take(owner: dict) -> bool:
        return store.update(rec["_id"], {"owner": owner}, only_if_status=INFLIGHT, expect={"owner": dead})

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(take, contenders))
    assert won.count(True) == 1
    assert store.get(rec["_id"])["owner"] == contenders[won.index(True)]  # type: ignore[index]


def test_add_tag_never_moves_a_tag_another_owner_holds(store: Store) -> None:
    first = make_ready(store, "tool:v1", "a" * 64)
    assert store.add_tag(first["_id"], "tool:v1", "uid:1", {"private": False})
    rec, _ = store.claim(pull_doc("tool:v1"))
    assert store.update(rec["_id"], {"status": "READY", "id": "b" * 64})
    assert not store.add_tag(rec["_id"], "tool:v1", "uid:2")
    assert store.find_ready("sys", "docker", "tool:v1")["_id"] == first["_id"]  # type: ignore[index]
    assert store.add_tag(rec["_id"], "tool:v1", "uid:1")  # its owner may move it
    assert store.find_ready("sys", "docker", "tool:v1")["_id"] == rec["_id"]  # type: ignore[index]
    assert store.get(first["_id"])["tag_access"] == []  # type: ignore[index]


def test_update_expect_compares_embedded_documents_by_fields(store: Store) -> None:
    """A lease's owner is an embedded document: the same fields in another key order are the same
    owner (a record written by another gateway or driver), a missing or extra field is not."""
    rec, _ = store.claim({**pull_doc("lease:order"), "owner": {"host": "h", "pid": 1, "start": "1"}})
    me = {"host": "h", "pid": 2, "start": "2"}
    assert not store.update(rec["_id"], {"owner": me}, expect={"owner": {"host": "h", "pid": 1}})
    assert not store.update(rec["_id"], {"owner": me}, expect={"owner": {"host": "h", "pid": 1, "start": "1", "x": 0}})
    assert not store.update(rec["_id"], {"owner": me}, expect={"owner": {"host": "h", "pid": 1, "start": None}})
    assert not store.update(rec["_id"], {"owner": me}, expect={"owner": {"start": "1", "pid": 9, "host": "h"}})
    assert store.update(rec["_id"], {"owner": me}, expect={"owner": {"start": "1", "pid": 1, "host": "h"}})
    assert store.get(rec["_id"])["owner"] == me  # type: ignore[index]
    # nested documents, and a None that must be a present null, not a missing field
    nested = {"a": {"b": 1, "c": None}, "d": [1, 2]}
    assert store.update(rec["_id"], {"extra": nested})
    assert not store.update(rec["_id"], {"x": 1}, expect={"extra": {"d": [1, 2], "a": {"b": 1}}})
    assert not store.update(rec["_id"], {"x": 1}, expect={"extra": {"d": [2, 1], "a": {"c": None, "b": 1}}})
    assert store.update(rec["_id"], {"x": 1}, expect={"extra": {"d": [1, 2], "a": {"c": None, "b": 1}}})
    assert store.update(rec["_id"], {"x": 2}, expect={"missing": None, "x": 1})


def _tag_holders(store: Store, tag: str) -> list[str]:
    return [r["_id"] for r in store.find(system="sys") if tag in (r.get("tag") or [])]


def test_add_tag_racing_for_one_tag_leaves_it_on_one_record(store: Store) -> None:
    """Several finished pulls name the same tag at once (two gateways completing): one record ends
    with it, and it is the one lookups find."""
    records = [make_ready(store, f"race{i}:v1", f"{i:064x}") for i in range(8)]
    barrier = threading.Barrier(len(records))

    def move(rid: str) -> bool:
        barrier.wait()
        return store.add_tag(rid, "race:latest", "registry")

    for _ in range(3):
        with ThreadPoolExecutor(len(records)) as pool:
            assert all(pool.map(move, [r["_id"] for r in records]))
        holders = _tag_holders(store, "race:latest")
        assert len(holders) == 1, holders
        assert store.find_ready("sys", "docker", "race:latest")["_id"] == holders[0]  # type: ignore[index]
        for r in records:  # each keeps its own tag, and only the holder has an entry for the moved one
            got = store.get(r["_id"])
            assert f"race{records.index(r)}:v1" in got["tag"]  # type: ignore[index]
            entries = [e["tag"] for e in got.get("tag_access") or []]  # type: ignore[union-attr]
            assert ("race:latest" in entries) == (r["_id"] == holders[0])


def test_add_tag_racing_owners_only_one_wins(store: Store) -> None:
    records = [make_ready(store, f"own{i}:v1", f"{i + 100:064x}") for i in range(8)]
    barrier = threading.Barrier(len(records))

    def take(i: int) -> bool:
        barrier.wait()
        return store.add_tag(records[i]["_id"], "contested:v1", f"uid:{i}")

    with ThreadPoolExecutor(len(records)) as pool:
        won = list(pool.map(take, range(len(records))))
    assert won.count(True) == 1, won
    winner = records[won.index(True)]["_id"]
    assert _tag_holders(store, "contested:v1") == [winner]


def test_add_tag_of_different_tags_to_one_record_keeps_them_all(store: Store) -> None:
    rec = make_ready(store, "many:v0", "e" * 64)
    tags = [f"many:v{i}" for i in range(1, 9)]
    barrier = threading.Barrier(len(tags))

    def add(tag: str) -> bool:
        barrier.wait()
        return store.add_tag(rec["_id"], tag, "registry", {"private": False})

    with ThreadPoolExecutor(len(tags)) as pool:
        assert all(pool.map(add, tags))
    got = store.get(rec["_id"])
    assert sorted(got["tag"]) == sorted(["many:v0", *tags])  # type: ignore[index]
    assert sorted(e["tag"] for e in got["tag_access"]) == sorted(["many:v0", *tags])  # type: ignore[index]


def test_add_tag_settles_a_pull_record_in_the_same_write(store: Store) -> None:
    """A pull record becomes READY together with its tag: never settled and untagged."""
    old = make_ready(store, "settle:v1", "a" * 64)
    rec, _ = store.claim(pull_doc("settle:v1"))
    assert store.add_tag(rec["_id"], "settle:v1", "registry", {"private": False},
                         {"status": "READY", "id": "b" * 64, "_id": "ignored", "tag": ["ignored"]})
    got = store.get(rec["_id"])
    assert got["status"] == "READY" and got["id"] == "b" * 64 and got["tag"] == ["settle:v1"]  # type: ignore[index]
    assert store.find_ready("sys", "docker", "settle:v1")["_id"] == rec["_id"]  # type: ignore[index]
    assert store.find_inflight("sys", "docker", "settle:v1") is None
    assert store.get(old["_id"])["tag"] == []  # type: ignore[index]
    again, inserted = store.claim(pull_doc("settle:v1"))  # the in-flight slot is free
    assert inserted
    # refused (another owner holds the tag): nothing is written, the record stays in flight
    assert not store.add_tag(again["_id"], "settle:v1", "uid:9", None, {"status": "READY", "id": "c" * 64})
    assert store.get(again["_id"])["status"] == "PENDING"  # type: ignore[index]
    assert store.find_inflight("sys", "docker", "settle:v1")["_id"] == again["_id"]  # type: ignore[index]


def test_lock_excludes_every_store_object_on_the_database(store: Store, twin: Store) -> None:
    inside: list[int] = []
    most = [0]
    guard = threading.Lock()

    def work(s: Store) -> None:
        for _ in range(5):
            with s.lock("image\x1fsys\x1fabc"):
                with guard:
                    inside.append(1)
                    most[0] = max(most[0], len(inside))
                time.sleep(0.002)
                with guard:
                    inside.pop()

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(work, [store, twin] * 3))
    assert most[0] == 1
    with store.lock("one"), twin.lock("another"):  # locks of other names are independent
        pass


def test_lock_of_a_dead_holder_is_taken_over_after_its_lease(store: Store, twin: Store) -> None:
    assert store._take_lock("image\x1fsys\x1fdead", "a-gateway-that-died", 0.5)
    assert not twin._take_lock("image\x1fsys\x1fdead", "another", 30)
    started = time.monotonic()
    with twin.lock("image\x1fsys\x1fdead", wait=10):
        assert 0.3 < time.monotonic() - started < 5
    with pytest.raises(ShifterError, match="stayed held"):
        assert store._take_lock("image\x1fsys\x1fbusy", "holder", 30)
        with twin.lock("image\x1fsys\x1fbusy", wait=0.3):
            pass


def test_lock_is_renewed_while_held(store: Store, twin: Store) -> None:
    with store.lock("image\x1fsys\x1flong", lease=0.6):
        time.sleep(1.5)  # well past the first lease: the holder's renewals keep it
        assert not twin._take_lock("image\x1fsys\x1flong", "intruder", 30)
    assert twin._take_lock("image\x1fsys\x1flong", "next", 30)  # released at the end


def test_closing_a_store_ends_its_lease_renewals(twin: Store) -> None:
    """A store closed while one of its locks is held (a gateway shutting down mid-publication) stops
    renewing before its connections close: a renewal on a closed SQLite connection crashed the process."""
    held = twin.lock("image\x1fsys\x1fclosing", lease=0.03)
    held.__enter__()  # never left: the process ends with the lock held, its lease lapses
    time.sleep(0.1)  # a renewal every 10 ms is under way
    renewer = twin._renewer().thread
    assert renewer is not None and renewer.is_alive()
    twin.close()
    renewer.join(2)
    assert not renewer.is_alive(), "the renewer outlived its store"
    with contextlib.suppress(Exception):  # leaving the lock on a closed store may fail; that is not tested here
        held.__exit__(None, None, None)
