"""The hooks slurmstepd runs: ``extern`` (the job's extern step) and ``ccm-task`` (each task of --ccm).

Both run as root inside slurmstepd (the shim's ``slurm_spank_task_post_fork`` of the extern
step and ``slurm_spank_task_init_privileged``), after the prolog built the job's environment.

``extern`` (plugstack ``extern_cgroup=1`` and/or ``extern_setup=``): with ``extern_cgroup=1``
the prolog only prepared the sshd (setupRoot ``--defer-sshd``) and it is started here.  The
shim made the extern slurmstepd a child subreaper, so the daemon, orphaned when it detaches,
is re-parented to that slurmstepd instead of init: Slurm's process tracking (the descendants
of the step's slurmstepd with proctrack/linuxproc, the step's cgroup with proctrack/cgroup)
then sees it and everything started through it, accounts for it and kills it when the job
ends, even if the epilog never runs.  Then the ``extern_setup=`` script runs, as root, with
the job's ids and ``SHIFTER_ROOT`` in its environment; a failure is logged.

``ccm-task``: prints the job's container root, which the shim chroots the task into.  It runs
once per task, so it only checks that the environment is there, the job's own and built for
--ccm (by the prolog, as root: the task's ``SLURM_SPANK_SHIFTER_CCM`` alone never gets a chroot).

``step-setup`` / ``step-teardown``: a step whose image, volumes or modules differ from its job's
(``srun --image=X shifter ...``) gets its own environment, built here by setupRoot
``--step-id`` once per node (slurmstepd, as root, before the tasks start) with the kernel's
squashfs and the job's GPUs on the node (:func:`_gpu_args`), and removed by unsetupRoot when
the step's slurmstepd ends (the job's epilog removes whatever a killed slurmstepd left).
Every task of the step enters it like the job's.  Both tools run as their ``main`` in a forked
child of this hook (``plugstack.run_root_main``): a step waits for them, and a second
interpreter cost it about 20 ms each way.  This module imports only the stdlib's cheapest
modules at the top (no ``re``, ``subprocess``), for the same reason.
"""

from __future__ import annotations

import os
import stat
import sys
import time

from shifter.errors import ShifterError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from shifter.runtime.container import Account
    from spank_plugin.plugstack import PlugstackArgs

_AUTHORIZED_KEYS = "opt/udiImage/etc/user_auth_keys"


def _ids(opts: dict[str, str], hook: str) -> tuple[str, int, int]:
    job_id, uid, gid = opts.get("job-id", ""), opts.get("uid", ""), opts.get("gid", "")
    if not (job_id.isdigit() and uid.isdigit() and gid.isdigit()):
        raise ShifterError(f"{hook}: needs --job-id, --uid and --gid from Slurm")
    return job_id, int(uid), int(gid)


def _job(conf: PlugstackArgs, job_id: str):
    from shifter.formats.config import load_config
    from shifter.runtime.jobenv import JobEnv

    return JobEnv(load_config(conf.shifter_config), job_id)


def _account(uid: int, gid: int) -> Account:
    """The job's user as setupRoot saw it (name, primary and supplementary groups)."""
    import pwd

    from shifter.runtime.container import Account

    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        raise ShifterError(f"uid {uid} has no passwd entry") from None
    groups = tuple(dict.fromkeys(gid if g == 0 else g for g in os.getgrouplist(user, gid)))
    return Account(user=user, uid=uid, gid=gid, groups=groups)


def extern(conf: PlugstackArgs, opts: dict[str, str]) -> int:
    """Start the deferred sshd in the extern step, then run ``extern_setup``; 1 if either failed."""
    job_id, uid, gid = _ids(opts, "extern")
    if uid == 0:
        return 0  # root's jobs never get a container (setupRoot refuses them)
    job = _job(conf, job_id)
    if not os.path.isfile(job.marker):
        return 0  # no container for this job on this node (no --image, or its setup failed)
    failed = 0
    if conf.extern_cgroup and conf.enable_sshd and os.path.isfile(os.path.join(job.root, _AUTHORIZED_KEYS)):
        from setuproot import sshd

        cgroup = sshd_cgroup(conf.memory_cgroup, uid, job_id)
        if cgroup is not None and not os.path.isdir(cgroup):
            cgroup = None  # setupRoot made it; if it is gone, the epilog is already running
        try:
            sshd.start_unless_port_taken(job.root, _account(uid, gid), cgroup, job_id)
        except ShifterError as err:  # e.g. a squatter took the port after the prolog checked it
            print(f"shifter: job {job_id}: the job's sshd did not start: {err}", file=sys.stderr)
            from shifter.runtime import jobdir

            # the job's tasks fail with the reason instead of running with someone else's port 1204
            jobdir.record_error(os.path.dirname(job.dir), job_id, uid, gid, f"the job's sshd did not start: {err}")
            failed = 1
    if conf.extern_setup:
        return run_extern_setup(conf.extern_setup, job_id, _account(uid, gid), job.root) or failed
    return failed


def sshd_cgroup(memory_cgroup: str | None, uid: int, job_id: str) -> str | None:
    """The cgroup the extern step moves the daemon into, or None to leave it in the step's own.

    On cgroup v1 the memory cgroup is a hierarchy of its own: joining it leaves the daemon in
    Slurm's cgroups of the other hierarchies.  On the unified v2 hierarchy a process is in one
    cgroup only, and a shifter cgroup would take the daemon, and all started through it, out of
    Slurm's job cgroup (its limits, accounting and kill at job end): it stays in the step's.
    """
    from shifter.runtime import jobcgroup

    if not memory_cgroup or jobcgroup.is_unified(memory_cgroup):
        return None
    return jobcgroup.job_cgroup(memory_cgroup, uid, job_id)


def run_extern_setup(script: str, job_id: str, account: Account, root: str) -> int:
    """Run the site's script as root; its output goes to slurmd's log through the shim."""
    import subprocess

    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SLURM_JOB_ID": job_id, "SLURM_JOB_UID": str(account.uid),
           "SLURM_JOB_GID": str(account.gid), "SLURM_JOB_USER": account.user, "SHIFTER_ROOT": root}
    try:
        proc = subprocess.run([script], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, cwd="/", check=False)
    except OSError as err:
        print(f"shifter: job {job_id}: extern_setup {script}: {err.strerror}", file=sys.stderr)
        return 1
    for line in proc.stdout.decode(errors="replace").splitlines():
        print(f"shifter: extern_setup: {line}", file=sys.stderr)
    if proc.returncode != 0:
        print(f"shifter: job {job_id}: extern_setup {script} failed with status {proc.returncode}",
              file=sys.stderr)
        return 1
    return 0


def ccm_task(conf: PlugstackArgs, opts: dict[str, str]) -> str:
    """The root a --ccm task is chrooted into: the job's CCM environment on this node, complete and its own.

    The shim asks because the task's environment says ``SLURM_SPANK_SHIFTER_CCM=1``, which any
    task can set: whether the job really is a --ccm job is decided here, from what the prolog
    (root) left in the job's root, never from the task.  The job's directory may be the user's, so
    everything in it is opened through its descriptor, without following symlinks, and trusted
    only when root owns it; the root-owned marker must name the task's user.
    """
    job_id, uid, _ = _ids(opts, "ccm-task")
    job = _job(conf, job_id)
    try:
        dir_fd = os.open(job.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ShifterError(f"--ccm: job {job_id} has no container on this node") from None
    except OSError:
        raise ShifterError(f"--ccm: the container of job {job_id} on this node is not ready") from None
    try:
        if os.fstat(dir_fd).st_uid not in (0, uid):  # root's with the user's ACL, or (no ACLs) the user's
            raise ShifterError(f"--ccm: the container of job {job_id} on this node is not ready")
        reason = _read_root_owned(dir_fd, os.path.basename(job.error))
        if reason is not None:
            first = reason.decode(errors="replace").split("\n", 1)[0].strip()
            raise ShifterError(f"--ccm: the container could not be built: {first}")
        marker = _read_root_owned(dir_fd, os.path.relpath(job.marker, job.dir))
    finally:
        os.close(dir_fd)
    if marker is None:
        raise ShifterError(f"--ccm: the container of job {job_id} on this node is not ready")
    if _marker_field(marker, "user") != _user_name(uid):
        raise ShifterError(f"--ccm: the container of job {job_id} on this node is not ready")
    if _marker_field(marker, "identifier") != CCM_ROOT:
        raise ShifterError(f"--ccm: job {job_id} was not submitted with --ccm")
    return job.root


CCM_ROOT = "/"  # a --ccm job's container is made from the host's root (the prolog's local:/)
_MAX_READ = 65536


def _read_root_owned(dir_fd: int, relpath: str) -> bytes | None:
    """The start of ``relpath`` below ``dir_fd`` if it is a plain, root-owned file; None if absent.

    Each component is opened without following symlinks; a file that is not root's own (a
    symlink, a hard link, the user's file) is refused rather than read.
    """
    from shifter.runtime import fdpath

    try:
        file_fd = fdpath.open_no_symlinks(dir_fd, relpath, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:
        raise ShifterError(f"--ccm: {relpath} of the job is not a plain file") from None
    try:
        info = os.fstat(file_fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != 0 or info.st_nlink != 1:
            raise ShifterError(f"--ccm: {relpath} of the job is not root's own file")
        return os.read(file_fd, _MAX_READ)
    finally:
        os.close(file_fd)


def _marker_field(marker: bytes, key: str) -> str | None:
    import json

    try:
        value = json.loads(marker.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return value.get(key) if isinstance(value, dict) else None


def _user_name(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def step_setup(conf: PlugstackArgs, opts: dict[str, str]) -> int:
    """Build the step's environment unless its request is the job's; prints ``prepared`` if built.

    A request the node cannot serve is recorded for the step's ``shifter`` to print (status 0,
    the node stays up); a node failure returns non-zero and fails the step.
    """
    from shifter.errors import REQUEST_FAILED
    from shifter.formats.config import load_config
    from shifter.formats.modules import module_names, select_modules
    from shifter.formats.reuse import marker_text
    from shifter.formats.volumemap import parse_volume_map, volume_signature
    from shifter.runtime.jobenv import JobEnv
    from spank_plugin.plugstack import check_image, record_error, run_root_main, user_name

    job_id, uid, gid = _ids(opts, "step-setup")
    step_id = opts.get("step-id", "")
    config = load_config(conf.shifter_config)
    step = JobEnv(config, job_id, step_id)
    image_type, image = opts.get("image-type") or "id", opts.get("image", "")
    volumes = [v for v in opts.get("volume", "").split(";") if v]
    user = user_name(uid)
    try:
        check_image(image_type, image)
        names = module_names(select_modules(config, opts.get("module") or None))
        signature = volume_signature(parse_volume_map(";".join(volumes), site=False)) if volumes else ""
        expected = marker_text(image, user, signature, names)
    except ShifterError as err:
        record_error(step, uid, gid, str(err))
        return 0
    try:
        fd = os.open(JobEnv(config, job_id).marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd) as fh:
            if fh.read() == expected:  # the job's own request: its tasks enter the job's environment
                print(f"shifter: step {job_id}.{step_id} asks for the job's own environment", file=sys.stderr)
                return 0
    except OSError:
        pass  # no job environment (a job without --image) or none readable: the step gets its own
    from shifter import buildinfo

    argv = [os.path.join(buildinfo.PREFIX, "sbin", "setupRoot"), "--config", conf.shifter_config,
            "--job-id", job_id, "--step-id", step_id, "-U", str(uid), "-G", str(gid), "-u", user]
    for volume in volumes:
        argv += ["-v", volume]
    if opts.get("module"):
        argv += ["-m", opts["module"]]
    if config.gpu_recipe:  # a node without GPUs asks slurmctld nothing
        argv += _gpu_args(job_id)
    start = time.monotonic()
    status, reason = run_root_main(argv + ["--", image_type, image])
    print(f"shifter: step {job_id}.{step_id} setup took {(time.monotonic() - start) * 1000:.1f} ms (status {status})",
          file=sys.stderr)
    if status == REQUEST_FAILED:
        record_error(step, uid, gid, reason)
        sys.stdout.write("prepared\n")  # the error file goes with the step's teardown
        return 0
    if status == 0:
        sys.stdout.write("prepared\n")
    return status


# one GRES of a node's line in `scontrol show job -d`: gpu[:type]:count(IDX:0-1,3); compiled where used, as
# importing re costs every step hook about 5 ms
_GPU_GRES = r"(?:^|,)gpu(?::[^:(),]+)?:\d+\(IDX:([0-9,-]+)\)"


def job_gpus_on_node(show_job: str, node: str) -> str:
    """The job's GPU indices on ``node`` (``0,2``; empty: none) from ``scontrol show job -d``.

    Each ``Nodes=<hostlist> ... GRES=<gres>`` line gives the allocation of its nodes; the GRES
    list separates entries with commas, and an index list may hold commas too.
    """
    import re

    from shifter.formats.gpurecipe import parse_gpu_ids
    from shifter.formats.hostsfile import expand_hostlist

    gres = re.compile(_GPU_GRES)
    for line in show_job.splitlines():
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        if "Nodes" not in fields or "GRES" not in fields or node not in expand_hostlist(fields["Nodes"]):
            continue
        ids: set[int] = set()
        for match in gres.finditer(fields["GRES"]):
            ids.update(parse_gpu_ids(match.group(1)))
        return ",".join(str(i) for i in sorted(ids))
    return ""


def _gpu_args(job_id: str) -> list[str]:
    """setupRoot's ``--gpus``/``--gpus-local`` for a step's environment: the job's GPUs on this node.

    Why the job's and not the step's: when step_setup runs (slurmstepd, before the tasks),
    SPANK shows only the environment srun sent, copied from where srun ran (SLURMD_NODENAME
    there names the batch node, SLURM_JOB_GPUS/SLURM_STEP_GPUS are that node's and any user can
    set them); Slurm gives a task its step's GPUs only when it starts it.  So the allocation is
    asked from slurmctld, which knows it per node; Slurm's CUDA_VISIBLE_DEVICES and device
    cgroup (ConstrainDevices) still narrow each task to its step's GPUs.  If slurmctld cannot
    answer, the step gets no GPU (logged), as a job without GPUs.
    """
    import subprocess

    from spank_plugin.plugstack import gpus_local

    node = os.environ.get("SLURMD_NODENAME", "")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if os.environ.get("SLURM_CONF"):
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-d", job_id], env=env, capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL, check=False)
        if proc.returncode != 0:
            raise ShifterError(proc.stderr.strip() or f"scontrol exited with status {proc.returncode}")
        gpus = job_gpus_on_node(proc.stdout, node) if node else ""
    except (OSError, subprocess.SubprocessError, ShifterError) as err:
        print(f"shifter: job {job_id}: the step's GPUs on {node or 'this node'} are unknown, it gets none: {err}",
              file=sys.stderr)
        return []
    if not gpus:
        return []
    return ["--gpus", gpus] + (["--gpus-local"] if gpus_local(dict(os.environ)) else [])


def step_teardown(conf: PlugstackArgs, opts: dict[str, str]) -> int:
    """Remove the step's environment (its tasks are gone or are killed first)."""
    from shifter import buildinfo
    from spank_plugin.plugstack import run_root_main

    job_id, _uid, _gid = _ids(opts, "step-teardown")
    step_id = opts.get("step-id", "")
    if not step_id.isdigit():
        raise ShifterError("step-teardown: needs --step-id")
    argv = [os.path.join(buildinfo.PREFIX, "sbin", "unsetupRoot"), "--config", conf.shifter_config,
            "--job-id", job_id, "--step-id", step_id]
    start = time.monotonic()
    status = run_root_main(argv)[0]
    print(f"shifter: step {job_id}.{step_id} teardown took {(time.monotonic() - start) * 1000:.1f} ms "
          f"(status {status})", file=sys.stderr)
    return status
