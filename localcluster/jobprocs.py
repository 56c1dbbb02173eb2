"""Looking at a job's in-container sshd and the processes it started, from the host (tests).

Every node of the local cluster shares the host's pid namespace, so a node's processes are
told apart by their network namespace (the node's slurmd's).  The sshd rewrites its command
line (``sshd: /opt/udiImage/sbin/sshd ... [listener] ...``), which is how it is found here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .testing import Cluster

SSHD_CMDLINE = b"sshd: /opt/udiImage/sbin/sshd"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    uid: int
    cmdline: str


def _read_proc(pid: int) -> Proc | None:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").strip().startswith("Z"):
        return None
    return Proc(pid=pid, ppid=int(fields["PPid"]), uid=int(fields["Uid"].split()[0]),
                cmdline=cmdline.replace(b"\0", b" ").decode(errors="replace").strip())


def _net_ns(pid: int) -> tuple[int, int] | None:
    try:
        info = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return info.st_dev, info.st_ino


def node_processes(cluster: Cluster, node: str) -> list[Proc]:
    """The live (non-zombie) processes in the node's network namespace."""
    wanted = _net_ns(cluster.node_pids()[node])
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _net_ns(int(name)) == wanted:
            proc = _read_proc(int(name))
            if proc is not None:
                found.append(proc)
    return found


def rooted_in_job(pid: int, job_id: str) -> bool:
    """Whether the process is chrooted into the job's container (``<udiMount>/<job>/root``)."""
    try:
        return os.readlink(f"/proc/{pid}/root").endswith(f"/{job_id}/root")
    except OSError:
        return False


def sshd_listeners(cluster: Cluster, node: str, job_id: str | None = None) -> list[Proc]:
    """The in-container sshd daemons (listeners) running on the node (of one job's container)."""
    return [p for p in node_processes(cluster, node)
            if p.cmdline.encode().startswith(SSHD_CMDLINE) and "[listener]" in p.cmdline
            and (job_id is None or rooted_in_job(p.pid, job_id))]


def ancestors(pid: int) -> list[Proc]:
    """The parent chain of ``pid`` up to (not including) pid 1."""
    chain = []
    proc = _read_proc(pid)
    while proc is not None and proc.ppid > 1:
        proc = _read_proc(proc.ppid)
        if proc is not None:
            chain.append(proc)
    return chain


def alive(pid: int) -> bool:
    return _read_proc(pid) is not None


def memory_cgroup(pid: int) -> str | None:
    """The process's path in the cgroup v1 memory hierarchy (as the host sees it)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    return None


def port_listening(cluster: Cluster, node: str, port: int) -> bool:
    """Whether a TCP socket listens on ``port`` in the node's network namespace."""
    pid = cluster.node_pids()[node]
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_port_free(cluster: Cluster, port: int = 1204, timeout: float = 120) -> None:
    """Wait until no node listens on ``port``: jobs share nodes here (OverSubscribe=FORCE ignores
    --exclusive), and only one job per node can have its sshd on port 1204."""
    import time

    deadline = time.monotonic() + timeout
    while busy := [node for node in cluster.nodes if port_listening(cluster, node, port)]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} still in use on {' '.join(busy)} after {timeout:.0f} s")
        time.sleep(0.2)


def sshd_log_lines(cluster: Cluster, job_id: str) -> list[str]:
    """What the nodes' slurmd logs say about the job's sshd (e.g. that another job held the port)."""
    found = []
    for node in cluster.nodes:
        log = cluster.state_dir / "log" / f"slurmd-{node}.log"
        found += [f"{node}: {line}" for line in log.read_text(errors="replace").splitlines()
                  if f"job {job_id}:" in line or f"[{job_id}.extern] error" in line]
    return found


def plugstack_args(cluster: Cluster) -> dict[str, str]:
    """The shifter plugin's arguments in the cluster's plugstack.conf (``key -> value``)."""
    text = (cluster.state_dir / "slurm" / "plugstack.conf").read_text()
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("required", "optional") and words[1].endswith("shifter_spank.so"):
            return dict(word.partition("=")[::2] for word in words[2:])
    return {}
