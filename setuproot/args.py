"""setupRoot's command line: the original's getopt string plus two long-option extensions."""

from __future__ import annotations

from shifter.errors import ShifterError
from shifter.record import Record

DEFAULT_CONFIG = "/etc/shifter/udiRoot.conf"
USAGE = ("usage: setupRoot -U uid -G gid -u user [-s pubkey] [-N nodespec] [-v volmap]... [-m modules] [-V] "
         "[--config PATH] [--job-id ID] [--step-id ID] [--memory-cgroup PATH] [--defer-sshd] [--gpus IDS] "
         "[--gpus-local] [--writable] [--] <type> <image>")


class SetupRequest(Record):
    """What the prolog asked for."""

    __slots__ = ("uid", "gid", "user", "pubkey", "node_spec", "volumes", "modules", "verbose",
                 "config_path", "jobid", "step", "memory_cgroup", "defer_sshd", "gpus", "gpus_local", "writable",
                 "image_type", "image")
    uid: int
    gid: int
    user: str
    pubkey: str | None
    node_spec: str | None
    volumes: list[str]
    modules: str | None
    verbose: bool
    config_path: str | None
    jobid: str | None
    step: str | None  # a step's own environment (another image, volumes or modules than the job's)
    memory_cgroup: str | None
    defer_sshd: bool  # prepare the sshd but let the extern step start it (plugstack extern_cgroup=1)
    gpus: str  # the job's GPU indices on this node (Slurm's SLURM_JOB_GPUS in the prolog); "" none
    writable: bool  # a per-job overlay over the image (sbatch --writable)
    gpus_local: bool  # Slurm gives tasks job-relative GPU indices (task/cgroup, ConstrainDevices=yes)
    image_type: str
    image: str


def default_config_path() -> str:
    """The udiRoot.conf baked in at install time: root commands never take it from the environment."""
    try:
        from shifter import buildinfo
    except ImportError:
        return DEFAULT_CONFIG
    return buildinfo.CONFIG_FILE


def _int_option(flag: str, value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise ShifterError(f"{flag} needs a non-negative integer, got {value!r}")
    return int(value)


def memory_cgroup_option(value: str) -> str:
    """``--memory-cgroup`` (setupRoot and unsetupRoot): an absolute cgroup path, never a relative one."""
    if not value.startswith("/"):
        raise ShifterError(f"--memory-cgroup needs an absolute path, got {value!r}")
    return value


# option -> SetupRequest field, by how the value is taken
_INT_OPTIONS = {"-U": "uid", "-G": "gid"}
_STRING_OPTIONS = {"-u": "user", "-s": "pubkey", "-N": "node_spec", "-m": "modules",
                   "--config": "config_path", "--job-id": "jobid", "--step-id": "step", "--gpus": "gpus"}
_SWITCHES = {"-V": "verbose", "--defer-sshd": "defer_sshd", "--gpus-local": "gpus_local", "--writable": "writable"}


def parse_args(argv: list[str], inherited_jobid: str | None) -> SetupRequest:
    from shifter.cmdline import getopt

    try:
        opts, positional = getopt(argv, "v:s:u:U:G:N:m:V", ["config=", "job-id=", "step-id=", "memory-cgroup=",
                                                                 "defer-sshd", "gpus=", "gpus-local", "writable"])
    except ShifterError as err:
        raise ShifterError(f"{err}; {USAGE}") from None
    values: dict[str, object] = {"uid": None, "gid": None, "user": None, "pubkey": None, "node_spec": None,
                                 "volumes": [], "modules": None, "verbose": False, "config_path": None,
                                 "jobid": inherited_jobid, "step": None, "memory_cgroup": None,
                                 "defer_sshd": False, "gpus": "", "gpus_local": False, "writable": False}
    for flag, value in opts:
        if flag in _INT_OPTIONS:
            values[_INT_OPTIONS[flag]] = _int_option(flag, value)
        elif flag in _STRING_OPTIONS:
            values[_STRING_OPTIONS[flag]] = value
        elif flag in _SWITCHES:
            values[_SWITCHES[flag]] = True
        elif flag == "-v":
            values["volumes"].append(value)  # type: ignore[union-attr]
        elif flag == "--memory-cgroup":
            values["memory_cgroup"] = memory_cgroup_option(value)
    if len(positional) != 2:
        raise ShifterError(f"expected <type> <image>, got {len(positional)} argument(s); {USAGE}")
    for flag, key in (("-u", "user"), ("-U", "uid"), ("-G", "gid")):
        if values[key] is None:
            raise ShifterError(f"{flag} is required; {USAGE}")
    return SetupRequest(image_type=positional[0], image=positional[1], **values)
