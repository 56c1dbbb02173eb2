"""The image gateways as real HTTP services, publishing into the cluster's imagePath.

The cluster runs ``settings.gateways`` of them (two by default), as a site with several gateway
hosts does: each its own port, config, logs and pid, all on one store and one imagePath, and
udiRoot.conf's ``imageGateway`` lists them all.  They share one SQLite file (several gateway
processes of one host may: WAL mode, and a dead owner is told by its pid at once) and, being
on one host, the blob cache and scratch tree, whose per-host locks are flock files there.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from .procs import DaemonError, PidRegistry, log_tail, require_free_port, start_daemon, wait_until
from .render import render_to
from .settings import BRIDGE_ADDR, MUNGE_SOCKET, REGISTRY_ADDR, Settings

NAME = "gateway"  # the first gateway's pid name; the others are Settings.gateway_name(i)


def names(settings: Settings) -> list[str]:
    """The pid-registry names of every gateway of the cluster, first one first."""
    return [settings.gateway_name(i) for i in range(settings.gateways)]


def log_file(settings: Settings, index: int) -> Path:
    return settings.log_dir / f"{settings.gateway_name(index)}.log"


def access_log(settings: Settings, index: int) -> Path:
    return settings.log_dir / f"{settings.gateway_name(index)}-access.log"


def store_uri(settings: Settings) -> str:
    return f"sqlite:///{settings.gateway_dir / 'images.sqlite'}"


def write_config(settings: Settings) -> None:
    """One imagemanager.json per gateway: its own ports and logs, the shared rest."""
    gw = settings.gateway_dir
    for sub in ("cache", "expand"):
        (gw / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.image_path.mkdir(mode=0o755, parents=True, exist_ok=True)
    settings.image_path.chmod(0o755)
    for index in range(settings.gateways):
        port = settings.gateway_port_of(index)
        render_to(settings.imagemanager_json_of(index), "imagemanager.json.j2", mode=0o644,
                  listen=[f"{BRIDGE_ADDR}:{port}", f"127.0.0.1:{port}"],
                  access_log=str(access_log(settings, index)), log_file=str(log_file(settings, index)),
                  store=store_uri(settings),
                  registry=REGISTRY_ADDR, registry_url=f"http://{REGISTRY_ADDR}",
                  cache_dir=str(gw / "cache"), expand_dir=str(gw / "expand"),
                  munge_socket=str(MUNGE_SOCKET), image_dir=str(settings.image_path))


def status(settings: Settings, index: int = 0) -> dict | None:
    try:
        with urllib.request.urlopen(f"{settings.gateway_local_url_of(index)}/api/status", timeout=3) as reply:
            return json.loads(reply.read() or b"{}") if reply.status == 200 else None
    except (OSError, ValueError, urllib.error.URLError):
        return None


def installed(settings: Settings) -> bool:
    wrapper = settings.prefix / "sbin" / "shifter-gateway"
    return wrapper.exists() and settings.installed_module("gateway/service.py")


def start(settings: Settings, pids: PidRegistry, index: int | None = None) -> None:
    """Start gateway ``index`` (every one with None) unless it runs; returns once it answers."""
    if index is None:
        for each in range(settings.gateways):
            start(settings, pids, each)
        return
    name = settings.gateway_name(index)
    if pids.pid(name) is not None:
        return
    port = settings.gateway_port_of(index)
    for host in (BRIDGE_ADDR, "127.0.0.1"):
        require_free_port(f"the gateway {name}", host, port)
    out = settings.log_dir / f"{name}.out"
    proc = start_daemon([str(settings.prefix / "sbin" / "shifter-gateway"),
                         "--config", str(settings.imagemanager_json_of(index))], out, cwd=settings.gateway_dir)
    pids.record(name, proc.pid)
    try:
        wait_until(f"shifter-gateway {name}", lambda: proc.poll() is None and status(settings, index) is not None,
                   60, out, proc, interval=0.2)
    except DaemonError as err:
        tail = log_tail(log_file(settings, index))
        raise DaemonError(f"{err}\nlast lines of its log:\n{tail}") from None
