"""Debian's docker-registry on loopback, storing in the state dir."""

from __future__ import annotations

import urllib.error
import urllib.request

from .procs import PidRegistry, require_free_port, start_daemon, wait_until
from .render import render_to
from .settings import REGISTRY_ADDR, Settings

NAME = "registry"


def url() -> str:
    return f"http://{REGISTRY_ADDR}"


def answers() -> bool:
    try:
        with urllib.request.urlopen(f"{url()}/v2/", timeout=2) as reply:
            return reply.status == 200
    except (OSError, urllib.error.URLError):
        return False


def start(settings: Settings, pids: PidRegistry) -> None:
    if pids.pid(NAME) is not None:
        return
    host, _, port = REGISTRY_ADDR.partition(":")
    require_free_port("the registry", host, int(port))
    config = settings.registry_dir / "config.yml"
    render_to(config, "registry.yml.j2", storage=settings.registry_dir / "storage", listen=REGISTRY_ADDR)
    log = settings.log_dir / "registry.log"
    proc = start_daemon(["docker-registry", "serve", str(config)], log)
    pids.record(NAME, proc.pid)
    wait_until("docker-registry", lambda: proc.poll() is None and answers(), 30, log, proc)
