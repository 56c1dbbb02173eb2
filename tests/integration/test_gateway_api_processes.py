"""``APIProcesses``: one gateway service as several forked API processes on one SQLite store:
real gateway processes, a real registry and a real munged, no Slurm needed.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_registry import (
    GatewayProcess,
    Munged,
    Registry,
    bound_credential,
    gateway_config,
    have,
    munged_and_registry,
    process_gone,
    wait_for,
)

from localcluster import oci

missing = have("munged", "docker-registry", "tar2sqfs")
pytestmark = pytest.mark.skipif(missing is not None, reason=f"needs {missing}")

ACCESS_LINE = re.compile(r"^\S+ \S+ [A-Z]+ '[^']*' \d{3} \d+\.\dms$")


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Munged, Registry]]:
    with munged_and_registry(tmp_path_factory.mktemp("api-processes")) as services:
        yield services


@pytest.fixture
def gateway(services: tuple[Path, Munged, Registry], request: pytest.FixtureRequest) -> Iterator[GatewayProcess]:
    top, munged, registry = services
    home = top / request.node.name
    home.mkdir()
    gw = GatewayProcess(home, gateway_config(home, registry, munged.socket, APIProcesses=2))
    try:
        gw.start()
        wait_for("two API processes", lambda: len(workers(gw)) == 2)
        yield gw
    finally:
        gw.stop()


def workers(gw: GatewayProcess) -> list[int]:
    """The service's child processes (its API processes)."""
    assert gw.proc is not None
    pid = gw.proc.pid
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def request(gw: GatewayProcess, munge_socket: str, method: str, path: str) -> tuple[int, bytes]:
    """One request on a fresh connection with a fresh credential bound to it."""
    address = gw.url.removeprefix("http://")
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        credential = bound_credential(munge_socket, method, path, b"", address)
        conn.request(method, path, headers={"authentication": credential})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def scrape_each(gw: GatewayProcess, want: int, tries: int = 200) -> dict[int, dict[str, float]]:
    """``/metrics`` of each API process (each scrape reaches one), by its pid."""
    seen: dict[int, dict[str, float]] = {}
    for _ in range(tries):
        with urllib.request.urlopen(f"{gw.url}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name = line.split("{")[0].split()[0]
                values[name] = values.get(name, 0.0) + float(line.split()[-1])
        seen[int(values["shifter_gateway_process_id"])] = values
        if len(seen) >= want:
            break
    return seen


def test_both_api_processes_answer_and_a_pull_completes_once(
    gateway: GatewayProcess, services: tuple[Path, Munged, Registry]
) -> None:
    top, munged, registry = services
    pids = workers(gateway)
    layer = oci.tar_bytes([oci.file("data/blob.bin", os.urandom(1 << 20))])
    oci.push_image(registry.url, "test/procs", "v1", [oci.gzip_bytes(layer)], oci.image_config([layer]))
    before = registry.blob_gets("test/procs")
    pull = "/api/pull/testsys/docker/test%2Fprocs%3Av1/"
    records = []
    deadline = time.monotonic() + 180
    while True:  # polled on fresh connections: the polls land on both processes
        status, body = request(gateway, munged.socket, "POST", pull)
        assert status == 200, body
        records.append(json.loads(body))
        if records[-1]["status"] in ("READY", "FAILURE"):
            break
        assert time.monotonic() < deadline, records[-1]
        time.sleep(0.05)
    assert records[-1]["status"] == "READY", records[-1]
    image_id = records[-1]["id"]
    assert registry.blob_gets("test/procs") - before == 2  # config and layer, once each
    images = Path(gateway.config["Platforms"]["testsys"]["local"]["imageDir"])
    assert sorted(os.listdir(images)) == sorted([f"{image_id}.squashfs", f"{image_id}.meta"])

    errors: list[str] = []
    lookup = "/api/lookup/testsys/docker/test%2Fprocs%3Av1/"

    def lookups() -> None:
        for _ in range(40):
            status, body = request(gateway, munged.socket, "GET", lookup)
            if status != 200 or json.loads(body)["id"] != image_id:
                errors.append(f"{status} {body[:200]!r}")

    threads = [threading.Thread(target=lookups) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    each = scrape_each(gateway, 2)
    assert sorted(each) == sorted(pids)  # every scrape answered by one of the two children
    # both answered lookups, and the one conversion ran in one of them
    assert all(v.get("shifter_gateway_lookups_total", 0) > 0 for v in each.values()), each
    assert sum(v.get("shifter_gateway_lookups_total", 0) for v in each.values()) >= 320
    assert sum(v.get("shifter_gateway_conversion_seconds_count", 0) for v in each.values()) == 1
    # two writers, one access log: whole lines only
    time.sleep(1.5)  # the access log is flushed within a second
    lines = Path(gateway.config["AccessLog"]).read_text().splitlines()
    assert all(ACCESS_LINE.match(line) for line in lines), [ln for ln in lines if not ACCESS_LINE.match(ln)][:3]
    assert sum(" GET '/api/lookup/testsys/" in ln and "' 200 " in ln for ln in lines) >= 320
    log = Path(gateway.config["LogFile"]).read_text()
    for pid in pids:
        assert f"[{pid}] gateway.service: shifter-gateway {pid} listening on" in log


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_service_and_every_api_process(gateway: GatewayProcess, signo: int) -> None:
    assert gateway.proc is not None
    pids = workers(gateway)
    log_file = Path(gateway.config["LogFile"])
    wait_for("both API processes to serve",
             lambda: all(f"shifter-gateway {pid} listening on" in log_file.read_text() for pid in pids), timeout=60)
    os.kill(gateway.proc.pid, signo)
    assert gateway.proc.wait(60) == 0
    gateway.proc = None
    for pid in pids:
        assert process_gone(pid), pid
    log = log_file.read_text()
    for pid in pids:  # each ran its cleanup (conversions ended, store closed), not just died
        assert f"[{pid}] gateway.service: shifter-gateway stopped" in log


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
def test_a_single_gateway_stops_cleanly_on_a_signal(
    services: tuple[Path, Munged, Registry], tmp_path: Path, signo: int
) -> None:
    """uvicorn raises the signal again after its graceful shutdown: the gateway's own cleanup
    still runs and the exit status is 0 (systemd's stop, or a Ctrl-C)."""
    _top, munged, registry = services
    gw = GatewayProcess(tmp_path, gateway_config(tmp_path, registry, munged.socket)).start()
    try:
        assert gw.proc is not None
        os.kill(gw.proc.pid, signo)
        assert gw.proc.wait(60) == 0
        gw.proc = None
        assert "gateway.service: shifter-gateway stopped" in Path(gw.config["LogFile"]).read_text()
    finally:
        gw.stop()


def test_a_killed_api_process_stops_the_service_non_zero(gateway: GatewayProcess) -> None:
    assert gateway.proc is not None
    first, second = workers(gateway)
    os.kill(first, signal.SIGKILL)
    assert gateway.proc.wait(60) == 1
    gateway.proc = None
    assert process_gone(first) and process_gone(second)
    log = Path(gateway.config["LogFile"]).read_text()
    assert f"API process {first} killed by signal 9; stopping the service" in log


def test_api_processes_die_with_a_killed_parent(gateway: GatewayProcess) -> None:
    assert gateway.proc is not None
    pids = workers(gateway)
    os.kill(gateway.proc.pid, signal.SIGKILL)
    gateway.proc.wait(10)
    gateway.proc = None
    wait_for("API processes to stop", lambda: all(process_gone(p) for p in pids), timeout=60)


@pytest.mark.parametrize("value", [0, 65, "2"])
def test_bad_api_processes_is_one_line_and_exit_1(
    services: tuple[Path, Munged, Registry], tmp_path: Path, value: object
) -> None:
    _top, munged, registry = services
    config = gateway_config(tmp_path, registry, munged.socket, APIProcesses=value)
    path = tmp_path / "imagemanager.json"
    path.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "gateway.service", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "key APIProcesses must be" in done.stderr, done.stderr
