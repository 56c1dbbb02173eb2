"""What the SPANK shim runs: `spank-hook <submit|prolog|epilog> [plugstack args] [options]`.

The C shim stays thin; every decision is made here.  `submit` runs as the
user inside sbatch/salloc/srun and must be quick (it is on the submission
path), so this module imports only the stdlib and the small format modules.
`prolog` and `epilog` run as root in slurmd's prolog environment, which
Slurm builds (user-set variables only reach it with a SPANK_ prefix).
"""

from __future__ import annotations

import os
import sys
import time

from shifter import buildinfo
from shifter.errors import ShifterError
from shifter.record import Record
from spank_plugin.plugstack import (
    PlugstackArgs,
    check_image,
    gpus_local,
    parse_plugstack_args,
    record_error,
    run_root_tool,
    user_name,
)

OPTION_ENV = "_SLURM_SPANK_OPTION_shifter_"


def check_sshd_on_node(conf: PlugstackArgs) -> None:
    """On the unified cgroup v2 hierarchy a prolog-started sshd would leave Slurm's job cgroup for the
    shifter one (no Slurm limits, no accounting): there only the extern step may start it."""
    from shifter.runtime import jobcgroup

    if conf.enable_sshd and not conf.extern_cgroup and conf.memory_cgroup and jobcgroup.is_unified(conf.memory_cgroup):
        raise ShifterError(f"plugstack.conf: enable_sshd=1 with memory_cgroup={conf.memory_cgroup} (cgroup v2) needs "
                           "extern_cgroup=1, so that the job's sshd stays in Slurm's job cgroup")


def _options(rest: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for arg in rest:
        key, sep, value = arg[2:].partition("=")
        opts[key] = value if sep else "1"
    return opts


# ---------------------------------------------------------------- submit


def submit(conf: PlugstackArgs, opts: dict[str, str]) -> list[tuple[str, str]]:
    """Validate the request and resolve the image once; return the variables to publish."""
    from shifter.formats.config import load_config
    from shifter.formats.imageref import parse_image_ref
    from shifter.formats.modules import module_names, select_modules
    from shifter.formats.sitefs import refuse_hidden_sources
    from shifter.formats.volumemap import parse_volume_map

    config = load_config(os.environ.get("SHIFTER_UDIROOT_CONF") or conf.shifter_config)
    image_text = opts.get("image")
    volume_text = opts.get("volume")
    module_text = opts.get("module")
    ccm = "ccm" in opts
    inherited = {name for name in ("image", "volume", "module") if _inherited(conf, name, opts.get(name))}
    if ccm and not conf.enable_ccm:
        raise ShifterError("--ccm is not enabled on this system (plugstack.conf enable_ccm=1)")
    if ccm and image_text:
        raise ShifterError("--ccm cannot be combined with --image")
    if volume_text and not image_text:
        raise ShifterError("--volume needs --image")
    writable = "writable" in opts
    if writable and ccm:
        raise ShifterError("--writable cannot be combined with --ccm")
    if writable and not image_text:
        raise ShifterError("--writable needs --image")
    if writable and os.environ.get("SLURM_JOB_ID") and _first_env("WRITABLE") != "1":
        # the job's environment is built once per node by the prolog: a step cannot change it
        raise ShifterError("--writable applies to a whole job: give it to sbatch or salloc, not to an srun in a job")

    out: list[tuple[str, str]] = []
    if image_text and "image" in inherited and _first_env("IMAGE") and _first_env("IMAGETYPE"):
        pass  # the job's image, resolved at submission: its SHIFTER_* variables are already here
    elif image_text:
        ref = parse_image_ref(image_text, config.default_image_type)
        if ref.type == "id":
            image_id = ref.tag
        elif ref.type == "local":
            if not config.allow_local_chroot:
                raise ShifterError(f"image type 'local' is not allowed on this system: {image_text}")
            image_id = ref.tag
        else:
            image_id = _resolve_in_job(config, ref)
        image_type = "local" if ref.type == "local" else "id"
        out += [("SHIFTER_IMAGE", image_id), ("SHIFTER_IMAGETYPE", image_type)]
        if ref.type not in ("id", "local"):
            out.append(("SHIFTER_IMAGEREQUEST", f"{ref.type}:{ref.tag}"))
    if volume_text and "volume" not in inherited:
        mounts = parse_volume_map(volume_text, site=False)
        refuse_hidden_sources(config.site_fs, mounts)
        out.append(("SHIFTER_VOLUME", ";".join(m.canonical() for m in mounts)))
    if module_text and "module" not in inherited:
        names = module_names(select_modules(config, module_text))
        out.append(("SHIFTER_MODULE", ",".join(names) or "none"))
    if ccm:
        out.append(("SHIFTER_CCM", "1"))
    if writable:
        out.append(("SHIFTER_WRITABLE", "1"))
    if conf.enable_sshd and (image_text or ccm):
        out.append(("SHIFTER_SSH_PUBKEY", user_ssh_pubkey()))
    return out


def user_ssh_pubkey() -> str:
    """The user's in-job ssh key (~/.udiRoot/id_rsa.key, the original's path), created if missing."""
    import subprocess

    home = os.path.expanduser("~")
    key_dir = os.path.join(home, ".udiRoot")
    key = os.path.join(key_dir, "id_rsa.key")
    if not (os.path.exists(key) and os.path.exists(key + ".pub")):
        os.makedirs(key_dir, mode=0o700, exist_ok=True)
        for stale in (key, key + ".pub"):
            if os.path.lexists(stale):
                os.unlink(stale)
        proc = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "shifter job key", "-f", key],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ShifterError(f"cannot create {key}: {proc.stderr.strip() or 'ssh-keygen failed'}")
    with open(key + ".pub") as f:
        pubkey = f.readline().strip()
    if not pubkey or "\n" in pubkey:
        raise ShifterError(f"{key}.pub holds no public key")
    return pubkey


def _inherited(conf: PlugstackArgs, name: str, value: str | None) -> bool:
    """Is this option value the job's own, handed down to an srun inside the allocation?

    Slurm gives every nested srun the submission's options again (SLURM_SPANK_<option env>,
    with only the last value of a repeated --volume).  Such a value was validated and resolved
    at submission, and the job's SHIFTER_* variables already hold the result: using them means
    nested sruns never ask the gateway again and keep every volume.
    """
    if not value or not os.environ.get("SLURM_JOB_ID"):
        return False
    option_env = "SLURM_SPANK_" + OPTION_ENV + ("shifter_" if conf.long_options else "") + name
    return os.environ.get(option_env) == value


def _first_env(name: str) -> str | None:
    return os.environ.get(f"SHIFTER_{name}") or os.environ.get(f"SLURM_SPANK_SHIFTER_{name}") or None


_STEP_IMAGES = "step-images.{job}"  # in ~/.udiRoot: what the sruns of one job resolved (_resolve_in_job)


def _resolve_in_job(config, ref) -> str:
    """The image id of an ``srun --image=`` in a job, asked from the gateway once per job and request.

    A job that runs many steps of another image (a loop of ``srun --image=X``) asked the
    gateway at every srun: about 20 ms of a step that costs 70.  The answer is kept for the
    job in the user's own ``~/.udiRoot/step-images.<jobid>``, a file only the user may write:
    what it holds only picks an image id for the user's own steps, which the user may name
    directly (``--image=id:...``), and setupRoot checks the image's ACL against it as for any
    id.  Outside a job (sbatch, salloc, srun that makes a job) the gateway is always asked.
    """
    job_id = os.environ.get("SLURM_JOB_ID", "")
    if not job_id.isdigit():
        return _resolve(config, ref)
    key = f"{config.system or ''} {ref.type}:{ref.tag}"
    path = os.path.join(os.path.expanduser("~"), ".udiRoot", _STEP_IMAGES.format(job=job_id))
    known = _read_step_images(path)
    if key in known:
        return known[key]
    image_id = _resolve(config, ref)
    known[key] = image_id
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        temp = f"{path}.{os.getpid()}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(f"{name} {value}\n" for name, value in known.items()))
        os.rename(temp, path)
        _prune_step_images(os.path.dirname(path), path)
    except OSError:
        pass  # a home that cannot be written: the next srun asks the gateway again
    return image_id


_STEP_IMAGES_KEPT_S = 7 * 86400


def _prune_step_images(directory: str, current: str) -> None:
    """Remove the files of jobs that ended long ago (no epilog runs as the user to remove them)."""
    cutoff = time.time() - _STEP_IMAGES_KEPT_S
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith("step-images.") or entry.path == current:
                continue
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass


def _read_step_images(path: str) -> dict[str, str]:
    """``system type:tag`` -> image id from the job's file; empty unless it is the user's own, private file."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
            return {}
        text = fh.read(65536).decode(errors="replace")
    known = {}
    for line in text.splitlines():
        key, _, image_id = line.rpartition(" ")
        if key and len(image_id) == 64 and all(c in "0123456789abcdef" for c in image_id):
            known[key] = image_id
    return known


def _resolve(config, ref) -> str:
    from shifter.client.gatewayclient import GatewayClient

    client = GatewayClient(
        config.image_gateways, config.system, config.gateway_timeout, gateway_user=config.image_gateway_user
    )
    record = client.lookup(ref)
    image_id = record.get("id")
    if not isinstance(image_id, str) or len(image_id) != 64:
        raise ShifterError(f"image gateway returned no image id for {ref.type}:{ref.tag}")
    return image_id


# ---------------------------------------------------------------- prolog / epilog


class JobRequest(Record):
    """What the prolog knows about the job: SPANK items plus the job-control environment."""

    __slots__ = ("job_id", "uid", "gid", "user", "image_type", "image", "volumes", "modules", "ssh_pubkey",
                 "node_spec", "gpus", "writable", "gpus_local")
    job_id: str
    uid: int
    gid: int
    user: str
    image_type: str
    image: str
    volumes: list[str]
    modules: str | None
    ssh_pubkey: str | None
    node_spec: str
    gpus: str  # SLURM_JOB_GPUS: the job's GPU indices on this node (Slurm 22.05 sets it in the prolog)
    writable: bool
    gpus_local: bool  # tasks get job-relative GPU indices (task/cgroup with ConstrainDevices=yes)
    _defaults = {"gpus": "", "writable": False, "gpus_local": False}


def job_request(opts: dict[str, str], env: dict[str, str], conf: PlugstackArgs) -> JobRequest:
    """Collect the job's request; everything here came from Slurm, values from the user are re-validated."""
    from shifter.formats.hostsfile import expand_cpus_per_node, expand_hostlist

    job_id = opts.get("job-id") or env.get("SLURM_JOB_ID", "")
    if not job_id.isdigit():
        raise ShifterError(f"prolog: no valid job id ({job_id!r})")
    uid = int(opts.get("uid") or env.get("SLURM_JOB_UID") or -1)
    if uid <= 0:
        raise ShifterError(f"prolog: job {job_id} has no valid non-root uid")
    user = env.get("SLURM_JOB_USER") or user_name(uid)
    gid = int(opts.get("gid") or env.get("SLURM_JOB_GID") or _primary_gid(uid))
    # slurmd's prolog environment names the job's nodes SLURM_NODELIST (Slurm 22.05)
    nodes = expand_hostlist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
    cpus = _cpus_per_node(env, len(nodes), expand_cpus_per_node)
    node_spec = " ".join(f"{node}/{count}" for node, count in zip(nodes, cpus, strict=True))
    volume = env.get("SPANK_SHIFTER_VOLUME", "")
    ccm = env.get("SPANK_SHIFTER_CCM") == "1" and conf.enable_ccm and not env.get("SPANK_SHIFTER_IMAGE")
    return JobRequest(
        job_id=job_id,
        uid=uid,
        gid=gid,
        user=user,
        # --ccm: a container made from the host's / (the original's local:/)
        image_type="local" if ccm else env.get("SPANK_SHIFTER_IMAGETYPE", "id"),
        image="/" if ccm else env.get("SPANK_SHIFTER_IMAGE", ""),
        volumes=[v for v in volume.split(";") if v],
        modules=env.get("SPANK_SHIFTER_MODULE") or None,
        ssh_pubkey=env.get("SPANK_SHIFTER_SSH_PUBKEY") if conf.enable_sshd else None,
        node_spec=node_spec,
        gpus=env.get("SLURM_JOB_GPUS", ""),
        writable=env.get("SPANK_SHIFTER_WRITABLE") == "1" and not ccm,
        gpus_local=gpus_local(env) if env.get("SLURM_JOB_GPUS") else False,
    )
def _cpus_per_node(env: dict[str, str], count: int, expand) -> list[int]:
    text = env.get("SLURM_JOB_CPUS_PER_NODE")
    cpus = expand(text) if text else []
    if len(cpus) != count:
        cpus = [max(cpus, default=1)] * count
    return cpus

def _primary_gid(uid: int) -> int:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        raise ShifterError(f"prolog: uid {uid} has no passwd entry") from None


def setuproot_argv(conf: PlugstackArgs, req: JobRequest) -> list[str]:
    """The original's setupRoot argv contract, plus --config, --job-id, --memory-cgroup, --defer-sshd, --gpus,
    --gpus-local and --writable."""
    check_image(req.image_type, req.image)
    argv = [os.path.join(buildinfo.PREFIX, "sbin", "setupRoot"), "--config", conf.shifter_config,
            "--job-id", req.job_id, "-U", str(req.uid), "-G", str(req.gid), "-u", req.user]
    if conf.memory_cgroup:
        argv += ["--memory-cgroup", conf.memory_cgroup]
    if req.ssh_pubkey:
        argv += ["-s", req.ssh_pubkey]
        if conf.extern_cgroup:  # the extern step starts it, so that Slurm tracks it (hook `extern`)
            argv.append("--defer-sshd")
    argv += ["-N", req.node_spec]
    for volume in req.volumes:
        argv += ["-v", volume]
    if req.modules:
        argv += ["-m", req.modules]
    if req.gpus:
        argv += ["--gpus", req.gpus]
        if req.gpus_local:
            argv.append("--gpus-local")
    if req.writable:
        argv.append("--writable")
    return argv + ["--", req.image_type, req.image]  # "--": an image named "--config=..." stays an image


def prolog(conf: PlugstackArgs, opts: dict[str, str]) -> int:
    """Build the job's environment; the failure policy is in docs/admin-guide.md.

    A request the node cannot serve (setupRoot exit 1) must not drain the node: the reason is
    recorded for the job's ``shifter`` to print, and the prolog succeeds.  Anything else
    (exit 2: the node is broken; a crash) fails the prolog, and Slurm drains the node.
    """
    from shifter.errors import REQUEST_FAILED

    try:
        check_sshd_on_node(conf)
    except ShifterError as err:  # the site's configuration: no job of this node can be served safely
        drain_node(f"shifter: {err}")
        raise
    req = job_request(opts, dict(os.environ), conf)
    remove_stale_environments(conf, req.job_id)
    try:
        argv = setuproot_argv(conf, req)
    except ShifterError as err:  # the user's submission environment named no valid image
        status, reason = REQUEST_FAILED, str(err)
    else:
        status, reason = _timed("prolog", req.job_id, argv)
    if status == REQUEST_FAILED:
        record_setup_error(conf, req, reason)
        print(f"shifter: job {req.job_id} cannot run in its container: {reason}", file=sys.stderr)
        return 0
    if status != 0:
        drain_node(f"shifter: {reason or f'setupRoot failed with status {status}'}")
    return status


def drain_node(reason: str) -> None:
    """Drain this node with the setup error as its reason (Slurm's own is a bare "Prolog error").

    One scontrol call, only when the node is broken; if it fails Slurm still drains the node.
    """
    node = os.environ.get("SLURMD_NODENAME", "")
    if not node:
        return
    import subprocess

    argv = ["scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason[:200]}"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL,
                                check=False)
    except (OSError, subprocess.SubprocessError) as err:
        print(f"shifter: cannot drain {node}: {err}", file=sys.stderr)
        return
    if result.returncode != 0:
        print(f"shifter: cannot drain {node}: {result.stderr.strip()}", file=sys.stderr)


def record_setup_error(conf: PlugstackArgs, req: JobRequest, reason: str) -> None:
    """Leave the reason where only the job's user can read it: <udiMount>/<jobid>/setup.error."""
    from shifter.formats.config import load_config
    from shifter.runtime.jobenv import JobEnv

    record_error(JobEnv(load_config(conf.shifter_config), req.job_id), req.uid, req.gid, reason)

def remove_stale_environments(conf: PlugstackArgs, current_job: str) -> None:
    """Tear down environments of other jobs that died without their epilog (spank_plugin/stale.py).

    Best effort: a problem here is logged and never fails this job's prolog.
    """
    from shifter.formats.config import load_config
    from spank_plugin.stale import stale_job_ids
    from unsetuproot.__main__ import job_ids_on_node

    try:
        config = load_config(conf.shifter_config)
        job_ids = job_ids_on_node(config.udi_mount, config.loop_mount)
        stale = stale_job_ids(config.udi_mount, config.loop_mount, job_ids, current_job)
    except (ShifterError, OSError) as err:
        print(f"shifter: prolog job {current_job}: looking for stale environments: {err}", file=sys.stderr)
        return
    for job_id in stale:
        print(f"shifter: prolog job {current_job}: removing the stale environment of job {job_id}",
              file=sys.stderr)
        argv = [os.path.join(buildinfo.PREFIX, "sbin", "unsetupRoot"), "--config", conf.shifter_config,
                "--job-id", job_id]
        if conf.memory_cgroup:
            argv += ["--memory-cgroup", conf.memory_cgroup]
        run_root_tool(argv)


def epilog(conf: PlugstackArgs, opts: dict[str, str]) -> int:
    job_id = opts.get("job-id") or os.environ.get("SLURM_JOB_ID", "")
    if not job_id.isdigit():
        raise ShifterError(f"epilog: no valid job id ({job_id!r})")
    argv = [os.path.join(buildinfo.PREFIX, "sbin", "unsetupRoot"), "--config", conf.shifter_config,
            "--job-id", job_id]
    if conf.memory_cgroup:  # the same path as the prolog's, so the job's cgroup is found and removed
        argv += ["--memory-cgroup", conf.memory_cgroup]
    return _timed("epilog", job_id, argv)[0]


def _timed(hook: str, job_id: str, argv: list[str]) -> tuple[int, str]:
    """Run the root tool and log its wall time: admins and the benchmarks read it from slurmd's log."""
    start = time.monotonic()
    status, reason = run_root_tool(argv)
    print(f"shifter: {hook} job {job_id} took {(time.monotonic() - start) * 1000:.1f} ms (status {status})",
          file=sys.stderr)
    return status, reason

# ---------------------------------------------------------------- entry point

HOOKS = {"submit", "prolog", "epilog", "extern", "ccm-task", "step-setup", "step-teardown"}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in HOOKS:
        print(f"usage: spank-hook {{{'|'.join(sorted(HOOKS))}}} [plugstack args] [--options]", file=sys.stderr)
        return 2
    hook = args[0]
    try:
        conf, rest = parse_plugstack_args(args[1:])
        for arg in conf.unknown:
            print(f"shifter: unknown plugstack.conf argument '{arg}'", file=sys.stderr)
        opts = _options(rest)
        if hook == "submit":
            for key, value in submit(conf, opts):
                sys.stdout.write(f"{key}={value}\n")
            return 0
        if hook in ("extern", "ccm-task", "step-setup", "step-teardown"):  # by slurmstepd: stephooks.py
            from spank_plugin import stephooks

            if hook == "extern":
                return stephooks.extern(conf, opts)
            if hook == "step-setup":
                return stephooks.step_setup(conf, opts)
            if hook == "step-teardown":
                return stephooks.step_teardown(conf, opts)
            sys.stdout.write(stephooks.ccm_task(conf, opts) + "\n")
            return 0
        return prolog(conf, opts) if hook == "prolog" else epilog(conf, opts)
    except ShifterError as err:
        print(f"shifter: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"shifter: {hook}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
