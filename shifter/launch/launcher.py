"""``shifter``: run a command in the job's container environment, as the user, without setuid.

Hot path (every task of every job): find the job's prepared environment on this node, compare
its reuse marker with this request, join its pinned user namespace, chroot, drop every
capability, set no_new_privs and exec.  It runs under ``python -I -S`` and imports only what
that path needs (no getopt: it pulls in gettext; no subprocess, logging, json or ctypes.util).
Called by cli.py; a request that no prepared environment serves goes on to fresh.py, and both
finish with execute.py.
"""

from __future__ import annotations

import os
import sys

from shifter.errors import ShifterError
from shifter.launch.execute import exec_in_root, prepare_exec

USAGE = """\
Usage: shifter [-h|--help] [-v|--verbose] [--image=<type>:<tag>] [--entrypoint[=cmd]]
               [-w|--workdir[=/path]] [-E|--clearenv] [-e|--env=VAR=val]... [--env-file=/file]
               [-V|--volume=/from:/to[:flags][;...]]... [-m|--module=m1,m2|none] [--writable]
               [--] [cmd args...]

       shifter doctor   (checks this node's setup for the runtime)

Runs cmd in the image: the job's image (SHIFTER_IMAGE/SHIFTER_IMAGETYPE, set by --image at
submission) unless --image names another.  Environment precedence, later wins: caller's
environment (or none with --clearenv), SHIFTER_IMAGEREQUEST/SHIFTER_IMAGE, the image's ENV,
--env-file, --env, the modules' and then the site's siteEnv settings.

--writable: require the job's writable layer (sbatch --writable): writes to the image's
directories are kept for every task of the job on this node and discarded when the job
ends.  Without it a --writable job's root is writable all the same; with it a job
submitted without --writable, or another image, fails instead of running read-only.
"""

_SHORT_OPTIONS = "hnvV:i:e:Ew::m:"
_LONG_OPTIONS = ["help", "verbose", "image=", "entrypoint=?", "entry=?", "workdir=?", "clearenv", "env=",
                 "env-file=", "volume=", "module=", "writable"]
_OPTION_NAMES = {"-h": "help", "--help": "help", "-v": "verbose", "--verbose": "verbose", "-i": "image",
                 "--image": "image", "--entrypoint": "entrypoint", "--entry": "entrypoint", "-w": "workdir",
                 "--workdir": "workdir", "-E": "clearenv", "--clearenv": "clearenv", "-e": "env", "--env": "env",
                 "--env-file": "env_file", "-V": "volume", "--volume": "volume", "-m": "module",
                 "--module": "module", "-n": "noop", "--writable": "writable"}

class Options:
    """The parsed command line."""

    __slots__ = ("image", "envs", "env_files", "volumes", "module", "entrypoint", "workdir", "help",
                 "verbose", "clearenv", "writable", "command")

    def __init__(self) -> None:
        self.image: str | None = None
        self.envs: list[str] = []
        self.env_files: list[str] = []
        self.volumes: list[str] | None = None
        self.module: str | None = None
        self.entrypoint: str | bool | None = None  # True: the image's ENTRY; a string: that command
        self.workdir: str | bool | None = None  # True: the image's WORKDIR
        self.help = False
        self.verbose = False
        self.clearenv = False
        self.writable = False  # only the job's own environment, prepared with a writable layer, will do
        self.command: list[str] = []

    def set(self, name: str, value: str | bool) -> None:
        if name == "env":
            self.envs.append(value)  # type: ignore[arg-type]
        elif name == "env_file":
            self.env_files.append(value)  # type: ignore[arg-type]
        elif name == "volume":
            # the first --volume replaces volumes from the environment (the original's #86/#87 fix)
            self.volumes = (self.volumes or []) + [value]  # type: ignore[list-item]
        elif name != "noop":
            setattr(self, name, value)


def parse_options(args: list[str]) -> Options:
    """getopt_long semantics with POSIXLY_CORRECT: options end at the first non-option."""
    from shifter.cmdline import getopt

    pairs, command = getopt(args, _SHORT_OPTIONS, _LONG_OPTIONS, permute=False)
    opts = Options()
    for flag, value in pairs:
        opts.set(_OPTION_NAMES[flag], True if value is None else value)
    opts.command = command
    return opts


def _first(environ: dict[str, str], name: str) -> str | None:
    """SHIFTER_<name>, else the SPANK plugin's SLURM_SPANK_SHIFTER_<name>; empty counts as unset."""
    return environ.get(f"SHIFTER_{name}") or environ.get(f"SLURM_SPANK_SHIFTER_{name}") or None


class Request:
    """The image, volumes and modules a launch asks for, resolved as far as possible locally."""

    __slots__ = ("ref_text", "identifier", "image_type", "tag", "volumes", "modules")

    def __init__(self, ref_text: str, identifier: str | None, image_type: str, tag: str,
                 volumes: str, modules: str | None) -> None:
        self.ref_text = ref_text
        self.identifier = identifier
        self.image_type = image_type
        self.tag = tag
        self.volumes = volumes
        self.modules = modules


def resolve_request(opts: Options, environ: dict[str, str], default_type: str) -> Request:
    """Image selection with the original's precedence; the job's image needs no gateway call.

    SHIFTER_IMAGE/SHIFTER_IMAGETYPE (the id fixed at submission) are used only together;
    --image overrides them, and an --image equal to the job's SHIFTER_IMAGEREQUEST still
    resolves to the job's id locally.
    """
    job_type, job_image = _first(environ, "IMAGETYPE"), _first(environ, "IMAGE")
    job_request = _first(environ, "IMAGEREQUEST")
    volumes = ";".join(opts.volumes) if opts.volumes is not None else (_first(environ, "VOLUME") or "")
    modules = opts.module if opts.module is not None else _first(environ, "MODULE")
    if opts.image is None and job_type and job_image:
        identifier = job_image if job_type in ("id", "local") else None
        return Request(job_request or f"{job_type}:{job_image}", identifier, job_type, job_image, volumes, modules)
    text = opts.image or job_request
    if not text:
        raise ShifterError("no image requested: use --image=<type>:<tag> or submit the job with --image")
    from shifter.formats.imageref import parse_image_ref

    ref = parse_image_ref(text, default_type)
    identifier = None
    if ref.type in ("id", "local"):
        identifier = ref.tag
    elif job_request and job_type == "id" and job_image:
        job_ref = parse_image_ref(job_request, default_type)
        if (job_ref.type, job_ref.lookup_tag) == (ref.type, ref.lookup_tag):
            identifier = job_image
    return Request(text, identifier, ref.type, ref.tag, volumes, modules)


def _read_text(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return os.read(fd, 1 << 16).decode("utf-8", "replace")
    finally:
        os.close(fd)


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        raise ShifterError(f"uid {os.getuid()} has no passwd entry") from None


def enter_prepared(job, meta, opts: Options, environ: dict[str, str], request: Request, config,
                   modules: list) -> None:
    """Join the job's namespace, chroot into its root, drop privileges and exec (never returns)."""
    from shifter.runtime import userns

    gpu_ops = None
    if getattr(config, "gpu_recipe", None):
        from shifter.formats.launchplan import decode_operations

        try:  # in the user's job directory: only setupRoot's own file counts
            fd = os.open(job.gpu_env, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        except OSError as exc:
            raise ShifterError(f"{job.gpu_env}: {exc.strerror}") from None
        if fd >= 0:
            with os.fdopen(fd, "rb") as fh:
                info = os.fstat(fh.fileno())
                if info.st_uid != 0 or (info.st_mode & 0o170000) != 0o100000:
                    raise ShifterError(f"{job.gpu_env} was not written by setupRoot")
                gpu_ops = decode_operations(fh.read())
    argv, env, cwd = prepare_exec(opts, environ, request, meta, config, modules, gpu_ops)
    try:
        userns.enter_user_namespace(job.userns)
        os.chroot(job.root)
    except OSError as exc:
        raise ShifterError(f"cannot enter the job's environment {job.dir}: {exc.strerror}") from None
    exec_in_root(argv, env, cwd, opts, meta, modules)


def _enter_step_environment(step, expected: str, opts: Options, environ: dict[str, str], request: Request,
                            config, modules: list) -> None:
    """Enter this step's own environment (built by slurmstepd for ``srun --image=...``) if it
    serves this request; say why when slurmstepd could not build it; else return."""
    from shifter.formats.reuse import marker_matches

    marker = _read_text(step.marker)
    if marker is not None and marker_matches(marker, expected):
        if opts.writable:
            raise ShifterError("--writable needs the job's own environment, not a step's")
        from shifter.formats.meta import read_meta

        enter_prepared(step, read_meta(step.meta), opts, environ, request, config, modules)
    if marker is None:
        reason = _read_text(step.error)
        if reason and request.identifier == _first(environ, "IMAGE"):
            node = environ.get("SLURMD_NODENAME") or os.uname().nodename
            raise ShifterError(f"the step's container could not be set up on {node}: {reason.strip()}")


def _raise_setup_error(job, environ: dict[str, str], request: Request) -> None:
    """The prolog could not build the job's environment (its request was at fault): say why."""
    if request.identifier != _first(environ, "IMAGE"):
        return
    reason = _read_text(job.error)
    if reason:
        node = environ.get("SLURMD_NODENAME") or os.uname().nodename
        raise ShifterError(f"the job's container could not be set up on {node}: {reason.strip()}")


def launch(args: list[str], environ: dict[str, str]) -> None:
    """Run the command in the job's (or step's) prepared environment when it serves the request,
    else in a fresh private one (fresh.py); never returns but by an exception."""
    opts = parse_options(args)
    if opts.help:
        sys.stdout.write(USAGE)
        sys.exit(0)
    from shifter.formats.config import config_path, load_config

    config = load_config(config_path(environ))
    request = resolve_request(opts, environ, config.default_image_type)
    from shifter.formats.modules import select_modules

    modules = select_modules(config, request.modules)
    jobid = environ.get("SLURM_JOB_ID", "")
    if request.identifier is None and request.image_type != "local":
        request.identifier = _lookup(config, request)
    if jobid.isascii() and jobid.isdigit():
        from shifter.formats.reuse import marker_matches, marker_text
        from shifter.runtime.jobenv import JobEnv

        job = JobEnv(config, jobid)
        signature = ""
        if request.volumes:
            from shifter.formats.volumemap import parse_volume_map, volume_signature

            signature = volume_signature(parse_volume_map(request.volumes, site=False))
        expected = marker_text(request.identifier or request.tag, _user_name(), signature, [m.name for m in modules])
        step_id = environ.get("SLURM_STEP_ID", "")
        if step_id.isascii() and step_id.isdigit():
            _enter_step_environment(JobEnv(config, jobid, step_id), expected, opts, environ, request, config,
                                    modules)
        marker = _read_text(job.marker)
        _raise_setup_error(job, environ, request)  # also after the build: the extern step's sshd may have failed
        if marker is not None and marker_matches(marker, expected):
            from shifter.formats.meta import read_meta

            if opts.writable and not os.path.exists(job.writable):
                raise ShifterError(f"--writable: job {jobid}'s environment is read-only "
                                   "(submit the job with --writable)")
            enter_prepared(job, read_meta(job.meta), opts, environ, request, config, modules)
    if opts.writable:
        raise ShifterError("--writable needs the job's own environment (its image, volumes and modules, "
                           "submitted with --image and --writable)")
    from shifter.launch.fresh import run_fresh

    run_fresh(config, opts, environ, request, modules)


def _lookup(config, request: Request) -> str:
    """Ask the gateway for the id of a reference that is not the job's (slow path only)."""
    from shifter.client.gatewayclient import GatewayClient
    from shifter.formats.imageref import ImageRef

    client = GatewayClient(
        config.image_gateways, config.system or "", config.gateway_timeout, gateway_user=config.image_gateway_user
    )
    return client.lookup(ImageRef(request.image_type, request.tag))["id"]

