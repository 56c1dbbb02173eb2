"""The local cluster's site modules (``module_<name>_*`` in its udiRoot.conf).

- ``mpich``: the MPICH ABI approach of the original's documentation.  The host's
  ``libmpich.so.12`` with its dependencies and UCX's transport plugins, packed by
  ``shifter.packing.relocate.build_module`` (what ``python -m shifter.packtool module`` runs) into
  ``<state>/modules/mpich``; copied to /opt/udiImage/modules/mpich and put first on
  LD_LIBRARY_PATH, it replaces the image's own MPICH in the image's MPI programs.
- ``siteinfo``: the default module; it only sets ``SHIFTER_SITE_MODULE=1``, so making it the
  default changes nothing else for the other tests, yet shows defaults and ``--module=none``.
- ``hooks``: a roothook (run as root by setupRoot, in the container root before it is entered)
  and a userhook (run as the user in the container before the command).
- ``altmpi``: declares a conflict with ``mpich``.

The mpich directory is rebuilt only when the host's MPICH changes (a stamp beside it), so a
running job never sees it replaced under its feet by a later ``up``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .render import write_file
from .settings import Settings

HOST_MPICH = Path("/usr/lib/x86_64-linux-gnu/libmpich.so.12")
UCX_PLUGINS = Path("/usr/lib/x86_64-linux-gnu/ucx")
MODULE_RECIPE = "1"
ROOTHOOK = """\
#!/bin/sh
# module hooks, roothook: run by setupRoot as root with the container root as working directory
printf 'roothook ran as uid %s in %s\\n' "$(id -u)" "$(pwd)" > opt/udiImage/modules/hooks/roothook.out
"""
USERHOOK = """\
#!/bin/sh
# module hooks, userhook: run by shifter as the user inside the container, before the command
echo "shifter module hooks: userhook ran as uid $(id -u)" >&2
"""


def modules_dir(settings: Settings) -> Path:
    return settings.state_dir / "modules"


def _mpich_stamp() -> str:
    real = HOST_MPICH.resolve()
    stat = real.stat()
    packer = Path(__file__).resolve().parent.parent / "shifter" / "packing" / "relocate.py"
    digest = hashlib.sha256(f"{MODULE_RECIPE} {real} {stat.st_size} {stat.st_mtime_ns}".encode())
    digest.update(packer.read_bytes())
    return digest.hexdigest()


def build_mpich_module(settings: Settings) -> Path | None:
    """``<state>/modules/mpich`` packed from the host's MPICH; None when the host has none."""
    if not HOST_MPICH.exists():
        return None
    from shifter.packing.relocate import build_module

    dest = modules_dir(settings) / "mpich"
    stamp_file = modules_dir(settings) / "mpich.stamp"
    stamp = _mpich_stamp()
    if dest.is_dir() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return dest
    build_module(str(dest), [str(HOST_MPICH)], aliases=[("libmpi.so.12", "libmpich.so.12")],
                 plugin_dirs=[str(UCX_PLUGINS)] if UCX_PLUGINS.is_dir() else [], replace=True)
    stamp_file.write_text(stamp)
    return dest


def write_hooks_module(settings: Settings) -> Path:
    """``<state>/modules/hooks``: its roothook and userhook scripts (root-owned, not writable by others)."""
    dest = modules_dir(settings) / "hooks"
    dest.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_file(dest / "roothook.sh", ROOTHOOK, mode=0o755)
    write_file(dest / "userhook.sh", USERHOOK, mode=0o755)
    return dest


def prepare(settings: Settings) -> dict[str, Path | None]:
    """Build what the modules need; the values go to udiRoot.conf.j2."""
    directory = modules_dir(settings)
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    return {"mpich_module": build_mpich_module(settings), "hooks_module": write_hooks_module(settings)}
