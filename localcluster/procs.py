"""Start, find and stop the cluster's daemons by the pids recorded in the state dir.

A pid file holds ``<pid> <start time>`` (field 22 of /proc/<pid>/stat) so that a pid reused
by an unrelated process after a crash is never mistaken for ours and never signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class DaemonError(RuntimeError):
    """A daemon did not start or did not become ready; the message says which and why."""


def start_time(pid: int) -> str | None:
    """The kernel's start time of `pid`, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; fields after the last ')' are fixed.
    return stat.rsplit(")", 1)[1].split()[19]


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class PidRegistry:
    """The pid files of one cluster: one file per daemon, named after it."""

    def __init__(self, pid_dir: Path) -> None:
        self.pid_dir = pid_dir

    def _file(self, name: str) -> Path:
        return self.pid_dir / f"{name}.pid"

    def record(self, name: str, pid: int) -> None:
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self._file(name).write_text(f"{pid} {start_time(pid) or '?'}\n")

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.pid_dir.glob("*.pid")) if self.pid_dir.is_dir() else []

    def pid(self, name: str) -> int | None:
        """The recorded pid when that process is still the one we started, else None."""
        try:
            pid_text, started = self._file(name).read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        if start_time(pid) != started or is_zombie(pid):
            return None
        return pid

    def forget(self, name: str) -> None:
        self._file(name).unlink(missing_ok=True)

    def stop(self, name: str, timeout: float = 15.0) -> None:
        """SIGTERM the daemon, then SIGKILL it if it is still there after `timeout`."""
        pid = self.pid(name)
        if pid is not None:
            terminate(pid, timeout)
        self.forget(name)


def terminate(pid: int, timeout: float = 15.0) -> None:
    """Stop one process: SIGTERM, wait up to `timeout`, then SIGKILL."""
    started = start_time(pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if start_time(pid) != started or is_zombie(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while start_time(pid) == started and not is_zombie(pid):
        time.sleep(0.05)


def require_free_port(what: str, host: str, port: int) -> None:
    """Fail clearly when another process already listens where a daemon of ours must."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise DaemonError(f"cannot start {what}: {host}:{port} is taken by another process "
                              f"({err.strerror}); stop it first") from None


def start_daemon(argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running process detached from our session, its output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, start_new_session=True, close_fds=True,
        )


def wait_until(what: str, ready: Callable[[], bool], timeout: float, log: Path,
               proc: subprocess.Popen[bytes] | None = None, interval: float = 0.1) -> None:
    """Poll `ready` until it is true; fail with the daemon's log tail on timeout or early exit."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            raise DaemonError(f"{what} exited with status {proc.returncode}; last lines of {log}:\n"
                              f"{log_tail(log)}")
        if time.monotonic() > deadline:
            raise DaemonError(f"{what} not ready after {timeout:.0f} s; last lines of {log}:\n"
                              f"{log_tail(log)}")
        time.sleep(interval)
