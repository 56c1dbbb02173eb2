"""Reaching paths that a user or an image controls through descriptors, never through strings.

Root checks an object and then acts on it; between the two a user can swap a directory for a
symlink (``renameat2(RENAME_EXCHANGE)``).  Everything here therefore resolves a path once, with
the kernel's own confinement (``openat2`` with ``RESOLVE_IN_ROOT`` or ``RESOLVE_NO_SYMLINKS``),
and hands back a descriptor: checks (``fstat``, :func:`real_path`) and actions (a mount on
:func:`proc_path`, ``*at`` calls) then hit exactly the object that was resolved.

Only if the kernel lacks ``openat2`` (ENOSYS, before 5.6) is a component-wise ``O_NOFOLLOW``
walk used instead; it refuses every symlink and ``..``, which is stricter than ``RESOLVE_IN_ROOT``.
"""

from __future__ import annotations

import _ctypes
import errno
import os
import stat
import sys

from shifter.runtime import linux

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

_SYS_OPENAT2 = 437  # the same number on every architecture (unified syscall table)
_syscall = linux._function("syscall", linux._ULong, linux._Int, linux._CharP, linux._CharP, linux._ULong)
_have_openat2 = True
_MAX_SWAPS = 100


def _open_how(flags: int, mode: int, resolve: int) -> bytes:
    """struct open_how: three u64 (flags, mode, resolve)."""
    return b"".join(value.to_bytes(8, sys.byteorder) for value in (flags, mode, resolve))


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2); O_CLOEXEC is always added.  Raises OSError naming ``path``."""
    global _have_openat2
    flags |= os.O_CLOEXEC
    if _have_openat2:
        how = _open_how(flags, mode, resolve)
        fd = _syscall(_SYS_OPENAT2, dirfd, os.fsencode(path), how, len(how))
        if fd >= 0:
            return fd
        err = _ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, f"{path}: {os.strerror(err)}")
        _have_openat2 = False
    return _walk_nofollow(dirfd, path, flags, mode)


def _walk_nofollow(dirfd: int, path: str, flags: int, mode: int) -> int:
    """The fallback: one component at a time with O_NOFOLLOW; ``..`` and every symlink refused."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.EXDEV, f"{path}: '..' is not resolved without openat2")
    if not parts:
        return os.open(".", flags, mode, dir_fd=dirfd)
    current = dirfd
    try:
        for index, name in enumerate(parts):
            last = index == len(parts) - 1
            step = (flags | os.O_NOFOLLOW) if last else (os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                following = os.open(name, step, mode, dir_fd=current)
            except OSError as exc:
                raise OSError(exc.errno, f"{path}: {exc.strerror}") from None
            if current != dirfd:
                os.close(current)
            current = following
        if stat.S_ISLNK(os.fstat(current).st_mode):  # O_PATH|O_NOFOLLOW opens a final link itself
            raise OSError(errno.ELOOP, f"{path}: {os.strerror(errno.ELOOP)}")
        result, current = current, dirfd
        return result
    finally:
        if current != dirfd:
            os.close(current)


def open_in_root(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """Open ``path`` as a process chrooted at ``root_fd`` would: absolute links and ``..``
    stay inside, /proc magic links are refused."""
    return openat2(root_fd, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS, mode)


def open_no_symlinks(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    """Open ``path`` below ``dirfd`` refusing any symlink on the way (and ``..`` above it)."""
    return openat2(dirfd, path, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, mode)


def open_dir(path: str) -> int:
    """An O_PATH descriptor of a directory the site configured (trusted path, no final symlink)."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def proc_path(fd: int) -> str:
    """The path that names exactly ``fd``'s object: a mount source or target that cannot move."""
    return f"/proc/self/fd/{fd}"


def real_path(fd: int) -> str:
    """Where ``fd``'s object is now, in this mount namespace (for allow-lists and messages)."""
    return os.readlink(proc_path(fd))


def relative_to(root_fd: int, fd: int) -> str:
    """``fd``'s path as seen inside the root ``root_fd`` ("/" for the root itself)."""
    return relative_to_path(real_path(root_fd), fd)


def relative_to_path(root: str, fd: int) -> str:
    """``fd``'s path as seen inside the root directory ``root`` ("/" for the root itself)."""
    base, real = root.rstrip("/"), real_path(fd)
    if real in (base, base + "/"):
        return "/"
    if not real.startswith(base + "/"):
        raise OSError(errno.EXDEV, f"{real} is outside {base}")
    return real[len(base):]


def make_dirs_in_root(root_fd: int, path: str, mode: int = 0o755, *, device: int | None = None) -> int:
    """Open directory ``path`` inside the root, creating missing components one at a time.

    Each missing component is made with ``mkdirat`` on an in-root descriptor of its parent and
    then opened in-root again, so a swapped component can redirect neither the creation nor the
    result out of the root.  With ``device``, a component is created only where its parent is on
    that filesystem (the container's tmpfs: creating inside a bound host directory would write on
    the host).  Returns an O_PATH descriptor of the directory.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for count in range(len(parts)):
        try:
            os.close(open_in_root(root_fd, "/".join(parts[:count + 1]), os.O_PATH))
            continue
        except FileNotFoundError:
            pass
        parent = open_in_root(root_fd, "/".join(parts[:count]) or "/", os.O_PATH | os.O_DIRECTORY)
        try:
            if parts[count] == "..":
                break
            if device is not None and os.fstat(parent).st_dev != device:
                raise OSError(errno.EXDEV, f"cannot create {path}: its parent is not on the container tmpfs")
            try:
                os.mkdir(parts[count], mode, dir_fd=parent)
            except FileExistsError:
                pass
        finally:
            os.close(parent)
    return open_in_root(root_fd, path, os.O_PATH | os.O_DIRECTORY)


def remove_tree(parent_fd: int, name: str) -> None:
    """``rm -rf`` of entry ``name`` of ``parent_fd``: never follows a link, never crosses a mount.

    Every step is an ``*at`` call on a descriptor: a directory swapped for a symlink is
    unlinked as a link, and a directory on another filesystem (a mount, or a swap that points
    elsewhere) stops the removal with EXDEV instead of emptying it.
    """
    _remove_entry(parent_fd, name, os.fstat(parent_fd).st_dev)


def _remove_entry(parent_fd: int, name: str, device: int) -> None:
    for _attempt in range(_MAX_SWAPS):
        try:
            os.unlink(name, dir_fd=parent_fd)
            return
        except FileNotFoundError:
            return
        except IsADirectoryError:
            pass
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                continue  # swapped for a non-directory since the unlink: unlink that
            raise
        try:
            if os.fstat(fd).st_dev != device:
                raise OSError(errno.EXDEV, f"refusing to remove {real_path(fd)}: another filesystem")
            for child in os.listdir(fd):
                _remove_entry(fd, child, device)
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=parent_fd)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.ENOTDIR):
                raise
    raise OSError(errno.EAGAIN, f"{name} keeps changing while it is removed")


_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT, _SYS_MOUNT_SETATTR = (
    428, 429, 430, 431, 432, 442)
_OPEN_TREE_CLONE = 1
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOVE_MOUNT_T_EMPTY_PATH = 0x40
_FSOPEN_CLOEXEC = _FSMOUNT_CLOEXEC = 0x1
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_open_tree = linux._function("syscall", linux._ULong, linux._Int, linux._CharP, linux._ULong)
_move_mount = linux._function("syscall", linux._ULong, linux._Int, linux._CharP, linux._Int, linux._CharP,
                              linux._ULong)
_mount_setattr = linux._function("syscall", linux._ULong, linux._Int, linux._CharP, linux._ULong, linux._CharP,
                                 linux._ULong)
_fsopen = linux._function("syscall", linux._ULong, linux._CharP, linux._ULong)
_fsconfig = linux._function("syscall", linux._ULong, linux._Int, linux._ULong, linux._CharP, linux._CharP,
                            linux._Int)
_fsmount = linux._function("syscall", linux._ULong, linux._Int, linux._ULong, linux._ULong)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = _ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _restrict(tree: int, *, readonly: bool, nodev: bool, propagation: int, recursive_flag: int,
              userns_fd: int = -1) -> None:
    """nosuid (nodev, read-only, idmapped) and the propagation on a detached mount, before anyone can see it."""
    attr_set = _MOUNT_ATTR_NOSUID | (_MOUNT_ATTR_NODEV if nodev else 0) | (_MOUNT_ATTR_RDONLY if readonly else 0)
    if userns_fd >= 0:
        attr_set |= _MOUNT_ATTR_IDMAP
    attr = b"".join(value.to_bytes(8, sys.byteorder) for value in (attr_set, 0, propagation, max(userns_fd, 0)))
    _check(_mount_setattr(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH | recursive_flag, attr, len(attr)),
           "mount_setattr")


def _attach(tree: int, target_fd: int) -> None:
    _check(_move_mount(_SYS_MOVE_MOUNT, tree, b"", target_fd, b"",
                       _MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH),
           f"move_mount onto {real_path(target_fd)}")


def bind_fd(source_fd: int, target_fd: int, *, readonly: bool = False, recursive: bool = False,
            nodev: bool = True, propagation: int = linux.MS_PRIVATE, userns_fd: int = -1) -> None:
    """Bind ``source_fd``'s directory on ``target_fd``'s, already nosuid (nodev, read-only) and
    private or slave when it appears.  With ``userns_fd`` the bind is an idmapped mount: owners
    show (and new files are written) through that user namespace's uid and gid maps.

    The bind is a detached copy (open_tree) restricted before it is attached (move_mount onto
    the descriptor), so nothing half-made is ever visible and a failure needs no unmount:
    closing the copy frees it.
    """
    recursive_flag = _AT_RECURSIVE if recursive else 0
    tree = _check(_open_tree(_SYS_OPEN_TREE, source_fd, b"",
                             _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_EMPTY_PATH | recursive_flag), "open_tree")
    try:
        _restrict(tree, readonly=readonly, nodev=nodev, propagation=propagation, recursive_flag=recursive_flag,
                  userns_fd=userns_fd)
        _attach(tree, target_fd)
    finally:
        os.close(tree)


def mount_new_fs(fstype: str, source: str, target_fd: int, *, owner: tuple[int, int],
                 propagation: int = linux.MS_PRIVATE) -> None:
    """Mount a new ``fstype`` filesystem from ``source`` on ``target_fd``, its root owned by ``owner``.

    The filesystem is made detached (fsopen/fsmount), nosuid and nodev from the start; its root
    is chowned through the mount's own descriptor and only then attached: no path is looked up
    between the mount and the chown, so a swap in the user's tree cannot redirect the chown.
    """
    context = _check(_fsopen(_SYS_FSOPEN, fstype.encode(), _FSOPEN_CLOEXEC), f"fsopen {fstype}")
    try:
        _check(_fsconfig(_SYS_FSCONFIG, context, _FSCONFIG_SET_STRING, b"source", os.fsencode(source), 0),
               f"{fstype} source {source}")
        _check(_fsconfig(_SYS_FSCONFIG, context, _FSCONFIG_CMD_CREATE, None, None, 0), f"mount {fstype} {source}")
        tree = _check(_fsmount(_SYS_FSMOUNT, context, _FSMOUNT_CLOEXEC, _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV),
                      f"fsmount {fstype}")
    finally:
        os.close(context)
    try:
        os.chown(proc_path(tree), *owner)
        _restrict(tree, readonly=False, nodev=True, propagation=propagation, recursive_flag=0)
        _attach(tree, target_fd)
    finally:
        os.close(tree)
