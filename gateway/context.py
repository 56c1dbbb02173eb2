"""What every job shares: config, store, metrics, this process's owner identity and the job queue.

gateway.pulls, gateway.imports, gateway.expiry, gateway.recovery and gateway.tagging each
get one ``Context`` (composition, not inheritance): the record helpers that more than one
of them needs (status writes, FAILURE, leases, "is the owner alive") live here once.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from gateway import pipeline
from gateway.buildproc import Builds
from gateway.checks import NotFound
from gateway.config import GatewayConfig, PlatformConfig
from gateway.metrics import Metrics
from gateway.store.base import INFLIGHT, Doc, Store, outage

log = logging.getLogger("gateway.manager")

HEARTBEAT_SECONDS = 10.0
STALE_HEARTBEAT_SECONDS = 90.0
LEASE_SECONDS = STALE_HEARTBEAT_SECONDS  # renewed with every heartbeat
RECLAIM_SECONDS = 30.0  # the housekeeper looks for records of dead owners this often
FAILURE_HOLD_SECONDS = 3.0  # a FAILURE stays visible to polling clients (every 0.5 s), then a retry starts
PULL_NICENESS = 10  # how much lower than the API's the CPU priority of pulls, expiries and their tools is


def yield_to_requests() -> None:
    """Lower this worker thread's CPU priority, and so that of every thread and tool it starts.

    Lookups decide how fast jobs are submitted; a pull or an expiry can wait.  On Linux the nice
    value is per thread and inherited by the threads and processes a thread creates, so one
    call here covers the conversion process, the examiner and every other tool.  The conversion
    process also drops itself to ``SCHED_IDLE`` (gateway.buildproc); threads of this process
    must not, as one that holds the interpreter's lock would then stall the lookups.
    """
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + PULL_NICENESS))


def proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: tells a live process from a reused pid (None: no such process)."""
    fields = _proc_stat(pid)
    return fields[19].decode() if fields else None


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat.rsplit(b")", 1)[-1].split()


def process_alive(pid: int, start: str | None = None) -> bool:
    """A zombie or dead task is not alive, whatever its parent does with it."""
    fields = _proc_stat(pid)
    if not fields or fields[0] in (b"Z", b"X", b"x"):
        return False
    return start is None or fields[19].decode() == start


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: str

    def as_doc(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "start": self.start}


class Context:
    """The state the job modules share, and the record helpers more than one of them uses."""

    def __init__(self, config: GatewayConfig, store: Store, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        pid = os.getpid()
        self.owner = Owner(socket.gethostname(), pid, proc_start_time(pid) or "0")
        self.jobs: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self.running: set[str] = set()
        self.running_lock = threading.Lock()
        # jobs that ended without settling their record because the store did not answer:
        # {rid: (kind, message)}, settled by the housekeeper once the store answers again
        self.unsettled: dict[str, tuple[str, str]] = {}
        self.builds = Builds()  # the conversion processes, ended when the gateway stops

    # -- owners and leases ----------------------------------------------------------------

    def lease(self) -> Doc:
        now = time.time()
        return {"owner": self.owner.as_doc(), "last_heartbeat": now, "lease_until": now + LEASE_SECONDS}

    def owner_alive(self, owner: Any, heartbeat: float | None) -> bool:
        """Is the process that owns an in-flight record still working on it?"""
        if not isinstance(owner, dict):
            return False
        if owner.get("host") == self.owner.host:
            pid = owner.get("pid")
            if not isinstance(pid, int):
                return False
            if pid == self.owner.pid:
                return str(owner.get("start")) == self.owner.start
            return process_alive(pid, str(owner.get("start")))
        return heartbeat is not None and time.time() - heartbeat < STALE_HEARTBEAT_SECONDS

    def record_alive(self, rec: Doc) -> bool:
        """Its owner works on it: a live process here, else an unexpired lease (or fresh heartbeat)."""
        owner = rec.get("owner")
        if isinstance(owner, dict) and owner.get("host") == self.owner.host:
            return self.owner_alive(owner, rec.get("last_heartbeat"))
        lease = rec.get("lease_until")
        if isinstance(lease, int | float):
            return time.time() < lease
        return self.owner_alive(owner, rec.get("last_heartbeat"))

    # -- records --------------------------------------------------------------------------

    def inflight_record(self, rid: str) -> Doc | None:
        """The record a queued job works on; None once it is gone or settled (nothing left to do)."""
        rec = self.store.get(rid)
        return rec if rec is not None and rec["status"] in INFLIGHT else None

    def set(self, rid: str, status: str, message: str = "", **fields: Any) -> None:
        fields.update(status=status, status_message=message, last_heartbeat=time.time())
        self.store.update(rid, fields)

    def fail(self, rid: str, message: str, started: float, work_dir: str | None = None) -> None:
        """FAILURE with a one-line reason; scratch files go first, so a settled record never has any."""
        if work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        message = message.splitlines()[0][:500] if message else "failed"
        try:
            self.store.update(rid, {"status": "FAILURE", "status_message": message, "last_pull": time.time()})
        except Exception as err:
            if outage(err) is None:
                raise
            log.warning("pull %s failed (%s); FAILURE written once the store answers", rid, message)
            with self.running_lock:
                self.unsettled[rid] = ("pull", message)
        self.metrics.inc("shifter_gateway_pulls_total", outcome="failure")
        self.metrics.observe("shifter_gateway_pull_seconds", time.monotonic() - started)
        log.info("pull %s failed: %s", rid, message)

    def job_dir(self, rid: str) -> str:
        return os.path.join(self.config.expand_dir, f"job-{rid}")

    # -- systems --------------------------------------------------------------------------

    def platform(self, system: str) -> PlatformConfig:
        try:
            return self.config.platforms[system]
        except KeyError:
            raise NotFound(f"unknown system {system!r}") from None

    def target(self, platform: PlatformConfig) -> pipeline.PublishTarget:
        if platform.accesstype == "remote" and platform.ssh is not None:
            return pipeline.PublishTarget(
                image_dir=platform.ssh.image_dir,
                host=platform.hosts[0],
                user=platform.ssh.username,
                ssh_key=platform.ssh.key,
                ssh_options=list(platform.ssh.ssh_options),
                scp_options=list(platform.ssh.scp_options),
            )
        return pipeline.PublishTarget(image_dir=platform.image_dir)

    def published(self, platform: PlatformConfig, image_id: str, fmt: str) -> bool:
        if platform.accesstype != "local":
            return True  # a remote system's files are trusted from the record
        base = os.path.join(platform.image_dir, image_id)
        return os.path.isfile(f"{base}.{fmt}") and os.path.isfile(f"{base}.meta")
