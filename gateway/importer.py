"""``doimport``: publish a squashfs file an import user already has, after checking it.

The original moved trust to the importer (no checks, the user's file copied as-is, id
from ``fasthash``). Here the file is first *copied* into the job's scratch directory
(never moved; the copy is what gets checked and published, so the user cannot swap
the file between check and publish), then refused with the reason if it is not a
squashfs or holds device nodes, extended attributes or setuid/setgid files.
The id stays the original's ``fasthash`` so ids of imported images match across gateways.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess

from shifter.errors import ShifterError

SQUASHFS_MAGIC = b"hsqs"
_CHUNK = 1 << 20
_STRIDE = 512 << 20


def fasthash(path: str) -> str:
    """The original's pseudo-id: sha256 of 1 MiB read every 512 MiB (offsets 0, 512 MiB, ...)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            fh.seek(_STRIDE - _CHUNK, os.SEEK_CUR)
    return digest.hexdigest()


def check_readable_by(path: str, uid: int, gids: set[int]) -> os.stat_result:
    """The requester must be able to read the file themselves (the gateway reads it as root)."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise ShifterError(f"cannot import {path}: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ShifterError(f"cannot import {path}: not a regular file")
    allowed = (
        (st.st_uid == uid and st.st_mode & stat.S_IRUSR)
        or (st.st_gid in gids and st.st_mode & stat.S_IRGRP)
        or st.st_mode & stat.S_IROTH
    )
    if not allowed:
        raise ShifterError(f"cannot import {path}: the requesting user cannot read it")
    return st


def copy_for_import(path: str, work_dir: str) -> str:
    """Copy (never move) the user's file into scratch space; returns the copy's path."""
    os.makedirs(work_dir, exist_ok=True)
    copy = os.path.join(work_dir, "import.squashfs")
    try:
        with open(path, "rb") as src, open(copy, "wb") as dst:
            shutil.copyfileobj(src, dst, 4 << 20)
            dst.flush()
            os.fsync(dst.fileno())
    except OSError as err:
        raise ShifterError(f"cannot copy {path}: {err.strerror}") from None
    os.chmod(copy, 0o644)
    return copy


def check_squashfs(path: str, shown: str) -> None:
    """Refuse anything but a squashfs free of device nodes, xattrs and setuid/setgid files."""
    with open(path, "rb") as fh:
        if fh.read(4) != SQUASHFS_MAGIC:
            raise ShifterError(f"rejected {shown}: not a squashfs file")
    info = _run(["unsquashfs", "-s", path], shown)
    for line in info.splitlines():
        if line.startswith("Number of xattr ids"):
            count = line.rsplit(None, 1)[-1]
            if count.isdigit() and int(count) > 0:
                raise ShifterError(f"rejected {shown}: the squashfs holds extended attributes")
    listing = _run(["unsquashfs", "-lls", "-d", "", path], shown)
    for line in listing.splitlines():
        mode, _, rest = line.partition(" ")
        if len(mode) != 10:
            continue
        name = rest.rsplit(" ", 1)[-1] if rest else "?"
        if mode[0] in "cbp" or mode[0] == "s":
            kind = {"c": "a character device", "b": "a block device", "p": "a fifo", "s": "a socket"}[mode[0]]
            raise ShifterError(f"rejected {shown}: {name} is {kind}")
        if mode[3] in "sS" or mode[6] in "sS":
            raise ShifterError(f"rejected {shown}: {name} is setuid or setgid")


def _run(argv: list[str], shown: str) -> str:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, errors="replace", timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ShifterError(f"cannot check {shown}: {argv[0]}: {err}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise ShifterError(f"rejected {shown}: not a valid squashfs ({last})")
    return proc.stdout
