"""What every hook shares: the plugstack.conf arguments and the job accessors.

Its own module so that ``hooks`` (submit, prolog, epilog, dispatch) and ``stephooks`` (the hooks
slurmstepd runs) both import it and never each other's internals: the dispatch in ``hooks``
imports ``stephooks``, the arrow never points back.  Stdlib and small ``shifter`` modules only:
``submit`` runs on the submission path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

from shifter import buildinfo
from shifter.errors import ShifterError


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
    from shifter.gpu import slurm_numbers_gpus_locally

    return slurm_numbers_gpus_locally(env.get("SLURM_CONF") or "/etc/slurm/slurm.conf")


def check_image(image_type: str, image: str) -> None:
    """The user's submission environment set these: only a valid reference reaches setupRoot's argv."""
    from shifter.imageref import IMAGE_TYPES, parse_image_ref

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
    """Write ``reason`` to the job's (or step's) setup.error, readable by its user only (shifter/jobdir.py)."""
    from shifter import jobdir

    jobdir.record_error(os.path.dirname(job.dir), os.path.basename(job.dir), uid, gid, reason)


def run_root_tool(argv: list[str]) -> tuple[int, str]:
    """Run setupRoot/unsetupRoot with a clean environment; its stderr is copied to slurmd's log.

    Returns the exit status and the tool's last line without its ``<prog>: `` prefix.
    """
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
