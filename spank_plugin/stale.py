"""Finding job environments on this node whose job is gone (a crash skipped its epilog).

setupRoot already replaces a stale environment of the *same* job id; this finds those of
other jobs so that they do not pile up (the original's issue #249).  An environment is stale
only when every sign says its job is over on this node, and only signs that a user cannot
forge count (a user's own process or its own job directory must not keep an environment
alive forever, nor make one look dead):

- no root process of the job runs here: no ``slurmstepd: [<jobid>.<step>]`` and no process
  whose environment has ``SLURM_JOB_ID=<jobid>`` (a prolog or setupRoot of it), both counted
  only with real uid 0 (with ``PrologFlags=contain`` the extern step lives as long as the job);
- neither its container root (a root-owned tmpfs, created at mount time) nor its loop mount
  directory changed within ``GRACE_SECONDS`` (a prolog between its end and the extern step);
  only root-owned paths count: the job directory under udiMount is the user's where ACLs are missing;
- the controller does not list the job as running (one squeue call, made only for such a
  rare candidate; when it cannot answer nothing is removed).

"This node" is the node's network namespace: several nodes of the local test cluster share
one host and pid namespace, and a process of the same job on another node must not count.
Removal is unsetupRoot's own code, run as a separate process.
"""

from __future__ import annotations

import os
import subprocess
import time

GRACE_SECONDS = 5.0
STEPD_PREFIX = b"slurmstepd: ["
# squeue states in which a job may still own its environment on a node
_ACTIVE_STATES = {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING",
                  "RESIZING", "STAGE_OUT"}


def job_ids_with_processes(candidates: set[str]) -> set[str]:
    """Which of ``candidates`` have a process in this node's network namespace."""
    own_net = os.stat("/proc/self/ns/net")
    found: set[str] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or name == str(os.getpid()):
            continue
        try:
            net = os.stat(f"/proc/{name}/ns/net")
            if (net.st_dev, net.st_ino) != (own_net.st_dev, own_net.st_ino) or real_uid(name) != 0:
                continue
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmdline = fh.read(256)
            if cmdline.startswith(STEPD_PREFIX):
                found.add(cmdline[len(STEPD_PREFIX):].split(b".", 1)[0].split(b"]", 1)[0].decode("ascii", "replace"))
                continue
            with open(f"/proc/{name}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:
            continue
        for job_id in candidates - found:
            if b"\0SLURM_JOB_ID=" + job_id.encode() + b"\0" in b"\0" + environ:
                found.add(job_id)
    return found & candidates


def real_uid(pid: str) -> int | None:
    """The real uid of ``pid`` from its status (a user cannot change it; the owner of /proc/<pid>
    becomes root for any process that makes itself non-dumpable)."""
    with open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"Uid:"):
                return int(line.split()[1])
    return None


def recently_touched(paths: list[str], now: float) -> bool:
    """Whether one of ``paths`` that root owns changed within the grace (a user's do not count)."""
    for path in paths:
        try:
            info = os.lstat(path)
            if info.st_uid == 0 and now - info.st_ctime < GRACE_SECONDS:
                return True
        except FileNotFoundError:
            continue
    return False


def controller_says_gone(job_id: str) -> bool:
    """True only when the controller answers and does not run the job any more."""
    try:
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                                timeout=15, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    if result.returncode != 0:
        return "invalid job id" in result.stderr.lower()
    return not (set(result.stdout.split()) & _ACTIVE_STATES)


def stale_job_ids(udi_mount: str, loop_mount: str, job_ids: list[str], current_job: str) -> list[str]:
    """The job ids (other than ``current_job``) whose environment here is stale."""
    candidates = {job_id for job_id in job_ids if job_id != current_job}
    if not candidates:
        return []
    candidates -= job_ids_with_processes(candidates)
    now = time.time()
    candidates = {job_id for job_id in candidates
                  if not recently_touched([f"{udi_mount}/{job_id}/root", f"{loop_mount}/{job_id}"], now)}
    return sorted(job_id for job_id in candidates if controller_says_gone(job_id))
