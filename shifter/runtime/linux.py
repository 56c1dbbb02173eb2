"""Thin bindings to the few Linux syscalls the runtime needs.

Every task start pays for this module, so it is built on ``_ctypes`` (the C core of ctypes)
directly: ``import ctypes`` costs ~1.5 ms here (struct, the type zoo, the library loaders) and
``ctypes.util`` another ~20 ms, while the few C types and one function-pointer class below
cost ~0.1 ms.  The functions come from ``dlopen(NULL)`` (the C library the interpreter
already has loaded); errno is captured per call (FUNCFLAG_USE_ERRNO).  Every failure becomes
an ``OSError`` carrying the errno and a message naming the path.
"""

from __future__ import annotations

import _ctypes
import os

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_RELATIME = 0x200000
_ST_RELATIME = 4096  # statvfs's ST_* bits equal the MS_* bits except this one
_KEPT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1


class _Int(_ctypes._SimpleCData):
    _type_ = "i"


class _ULong(_ctypes._SimpleCData):
    _type_ = "L"


class _CharP(_ctypes._SimpleCData):
    _type_ = "z"


class _CFunction(_ctypes.CFuncPtr):
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _Int


class _Libc:
    _handle = _ctypes.dlopen(None, os.RTLD_NOW)


def _function(name: str, *argtypes: type) -> _CFunction:
    func = _CFunction((name, _Libc))
    func.argtypes = argtypes
    return func


_mount = _function("mount", _CharP, _CharP, _CharP, _ULong, _CharP)
_umount2 = _function("umount2", _CharP, _Int)
_unshare = _function("unshare", _Int)
_setns = _function("setns", _Int, _Int)
_prctl = _function("prctl", _Int, _ULong, _ULong, _ULong, _ULong)


def _fail(what: str, path: str | None = None) -> OSError:
    err = _ctypes.get_errno()
    text = f"{what} {path}: {os.strerror(err)}" if path else f"{what}: {os.strerror(err)}"
    return OSError(err, text)


def _b(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2); raises OSError naming the target."""
    if _mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        raise _fail(f"mount {fstype or 'bind'} {source or ''} on", target)


def umount2(target: str, flags: int = MNT_DETACH | UMOUNT_NOFOLLOW) -> None:
    """umount2(2); detaching and not following a final symlink by default."""
    if _umount2(_b(target), flags) != 0:
        raise _fail("umount", target)


def unshare(flags: int) -> None:
    if _unshare(flags) != 0:
        raise _fail("unshare")


def setns(fd: int, nstype: int, path: str = "") -> None:
    if _setns(fd, nstype) != 0:
        raise _fail("setns", path or None)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    result = _prctl(option, arg2, arg3, arg4, arg5)
    if result < 0:
        raise _fail(f"prctl({option})")
    return result


def die_with_parent(parent: int, signo: int) -> None:
    """Get ``signo`` when the thread that forked this process ends; leave at once if it already has.

    A helper a service forks must not outlive it; checking the parent's pid after the call
    closes the window in which the parent died before the request was made.
    """
    prctl(PR_SET_PDEATHSIG, signo)
    if os.getppid() != parent:
        os._exit(1)


def set_no_new_privs() -> None:
    """Make setuid bits and file capabilities inert for everything exec'd from here on."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def drop_bounding_set() -> None:
    """Drop every capability from the bounding set (the kernel keeps it full otherwise)."""
    with open("/proc/sys/kernel/cap_last_cap", "rb") as fh:
        last = int(fh.read())
    if not 0 < last < 100:
        raise OSError(0, f"implausible cap_last_cap {last}")
    for cap in range(last + 1):
        prctl(PR_CAPBSET_DROP, cap)


def mount_flags(path: str) -> int:
    """The per-mount MS_* flags of the mount ``path`` is on."""
    st_flags = os.statvfs(path).f_flag
    return (st_flags & _KEPT_FLAGS) | (MS_RELATIME if st_flags & _ST_RELATIME else 0)


def restrict(target: str, *, readonly: bool = False, recursive: bool = False, nodev: bool = True,
             propagation: int = MS_PRIVATE) -> None:
    """Make the bind mount at ``target`` nosuid (and nodev unless told not to), and private or slave.

    Flags cannot be given with the bind itself, hence this remount.
    """
    rec = MS_REC if recursive else 0
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (MS_NODEV if nodev else 0) | (MS_RDONLY if readonly else 0)
    # keep what the source already enforces: in a user namespace those flags are locked and a
    # remount that would clear them fails with EPERM
    flags |= mount_flags(target)
    mount(None, target, None, flags)
    mount(None, target, None, propagation | rec)


def bind(source: str, target: str, *, readonly: bool = False, recursive: bool = False,
         nodev: bool = True, propagation: int = MS_PRIVATE) -> None:
    """Bind ``source`` on ``target`` and restrict it; a half-made bind is detached again."""
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    try:
        restrict(target, readonly=readonly, recursive=recursive, nodev=nodev, propagation=propagation)
    except OSError:
        try:
            umount2(target)
        except OSError:
            pass
        raise
