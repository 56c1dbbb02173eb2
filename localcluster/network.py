"""The test network: a bridge in the root namespace and one network namespace per node.

Each node gets its own address (and so its own slurmd port 6818 and sshd port 1204) and
reaches the controller, the gateway and the other nodes through the bridge.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .settings import BRIDGE, BRIDGE_ADDR, NETMASK_BITS, Settings

NETNS_DIR = Path("/run/netns")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def cluster_netns() -> list[str]:
    """Every network namespace named like ours, including those of a crashed, bigger cluster."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith("shifter-n"))


def ensure_bridge() -> None:
    if not link_exists(BRIDGE):
        _ip("link", "add", BRIDGE, "type", "bridge")
    addrs = _ip("-o", "-4", "addr", "show", "dev", BRIDGE).stdout
    if f" {BRIDGE_ADDR}/" not in addrs:
        _ip("addr", "add", f"{BRIDGE_ADDR}/{NETMASK_BITS}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def ensure_node(node: str) -> None:
    """Create the node's namespace and veth pair (idempotent)."""
    ns, veth = Settings.netns(node), Settings.host_veth(node)
    if not netns_exists(ns):
        _ip("netns", "add", ns)
    if not link_exists(veth):
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    _ip("link", "set", veth, "master", BRIDGE, "up")
    addrs = _ip("-n", ns, "-o", "-4", "addr", "show", "dev", "eth0").stdout
    if f" {Settings.node_addr(node)}/" not in addrs:
        _ip("-n", ns, "addr", "add", f"{Settings.node_addr(node)}/{NETMASK_BITS}", "dev", "eth0")
    _ip("-n", ns, "link", "set", "eth0", "up")
    _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", ns, "route", "replace", "default", "via", BRIDGE_ADDR)


def remove_all() -> None:
    """Delete every node namespace (their veth pairs go with them) and the bridge."""
    for ns in cluster_netns():
        _ip("netns", "delete", ns, check=False)
    for link in Path("/sys/class/net").iterdir():
        if link.name.startswith("shv"):
            _ip("link", "delete", link.name, check=False)
    if link_exists(BRIDGE):
        _ip("link", "delete", BRIDGE, check=False)


def leftovers() -> list[str]:
    found = [f"network namespace {ns}" for ns in cluster_netns()]
    found += [f"link {p.name}" for p in Path("/sys/class/net").iterdir()
              if p.name == BRIDGE or p.name.startswith("shv")]
    return found
