"""Run the site's ``examiner`` (e.g. a security scanner) on a built image before it is published.

The original unpacked every image to a directory and ran ``examiner <dir> <id>`` on it; our
pipeline never has an unpacked tree, so the built squashfs is shown to the examiner through
``squashfuse`` (read-only, unprivileged: the gateway only needs access to /dev/fuse) in a
temporary directory under the pull's scratch directory. The mount is always removed before
the scratch directory is, and ``unmount_under`` lets start-up recovery remove a mount that a
crashed gateway left behind. The examiner runs from an argument list, in its own session,
bounded by a timeout and by as many seconds of CPU time (``prlimit``); a non-zero exit fails
the pull. Its message is shown with control characters escaped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time

from gateway.bounds import limited
from gateway.tarread import printable
from shifter.errors import ShifterError

MOUNT_TIMEOUT = 10.0
_STDERR_LIMIT = 64 << 10


def _unescape(field: str) -> str:
    """/proc/self/mounts escapes space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts_under(directory: str) -> list[str]:
    """Mount points at or below ``directory`` in this mount namespace, deepest first."""
    base = os.path.realpath(directory).rstrip("/")
    found = []
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 2:
                target = _unescape(fields[1])
                if target == base or target.startswith(base + "/"):
                    found.append(target)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def _unmount(path: str) -> str | None:
    """Unmount (lazily if busy); returns an error message or None."""
    tool = ["umount"] if os.geteuid() == 0 else ["fusermount3", "-u"]
    lazy = ["umount", "-l"] if os.geteuid() == 0 else ["fusermount3", "-u", "-z"]
    message = ""
    for argv in (tool, lazy):
        try:
            done = subprocess.run([*argv, path], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as err:
            message = str(err)
            continue
        if done.returncode == 0:
            return None
        message = done.stderr.decode("utf-8", "replace").strip() or f"exit status {done.returncode}"
    return f"cannot unmount {path}: {message}"


def unmount_under(directory: str) -> list[str]:
    """Remove every mount below ``directory`` (a crashed gateway's examiner mounts); returns errors."""
    try:
        targets = mounts_under(directory)
    except OSError:
        return []
    return [err for err in map(_unmount, targets) if err]


def _mount(squashfs: str, mountpoint: str) -> subprocess.Popen[bytes]:
    """squashfuse in the foreground (we keep its pid); returns once the tree is visible."""
    if shutil.which("squashfuse") is None:
        raise ShifterError("the examiner is configured but squashfuse is not installed; "
                           "cannot show the image to the examiner")
    try:
        proc = subprocess.Popen(["squashfuse", "-f", "-o", "ro", squashfs, mountpoint],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as err:
        raise ShifterError(f"cannot run squashfuse: {err.strerror}") from None
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None:
            lines = (proc.stderr.read() if proc.stderr else b"").decode("utf-8", "replace").strip()
            detail = lines.splitlines()[-1] if lines else f"exit status {proc.returncode}"
            raise ShifterError(f"squashfuse could not mount the image for the examiner: {detail}")
        if time.monotonic() > deadline:
            _stop(proc)
            raise ShifterError("squashfuse did not mount the image for the examiner in time")
        time.sleep(0.01)
    return proc


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Wait for a process that should be exiting; kill its session after ``grace`` seconds."""
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.stderr:
        proc.stderr.close()


def _run_examiner(examiner: str, tree: str, image_id: str, timeout: float) -> None:
    name = printable(os.path.basename(examiner))
    if shutil.which(examiner) is None:  # prlimit would only say so in its exit status
        raise ShifterError(f"cannot run the examiner {printable(examiner)}: not an executable file")
    try:
        proc = subprocess.Popen(limited([examiner, tree, image_id], cpu=timeout), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/",
                                start_new_session=True)
    except OSError as err:
        raise ShifterError(f"cannot run the examiner {examiner}: {err.strerror}") from None
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ShifterError(f"the examiner {name} did not finish within {timeout:g} s") from None
    finally:
        # whatever the examiner started in its session must not keep the mount busy
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        lines = stderr[-_STDERR_LIMIT:].decode("utf-8", "replace").strip().splitlines()
        detail = printable(lines[-1].strip()[:300]) if lines else "no message"
        raise ShifterError(f"the examiner {name} rejected the image (exit status {proc.returncode}): {detail}")


def examine(examiner: str, squashfs: str, image_id: str, scratch_dir: str, timeout: float) -> None:
    """Show ``squashfs`` read-only to ``examiner <dir> <image id>``; ShifterError if it refuses."""
    mountpoint = tempfile.mkdtemp(prefix="examine-", dir=scratch_dir)
    proc = None
    try:
        proc = _mount(squashfs, mountpoint)
        _run_examiner(examiner, mountpoint, image_id, timeout)
    finally:
        # listed in /proc/self/mounts even when squashfuse died (where ismount() fails)
        error = next(filter(None, map(_unmount, mounts_under(mountpoint))), None)
        if proc is not None:
            _stop(proc)
        if error is None:
            with contextlib.suppress(OSError):
                os.rmdir(mountpoint)
    if error is not None:
        raise ShifterError(f"after the examiner: {error}")
