"""Real daemons for the gateway's integration tests, each in its own temporary directory.

- ``Munged``: a private ``munged`` (own key, socket, pid, log and seed files).
- ``Registry``: Debian's ``docker-registry`` on a free loopback port, with its access log.
- ``GatewayProcess``: the real ``python -m gateway.service`` on a free loopback port; with
  ``hostname=`` in a UTS namespace of its own (root only), so gateways of one machine see each
  other as gateways of two hosts (the store's lease decides, not a pid on this host).
- ``StallingProxy``: the registry, with one blob stalled after half its bytes.

Every process is stopped by its pid. Used as plain helpers (not fixtures) so each test
module decides the scope; import with ``from fixtures_registry import ...``.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up in {timeout}s\n{tail}")


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; only the given pid."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid if not os.path.exists(f"/proc/{pid}") else 0
        if done:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class Munged:
    """A munged of our own: ``socket`` is what tests pass to shifter.client.munge and the gateway."""

    def __init__(self) -> None:
        # its own directory outside pytest's 0700 tmp tree, so other uids can reach the socket
        self.dir = Path(tempfile.mkdtemp(prefix="shifter-test-munge-"))
        os.chmod(self.dir, 0o755)
        self.socket = str(self.dir / "munge.socket")
        self.key = self.dir / "munge.key"
        self.key.write_bytes(os.urandom(1024))
        os.chmod(self.key, 0o600)
        self.pidfile = self.dir / "munged.pid"
        self.log = self.dir / "munged.log"
        self.pid: int | None = None

    def start(self) -> Munged:
        argv = [
            "munged",
            f"--socket={self.socket}",
            f"--key-file={self.key}",
            f"--pid-file={self.pidfile}",
            f"--log-file={self.log}",
            f"--seed-file={self.dir / 'munged.seed'}",
            "--num-threads=4",
        ]
        if os.geteuid() == 0:
            argv.append("--force")
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
        wait_for("munged", lambda: self.pidfile.exists() and os.path.exists(self.socket), log=self.log)
        self.pid = int(self.pidfile.read_text().strip())
        return self

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid)
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)


class Registry:
    """docker-registry on 127.0.0.1:<free port>; ``blob_gets(repo)`` counts blob downloads from its log."""

    def __init__(self, root: Path, name: str = "registry", htpasswd: tuple[str, str] | None = None) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.htpasswd = htpasswd
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.addr}"
        self.log = self.dir / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Registry:
        config = self.dir / "config.yml"
        auth = ""
        if self.htpasswd is not None:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import crypt  # bcrypt via libxcrypt: the only hash docker-registry's htpasswd accepts

            user, password = self.htpasswd
            hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
            (self.dir / "htpasswd").write_text(f"{user}:{hashed}\n")
            auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {self.dir / 'htpasswd'}\n"
        config.write_text(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.dir / 'storage'}\n  delete:\n    enabled: true\n  redirect:\n"
            f"    disable: true\nhttp:\n  addr: {self.addr}\n{auth}"
        )
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for("docker-registry", self._answers, log=self.log)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as reply:
                return reply.status == 200
        except urllib.error.HTTPError as err:
            return err.code == 401 and self.htpasswd is not None
        except OSError:
            return False

    def blob_gets(self, repo: str) -> int:
        text = self.log.read_text(errors="replace")
        return sum(1 for line in text.splitlines() if f'"GET /v2/{repo}/blobs/' in line and '" 200 ' in line)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid)
            self.proc = None


def bound_payload(method: str, target: str, body: bytes, gateway: str, **extra: Any) -> bytes:
    """A credential payload naming one request, as shifter.client.gatewayclient builds it."""
    from shifter.formats import requestbinding

    doc = {requestbinding.KEY: requestbinding.claim(method, target, body, gateway), **extra}
    return json.dumps(doc).encode()


def bound_credential(socket: str, method: str, target: str, body: bytes = b"", gateway: str = "", **extra: Any) -> str:
    """A fresh credential for one request to ``gateway`` (host:port), decodable only by root (the test gateway)."""
    from shifter.client import munge

    return munge.encode(bound_payload(method, target, body, gateway, **extra), socket, decoder_uid=0)


def process_gone(pid: int) -> bool:
    """No such process, or only a dead one left for its (new) parent to reap."""
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[-1].split()[0]
    except OSError:
        return True
    return state in (b"Z", b"X")


@contextlib.contextmanager
def munged_and_registry(root: Path) -> Iterator[tuple[Path, Munged, Registry]]:
    """A munged and an empty registry for a test module's gateways, stopped when it ends; ``root``
    (their files, and the gateways' homes below it) is made readable for the tests' other users."""
    os.chmod(root, 0o755)
    munged = Munged().start()
    try:
        registry = Registry(root).start()
        try:
            yield root, munged, registry
        finally:
            registry.stop()
    finally:
        munged.stop()


def gateway_config(root: Path, registry: Registry, munge_socket: str, **overrides: Any) -> dict[str, Any]:
    """An imagemanager.json for a test gateway on a free port."""
    for sub in ("cache", "expand", "images"):
        (root / sub).mkdir(exist_ok=True)
    config: dict[str, Any] = {
        "DefaultImageLocation": registry.addr,
        "DefaultImageFormat": "squashfs",
        "PullUpdateTimeout": 300,
        "ImageExpirationTimeout": "90:00:00:00",
        "CacheDirectory": str(root / "cache"),
        "ExpandDirectory": str(root / "expand"),
        "Locations": {registry.addr: {"remotetype": "dockerv2", "url": registry.url, "authMethod": "token"}},
        "Platforms": {
            "testsys": {
                "mungeSocketPath": munge_socket,
                "accesstype": "local",
                "admins": ["root"],
                "local": {"imageDir": str(root / "images")},
            }
        },
        "Listen": [f"127.0.0.1:{free_port()}"],
        "AccessLog": str(root / "access.log"),
        "LogFile": str(root / "gateway.log"),
        "Store": f"sqlite:///{root / 'gateway.db'}",
        "WorkerThreads": 2,
        "Metrics": True,
        "ImportUsers": ["root"],
    }
    config.update(overrides)
    return config


class GatewayProcess:
    """The real gateway service as a subprocess (``python -m gateway.service --config``)."""

    def __init__(self, root: Path, config: dict[str, Any], hostname: str | None = None,
                 env: dict[str, str] | None = None, repo: Path | None = None) -> None:
        self.repo = repo or REPO  # another checkout's gateway (benchmarks compare two)
        self.root = root
        self.config = config
        self.hostname = hostname
        self.env = env
        self.config_path = root / "imagemanager.json"
        host, _, port = config["Listen"][0].rpartition(":")
        self.url = f"http://{host}:{port}"
        self.out = root / "gateway.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self.launch()
        return self.wait_up(timeout)

    def launch(self) -> GatewayProcess:
        """Start the process without waiting for it to serve (it recovers the store first)."""
        self.config_path.write_text(json.dumps(self.config, indent=2))
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "gateway.service", "--config", str(self.config_path)],
                cwd=self.repo,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
                preexec_fn=_own_hostname(self.hostname) if self.hostname else None,
            )
        return self

    def wait_up(self, timeout: float = 30.0) -> GatewayProcess:
        wait_for("shifter-gateway", self._up, timeout, log=self.out)
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"gateway exited with {self.proc.returncode}: {self.out.read_text(errors='replace')[-2000:]}"
            )
        try:
            with urllib.request.urlopen(f"{self.url}/api/status", timeout=1) as reply:
                return reply.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: a crash, for recovery tests."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid)
            self.proc = None


CLONE_NEWUTS = 0x04000000


def _own_hostname(name: str) -> Callable[[], None]:
    """For preexec_fn: a UTS namespace of the child's own with ``name`` as its host name."""
    encoded = name.encode()

    def enter() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWUTS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
        if libc.sethostname(encoded, len(encoded)) != 0:
            raise OSError(ctypes.get_errno(), "sethostname")

    return enter


def metric(gw: GatewayProcess, name: str) -> float:
    """The sum of a gateway's ``/metrics`` samples called ``name`` (all label sets)."""
    with urllib.request.urlopen(f"{gw.url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


class StallingProxy:
    """Forwards GETs to the real registry; the one layer named by ``digest`` gets its headers
    and half its bytes, then nothing until ``release``: a pull that is mid-download for as
    long as the test wants. A test instrument in front of the real registry, for the gateway
    whose Location URL names it; the gateways that take over talk to the registry itself."""

    def __init__(self, upstream: str, digest: str) -> None:
        self.upstream = upstream
        self.digest = digest
        self.stalled = threading.Event()
        self.release = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                body = forward_to_registry(self, proxy.upstream)
                if self.path.endswith(f"/blobs/{proxy.digest}"):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    proxy.stalled.set()
                    proxy.release.wait(120)
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def run_shifterimg(conf: Path, munge_socket: str, *args: str, home: Path, uid: int = 0,
                   stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``shifterimg`` as a subprocess of ``uid`` with the site's udiRoot.conf ``conf``."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "SHIFTER_UDIROOT_CONF": str(conf),
        "SHIFTER_MUNGE_SOCKET": munge_socket,
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run([PYTHON, "-m", "shifter.client.shifterimg", *args], capture_output=True, text=True,
                          input=stdin, env=env, cwd="/", timeout=180, user=uid or None, group=uid or None,
                          check=False)


def have(*programs: str) -> str | None:
    """The first missing program, or None."""
    for program in programs:
        if shutil.which(program) is None and not os.path.exists(f"/usr/sbin/{program}"):
            return program
    return None


def forward_to_registry(handler: Any, upstream: str) -> bytes:
    """Answer ``handler``'s request (a BaseHTTPRequestHandler of a test's front) with the upstream
    registry's status and registry headers; returns the body, which the caller sends (or not)."""
    request = urllib.request.Request(upstream + handler.path, method=handler.command)
    if handler.headers.get("Accept"):
        request.add_header("Accept", handler.headers["Accept"])
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            body, status, headers = reply.read(), reply.status, reply.headers
    except urllib.error.HTTPError as err:
        body, status, headers = err.read(), err.code, err.headers
    handler.send_response(status)
    for key in ("Content-Type", "Docker-Content-Digest"):
        if headers.get(key):
            handler.send_header(key, headers[key])
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    return body
