"""``doimport``: publish a squashfs file an import user already has, after checking it.

The original moved trust to the importer (no checks, the user's file copied as-is, id
from ``fasthash``). Here the file is opened *by the requesting user* (a helper process
running with their uid and groups opens it with ``O_NOFOLLOW`` and hands the descriptor
back over a socket pair), so every directory on the way is checked by the kernel as for
them, and the gateway reads only through that descriptor: nothing is reopened by path.
The copy (bounded by MaxImageBytes before and while copying) is what gets checked and
published, so the user cannot swap the file between check and publish; it is refused
with the reason if it is not a squashfs or holds device nodes, extended attributes or
setuid/setgid files. The id is the sha256 of the whole copy: two files share an id only
if they are the same bytes. The original's ``fasthash`` stays as an alias in the record.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import TextIO

from gateway.bounds import UNSQUASHFS_MEMORY, limited
from gateway.tarread import printable
from shifter.errors import ShifterError

SQUASHFS_MAGIC = b"hsqs"
_CHUNK = 1 << 20
_STRIDE = 512 << 20
_HELPER_TIMEOUT = 30
_SUPERBLOCK_BYTES = 1 << 20  # what ``unsquashfs -s`` may print
# A line of ``unsquashfs -lls``: mode, owner/group, size, date (at most 160 bytes) and a path
# of 128 bytes on average, the same allowance per path as the flattener's (MaxImagePaths).
LISTING_BYTES_PER_PATH = 160 + 128

# Runs as the requesting user with nothing but the standard library (-I -S): opens the
# path without following a final symlink and sends the descriptor, or the errno, back.
_OPEN_AS_USER = """
import os, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
try:
    fd = os.open(sys.argv[2], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
except OSError as err:
    sock.sendall(b"E%d" % err.errno)
else:
    socket.send_fds(sock, [b"F"], [fd])
"""


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


def _reason(path: str, code: int) -> str:
    if code == errno.ELOOP:
        return f"cannot import {path}: it is a symbolic link"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot import {path}: the requesting user cannot read it"
    return f"cannot import {path}: {os.strerror(code)}"


def open_as_user(path: str, uid: int, gid: int, groups: set[int]) -> int:
    """A read descriptor for ``path`` opened by ``uid`` with its groups; the caller closes it."""
    if uid < 0 or gid < 0:
        raise ShifterError(f"cannot import {path}: the requester's identity is unknown")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            helper = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _OPEN_AS_USER, str(theirs.fileno()), path],
                user=uid, group=gid, extra_groups=sorted(g for g in groups if g >= 0),
                pass_fds=(theirs.fileno(),), cwd="/", env={}, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        except OSError as err:
            raise ShifterError(f"cannot import {path}: cannot start the helper: {err.strerror}") from None
        theirs.close()
        ours.settimeout(_HELPER_TIMEOUT)
        try:
            message, fds, _flags, _addr = socket.recv_fds(ours, 64, 1)
        except OSError as err:
            helper.kill()
            raise ShifterError(f"cannot import {path}: the helper did not answer ({err})") from None
        finally:
            try:
                helper.wait(_HELPER_TIMEOUT)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
    finally:
        ours.close()
        theirs.close()
    if message == b"F" and len(fds) == 1:
        return fds[0]
    for fd in fds:
        os.close(fd)
    if message.startswith(b"E") and message[1:].isdigit():
        raise ShifterError(_reason(path, int(message[1:])))
    raise ShifterError(f"cannot import {path}: the helper failed")


def copy_for_import(fd: int, path: str, work_dir: str, max_bytes: int) -> tuple[str, str]:
    """Copy from the user's descriptor into scratch space, at most ``max_bytes``.

    Returns the copy's path and the sha256 of its content (the image id).
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ShifterError(f"cannot import {path}: not a regular file")
    if st.st_size > max_bytes:
        raise ShifterError(
            f"cannot import {path}: {st.st_size} bytes is more than MaxImageBytes ({max_bytes})"
        )
    os.makedirs(work_dir, exist_ok=True)
    copy = os.path.join(work_dir, "import.squashfs")
    digest = hashlib.sha256()
    copied = 0
    try:
        out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            while chunk := os.read(fd, 4 << 20):
                copied += len(chunk)
                if copied > max_bytes:  # the file grew while it was copied
                    raise ShifterError(f"cannot import {path}: more than MaxImageBytes ({max_bytes}) bytes")
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
            os.fsync(out)
        finally:
            os.close(out)
    except OSError as err:
        raise ShifterError(f"cannot copy {path}: {err.strerror}") from None
    return copy, digest.hexdigest()


def check_squashfs(path: str, shown: str, max_paths: int = 4_000_000, seconds: float = 3600.0) -> None:
    """Refuse anything but a squashfs free of device nodes, xattrs and setuid/setgid files.

    unsquashfs reads the user's bytes, so it runs under the limits of the pull's tools
    (``bounds.limited``): CPU time and wall time of ``seconds`` (PullDeadline), 1 GiB of
    address space, and a listing of at most ``max_paths`` (MaxImagePaths) lines of bounded
    length, written to a file in the copy's directory and read back a line at a time.
    """
    with open(path, "rb") as fh:
        if fh.read(4) != SQUASHFS_MAGIC:
            raise ShifterError(f"rejected {shown}: not a squashfs file")
    scratch = os.path.dirname(path)
    with _run(["unsquashfs", "-s", path], shown, scratch, _SUPERBLOCK_BYTES, max_paths, seconds) as info:
        for line in info:
            if line.startswith("Number of xattr ids"):
                count = line.rsplit(None, 1)[-1]
                if count.isdigit() and int(count) > 0:
                    raise ShifterError(f"rejected {shown}: the squashfs holds extended attributes")
    listing_bytes = max_paths * LISTING_BYTES_PER_PATH
    with _run(["unsquashfs", "-lls", "-d", "", path], shown, scratch, listing_bytes, max_paths,
              seconds) as listing:
        paths = 0
        for line in listing:
            mode, _, rest = line.partition(" ")
            if len(mode) != 10:
                continue  # unsquashfs's own lines
            paths += 1
            if paths > max_paths:
                raise ShifterError(f"rejected {shown}: it holds more than {max_paths} paths (MaxImagePaths)")
            name = printable(rest.rstrip("\n").rsplit(" ", 1)[-1] if rest else "?")
            if mode[0] in "cbp" or mode[0] == "s":
                kind = {"c": "a character device", "b": "a block device", "p": "a fifo", "s": "a socket"}[mode[0]]
                raise ShifterError(f"rejected {shown}: {name} is {kind}")
            if mode[3] in "sS" or mode[6] in "sS":
                raise ShifterError(f"rejected {shown}: {name} is setuid or setgid")


@contextlib.contextmanager
def _run(argv: list[str], shown: str, scratch: str, max_output: int, max_paths: int,
         seconds: float) -> Iterator[TextIO]:
    """Run ``argv`` under the tools' limits, its output into a file; yields that file to read."""
    command = limited(argv, cpu=seconds, memory=UNSQUASHFS_MEMORY, fsize=max_output)
    with tempfile.TemporaryFile(dir=scratch) as out, tempfile.TemporaryFile(dir=scratch) as err:
        try:
            proc = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                  timeout=seconds, check=False)
        except subprocess.TimeoutExpired:
            raise ShifterError(f"rejected {shown}: {argv[0]} did not finish within {seconds:g} s"
                               " (PullDeadline)") from None
        except OSError as error:
            raise ShifterError(f"cannot check {shown}: {argv[0]}: {error.strerror}") from None
        if proc.returncode != 0:
            err.seek(0)
            lines = err.read(4000).decode("utf-8", "replace").strip().splitlines()
            last = printable(lines[-1].strip()[:300]) if lines else "failed"
            raise ShifterError(_failure(proc.returncode, last, shown, argv[0], max_output, max_paths, seconds))
        out.seek(0)
        with open(out.fileno(), encoding="utf-8", errors="replace", closefd=False) as text:
            yield text


def _failure(status: int, last: str, shown: str, tool: str, max_output: int, max_paths: int,
             seconds: float) -> str:
    """One line saying which limit stopped the tool, or what it said."""
    if status == -signal.SIGXFSZ:
        return (f"rejected {shown}: its file list is longer than {max_paths} paths (MaxImagePaths) allow"
                f" ({tool} stopped at {max_output} bytes)")
    if status in (-signal.SIGXCPU, -signal.SIGKILL):
        return f"rejected {shown}: {tool} exceeded its CPU time limit of {seconds:g} s (PullDeadline)"
    if "out of memory" in last.lower() or "cannot allocate" in last.lower():
        return f"rejected {shown}: {tool} exceeded its memory limit of {UNSQUASHFS_MEMORY >> 20} MiB"
    return f"rejected {shown}: not a valid squashfs ({last})"
