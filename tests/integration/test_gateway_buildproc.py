"""Each conversion runs in a process of its own (gateway.buildproc): a real gateway, a real
registry behind a stalling front (a download that waits as long as the test wants), a real
munged. What the tests hold the gateway to: a conversion process that dies fails its pull
with the reason and leaves no scratch, squashfs or partial download behind; a gateway that
stops or is killed takes its conversion processes with it; lookups are answered while a
conversion process works.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import time
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
    munged_and_registry,
    process_gone,
    wait_for,
)

from gateway.context import PULL_NICENESS
from localcluster import oci

missing = have("munged", "docker-registry", "tar2sqfs")
pytestmark = pytest.mark.skipif(missing is not None, reason=f"needs {missing}")


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Munged, Registry]]:
    with munged_and_registry(tmp_path_factory.mktemp("buildproc")) as services:
        layer = oci.tar_bytes([oci.file("bin/hello", b"hello\n", 0o755)])
        oci.push_image(services[2].url, "test/small", "v1", [oci.gzip_bytes(layer)], oci.image_config([layer]))
        yield services


class Stalled:
    """A gateway whose pull of ``test/<name>`` stalls mid-download in its conversion process."""

    def __init__(self, services: tuple[Path, Munged, Registry], name: str) -> None:
        root, self.munged, self.registry = services
        self.home = root / name
        self.home.mkdir()
        big = oci.tar_bytes([oci.file(f"data/{name}.bin", os.urandom(4 << 20))])
        blob = oci.gzip_bytes(big)
        oci.push_image(self.registry.url, f"test/{name}", "v1", [blob], oci.image_config([big]))
        self.proxy = StallingProxy(self.registry.url, "sha256:" + hashlib.sha256(blob).hexdigest())
        locations = {self.registry.addr: {"remotetype": "dockerv2", "url": self.proxy.url, "authMethod": "token"}}
        self.gw = GatewayProcess(self.home, gateway_config(self.home, self.registry, self.munged.socket,
                                                           Locations=locations))
        self.pull_path = f"/api/pull/testsys/docker/test%2F{name}%3Av1/"

    def request(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        address = self.gw.url.removeprefix("http://")
        host, port = address.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(method, path, headers={"authentication": bound_credential(
                self.munged.socket, method, path, b"", address)})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def start_stalled_pull(self) -> int:
        """Start the pull; returns the pid of its conversion process once it is mid-download."""
        self.gw.start()
        status, body = self.request("POST", self.pull_path)
        assert status == 200, body
        assert self.proxy.stalled.wait(60), "the conversion process never asked for the layer"
        assert self.gw.proc is not None
        children = conversion_processes(self.gw.proc.pid)
        assert len(children) == 1, children
        return children[0]

    def partials(self) -> list[str]:
        blobs = self.home / "cache" / "blobs" / "sha256"
        return sorted(n for n in os.listdir(blobs) if ".partial-" in n) if blobs.exists() else []

    def scratch(self) -> list[str]:
        return sorted(os.listdir(self.home / "expand"))

    def stop(self) -> None:
        self.proxy.stop()
        self.gw.stop()


def conversion_processes(parent: int) -> list[int]:
    """Live ``python -m gateway.buildproc`` children of ``parent``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[-1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == parent and stat[0] not in (b"Z", b"X") and b"gateway.buildproc" in cmdline:
            found.append(int(entry))
    return found


def nice(pid: int) -> int:
    """Field 19 of /proc/<pid>/stat (of the main thread)."""
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[-1].split()[16])


def test_a_killed_conversion_process_fails_its_pull_and_leaves_nothing(
        services: tuple[Path, Munged, Registry]) -> None:
    run = Stalled(services, "killed")
    try:
        child = run.start_stalled_pull()
        assert run.partials(), "the stalled download has no partial file"
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            status, rec = run.request("POST", run.pull_path)
            assert status == 200, rec
            if rec["status"] in ("READY", "FAILURE"):
                break
            assert time.monotonic() < deadline, rec
            time.sleep(0.2)
        assert rec["status"] == "FAILURE"
        assert rec["status_message"] == "the conversion process was killed by SIGKILL; try again"
        assert run.partials() == []
        assert run.scratch() == []
        assert os.listdir(run.home / "images") == []
        # the gateway itself is unharmed: it answers, and its records say what happened
        status, body = run.request("GET", f"/api/lookup/testsys/docker/{run.registry.addr}%2Ftest%2Fsmall%3Av1/")
        assert status == 404, body
        assert run.gw.proc is not None and run.gw.proc.poll() is None
    finally:
        run.stop()


def test_gateway_stop_ends_its_conversion_process_and_recovery_finishes_the_pull(
        services: tuple[Path, Munged, Registry]) -> None:
    run = Stalled(services, "stopped")
    try:
        child = run.start_stalled_pull()
        run.gw.stop()  # SIGTERM
        wait_for("the conversion process to end with the gateway", lambda: process_gone(child), 10)
        run.proxy.release.set()
        # recovery re-queues the interrupted pull, which completes from the registry itself
        run.gw.config["Locations"] = {run.registry.addr: {"remotetype": "dockerv2", "url": run.registry.url,
                                                          "authMethod": "token"}}
        run.gw.start()
        deadline = time.monotonic() + 60
        while (rec := run.request("POST", run.pull_path)[1])["status"] not in ("READY", "FAILURE"):
            assert time.monotonic() < deadline, rec
            time.sleep(0.2)
        assert rec["status"] == "READY", rec
        assert run.partials() == []
    finally:
        run.stop()


def test_a_killed_gateway_takes_its_conversion_process_with_it(services: tuple[Path, Munged, Registry]) -> None:
    run = Stalled(services, "gwkilled")
    try:
        child = run.start_stalled_pull()
        run.gw.kill()  # SIGKILL: no stop() runs, the child dies with its parent (PR_SET_PDEATHSIG)
        wait_for("the conversion process to die with the gateway", lambda: process_gone(child), 10)
    finally:
        run.stop()


def test_lookups_are_answered_while_a_conversion_process_runs(services: tuple[Path, Munged, Registry]) -> None:
    run = Stalled(services, "busy")
    try:
        small = f"{run.registry.addr}%2Ftest%2Fsmall%3Av1"
        run.gw.start()
        deadline = time.monotonic() + 60
        while (rec := run.request("POST", f"/api/pull/testsys/docker/{small}/")[1])["status"] != "READY":
            assert rec["status"] != "FAILURE" and time.monotonic() < deadline, rec
            time.sleep(0.2)
        assert run.gw.proc is not None
        status, body = run.request("POST", run.pull_path)
        assert status == 200, body
        assert run.proxy.stalled.wait(60)
        (child,) = conversion_processes(run.gw.proc.pid)
        assert child != run.gw.proc.pid
        assert nice(child) == min(19, nice(run.gw.proc.pid) + PULL_NICENESS)  # it yields to the API
        assert os.sched_getscheduler(child) == os.SCHED_IDLE
        for _ in range(20):
            started = time.monotonic()
            status, rec = run.request("GET", f"/api/lookup/testsys/docker/{small}/")
            assert status == 200 and rec["status"] == "READY", rec
            assert time.monotonic() - started < 2.0
        status, rec = run.request("POST", run.pull_path)
        assert rec["status"] == "PULLING", rec  # the conversion is still under way meanwhile
    finally:
        run.stop()
