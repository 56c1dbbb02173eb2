"""The cluster's own munged: its own key, on the default socket every Slurm tool uses."""

from __future__ import annotations

import os
import socket
import subprocess

from .procs import DaemonError, PidRegistry, start_daemon, wait_until
from .settings import MUNGE_SOCKET, Settings

NAME = "munged"


def _socket_answers() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(MUNGE_SOCKET))
        except OSError:
            return False
    return True


def _credential_round_trip() -> bool:
    encoded = subprocess.run(["munge", "-n"], capture_output=True)
    if encoded.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True).returncode == 0


def _key_file(settings: Settings) -> str:
    key = settings.munge_dir / "munge.key"
    if not key.exists():
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(os.urandom(1024))
    return str(key)


def start(settings: Settings, pids: PidRegistry) -> None:
    """Start munged unless ours already runs; refuse to displace someone else's."""
    if pids.pid(NAME) is not None:
        return
    if _socket_answers():
        raise DaemonError(f"another munged already serves {MUNGE_SOCKET} (not started by this cluster); "
                          "stop it first, the local cluster runs its own with its own key")
    settings.munge_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    MUNGE_SOCKET.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    log = settings.log_dir / "munged.log"
    proc = start_daemon(
        ["munged", "--foreground", "--force", f"--key-file={_key_file(settings)}",
         f"--pid-file={settings.munge_dir / 'munged.pid'}", f"--log-file={log}",
         f"--seed-file={settings.munge_dir / 'munged.seed'}", f"--socket={MUNGE_SOCKET}"],
        settings.log_dir / "munged.out")
    pids.record(NAME, proc.pid)
    wait_until("munged", _credential_round_trip, 20, log, proc)


def healthy() -> bool:
    return _credential_round_trip()
