"""The job's memory cgroup: ``<memory_cgroup>/shifter/uid_<uid>/job_<jobid>``.

It holds the job's sshd and everything started through it, so the epilog can find and kill
all of it, and a site can cap its memory.  Works on the cgroup v1 memory hierarchy (e.g.
/sys/fs/cgroup/memory) and on the unified v2 hierarchy (e.g. /sys/fs/cgroup) when it offers
the memory controller: there ``+memory`` is written to each new level's parent's
cgroup.subtree_control so the job's cgroup gets memory.* files.  Only directories below
``<memory_cgroup>/shifter`` are ever created or removed.
"""

from __future__ import annotations

import errno
import os

_SIGKILL = 9


def job_cgroup(base: str, uid: int, jobid: str) -> str:
    return f"{base.rstrip('/')}/shifter/uid_{uid}/job_{jobid}"


def _is_v2(path: str) -> bool:
    return os.path.exists(os.path.join(path, "cgroup.controllers"))


def is_unified(path: str) -> bool:
    """Is ``path`` on the cgroup v2 (unified) hierarchy, where a process is in one cgroup only?"""
    return _is_v2(path)


def create(base: str, uid: int, jobid: str) -> str:
    """Create the job's cgroup (and its parents under ``base``); return its path."""
    if not os.path.isdir(base):
        raise OSError(errno.ENOENT, f"memory cgroup {base} does not exist")
    path = base.rstrip("/")
    for part in ("shifter", f"uid_{uid}", f"job_{jobid}"):
        if _is_v2(path):
            with open(os.path.join(path, "cgroup.controllers")) as fh:
                if "memory" not in fh.read().split():
                    raise OSError(errno.ENOTSUP, f"cgroup {path} has no memory controller")
            with open(os.path.join(path, "cgroup.subtree_control"), "w") as fh:
                fh.write("+memory")
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
    return path


def add_self(path: str) -> None:
    """Move the calling process into the cgroup (its children follow)."""
    with open(os.path.join(path, "cgroup.procs"), "w") as fh:
        fh.write(str(os.getpid()))


def _pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as fh:
            return [int(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def remove(base: str, jobid: str, timeout: float = 5.0) -> None:
    """Kill every process in the job's cgroup(s) and remove them; idempotent."""
    import time

    top = os.path.join(base.rstrip("/"), "shifter")
    try:
        uid_dirs = [e.path for e in os.scandir(top) if e.is_dir() and e.name.startswith("uid_")]
    except FileNotFoundError:
        return
    for uid_dir in uid_dirs:
        path = os.path.join(uid_dir, f"job_{jobid}")
        if not os.path.isdir(path):
            continue
        deadline = time.monotonic() + timeout
        while True:
            pids = _pids(path)
            for pid in pids:
                try:
                    os.kill(pid, _SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise OSError(exc.errno, f"cannot remove cgroup {path}: {exc.strerror}") from None
                time.sleep(0.01)
        try:
            os.rmdir(uid_dir)
        except OSError:
            pass  # another job of the user still has its cgroup there
