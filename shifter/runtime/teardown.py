"""Removing a job's environment from a node, completely and idempotently.

Used by unsetupRoot, by setupRoot to clean a stale environment of the same job id (a job that
died without its epilog) and by setupRoot to undo a setup that failed halfway.  Each step
tolerates the state any earlier crash could have left: missing directories, missing mounts,
processes already gone.
"""

from __future__ import annotations

import errno
import os

from shifter.errors import ShifterError
from shifter.runtime import fdpath, mounts

TYPE_CHECKING = False
if TYPE_CHECKING:
    from shifter.formats.config import UdiRootConfig
    from shifter.runtime.jobenv import JobEnv

_KILL_WAIT_SECONDS = 2.0
_SIGKILL = 9  # the signal module costs ~3 ms to import (enum, functools) on this path


def processes_rooted_in(root: str) -> list[int]:
    """Pids of processes whose root directory is ``root`` or below (the job's tasks and sshd).

    A process chrooted at a directory of the same path in another mount namespace (another
    node's, where several nodes share a host, and a step ends on each node at its own time)
    is not this environment's: a root equal to ``root`` must also be the same directory.
    """
    found = []
    here = None
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            link = os.readlink(f"/proc/{name}/root")
        except OSError:
            continue
        if not mounts.is_under(link, root):
            continue
        if link.rstrip("/") == root.rstrip("/"):
            if here is None:
                try:
                    info = os.stat(root)
                    here = (info.st_dev, info.st_ino)
                except OSError:  # nothing to compare with: the path decides, as before
                    here = ()
            try:
                theirs = os.stat(f"/proc/{name}/root")
            except OSError:
                continue
            if here and (theirs.st_dev, theirs.st_ino) != here:
                continue
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
    """rm -rf ``path`` (a job's directory) through descriptors.

    The job's user owns its directory and can swap anything below it for a symlink to a host
    directory while this runs: the removal works on descriptors (shifter/runtime/fdpath.py), never
    follows a link and stops at another filesystem.  Nothing may still be mounted below it.
    """
    if mounts.mounts_under(path):
        raise ShifterError(f"refusing to remove {path}: something is still mounted below it")
    parent, name = os.path.split(path.rstrip("/"))
    try:
        parent_fd = fdpath.open_dir(parent)  # udiMount or loopMount: root's, checked by setupRoot
    except FileNotFoundError:
        return
    try:
        fdpath.remove_tree(parent_fd, name)
    except OSError as exc:
        raise ShifterError(f"cannot remove {path}: {exc.strerror}") from None
    finally:
        os.close(parent_fd)


def destroy(config: UdiRootConfig, job: JobEnv, memory_cgroup: str | None = None) -> None:
    """Kill the job's processes (its memory cgroup's and those rooted in its environment),
    unmount its trees, remove its cache files, directories and cgroup.

    Every step is tried even when an earlier one failed (a cgroup that cannot be removed must
    not keep the mounts and the loop device alive); the failures are reported together.
    """
    errors: list[str] = []
    if memory_cgroup:
        from shifter.runtime import jobcgroup

        try:
            jobcgroup.remove(memory_cgroup, job.jobid)
        except OSError as exc:
            errors.append(exc.strerror or str(exc))
    if not os.path.lexists(job.dir) and not os.path.lexists(job.loop_mount):
        remove_cache_files(config, job.jobid)  # nothing can be mounted below paths that do not exist
        _report(errors)
        return
    try:  # first, so that no new task enters an environment being torn down without a check
        os.unlink(job.plan)
    except OSError:
        pass
    kill_processes_rooted_in(job.root)
    for tree in (job.dir, job.loop_mount):
        try:
            mounts.unmount_tree(tree)
        except OSError as exc:
            errors.append(f"cannot unmount job {job.jobid}: {exc.strerror}")
    try:
        remove_cache_files(config, job.jobid)
    except OSError as exc:
        errors.append(f"cannot remove the perNodeCache files of job {job.jobid}: {exc.strerror}")
    try:
        _remove_tree(job.dir)
    except ShifterError as err:
        errors.append(str(err))
    try:
        os.rmdir(job.loop_mount)  # root's and normally empty: one call instead of a mount table read
    except FileNotFoundError:
        pass
    except OSError as exc:
        try:
            if exc.errno != errno.ENOTEMPTY:
                raise ShifterError(f"cannot remove {job.loop_mount}: {exc.strerror}") from None
            _remove_tree(job.loop_mount)
        except ShifterError as err:
            errors.append(str(err))
    _report(errors)


def _report(errors: list[str]) -> None:
    if errors:
        raise ShifterError("; ".join(errors))
