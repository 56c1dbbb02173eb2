"""slurmctld on the host and one slurmd per node, each node in its own namespaces.

A node's slurmd is started as
``nsenter --net=/run/netns/shifter-n<i> unshare -m -u --ipc --propagation private -- python -m
localcluster.nodeinit ... -- slurmd -D -N n<i>``: its own network namespace (own address and
ports), its own private mount namespace (own mount table; the runtime's state dirs are a
tmpfs of its own), its own hostname, and its own System V IPC namespace and /dev/shm, as on
separate machines: shared-memory transports (UCX's, for MPI) tell nodes of one kernel apart
by their IPC namespace, and would otherwise try shared memory between ranks of two nodes.
``ip netns exec`` is not used: it remounts /sys, which hides /sys/fs/cgroup from slurmd.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from . import features, network
from .procs import DaemonError, PidRegistry, require_free_port, start_daemon, wait_until
from .render import render_to, write_file
from .settings import BRIDGE_ADDR, Settings

CONTROLLER = "slurmctld"
READY_NODE_STATES = {"idle", "mix", "mixed", "alloc", "allocated", "comp", "completing"}
REPO_ROOT = Path(__file__).resolve().parent.parent


def slurmd_name(node: str) -> str:
    return f"slurmd-{node}"


def slurm_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(settings.slurm_conf)}


def write_config(settings: Settings) -> str:
    """Render slurm.conf, cgroup.conf, plugstack.conf and the nodes' hosts file.

    Returns a fingerprint of everything slurmd reads only at start-up (configs and the
    SPANK plugin): when it changes, the daemons must be restarted (slurmd decides at
    start-up whether any plugin has a job prolog).
    """
    plugin = settings.plugin_so if settings.plugin_so.exists() else None
    nodes = [{"name": n, "addr": settings.node_addr(n)} for n in settings.node_names]
    for sub in ("slurmctld", "slurmd"):
        (settings.state_dir / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
    render_to(settings.slurm_conf, "slurm.conf.j2",
              controller_host=settings.controller_host, controller_addr=BRIDGE_ADDR,
              state_dir=settings.state_dir, plugstack_conf=settings.plugstack_conf,
              node_tmp=settings.node_tmp, nodes=nodes,
              node_range=f"n[1-{settings.nodes}]" if settings.nodes > 1 else "n1",
              cpus=2, fake_gpus=settings.fake_gpus)
    render_to(settings.slurm_dir / "cgroup.conf", "cgroup.conf.j2")
    render_to(settings.slurm_dir / "gres.conf", "gres.conf.j2", fake_gpus=settings.fake_gpus)
    render_to(settings.plugstack_conf, "plugstack.conf.j2", plugin=plugin,
              expected_plugin=settings.plugin_so, udiroot_conf=settings.udiroot_conf,
              plugin_args=features.plugstack_args(settings))
    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             f"{BRIDGE_ADDR}\t{settings.controller_host}"]
    hosts += [f"{n['addr']}\t{n['name']}" for n in nodes]
    write_file(settings.node_hosts_file, "\n".join(hosts) + "\n")
    digest = hashlib.sha256()
    for path in (settings.slurm_conf, settings.slurm_dir / "cgroup.conf", settings.slurm_dir / "gres.conf",
                 settings.plugstack_conf):
        digest.update(path.read_bytes())
    if plugin is not None:
        digest.update(plugin.read_bytes())
    return digest.hexdigest()


def node_states(settings: Settings) -> dict[str, str]:
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                            env=slurm_env(settings), timeout=30)
    if result.returncode != 0:
        return {}
    states = {}
    for line in result.stdout.splitlines():
        name, _, state = line.partition(" ")
        states[name] = state.strip()
    return states


def _all_nodes_ready(settings: Settings) -> bool:
    states = node_states(settings)
    return all(states.get(n, "") in READY_NODE_STATES for n in settings.node_names)


def _controller_answers(settings: Settings) -> bool:
    return subprocess.run(["scontrol", "ping"], capture_output=True, text=True,
                          env=slurm_env(settings), timeout=30).stdout.count("UP") > 0


def start_controller(settings: Settings, pids: PidRegistry, clear_state: bool) -> None:
    if pids.pid(CONTROLLER) is not None:
        return
    require_free_port("slurmctld", "0.0.0.0", 6817)
    log = settings.log_dir / "slurmctld.log"
    argv = ["slurmctld", "-D", "-f", str(settings.slurm_conf)]
    if clear_state:
        argv.append("-c")
    proc = start_daemon(argv, settings.log_dir / "slurmctld.out", env=slurm_env(settings))
    pids.record(CONTROLLER, proc.pid)
    wait_until("slurmctld", lambda: _controller_answers(settings), 60, log, proc, interval=0.3)


def start_node(settings: Settings, pids: PidRegistry, node: str,
               rejoin: dict[str, str] | None = None) -> subprocess.Popen[bytes] | None:
    """Start the node's slurmd in fresh namespaces, or with ``rejoin`` in the node's old ones.

    ``rejoin`` maps ``mnt``, ``uts`` and ``ipc`` to namespace files (e.g. /proc/<pid>/fd/<n>)
    of a node whose slurmd died: the new slurmd finds the node's mount table as it was, as a
    real node's would be after a slurmd crash (tests of leftovers of dead jobs use it).
    """
    name = slurmd_name(node)
    if pids.pid(name) is not None:
        return None
    for base in (settings.udi_mount, settings.loop_mount, settings.per_node_cache, settings.node_tmp,
                 settings.state_dir / "slurmd" / node):
        base.mkdir(parents=True, exist_ok=True)
    env = {**slurm_env(settings), "PYTHONPATH": str(REPO_ROOT)}
    nodeinit = [sys.executable, "-m", "localcluster.nodeinit", "--hostname", node]
    slurmd = ["--", "slurmd", "-D", "-N", node, "-f", str(settings.slurm_conf)]
    net = f"--net={network.NETNS_DIR / settings.netns(node)}"
    if rejoin is not None:
        argv = ["nsenter", net, f"--mount={rejoin['mnt']}", f"--uts={rejoin['uts']}", f"--ipc={rejoin['ipc']}",
                "--", *nodeinit, *slurmd]
    else:
        memory_cgroup = features.node_memory_cgroup(settings, node)  # see localcluster/features.py
        if memory_cgroup is not None:
            nodeinit += ["--memory-cgroup", str(memory_cgroup)]
        if node == features.SHARED_ROOT_NODE:
            nodeinit += ["--shared-root", str(features.peer_pidfile(settings, node))]
        if settings.fake_gpus:
            nodeinit += ["--fake-gpus", str(settings.fake_gpus)]
        argv = ["nsenter", net, "--", "unshare", "--mount", "--uts", "--ipc", "--propagation", "private", "--",
                *nodeinit,
                "--tmpfs", f"{settings.udi_mount}=0755", "--tmpfs", f"{settings.loop_mount}=0700",
                "--tmpfs", f"{settings.per_node_cache}=0755", "--tmpfs", f"{settings.node_tmp}=1777",
                "--tmpfs", "/dev/shm=1777",
                "--hosts", str(settings.node_hosts_file), *slurmd]
    proc = start_daemon(argv, settings.log_dir / f"slurmd-{node}.out", env=env, cwd=settings.state_dir)
    pids.record(name, proc.pid)
    return proc


def start_nodes(settings: Settings, pids: PidRegistry) -> None:
    started = {node: start_node(settings, pids, node) for node in settings.node_names}
    log = settings.log_dir / "slurmd-n1.log"
    for node, proc in started.items():
        if proc is not None and proc.poll() is not None:
            log = settings.log_dir / f"slurmd-{node}.out"
            raise DaemonError(f"slurmd for {node} exited with status {proc.returncode}; see {log}")
    try:
        wait_until("slurmd nodes", lambda: _all_nodes_ready(settings), 90, log, interval=0.3)
    except DaemonError as err:
        raise DaemonError(f"{err}\nnode states: {node_states(settings)}") from None


def healthy(settings: Settings, pids: PidRegistry) -> list[str]:
    """What is wrong with the Slurm part of the cluster (empty when healthy)."""
    problems = [f"{name} is not running" for name in
                [CONTROLLER, *(slurmd_name(n) for n in settings.node_names)] if pids.pid(name) is None]
    if not problems:
        states = node_states(settings)
        problems = [f"node {n} is {states.get(n, 'unknown')}" for n in settings.node_names
                    if states.get(n, "") not in READY_NODE_STATES]
    return problems
