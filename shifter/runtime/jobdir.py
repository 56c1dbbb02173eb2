"""The job's directory under udiMount: root's, entered by the job's user through an ACL entry.

Root creates, fills and removes ``<udiMount>/<jobid>``; the user only reads it (the launch plan,
the image's ``.meta``, ``setup.error``) and enters ``root`` and ``userns`` below it.  Were the
directory the user's, the user could rename or replace entries between root's steps; kept
root's (mode 0700) with a POSIX access ACL ``user:<uid>:r-x``, nobody but root changes it, and
no other user can even list it.  On a filesystem without POSIX ACLs the directory is handed to
the user instead (the layout before ACLs), which the descriptor-based teardown also survives.
"""

from __future__ import annotations

import errno
import os
import struct
import sys

from shifter.runtime.jobenv import ERROR_FILE, PLAN_FILE

ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
_RWX, _RX, _NONE = 7, 5, 0


def access_acl(uid: int) -> bytes:
    """The xattr value of ``u::rwx,u:<uid>:r-x,g::---,m::r-x,o::---`` (little-endian, sorted by tag)."""
    entries = ((_USER_OBJ, _RWX, _NO_ID), (_USER, _RX, uid), (_GROUP_OBJ, _NONE, _NO_ID),
               (_MASK, _RX, _NO_ID), (_OTHER, _NONE, _NO_ID))
    return struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def acl_users(value: bytes) -> list[int]:
    """The uids that named ``user:`` entries of an access ACL xattr admit (for checks and tests)."""
    body = value[4:]
    entries = (struct.unpack_from("<HHI", body, offset) for offset in range(0, len(body) - len(body) % 8, 8))
    return [ident for tag, perm, ident in entries if tag == _USER and perm & _RX == _RX]


def ensure_base(path: str, mode: int) -> None:
    """The shared parent (udiMount, loopMount): root-owned, not writable by anyone else, no symlink."""
    from shifter.errors import NodeError

    os.makedirs(path, mode, exist_ok=True)
    info = os.lstat(path)
    if info.st_uid != 0 or not os.path.isdir(path) or os.path.islink(path):
        raise NodeError(f"{path} must be a directory owned by root")
    if info.st_mode & 0o777 != mode:
        os.chmod(path, mode)


def admit_user(dir_fd: int, uid: int, gid: int) -> None:
    """Let ``uid`` (only) read and enter the root-owned directory ``dir_fd``; nobody may write it.

    ``dir_fd`` is a descriptor (not O_PATH) of the directory: owner, mode and ACL are set on the
    object itself, whatever happens to its name meanwhile.
    """
    os.fchown(dir_fd, 0, 0)
    os.fchmod(dir_fd, 0o700)
    try:
        os.setxattr(dir_fd, ACL_XATTR, access_acl(uid))
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        print("shifter: udiMount's filesystem has no POSIX ACLs: the job's directory is handed to its user",
              file=sys.stderr)
        os.fchown(dir_fd, uid, gid)


def record_error(udi_mount: str, name: str, uid: int, gid: int, reason: str) -> None:
    """Write ``setup.error`` in ``<udi_mount>/<name>`` (a job's or a step's directory): the reason every
    ``shifter`` there prints instead of running.

    The job's directory (udiMount too, on a node that never ran a job) is made here when setupRoot
    stopped before making it; the file is created, never written through whatever stood there,
    and the launch plan is withdrawn so that no task enters an environment that failed.  The
    epilog removes all of it.
    """
    import contextlib  # only here: setupRoot imports this module, and contextlib costs it 2-3 ms

    from shifter.errors import ShifterError

    ensure_base(udi_mount, 0o755)
    base_fd = os.open(udi_mount, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=base_fd)
        try:
            dir_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=base_fd)
        except OSError:
            raise ShifterError(f"{udi_mount}/{name} is not a directory") from None
    finally:
        os.close(base_fd)
    try:
        if os.fstat(dir_fd).st_uid not in (0, uid):
            raise ShifterError(f"{udi_mount}/{name} belongs to another user")
        os.fchown(dir_fd, 0, 0)  # nobody else may change it while the file is written
        for name in (ERROR_FILE, PLAN_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
        fd = os.open(ERROR_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=dir_fd)
        with os.fdopen(fd, "w") as fh:
            fh.write((reason or "setupRoot failed") + "\n")
        admit_user(dir_fd, uid, gid)
    finally:
        os.close(dir_fd)
