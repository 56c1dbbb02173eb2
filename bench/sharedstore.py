"""P5m: P5 (authenticated lookups/s and p99, 32 clients) against each of two gateways on one
MongoDB-wire store, compared with P5 on the cluster's SQLite gateway measured in the same run.

The bench starts what it measures and stops it by pid: a ``secantusd-py`` server (the
MongoDB-wire server of the test extra, as tests/fixtures_mongo.py starts it) on a free loopback
port, and two more gateway processes of the installed code, configured like the cluster's first
gateway but with ``Store: mongodb`` on that server, their own port, cache, scratch directory
and logs, and one image directory of their own (so the cluster's images are not touched).
Each gateway is measured alone with ``measure_p5`` (the load generator in its own process).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench import lookups  # noqa: E402

sys.path.insert(0, str(_ROOT / "tests"))  # the tests' own fixtures start the MongoDB-wire server
from fixtures_mongo import SecantusServer  # noqa: E402
from fixtures_registry import free_port  # noqa: E402


def _wait(what: str, ready: Any, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text(errors='replace')[-1500:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s: {log.read_text(errors='replace')[-1500:]}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by pid, SIGKILL after 15 s."""
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextmanager
def mongo_server(root: Path) -> Iterator[str]:
    """A ``secantusd-py`` on a free loopback port with its own storage (the tests' own server
    fixture); yields its URI and stops it by pid."""
    server = SecantusServer(root).start()
    try:
        yield server.uri
    finally:
        server.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/status", timeout=3) as reply:
            return reply.status == 200
    except (OSError, urllib.error.URLError):
        return False


@contextmanager
def mongo_gateways(prefix: Path, template: Path, root: Path, uri: str, count: int = 2) -> Iterator[list[str]]:
    """``count`` gateways of the installed code on the database at ``uri``: configured like
    ``template`` (the cluster's imagemanager.json) except for the store, their listen port,
    cache, scratch directory and logs; one image directory for all. Yields their URLs."""
    base = json.loads(template.read_text())
    images = root / "images"
    images.mkdir(mode=0o755, parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    urls = []
    try:
        for i in range(count):
            own = root / f"gw-{i + 1}"
            for sub in ("cache", "expand"):
                (own / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            port = free_port()
            config = {**base, "Listen": [f"127.0.0.1:{port}"], "Store": "mongodb", "MongoDBURI": uri,
                      "MongoDB": "ShifterBench", "CacheDirectory": str(own / "cache"),
                      "ExpandDirectory": str(own / "expand"), "LogFile": str(own / "gateway.log"),
                      "AccessLog": str(own / "gateway-access.log")}
            platforms = json.loads(json.dumps(base["Platforms"]))
            for platform in platforms.values():
                platform["local"]["imageDir"] = str(images)
            config["Platforms"] = platforms
            path = own / "imagemanager.json"
            path.write_text(json.dumps(config, indent=1) + "\n")
            log = own / "gateway.out"
            with open(log, "ab") as out:
                proc = subprocess.Popen([str(prefix / "sbin" / "shifter-gateway"), "--config", str(path)],
                                        cwd=own, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            _wait(f"gateway {url}", lambda url=url: _answers(url), proc, log)
            urls.append(url)
        yield urls
    finally:
        for proc in procs:
            _stop(proc)


def measure_p5m(sqlite_url: str, system: str, tag: str, prefix: Path, template: Path, work: Path,
                seconds: float = 10, clients: int = 32, munge_socket: str | None = None) -> dict[str, Any]:
    """P5 on the SQLite gateway ``sqlite_url`` and on each of two gateways on one MongoDB-wire
    store (started here, removed afterwards), all idle, in one run."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        with mongo_server(work / "mongo") as uri, mongo_gateways(prefix, template, work, uri) as urls:
            for url in urls:  # the first pulls and converts; the second finds it READY in the store
                lookups._ready_client(url, system, tag, munge_socket)
            baseline = lookups.measure_p5(sqlite_url, system, tag, seconds, clients, munge_socket)
            each = [lookups.measure_p5(url, system, tag, seconds, clients, munge_socket) for url in urls]
            together = _at_once(urls, system, tag, seconds, clients, munge_socket)
            server = _server_reads(uri, system)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"sqlite": baseline, "mongo": each, "together": together, "server_reads_per_s": server}


def _at_once(urls: list[str], system: str, tag: str, seconds: float, clients: int,
             munge_socket: str | None) -> list[dict[str, Any]]:
    """P5 against every gateway at the same time (``clients`` each): the deployment's total."""
    results: list[dict[str, Any]] = [{} for _ in urls]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = lookups.measure_p5(urls[i], system, tag, seconds, clients, munge_socket)
        except BaseException as err:  # noqa: BLE001 - raised below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(urls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _server_reads(uri: str, system: str, count: int = 500) -> float:
    """find_one/s of the gateways' lookup query from one pymongo client: what the server
    itself costs per lookup, apart from the gateway."""
    import pymongo

    client: pymongo.MongoClient = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        images = client["ShifterBench"]["images"]
        doc = images.find_one({"system": system, "status": "READY"})
        query = {"system": system, "itype": doc["itype"], "tag": doc["tag"][0], "status": "READY"} if doc else {}
        started = time.perf_counter()
        for _ in range(count):
            images.find_one(query)
        return count / (time.perf_counter() - started)
    finally:
        client.close()


def p5m_metric(r: dict[str, Any]) -> dict[str, Any]:
    base = r["sqlite"]
    ratios = [m["lookups_per_s"] / base["lookups_per_s"] for m in r["mongo"]]
    per = "; ".join(f"gateway {i + 1}: {m['lookups_per_s']:.0f}/s, p99 {m['p99_ms']:.1f} ms, "
                    f"{m['errors']} errors ({ratio:.2f} of SQLite)"
                    for i, (m, ratio) in enumerate(zip(r["mongo"], ratios, strict=True)))
    return {"value": round(min(ratios), 2), "unit": "ratio (lowest gateway / SQLite)",
            "baseline": f"one gateway on SQLite: {base['lookups_per_s']:.0f}/s, p99 {base['p99_ms']:.1f} ms",
            "measured": f"two gateways on one MongoDB-wire store (secantusd-py), each alone with "
                        f"{base['clients']} clients for {base['seconds']:.0f} s: {per}",
            "together": "both gateways loaded at once: " + ", ".join(
                f"{m['lookups_per_s']:.0f}/s (p99 {m['p99_ms']:.1f} ms)" for m in r["together"])
                + f", {sum(m['lookups_per_s'] for m in r['together']):.0f}/s in all",
            "runs": None, "goal": ">= 0.8 per gateway",
            "note": f"all idle, measured one after another; the server alone answers the lookup query "
                    f"{r['server_reads_per_s']:.0f} times/s from one client; {base.get('note')}"}
