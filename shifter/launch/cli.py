"""The ``shifter`` command's entry point: ``shifter doctor``, or a launch.

Kept apart from the subcommands so that none of them imports another through it: the launcher
(launcher.py, with its fresh path fresh.py) and the node check (doctor.py) are both leaves of
this dispatch.  Installed as ``$PREFIX/libexec/shifter/shifter`` (scripts/install.py), run by
users under ``python -I -S``.
"""

from __future__ import annotations

import os
import sys

from shifter.errors import ShifterError
from shifter.launch.execute import PROG


def run(args: list[str], environ: dict[str, str]) -> None:
    """``shifter doctor`` exactly (``shifter -- doctor`` runs a program called doctor in the image), else a launch."""
    from shifter.formats.config import config_path

    if args == ["doctor"]:
        from shifter.launch.doctor import run as run_doctor

        sys.exit(run_doctor(config_path(environ)))
    from shifter.launch.launcher import launch

    launch(args, environ)


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
        run(sys.argv[1:], initial_environment())
    except ShifterError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as err:
        print(f"{PROG}: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""), file=sys.stderr)
        sys.exit(1)
