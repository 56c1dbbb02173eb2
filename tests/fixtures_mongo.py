"""A real MongoDB-wire server for the MongoStore tests: SecantusDB's ``secantusd-py``.

Debian has no MongoDB server and the MongoDB packages on PyPI download binaries at run
time, so the test extra installs ``secantusdb`` (a MongoDB-wire server in Python over
WiredTiger).  ``SecantusServer`` starts it on a free loopback port with its own storage
directory, waits until it answers ``ping`` and stops it by pid.  ``standalone=True``
drops the one-node replica-set advertisement, so the driver sees what a plain
``mongod`` without ``--replSet`` looks like.

Set ``SHIFTER_TEST_MONGODB_URI`` to run the same tests against a real MongoDB instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from fixtures_registry import REPO, free_port, stop_pid, wait_for

SERVER = "secantusd-py"


def server_program() -> str | None:
    """The server next to the tests' interpreter (the venv), else on PATH."""
    beside = REPO / ".venv" / "bin" / SERVER
    return str(beside) if beside.exists() else shutil.which(SERVER)


class SecantusServer:
    """One ``secantusd-py`` process in ``root``; ``uri`` is what MongoStore is given."""

    def __init__(self, root: Path, standalone: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.root = root
        self.standalone = standalone
        self.extra = extra
        self.port = free_port()
        self.log = root / "secantusd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # directConnection: talk to this one server whatever topology it advertises
        self.uri = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self, timeout: float = 60.0) -> SecantusServer:
        program = server_program()
        if program is None:
            raise RuntimeError(f"{SERVER} is not installed: run `make venv` (the test extra pins secantusdb)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "secantusd.toml"
        config.write_text("")  # an explicit, empty config: no ./secantusd.toml or ~/.secantus is picked up
        argv = [program, "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port),
                "--storage-path", str(self.root / "data"), "--log-level", "WARNING"]
        if self.standalone:
            argv.append("--standalone")
        argv += self.extra
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_for(SERVER, self._answers, timeout, log=self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        import pymongo
        from pymongo.errors import PyMongoError

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{SERVER} exited with {self.proc.returncode}: "
                               f"{self.log.read_text(errors='replace')[-2000:]}")
        client: pymongo.MongoClient = pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=300)
        try:
            client.admin.command("ping")
            return True
        except PyMongoError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: the database server dies under the gateways."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid, timeout=15.0)
            self.proc = None


def external_uri() -> str | None:
    """A real MongoDB to test against instead of the bundled server."""
    return os.environ.get("SHIFTER_TEST_MONGODB_URI") or None
