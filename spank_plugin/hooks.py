"""What the SPANK shim runs: `spank-hook <submit|prolog|epilog> [plugstack args] [options]`.

The C shim stays thin; every decision is made here.  `submit` runs as the
user inside sbatch/salloc/srun and must be quick (it is on the submission
path), so this module imports only the stdlib and the small format modules.
`prolog` and `epilog` run as root in slurmd's prolog environment, which
Slurm builds (user-set variables only reach it with a SPANK_ prefix).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from shifter import buildinfo
from shifter.errors import ShifterError

OPTION_ENV = "_SLURM_SPANK_OPTION_shifter_"


@dataclass
class PlugstackArgs:
    """The plugstack.conf arguments of the original plugin, parsed once here."""

    shifter_config: str = buildinfo.CONFIG_FILE
    extern_setup: str | None = None
    extern_cgroup: bool = False
    memory_cgroup: str | None = None
    enable_ccm: bool = False
    enable_sshd: bool = False
    long_options: bool = False
    unknown: list[str] = field(default_factory=list)


def parse_plugstack_args(args: list[str]) -> tuple[PlugstackArgs, list[str]]:
    """Split argv into the plugstack arguments and the hook's own --options."""
    conf = PlugstackArgs()
    rest: list[str] = []
    for arg in args:
        if arg.startswith("--"):
            rest.append(arg)
            continue
        key, sep, value = arg.partition("=")
        if key == "long_options" and not sep:
            conf.long_options = True
        elif key == "shifter_config" and sep:
            conf.shifter_config = value
        elif key == "extern_setup" and sep:
            conf.extern_setup = value or None
        elif key == "memory_cgroup" and sep:
            conf.memory_cgroup = value or None
        elif key in ("extern_cgroup", "enable_ccm", "enable_sshd") and sep:
            setattr(conf, key, _flag(key, value))
        else:
            conf.unknown.append(arg)
    return conf, rest


def _flag(key: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise ShifterError(f"plugstack.conf: {key}= must be 0 or 1, not {value!r}")
    return value == "1"


def _options(rest: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for arg in rest:
        key, sep, value = arg[2:].partition("=")
        opts[key] = value if sep else "1"
    return opts


# ---------------------------------------------------------------- submit


def submit(conf: PlugstackArgs, opts: dict[str, str]) -> list[tuple[str, str]]:
    """Validate the request and resolve the image once; return the variables to publish."""
    from shifter.config import load_config
    from shifter.imageref import parse_image_ref
    from shifter.modules import module_names, select_modules
    from shifter.volumemap import parse_volume_map

    config = load_config(os.environ.get("SHIFTER_UDIROOT_CONF") or conf.shifter_config)
    image_text = opts.get("image")
    volume_text = opts.get("volume")
    module_text = opts.get("module")
    ccm = "ccm" in opts
    if ccm and not conf.enable_ccm:
        raise ShifterError("--ccm is not enabled on this system (plugstack.conf enable_ccm=1)")
    if ccm and image_text:
        raise ShifterError("--ccm cannot be combined with --image")
    if volume_text and not image_text:
        raise ShifterError("--volume needs --image")

    out: list[tuple[str, str]] = []
    if image_text:
        ref = parse_image_ref(image_text, config.default_image_type)
        if ref.type == "id":
            image_id = ref.tag
        elif ref.type == "local":
            if not config.allow_local_chroot:
                raise ShifterError(f"image type 'local' is not allowed on this system: {image_text}")
            image_id = ref.tag
        else:
            image_id = _resolve(config, ref)
        image_type = "local" if ref.type == "local" else "id"
        out += [("SHIFTER_IMAGE", image_id), ("SHIFTER_IMAGETYPE", image_type)]
        if ref.type not in ("id", "local"):
            out.append(("SHIFTER_IMAGEREQUEST", f"{ref.type}:{ref.tag}"))
        # Nested sruns inherit the resolved id and never ask the gateway again.
        out.append((_option_env(conf, "image"), f"{image_type}:{image_id}"))
    if volume_text:
        mounts = parse_volume_map(volume_text, site=False)
        out.append(("SHIFTER_VOLUME", ";".join(m.canonical() for m in mounts)))
    if module_text:
        names = module_names(select_modules(config, module_text))
        out.append(("SHIFTER_MODULE", ",".join(names) or "none"))
    if ccm:
        out.append(("SHIFTER_CCM", "1"))
    if conf.enable_sshd and (image_text or ccm):
        out.append(("SHIFTER_SSH_PUBKEY", user_ssh_pubkey()))
    return out


def user_ssh_pubkey() -> str:
    """The user's in-job ssh key (~/.udiRoot/id_rsa.key, the original's path), created if missing."""
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


def _option_env(conf: PlugstackArgs, name: str) -> str:
    return OPTION_ENV + ("shifter_" if conf.long_options else "") + name


def _resolve(config, ref) -> str:
    from shifter.gatewayclient import GatewayClient

    client = GatewayClient(config.image_gateways, config.system, config.gateway_timeout)
    record = client.lookup(ref)
    image_id = record.get("id")
    if not isinstance(image_id, str) or len(image_id) != 64:
        raise ShifterError(f"image gateway returned no image id for {ref.type}:{ref.tag}")
    return image_id


# ---------------------------------------------------------------- prolog / epilog


@dataclass
class JobRequest:
    """What the prolog knows about the job: SPANK items plus the job-control environment."""

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


def job_request(opts: dict[str, str], env: dict[str, str], conf: PlugstackArgs) -> JobRequest:
    """Collect the job's request; everything here came from Slurm, values from the user are re-validated."""
    from shifter.hostsfile import expand_cpus_per_node, expand_hostlist

    job_id = opts.get("job-id") or env.get("SLURM_JOB_ID", "")
    if not job_id.isdigit():
        raise ShifterError(f"prolog: no valid job id ({job_id!r})")
    uid = int(opts.get("uid") or env.get("SLURM_JOB_UID") or -1)
    if uid <= 0:
        raise ShifterError(f"prolog: job {job_id} has no valid non-root uid")
    user = env.get("SLURM_JOB_USER") or _user_name(uid)
    gid = int(opts.get("gid") or env.get("SLURM_JOB_GID") or _primary_gid(uid))
    nodes = expand_hostlist(env.get("SLURM_JOB_NODELIST", ""))
    cpus = _cpus_per_node(env, len(nodes), expand_cpus_per_node)
    node_spec = " ".join(f"{node}/{count}" for node, count in zip(nodes, cpus, strict=True))
    volume = env.get("SPANK_SHIFTER_VOLUME", "")
    return JobRequest(
        job_id=job_id,
        uid=uid,
        gid=gid,
        user=user,
        image_type=env.get("SPANK_SHIFTER_IMAGETYPE", "id"),
        image=env.get("SPANK_SHIFTER_IMAGE", ""),
        volumes=[v for v in volume.split(";") if v],
        modules=env.get("SPANK_SHIFTER_MODULE") or None,
        ssh_pubkey=env.get("SPANK_SHIFTER_SSH_PUBKEY") if conf.enable_sshd else None,
        node_spec=node_spec,
    )


def _cpus_per_node(env: dict[str, str], count: int, expand) -> list[int]:
    text = env.get("SLURM_JOB_CPUS_PER_NODE")
    cpus = expand(text) if text else []
    if len(cpus) != count:
        cpus = [max(cpus, default=1)] * count
    return cpus


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise ShifterError(f"prolog: uid {uid} has no user name") from None


def _primary_gid(uid: int) -> int:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        raise ShifterError(f"prolog: uid {uid} has no passwd entry") from None


def setuproot_argv(conf: PlugstackArgs, req: JobRequest) -> list[str]:
    """The original's setupRoot argv contract, plus --config and --job-id."""
    argv = [os.path.join(buildinfo.PREFIX, "sbin", "setupRoot"), "--config", conf.shifter_config,
            "--job-id", req.job_id, "-U", str(req.uid), "-G", str(req.gid), "-u", req.user]
    if req.ssh_pubkey:
        argv += ["-s", req.ssh_pubkey]
    argv += ["-N", req.node_spec]
    for volume in req.volumes:
        argv += ["-v", volume]
    if req.modules:
        argv += ["-m", req.modules]
    return argv + [req.image_type, req.image]


def prolog(conf: PlugstackArgs, opts: dict[str, str]) -> int:
    req = job_request(opts, dict(os.environ), conf)
    return _timed("prolog", req.job_id, setuproot_argv(conf, req))


def epilog(conf: PlugstackArgs, opts: dict[str, str]) -> int:
    job_id = opts.get("job-id") or os.environ.get("SLURM_JOB_ID", "")
    if not job_id.isdigit():
        raise ShifterError(f"epilog: no valid job id ({job_id!r})")
    argv = [os.path.join(buildinfo.PREFIX, "sbin", "unsetupRoot"), "--config", conf.shifter_config,
            "--job-id", job_id]
    return _timed("epilog", job_id, argv)


def _timed(hook: str, job_id: str, argv: list[str]) -> int:
    """Run the root tool and log its wall time: admins and the benchmarks read it from slurmd's log."""
    start = time.monotonic()
    status = _run_root_tool(argv)
    print(f"shifter: {hook} job {job_id} took {(time.monotonic() - start) * 1000:.1f} ms (status {status})",
          file=sys.stderr)
    return status


def _run_root_tool(argv: list[str]) -> int:
    """Run setupRoot/unsetupRoot with a clean environment; its stderr reaches slurmd's log."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    for key in ("SLURM_JOB_ID",):
        if key in os.environ:
            env[key] = os.environ[key]
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, check=False)
    return proc.returncode


# ---------------------------------------------------------------- entry point

HOOKS = {"submit", "prolog", "epilog"}


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
        return prolog(conf, opts) if hook == "prolog" else epilog(conf, opts)
    except ShifterError as err:
        print(f"shifter: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"shifter: {hook}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
