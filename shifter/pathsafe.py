"""Resolving paths inside a container root the way a process chrooted there would see them.

A plain ``realpath(root + path)`` lets an absolute symlink in an image (``/data -> /etc``)
escape to the host's /etc.  Here absolute link targets restart at the root and ``..`` never
climbs above it, so the result always lies inside the root (or an error is raised).
"""

from __future__ import annotations

import errno
import os
import stat

_MAX_LINKS = 40


def resolve_in_root(root: str, path: str, *, must_exist: bool = True) -> str:
    """Return the host path that ``path`` names inside ``root``, following symlinks chroot-style."""
    root = root.rstrip("/")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root + "/" + "/".join(resolved + [name])
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            if must_exist:
                raise
            resolved.append(name)
            resolved.extend(p for p in parts if p != "..")
            break
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, f"too many symlinks resolving {path}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(name)
    return root + "/" + "/".join(resolved) if resolved else root


def open_inside(root: str, host_path: str, flags: int) -> int:
    """Open ``host_path`` without following a final symlink and check it is still under ``root``.

    The check on /proc/self/fd closes the window between resolving and using the path: a
    mount on ``/proc/self/fd/N`` then hits exactly the object that was checked.
    """
    fd = os.open(host_path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    real = os.readlink(f"/proc/self/fd/{fd}")
    base = root.rstrip("/")
    if real != base and not real.startswith(base + "/"):
        os.close(fd)
        raise OSError(errno.EXDEV, f"{host_path} resolves outside the container root")
    return fd
