"""Resolving paths inside a container root the way a process chrooted there would see them.

A plain ``realpath(root + path)`` lets an absolute symlink in an image (``/data -> /etc``)
escape to the host's /etc.  The kernel resolves here (shifter/runtime/fdpath.py, ``openat2`` with
``RESOLVE_IN_ROOT``): absolute link targets restart at the root and ``..`` never climbs above
it, so the result always lies inside the root (or an error is raised).

These return or take path strings, for trees only root and the image shape (the site's own
mounts, a root tmpfs being built).  Where a user can change a path meanwhile, keep the
descriptor that fdpath returns and act on it instead.
"""

from __future__ import annotations

import errno
import os

from shifter.runtime import fdpath

_MAX_LINKS = 40


def resolve_in_root(root: str, path: str, *, must_exist: bool = True) -> str:
    """Return the host path that ``path`` names inside ``root``, following symlinks chroot-style.

    With ``must_exist=False`` the missing tail is appended to the deepest existing directory,
    after a dangling symlink there is followed to where its target would be.
    """
    root = root.rstrip("/") or "/"
    root_fd = fdpath.open_dir(root)
    try:
        for _link in range(_MAX_LINKS):
            parts = [p for p in path.split("/") if p not in ("", ".")]
            cut, fd = _deepest(root_fd, parts, must_exist)
            try:
                inside = fdpath.relative_to_path(root, fd)
                dangling = f"/proc/self/fd/{fd}/{parts[cut]}" if cut < len(parts) else ""
                if not dangling or not os.path.islink(dangling):
                    rest = [p for p in parts[cut:] if p != ".."]
                    base = root if inside == "/" else root + inside
                    return base.rstrip("/") + "/" + "/".join(rest) if rest else base
                target = os.readlink(dangling)
            finally:
                os.close(fd)
            prefix = "" if target.startswith("/") else inside.rstrip("/") + "/"
            path = prefix + target + "/" + "/".join(parts[cut + 1:])
        raise OSError(errno.ELOOP, f"too many symlinks resolving {path}")
    finally:
        os.close(root_fd)


def _deepest(root_fd: int, parts: list[str], must_exist: bool) -> tuple[int, int]:
    """(n, descriptor) of the longest prefix ``parts[:n]`` that resolves inside the root."""
    for cut in range(len(parts), -1, -1):
        try:
            return cut, fdpath.open_in_root(root_fd, "/".join(parts[:cut]) or "/", os.O_PATH)
        except FileNotFoundError:
            if must_exist:
                raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, f"too many symlinks resolving /{'/'.join(parts)}") from None
            raise
    raise FileNotFoundError(errno.ENOENT, "the container root does not exist")


def open_inside(root: str, host_path: str, flags: int) -> int:
    """Open ``host_path`` (a path below ``root``) without following a final symlink, resolving
    every other component inside ``root``: the result cannot lie outside it, and a mount on
    ``/proc/self/fd/N`` then hits exactly the object that was opened."""
    base = root.rstrip("/")
    if host_path != base and not host_path.startswith(base + "/"):
        raise OSError(errno.EXDEV, f"{host_path} is outside the container root")
    root_fd = fdpath.open_dir(base or "/")
    try:
        return fdpath.open_in_root(root_fd, host_path[len(base):] or "/", flags | os.O_NOFOLLOW)
    finally:
        os.close(root_fd)
