"""The last steps of every launch, shared by the prepared path (launcher.py) and the fresh path (fresh.py).

Before the chroot: the command's argv, environment and the caller's cwd (prepare_exec); after
it: working directory, no capabilities, no_new_privs, module userhooks and the exec
(exec_in_root).  Runs as the user on every task under ``python -I -S``; after the chroot nothing
can be imported, so everything needed there is imported before it.
"""

from __future__ import annotations

import os
import sys

from shifter.errors import ShifterError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from shifter.launch.launcher import Options, Request

PROG = "shifter"


def prepare_exec(opts: Options, environ: dict[str, str], request: Request, meta, config,
                 modules: list, gpu_ops: list | None = None) -> tuple[list[str], dict[str, str], str]:
    """(argv, environment, caller's cwd) for the command: everything decided before the chroot.

    ``gpu_ops``: the job's GPU environment as setupRoot recorded it, applied last.
    """
    from shifter.formats.command import select_command
    from shifter.formats.environment import apply_operations, build_environment
    from shifter.formats.launchplan import image_env

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

    from shifter.runtime import linux

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


def _env_file_entries(opts: Options) -> list[str]:
    if not opts.env_files:
        return []
    from shifter.formats.environment import parse_env_file

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
