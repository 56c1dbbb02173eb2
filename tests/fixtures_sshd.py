"""A real sshd of our own for the gateway's remote-publish tests.

``Sshd(directory, address, netns=None)``: host and client keys generated in ``directory``,
root allowed by that one key only, ``/usr/sbin/sshd -D -e`` on a free port of ``address``;
with ``netns`` (a path like /run/netns/shifter-n1) it runs inside that network namespace
(``nsenter --net``, which execs sshd, so the pid we hold is sshd's). ``target(image_dir)``
is a gateway PublishTarget for it; ``stop()`` ends it by its pid. Needs root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from fixtures_registry import free_port, stop_pid

from gateway.publish import PublishTarget

SSHD = "/usr/sbin/sshd"
CLIENT_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                  "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]


def sshd_missing() -> str | None:
    """Why an sshd of our own cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to run sshd"
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        return "openssh-server not installed"
    return None


class Sshd:
    def __init__(self, directory: Path, address: str = "127.0.0.1", netns: str | None = None) -> None:
        self.dir = directory
        self.address = address
        self.netns = netns
        self.port = free_port()
        self.key = directory / "client"
        self.log = directory / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Sshd:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)],
                           check=True, timeout=30)
        shutil.copy(self.dir / "client.pub", self.dir / "authorized_keys")
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress {self.address}\nHostKey {self.dir / 'host'}\n"
            f"PidFile {self.dir / 'sshd.pid'}\nAuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        enter = ["nsenter", f"--net={self.netns}", "--"] if self.netns else []
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*enter, SSHD, "-D", "-e", "-f", str(config)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex((self.address, self.port)) == 0

    def target(self, image_dir: str, user: str = "root") -> PublishTarget:
        return PublishTarget(image_dir, host=self.address, user=user, ssh_key=str(self.key),
                             ssh_options=["-p", str(self.port), *CLIENT_OPTIONS],
                             scp_options=["-P", str(self.port), *CLIENT_OPTIONS])

    def run(self, command: str) -> str:
        """Run a fixed command (no input in it) on the sshd's host as root; its stdout."""
        done = subprocess.run(["ssh", "-i", str(self.key), "-p", str(self.port), *CLIENT_OPTIONS,
                               f"root@{self.address}", command],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=True)
        return done.stdout

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid)
            self.proc = None
