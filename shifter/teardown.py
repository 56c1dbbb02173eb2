"""Removing a job's environment from a node, completely and idempotently.

Used by unsetupRoot, by setupRoot to clean a stale environment of the same job id (a job that
died without its epilog) and by setupRoot to undo a setup that failed halfway.  Each step
tolerates the state any earlier crash could have left: missing directories, missing mounts,
processes already gone.
"""

from __future__ import annotations

import errno
import os

from shifter import mounts
from shifter.errors import ShifterError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from shifter.config import UdiRootConfig
    from shifter.jobenv import JobEnv

_KILL_WAIT_SECONDS = 2.0
_SIGKILL = 9  # the signal module costs ~3 ms to import (enum, functools) on this path


def processes_rooted_in(root: str) -> list[int]:
    """Pids of processes whose root directory is ``root`` or below (the job's tasks and sshd)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            link = os.readlink(f"/proc/{name}/root")
        except OSError:
            continue
        if mounts.is_under(link, root):
            found.append(int(name))
    return found


def kill_processes_rooted_in(root: str) -> None:
    """SIGKILL everything chrooted into ``root`` and wait briefly until it is gone."""
    pids = processes_rooted_in(root)
    if not pids:
        return
    for pid in pids:
        try:
            os.kill(pid, _SIGKILL)
        except ProcessLookupError:
            pass
    import time

    deadline = time.monotonic() + _KILL_WAIT_SECONDS
    while processes_rooted_in(root) and time.monotonic() < deadline:
        time.sleep(0.01)


def remove_cache_files(config: UdiRootConfig, jobid: str) -> None:
    """Remove perNodeCache backing files a crashed setup of this job left before unlinking them."""
    directory = config.per_node_cache_path
    if not directory:
        return
    prefix = f"perNodeCache_job{jobid}_"
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass


def _remove_tree(path: str) -> None:
    """rm -rf ``path`` after checking nothing is mounted below it (never delete into a bind)."""
    if mounts.mounts_under(path):
        raise ShifterError(f"refusing to remove {path}: something is still mounted below it")
    _remove(path)


def _remove(path: str) -> None:
    """rm -rf without following symlinks (shutil costs ~2 ms to import on this path)."""
    try:
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    except PermissionError:
        if not os.path.isdir(path) or os.path.islink(path):
            raise
    with os.scandir(path) as entries:
        children = [entry.path for entry in entries]
    for child in children:
        _remove(child)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def destroy(config: UdiRootConfig, job: JobEnv, memory_cgroup: str | None = None) -> None:
    """Kill the job's processes (its memory cgroup's and those rooted in its environment),
    unmount its trees, remove its cache files, directories and cgroup."""
    if memory_cgroup:
        from shifter import jobcgroup

        try:
            jobcgroup.remove(memory_cgroup, job.jobid)
        except OSError as exc:
            raise ShifterError(exc.strerror) from None
    if not os.path.lexists(job.dir) and not os.path.lexists(job.loop_mount):
        remove_cache_files(config, job.jobid)  # nothing can be mounted below paths that do not exist
        return
    try:  # first, so that no new task enters an environment being torn down without a check
        os.unlink(job.plan)
    except OSError:
        pass
    kill_processes_rooted_in(job.root)
    try:
        mounts.unmount_tree(job.dir)
        mounts.unmount_tree(job.loop_mount)
    except OSError as exc:
        raise ShifterError(f"cannot unmount job {job.jobid}: {exc.strerror}") from None
    remove_cache_files(config, job.jobid)
    _remove_tree(job.dir)
    try:
        os.rmdir(job.loop_mount)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise ShifterError(f"cannot remove {job.loop_mount}: {exc.strerror}") from None
        _remove_tree(job.loop_mount)
