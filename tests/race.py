"""A real unprivileged user racing root: swap a directory and a symlink, over and over.

Every root path that touches a path a user (or an image) controls must be tested against this
swapper: a check-then-use on a path string loses the race within a few trials, a descriptor-
based one never does.  A new root path without a test that runs it under :func:`swapping` is a
review finding (docs/internals.md, "Trust boundaries").

:func:`swapping` forks a child that drops to the given user (setgroups, setresgid, setresuid:
no capability is left) and exchanges the two names with ``renameat2(RENAME_EXCHANGE)`` (atomic:
at every instant one name is the directory and the other the symlink) until it is stopped, it
has made ``max_swaps`` exchanges or ``max_seconds`` have passed; a failed exchange (a name
removed meanwhile) is retried, as an attacker would.  The context manager always
kills and reaps the child by its pid, and reports how many exchanges it made.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Iterator

_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}[os.uname().machine]
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def exchange(first: str, second: str) -> None:
    """renameat2(first, second, RENAME_EXCHANGE): swap two names atomically."""
    result = _libc.syscall(ctypes.c_long(_SYS_RENAMEAT2), ctypes.c_int(_AT_FDCWD), os.fsencode(first),
                           ctypes.c_int(_AT_FDCWD), os.fsencode(second), ctypes.c_uint(_RENAME_EXCHANGE))
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2 {first} {second}: {os.strerror(err)}")


class Swapper:
    """What the context manager yields: the child's pid, and afterwards its exchange count."""

    def __init__(self, pid: int, count_fd: int) -> None:
        self.pid = pid
        self._count_fd = count_fd
        self.swaps = 0

    def _collect(self) -> None:
        data = b""
        while chunk := os.read(self._count_fd, 64):
            data += chunk
        os.close(self._count_fd)
        self.swaps = int(data or b"0")


def _swap_loop(first: str, second: str, uid: int, gid: int, max_swaps: int, max_seconds: float,
               count_fd: int, ready_fd: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    done = 0
    stop = False

    def _stop(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    os.write(ready_fd, b"r")
    os.close(ready_fd)
    deadline = time.monotonic() + max_seconds
    try:
        while not stop and done < max_swaps and time.monotonic() < deadline:
            try:
                exchange(first, second)
            except OSError:
                continue  # a name removed by root for now: an attacker keeps trying
            done += 1
    finally:
        os.write(count_fd, str(done).encode())


@contextlib.contextmanager
def swapping(first: str, second: str, *, uid: int, gid: int, max_swaps: int = 2_000_000,
             max_seconds: float = 30.0) -> Iterator[Swapper]:
    """Run the swapper as ``uid``/``gid`` on ``first`` and ``second`` while the body runs.

    The two names must exist and the user must be able to rename both (own their parent
    directories).  The child is stopped (SIGTERM, then SIGKILL) and reaped when the body ends,
    however it ends; ``Swapper.swaps`` then says how many exchanges it made, so a test can
    assert that the race really ran.
    """
    count_r, count_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        status = 0
        try:
            os.close(count_r)
            os.close(ready_r)
            _swap_loop(first, second, uid, gid, max_swaps, max_seconds, count_w, ready_w)
        except BaseException:  # noqa: BLE001 - the child must exit, whatever happened
            status = 1
        os._exit(status)
    os.close(count_w)
    os.close(ready_w)
    swapper = Swapper(pid, count_r)
    try:
        if os.read(ready_r, 1) != b"r":
            raise RuntimeError("the swapper could not drop to the user")
        yield swapper
    finally:
        os.close(ready_r)
        _stop(pid)
        swapper._collect()


def _stop(pid: int) -> None:
    """SIGTERM, a short grace for the count to be written, then SIGKILL; always reaped."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        reaped, _status = os.waitpid(pid, os.WNOHANG)
        if reaped:
            return
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
