"""``shifter``: run a command in the job's container environment, as the user, without setuid.

Hot path (every task of every job): find the job's prepared environment on this node, compare
its reuse marker with this request, join its pinned user namespace, chroot, drop every
capability, set no_new_privs and exec.  It runs under ``python -I -S`` and imports only what
that path needs (no getopt: it pulls in gettext; no subprocess, logging, json or ctypes.util).
"""

from __future__ import annotations

import os
import sys

from shifter.errors import ShifterError

PROG = "shifter"
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


def config_path(environ: dict[str, str]) -> str:
    if environ.get("SHIFTER_UDIROOT_CONF"):
        return environ["SHIFTER_UDIROOT_CONF"]
    try:
        from shifter import buildinfo
    except ImportError:
        return "/etc/shifter/udiRoot.conf"
    return buildinfo.CONFIG_FILE


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
    from shifter.imageref import parse_image_ref

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


def prepare_exec(opts: Options, environ: dict[str, str], request: Request, meta, config,
                 modules: list, gpu_ops: list | None = None) -> tuple[list[str], dict[str, str], str]:
    """(argv, environment, caller's cwd) for the command: everything decided before the chroot.

    ``gpu_ops``: the job's GPU environment as setupRoot recorded it, applied last.
    """
    from shifter.command import select_command
    from shifter.environment import apply_operations, build_environment
    from shifter.launchplan import image_env

    env = build_environment({} if opts.clearenv else environ, request.ref_text, request.identifier,
                            image_env(meta.env, config), _env_file_entries(opts), opts.envs, modules, config)
    if gpu_ops:
        apply_operations(env, gpu_ops)
    argv = _script_by_descriptor(select_command(opts.command, opts.entrypoint, meta.entrypoint, meta.cmd, None))
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = "/"
    return argv, env, cwd


def exec_in_root(argv: list[str], env: dict[str, str], cwd: str, opts: Options, meta, modules: list) -> None:
    """After the chroot: working directory, no capabilities, no_new_privs, userhooks, exec."""
    import _signal  # built in: nothing to import from the container

    from shifter import linux

    # the interpreter ignores SIGPIPE and SIGXFSZ, and an exec keeps ignored signals ignored:
    # without this `yes | head` inside the container would end in "Broken pipe" errors
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
    _change_directory(opts, meta, cwd)
    argv = _prefer_visible_script(argv)
    linux.drop_bounding_set()
    linux.set_no_new_privs()
    for module in modules:
        if module.userhook:
            _run_userhook(module.name, module.userhook)
    _exec(argv, env)


def enter_prepared(job, meta, opts: Options, environ: dict[str, str], request: Request, config,
                   modules: list) -> None:
    """Join the job's namespace, chroot into its root, drop privileges and exec (never returns)."""
    from shifter import userns

    gpu_ops = None
    if getattr(config, "gpu_recipe", None):
        from shifter.launchplan import decode_operations

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


_SCRIPT_DESCRIPTORS: dict[str, str] = {}  # "/dev/fd/N" -> the script path it stands for


def _script_by_descriptor(argv: list[str]) -> list[str]:
    """Keep a script that names shifter as its interpreter readable from inside the container.

    The kernel runs ``#!/path/to/shifter /bin/sh`` (or ``#!/usr/bin/env -S shifter /bin/sh``)
    scripts as ``shifter /bin/sh <script> args``, but the script may live where the container
    cannot see it (Slurm keeps batch scripts in slurmd's spool directory).  It is opened here,
    before the chroot, and handed to the interpreter as /dev/fd/N.
    """
    if len(argv) < 2 or argv[1].startswith("-"):
        return argv
    try:
        fd = os.open(argv[1], os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return argv
    try:
        import stat

        runs_us = stat.S_ISREG(os.fstat(fd).st_mode) and _names_shifter(os.pread(fd, 512, 0))
    except OSError:
        runs_us = False
    if not runs_us:
        os.close(fd)
        return argv
    os.set_blocking(fd, True)
    os.set_inheritable(fd, True)
    name = f"/dev/fd/{fd}"
    _SCRIPT_DESCRIPTORS[name] = argv[1]
    return [argv[0], name, *argv[2:]]


def _names_shifter(head: bytes) -> bool:
    """True when ``head`` starts with a #! line whose program (directly or through env) is shifter."""
    if not head.startswith(b"#!"):
        return False
    words = head[2:].split(b"\n", 1)[0].split()
    if words and words[0].rsplit(b"/", 1)[-1] == b"env":
        words = [w for w in words[1:] if not w.startswith(b"-") and b"=" not in w]
    return bool(words) and words[0].rsplit(b"/", 1)[-1] == b"shifter"


def _prefer_visible_script(argv: list[str]) -> list[str]:
    """After the chroot: when the script is visible at its own path in the container, use that."""
    if len(argv) < 2 or argv[1] not in _SCRIPT_DESCRIPTORS:
        return argv
    fd, path = int(argv[1][len("/dev/fd/"):]), _SCRIPT_DESCRIPTORS[argv[1]]
    try:
        here, there = os.stat(path), os.fstat(fd)
    except OSError:
        return argv
    if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
        return argv
    os.close(fd)
    return [argv[0], path, *argv[2:]]


def _enter_step_environment(step, expected: str, opts: Options, environ: dict[str, str], request: Request,
                            config, modules: list) -> None:
    """Enter this step's own environment (built by slurmstepd for ``srun --image=...``) if it
    serves this request; say why when slurmstepd could not build it; else return."""
    from shifter.reuse import marker_matches

    marker = _read_text(step.marker)
    if marker is not None and marker_matches(marker, expected):
        if opts.writable:
            raise ShifterError("--writable needs the job's own environment, not a step's")
        from shifter.meta import read_meta

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


def _env_file_entries(opts: Options) -> list[str]:
    if not opts.env_files:
        return []
    from shifter.environment import parse_env_file

    entries: list[str] = []
    for path in opts.env_files:
        try:
            with open(path, encoding="utf-8") as fh:
                entries.extend(parse_env_file(fh.read(), path))
        except OSError as exc:
            raise ShifterError(f"--env-file {path}: {exc.strerror}") from None
    return entries


def _change_directory(opts: Options, meta, cwd: str) -> None:
    if opts.workdir is not None:
        target = meta.workdir if opts.workdir is True else opts.workdir
        if not target:
            raise ShifterError("--workdir without a value needs an image with a WORKDIR")
        try:
            os.chdir(target)
        except OSError as exc:
            raise ShifterError(f"cannot change to working directory {target}: {exc.strerror}") from None
        return
    for candidate in (cwd, meta.workdir or "/", "/"):
        try:
            os.chdir(candidate)
            return
        except OSError:
            continue


def _run_userhook(name: str, hook: str) -> None:
    """A module's userhook, /bin/sh in the container as the user; non-zero aborts the launch."""
    pid = os.fork()
    if pid == 0:
        try:
            os.execv("/bin/sh", ["/bin/sh", hook])
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise ShifterError(f"module {name} userhook {hook} failed")


def _exec(argv: list[str], env: dict[str, str]) -> None:
    """execvpe with the container's PATH, searched here: after the chroot nothing can be imported
    (os.execvpe would import warnings)."""
    name = argv[0]
    candidates = [name] if "/" in name else [
        f"{d or '.'}/{name}" for d in env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":")]
    denied: OSError | None = None
    other: OSError | None = None
    for path in candidates:
        try:
            os.execve(path, argv, env)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError as exc:
            denied = exc
        except OSError as exc:
            other = other or exc
    if denied is not None:
        print(f"{PROG}: {name}: permission denied", file=sys.stderr)
        os._exit(126)
    if other is not None:
        print(f"{PROG}: {name}: {other.strerror}", file=sys.stderr)
        os._exit(126)
    print(f"{PROG}: {name}: not found in image", file=sys.stderr)
    os._exit(127)


def launch(args: list[str], environ: dict[str, str]) -> None:
    if args == ["doctor"]:  # `shifter -- doctor` runs a program called doctor in the image
        from shifter.doctor import run

        sys.exit(run(config_path(environ)))
    opts = parse_options(args)
    if opts.help:
        sys.stdout.write(USAGE)
        sys.exit(0)
    from shifter.config import load_config

    config = load_config(config_path(environ))
    request = resolve_request(opts, environ, config.default_image_type)
    from shifter.modules import select_modules

    modules = select_modules(config, request.modules)
    jobid = environ.get("SLURM_JOB_ID", "")
    if request.identifier is None and request.image_type != "local":
        request.identifier = _lookup(config, request)
    if jobid.isascii() and jobid.isdigit():
        from shifter.jobenv import JobEnv
        from shifter.reuse import marker_matches, marker_text

        job = JobEnv(config, jobid)
        signature = ""
        if request.volumes:
            from shifter.volumemap import parse_volume_map, volume_signature

            signature = volume_signature(parse_volume_map(request.volumes, site=False))
        expected = marker_text(request.identifier or request.tag, _user_name(), signature, [m.name for m in modules])
        step_id = environ.get("SLURM_STEP_ID", "")
        if step_id.isascii() and step_id.isdigit():
            _enter_step_environment(JobEnv(config, jobid, step_id), expected, opts, environ, request, config,
                                    modules)
        marker = _read_text(job.marker)
        _raise_setup_error(job, environ, request)  # also after the build: the extern step's sshd may have failed
        if marker is not None and marker_matches(marker, expected):
            from shifter.meta import read_meta

            if opts.writable and not os.path.exists(job.writable):
                raise ShifterError(f"--writable: job {jobid}'s environment is read-only "
                                   "(submit the job with --writable)")
            enter_prepared(job, read_meta(job.meta), opts, environ, request, config, modules)
    if opts.writable:
        raise ShifterError("--writable needs the job's own environment (its image, volumes and modules, "
                           "submitted with --image and --writable)")
    from shifter.fresh import run_fresh

    run_fresh(config, opts, environ, request, modules)


def _lookup(config, request: Request) -> str:
    """Ask the gateway for the id of a reference that is not the job's (slow path only)."""
    from shifter.gatewayclient import GatewayClient
    from shifter.imageref import ImageRef

    client = GatewayClient(
        config.image_gateways, config.system or "", config.gateway_timeout, gateway_user=config.image_gateway_user
    )
    return client.lookup(ImageRef(request.image_type, request.tag))["id"]


def initial_environment() -> dict[str, str]:
    """The environment this process was started with, which os.environ is not.

    When the locale is C the interpreter sets LC_CTYPE=C.UTF-8 at start-up (PEP 538, not
    switchable off under -I); passed on, it would change the locale of the user's program.
    The kernel keeps the original.  Like os.environ, the first of two equal names wins; an entry
    without a name (which execve cannot be given from Python) is dropped, as bin/shifter does.
    """
    try:
        with open("/proc/self/environ", "rb") as fh:
            data = fh.read()
    except OSError:
        return {name: value for name, value in os.environ.items() if name}
    env: dict[str, str] = {}
    for entry in data.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if name and sep:
            env.setdefault(os.fsdecode(name), os.fsdecode(value))
    return env


def main() -> None:
    try:
        launch(sys.argv[1:], initial_environment())
    except ShifterError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as err:
        print(f"{PROG}: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""), file=sys.stderr)
        sys.exit(1)
