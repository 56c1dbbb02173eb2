"""What every hook shares: the plugstack.conf arguments and the job accessors.

Its own module so that ``hooks`` (submit, prolog, epilog, dispatch) and ``stephooks`` (the hooks
slurmstepd runs) both import it and never each other's internals: the dispatch in ``hooks``
imports ``stephooks``, the arrow never points back.  Stdlib and small ``shifter`` modules only:
``submit`` runs on the submission path.
"""

from __future__ import annotations

import os
import sys

from shifter import buildinfo
from shifter.errors import ShifterError
from shifter.record import Record


class PlugstackArgs(Record):
    """The plugstack.conf arguments of the original plugin, parsed once here.

    A Record, not a dataclass: importing ``dataclasses`` costs a step hook about 5 ms.
    """

    __slots__ = ("shifter_config", "extern_setup", "extern_cgroup", "memory_cgroup", "enable_ccm", "enable_sshd",
                 "long_options", "unknown")
    shifter_config: str
    extern_setup: str | None
    extern_cgroup: bool
    memory_cgroup: str | None
    enable_ccm: bool
    enable_sshd: bool
    long_options: bool
    unknown: list[str]
    _defaults = {"shifter_config": buildinfo.CONFIG_FILE, "extern_setup": None, "extern_cgroup": False,
                 "memory_cgroup": None, "enable_ccm": False, "enable_sshd": False, "long_options": False,
                 "unknown": []}


def parse_plugstack_args(args: list[str]) -> tuple[PlugstackArgs, list[str]]:
    """Split argv into the plugstack arguments and the hook's own --options."""
    values: dict[str, object] = {}
    unknown: list[str] = []
    rest: list[str] = []
    for arg in args:
        if arg.startswith("--"):
            rest.append(arg)
            continue
        key, sep, value = arg.partition("=")
        if key == "long_options" and not sep:
            values["long_options"] = True
        elif key == "shifter_config" and sep:
            values["shifter_config"] = value
        elif key in ("extern_setup", "memory_cgroup") and sep:
            values[key] = value or None
        elif key in ("extern_cgroup", "enable_ccm", "enable_sshd") and sep:
            values[key] = _flag(key, value)
        else:
            unknown.append(arg)
    conf = PlugstackArgs(unknown=unknown, **values)
    if conf.enable_sshd and not (conf.extern_cgroup or conf.memory_cgroup):
        raise ShifterError("plugstack.conf: enable_sshd=1 needs extern_cgroup=1 (with PrologFlags=contain) or "
                           "memory_cgroup=: without either, what users start through the job's sshd outlives the job")
    return conf, rest


def _flag(key: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise ShifterError(f"plugstack.conf: {key}= must be 0 or 1, not {value!r}")
    return value == "1"


def gpus_local(env: dict[str, str]) -> bool:
    """How Slurm numbers the GPUs in tasks, from the slurm.conf slurmd gives the prolog (SLURM_CONF)."""
    from shifter.runtime.gpudiscovery import slurm_numbers_gpus_locally

    return slurm_numbers_gpus_locally(env.get("SLURM_CONF") or "/etc/slurm/slurm.conf")


def check_image(image_type: str, image: str) -> None:
    """The user's submission environment set these: only a valid reference reaches setupRoot's argv."""
    from shifter.formats.imageref import IMAGE_TYPES, parse_image_ref

    if image_type not in IMAGE_TYPES:
        raise ShifterError(f"prolog: unknown image type {image_type!r}")
    if not image:
        raise ShifterError("prolog: the job names no image")
    parse_image_ref(f"{image_type}:{image}")


def user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise ShifterError(f"prolog: uid {uid} has no user name") from None


def record_error(job, uid: int, gid: int, reason: str) -> None:
    """Write ``reason`` to the job's (or step's) setup.error, readable by its user only (shifter/runtime/jobdir.py)."""
    from shifter.runtime import jobdir

    jobdir.record_error(os.path.dirname(job.dir), os.path.basename(job.dir), uid, gid, reason)


def run_root_tool(argv: list[str]) -> tuple[int, str]:
    """Run setupRoot/unsetupRoot with a clean environment; its stderr is copied to slurmd's log.

    Returns the exit status and the tool's last line without its ``<prog>: `` prefix.
    """
    import subprocess

    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    for key in ("SLURM_JOB_ID",):
        if key in os.environ:
            env[key] = os.environ[key]
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    lines = [line for line in proc.stderr.decode(errors="replace").splitlines() if line.strip()]
    for line in lines:
        print(line, file=sys.stderr)
    prog = os.path.basename(argv[0]) + ": "
    reason = lines[-1].removeprefix(prog) if lines else ""
    return proc.returncode, reason


def run_root_main(argv: list[str]) -> tuple[int, str]:
    """:func:`run_root_tool` for a step hook, without a second interpreter: setupRoot's or unsetupRoot's
    main runs in a forked child of this hook.

    A step waits for its environment (and slurmstepd for its removal): starting Python again
    and importing what this hook already holds cost about 20 ms each way.  The child gets what
    the tool's process would: stdin and stdout on /dev/null, stderr on a pipe read here, an
    environment of PATH (and SLURM_JOB_ID), and it leaves with ``os._exit`` so that nothing of
    this hook runs after the tool's main.  Same return value as :func:`run_root_tool`.
    """
    prog = os.path.basename(argv[0])
    if prog == "setupRoot":
        from setuproot.__main__ import main
    elif prog == "unsetupRoot":
        from unsetuproot.__main__ import main
    else:
        raise ValueError(f"run_root_main: no in-process main for {prog}")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if "SLURM_JOB_ID" in os.environ:
        env["SLURM_JOB_ID"] = os.environ["SLURM_JOB_ID"]
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the tool: never returns into the hook
        code = 1  # what an uncaught exception gives a Python program
        try:
            os.close(read_fd)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(write_fd, 2)
            os.close(devnull)
            os.close(write_fd)
            os.environ.clear()
            os.environ.update(env)
            code = main(argv[1:])
        except BaseException as err:  # noqa: BLE001 - one line, as the tool's own main gives
            print(f"{prog}: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    lines = [line for line in b"".join(chunks).decode(errors="replace").splitlines() if line.strip()]
    for line in lines:
        print(line, file=sys.stderr)
    reason = lines[-1].removeprefix(prog + ": ") if lines else ""
    return os.waitstatus_to_exitcode(status), reason
