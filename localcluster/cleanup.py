"""Find and remove everything a (possibly crashed) cluster can leave behind.

The same inspection serves `down` (remove it) and the check after `make test` (report it
and fail): processes in the nodes' network namespaces, mounts under the state dir in any
mount namespace, loop devices backed by files under the state dir, the network, and the
memory cgroup directory when the cluster created it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from . import hostdirs, network
from .procs import start_time
from .settings import Settings

MEMORY_CGROUP = Path("/sys/fs/cgroup/memory/shifter")


def _ns_inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _proc_ns_inode(pid: int, kind: str) -> int | None:
    try:
        link = os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    return int(link[link.index("[") + 1:-1])


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def node_processes() -> list[int]:
    """Processes living in any of the cluster's node network namespaces."""
    inodes = {ino for ns in network.cluster_netns()
              if (ino := _ns_inode(network.NETNS_DIR / ns)) is not None}
    return [pid for pid in _pids() if inodes and _proc_ns_inode(pid, "net") in inodes]


def kill_node_processes(timeout: float = 10.0) -> None:
    victims = {pid: start_time(pid) for pid in node_processes()}
    for pid in victims:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(start_time(p) == s for p, s in victims.items()):
        time.sleep(0.1)
    for pid, started in victims.items():
        if start_time(pid) == started:
            _signal(pid, signal.SIGKILL)
    while any(start_time(p) == s and not _zombie(p) for p, s in victims.items()):
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts_under(root: Path) -> list[tuple[int, str]]:
    """(pid, mount point) for every mount below `root`, one pid per mount namespace.

    Only processes whose root is the namespace's root are read: a chrooted process sees
    mount points relative to its own root.
    """
    prefix = str(root).rstrip("/") + "/"
    seen: set[int | None] = set()
    found = []
    for pid in _pids():
        ns = _proc_ns_inode(pid, "mnt")
        if ns in seen or _root_of(pid) != "/":
            continue
        seen.add(ns)
        try:
            lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        except OSError:
            continue
        found += [(pid, point) for line in lines
                  if (point := _unescape(line.split()[4])).startswith(prefix)]
    return found


def _root_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:
        return None


def loop_devices_under(root: Path) -> list[str]:
    """/dev/loopN of every attached loop device whose backing file lies below `root`."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    for dev in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(prefix):
            found.append(f"/dev/{dev.name}")
    return found


def _unmount_host_mounts(root: Path) -> None:
    own_ns = _proc_ns_inode(os.getpid(), "mnt")
    for pid, point in sorted(mounts_under(root), key=lambda m: -len(m[1])):
        if _proc_ns_inode(pid, "mnt") == own_ns:
            subprocess.run(["umount", "-l", point], capture_output=True)


def _detach_loops(root: Path) -> None:
    for _ in range(50):
        devices = loop_devices_under(root)
        if not devices:
            return
        for dev in devices:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        time.sleep(0.1)


def cgroup_marker(settings: Settings) -> Path:
    return settings.state_dir / "owns-memory-cgroup"


def claim_memory_cgroup(settings: Settings) -> None:
    """Remember, before anything runs, that the shifter memory cgroup dir is ours to remove.

    The marker stays after `down`, so the leftover check still knows the dir was ours.
    """
    if MEMORY_CGROUP.parent.is_dir() and not MEMORY_CGROUP.exists():
        cgroup_marker(settings).touch()


def _remove_memory_cgroup(settings: Settings) -> None:
    if not cgroup_marker(settings).exists() or not MEMORY_CGROUP.exists():
        return
    for path in sorted((p for p in MEMORY_CGROUP.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _kill_cgroup_tasks(path)
        path.rmdir()
    _kill_cgroup_tasks(MEMORY_CGROUP)
    MEMORY_CGROUP.rmdir()


def _kill_cgroup_tasks(path: Path) -> None:
    for _ in range(100):
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        if not pids:
            return
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.05)


def clean(settings: Settings) -> None:
    """Remove every trace; the daemons must already be stopped."""
    kill_node_processes()
    _unmount_host_mounts(settings.state_dir)
    _detach_loops(settings.state_dir)
    network.remove_all()
    _remove_memory_cgroup(settings)
    shutil.rmtree(settings.state_dir / "slurmd", ignore_errors=True)
    hostdirs.remove(settings)


DAEMON_COMMANDS = {"munged", "slurmctld", "slurmd", "slurmstepd", "docker-registry", "shifter-gateway",
                   "nsenter", "unshare", "python3", "python"}


def processes_using(root: Path) -> list[int]:
    """Daemons of ours: processes of the kinds the cluster starts whose arguments name `root`.

    The kinds are checked so that, say, someone's `tail -f` of a log in the state dir is
    not mistaken for a daemon the cluster failed to stop.
    """
    needle = str(root).encode()
    found = []
    for pid in _pids():
        if pid == os.getpid() or _comm(pid) not in DAEMON_COMMANDS:
            continue
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def leftovers(settings: Settings, running: list[str]) -> list[str]:
    """A line per thing still there after `down` (empty when clean)."""
    found = [f"process {name} still running" for name in running]
    found += [f"process {pid} ({_comm(pid)}) started with {settings.state_dir} in its arguments"
              for pid in processes_using(settings.state_dir) if not _zombie(pid)]
    found += [f"process {pid} ({_comm(pid)}) in a node network namespace" for pid in node_processes()]
    found += [f"mount {point} (mount namespace of pid {pid})"
              for pid, point in mounts_under(settings.state_dir)]
    found += [f"loop device {dev}" for dev in loop_devices_under(settings.state_dir)]
    found += network.leftovers()
    if cgroup_marker(settings).exists() and MEMORY_CGROUP.exists():
        found.append(f"cgroup {MEMORY_CGROUP}")
    found += hostdirs.leftovers(settings)
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
