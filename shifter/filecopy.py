"""Copying files and trees into a container root without ``shutil``.

``shutil`` pulls in fnmatch, re and enum: 2 ms idle, 8 ms on a loaded node, on every prolog.
What setupRoot needs is small: regular files (content by ``sendfile``, then mode, and owner
when running as root), symlinks as symlinks, directories recursively.  Device nodes, fifos
and sockets are skipped, never recreated.
"""

from __future__ import annotations

import os
import stat

_CHUNK = 1 << 30


def copy_file(source: str, target: str, *, mode: int | None = None, owner: tuple[int, int] | None = None,
              exclusive: bool = True) -> None:
    """Copy a regular file's content; ``mode`` defaults to the source's permission bits."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(src)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_EXCL if exclusive else os.O_TRUNC)
        dst = os.open(target, flags, 0o600)
        try:
            offset = 0
            while offset < info.st_size:
                sent = os.sendfile(dst, src, offset, min(_CHUNK, info.st_size - offset))
                if sent == 0:
                    break
                offset += sent
            if owner is not None:
                os.fchown(dst, *owner)
            os.fchmod(dst, stat.S_IMODE(info.st_mode) if mode is None else mode)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def copy_entry(source: str, target: str, *, keep_owner: bool) -> None:
    """Copy one directory entry (file, symlink or directory tree) to ``target``, which must not exist."""
    info = os.lstat(source)
    owner = (info.st_uid, info.st_gid) if keep_owner else None
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(source), target)
        if owner is not None:
            os.lchown(target, *owner)
    elif stat.S_ISREG(info.st_mode):
        copy_file(source, target, owner=owner)
    elif stat.S_ISDIR(info.st_mode):
        os.mkdir(target, 0o700)
        copy_contents(source, target, keep_owner=keep_owner)
        if owner is not None:
            os.chown(target, *owner)
        os.chmod(target, stat.S_IMODE(info.st_mode))


def copy_contents(source: str, target: str, *, keep_owner: bool, skip_existing: bool = False) -> None:
    """``cp -rp source/* target/`` into an existing directory."""
    with os.scandir(source) as entries:
        names = [entry.name for entry in entries]
    for name in names:
        dest = os.path.join(target, name)
        if skip_existing and os.path.lexists(dest):
            continue
        if os.path.isdir(dest) and not os.path.islink(dest) and os.path.isdir(os.path.join(source, name)):
            copy_contents(os.path.join(source, name), dest, keep_owner=keep_owner, skip_existing=skip_existing)
            continue
        copy_entry(os.path.join(source, name), dest, keep_owner=keep_owner)
