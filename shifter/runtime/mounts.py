"""The mount table as the kernel reports it, and tearing down a subtree of it.

/proc/self/mountinfo escapes space, tab, newline and backslash in paths as octal (``\\040``);
paths are unescaped before any comparison.  A subtree is matched on whole path components,
so removing /x/udiMount never touches /x/udiMount2 (a bug class the original guarded against).
"""

from __future__ import annotations

import errno

from shifter.runtime import linux

_OCTAL_DIGITS = frozenset("01234567")


def unescape(field: str) -> str:
    """Undo the kernel's octal escaping of a mountinfo path field."""
    if "\\" not in field:
        return field
    out = bytearray()
    raw = field.encode("latin-1")
    i = 0
    while i < len(raw):
        code = raw[i : i + 4]
        if code[:1] == b"\\" and len(code) == 4 and set(code[1:].decode("latin-1")) <= _OCTAL_DIGITS:
            out.append(int(code[1:], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def mount_points(table: str = "/proc/self/mountinfo") -> list[str]:
    """Every mount point in the table, in mount order (a path appears once per stacked mount)."""
    with open(table, encoding="latin-1") as fh:
        return [unescape(line.split(" ", 5)[4]) for line in fh if line.strip()]


def mount_sources(table: str = "/proc/self/mountinfo") -> list[tuple[str, str, str]]:
    """(mount point, fstype, source) for every mount, for finding e.g. which loop device backs a mount."""
    result = []
    with open(table, encoding="latin-1") as fh:
        for line in fh:
            fields = line.split()
            if not fields:
                continue
            sep = fields.index("-")
            result.append((unescape(fields[4]), fields[sep + 1], unescape(fields[sep + 2])))
    return result


def is_under(path: str, base: str) -> bool:
    """True when ``path`` is ``base`` or below it, comparing whole components."""
    base = base.rstrip("/") or "/"
    return path == base or path.startswith(base if base == "/" else base + "/")


def mounts_under(base: str, table: str = "/proc/self/mountinfo") -> list[str]:
    return [point for point in mount_points(table) if is_under(point, base)]


def outermost(points: list[str]) -> list[str]:
    """The mount points not below another one of ``points``: the tops of disjoint subtrees."""
    tops: list[str] = []
    for point in sorted(set(points)):
        if not any(is_under(point, top) for top in tops):
            tops.append(point)
    return tops


def _detach(point: str) -> None:
    try:
        linux.umount2(point, linux.MNT_DETACH | linux.UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise


def unmount_tree(base: str, attempts: int = 10) -> None:
    """Detach every mount at or below ``base`` until none is left; raise OSError if some remain.

    A lazy (MNT_DETACH) unmount of a mount takes its whole subtree with it in one syscall, so
    only the tops of the subtrees are detached: each umount2 that frees mounts costs the kernel
    an RCU grace period (0.1-0.3 ms), and detaching 30 mounts one by one, children first, cost
    2-8 ms here against 0.5 ms.  Should a top refuse (a mount the kernel keeps locked), the
    remaining mounts are then detached one by one, deepest first.  UMOUNT_NOFOLLOW stops a
    symlink planted in an image from redirecting an unmount elsewhere.
    """
    for attempt in range(attempts):
        points = mounts_under(base)
        if not points:
            return
        targets = outermost(points) if attempt == 0 else sorted(points, reverse=True)
        for point in targets:
            _detach(point)
    left = mounts_under(base)
    if left:
        raise OSError(errno.EBUSY, f"still mounted under {base}: {left[0]}")
