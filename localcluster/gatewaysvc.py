"""The image gateway as a real HTTP service, publishing into the cluster's imagePath."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from .procs import DaemonError, PidRegistry, log_tail, require_free_port, start_daemon, wait_until
from .render import render_to
from .settings import BRIDGE_ADDR, MUNGE_SOCKET, REGISTRY_ADDR, Settings

NAME = "gateway"


def write_config(settings: Settings) -> None:
    gw = settings.gateway_dir
    for sub in ("cache", "expand"):
        (gw / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.image_path.mkdir(mode=0o755, parents=True, exist_ok=True)
    settings.image_path.chmod(0o755)
    render_to(settings.imagemanager_json, "imagemanager.json.j2", mode=0o644,
              listen=[f"{BRIDGE_ADDR}:{settings.gateway_port}", f"127.0.0.1:{settings.gateway_port}"],
              access_log=str(settings.log_dir / "gateway-access.log"),
              log_file=str(settings.log_dir / "gateway.log"),
              store=f"sqlite:///{gw / 'images.sqlite'}",
              registry=REGISTRY_ADDR, registry_url=f"http://{REGISTRY_ADDR}",
              cache_dir=str(gw / "cache"), expand_dir=str(gw / "expand"),
              munge_socket=str(MUNGE_SOCKET), image_dir=str(settings.image_path))


def status(settings: Settings) -> dict | None:
    try:
        with urllib.request.urlopen(f"{settings.gateway_local_url}/api/status", timeout=3) as reply:
            return json.loads(reply.read() or b"{}") if reply.status == 200 else None
    except (OSError, ValueError, urllib.error.URLError):
        return None


def installed(settings: Settings) -> bool:
    wrapper = settings.prefix / "sbin" / "shifter-gateway"
    return wrapper.exists() and settings.installed_module("gateway/service.py")


def start(settings: Settings, pids: PidRegistry) -> None:
    if pids.pid(NAME) is not None:
        return
    for host in (BRIDGE_ADDR, "127.0.0.1"):
        require_free_port("the gateway", host, settings.gateway_port)
    out = settings.log_dir / "gateway.out"
    proc = start_daemon([str(settings.prefix / "sbin" / "shifter-gateway"),
                         "--config", str(settings.imagemanager_json)], out, cwd=settings.gateway_dir)
    pids.record(NAME, proc.pid)
    try:
        wait_until("shifter-gateway", lambda: proc.poll() is None and status(settings) is not None,
                   60, out, proc, interval=0.2)
    except DaemonError as err:
        tail = log_tail(settings.log_dir / "gateway.log")
        raise DaemonError(f"{err}\nlast lines of its log:\n{tail}") from None
