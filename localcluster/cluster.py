"""Bring the whole local cluster up, check it, describe it, and take it down without a trace."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from . import cleanup, gatewaysvc, hostdirs, images, munge, network, registry, sitemodules, slurm, users
from .procs import DaemonError, PidRegistry
from .render import render_to, write_file
from .settings import REGISTRY_ADDR, Settings

# Stop order: the nodes (and their jobs) first, then every gateway (gatewaysvc.names), munged
# last (everything authenticates with it).
STOP_ORDER = ("registry", "slurmctld", "munged")


def log(message: str) -> None:
    print(f"cluster: {message}", file=sys.stderr, flush=True)


def pid_registry(settings: Settings) -> PidRegistry:
    return PidRegistry(settings.pid_dir)


def _announce(pids: PidRegistry, name: str, what: str) -> None:
    pid = pids.pid(name)
    log(f"{what} already running (pid {pid})" if pid else f"starting {what}")


# --- up ---------------------------------------------------------------------------

def _prepare_dirs(settings: Settings) -> None:
    settings.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    settings.state_dir.chmod(0o755)
    for path, mode in ((settings.log_dir, 0o755), (settings.slurm_dir, 0o755), (settings.pid_dir, 0o755),
                       (settings.site_fs_dir, 0o755), (settings.state_dir / "node", 0o755),
                       (settings.udi_mount, 0o755), (settings.loop_mount, 0o700),
                       (settings.per_node_cache, 0o755), (settings.registry_dir, 0o700)):
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    write_file(settings.site_fs_dir / "README", "a site file system bound into every container\n")


def _write_udiroot_conf(settings: Settings) -> None:
    """The runtime's config: root-owned, 0644, in a directory only root can write."""
    for directory in (settings.prefix, settings.sysconfdir):
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    opt_udi_image = settings.prefix / "libexec" / "shifter" / "opt" / "udiImage"
    render_to(settings.udiroot_conf, "udiRoot.conf.j2", mode=0o644, **sitemodules.prepare(settings),
              udi_mount=settings.udi_mount, loop_mount=settings.loop_mount,
              image_path=settings.image_path, prefix=settings.prefix, etc_path=settings.etc_path,
              opt_udi_image=opt_udi_image if opt_udi_image.is_dir() else None,
              per_node_cache=settings.per_node_cache, site_fs=hostdirs.site_fs(settings),
              gateway_urls=" ".join(settings.gateway_urls),
              fake_gpu_driver=settings.fake_gpu_driver if settings.fake_gpus else None)
    os.chown(settings.udiroot_conf, 0, 0)


def _fingerprint_changed(path: Path, fingerprint: str) -> bool:
    try:
        return path.read_text() != fingerprint
    except OSError:
        return True


def _gateway_fingerprint(settings: Settings) -> str:
    digest = hashlib.sha256()
    for index in range(settings.gateways):
        digest.update(settings.imagemanager_json_of(index).read_bytes())
    stamp = settings.prefix / "install-id"
    if stamp.exists():
        digest.update(stamp.read_bytes())
    return digest.hexdigest()


def _stop_nodes(settings: Settings, pids: PidRegistry) -> None:
    for name in pids.names():
        if name.startswith("slurmd-"):
            pids.stop(name)
    cleanup.kill_node_processes()


def _start_slurm(settings: Settings, pids: PidRegistry, fresh: bool) -> None:
    fingerprint = slurm.write_config(settings)
    stamp = settings.slurm_dir / "fingerprint"
    if _fingerprint_changed(stamp, fingerprint) and pids.pid(slurm.CONTROLLER) is not None:
        log("slurm configuration or SPANK plugin changed: restarting slurmctld and every slurmd")
        _stop_nodes(settings, pids)
        pids.stop(slurm.CONTROLLER)
    _announce(pids, slurm.CONTROLLER, "slurmctld")
    slurm.start_controller(settings, pids, clear_state=fresh)
    running = pids_alive(settings, [slurm.slurmd_name(n) for n in settings.node_names])
    log(f"starting {settings.nodes - len(running)} slurmd ({len(running)} already running)")
    slurm.start_nodes(settings, pids)
    stamp.write_text(fingerprint)


def _start_gateway(settings: Settings, pids: PidRegistry) -> None:
    if not gatewaysvc.installed(settings):
        log(f"no gateway installed at {settings.prefix}/sbin/shifter-gateway: run `make install`; "
            "continuing without it")
        return
    gatewaysvc.write_config(settings)
    fingerprint = _gateway_fingerprint(settings)
    stamp = settings.gateway_dir / "fingerprint"
    running = [name for name in gatewaysvc.names(settings) if pids.pid(name) is not None]
    if _fingerprint_changed(stamp, fingerprint) and running:
        log("the installed code or imagemanager.json changed: restarting the gateways")
        for name in running:
            pids.stop(name)
    for index, name in enumerate(gatewaysvc.names(settings)):
        _announce(pids, name, f"image gateway {index + 1} of {settings.gateways} "
                              f"(port {settings.gateway_port_of(index)})")
        gatewaysvc.start(settings, pids, index)
    stamp.write_text(fingerprint)


def _pull_through_gateway(settings: Settings, references: list[str]) -> None:
    """Have the gateways pull and convert each image so it is READY before any test runs."""
    shifterimg = settings.prefix / "bin" / "shifterimg"
    if pids_alive(settings, gatewaysvc.names(settings)) != gatewaysvc.names(settings):
        return
    if not shifterimg.exists() or not settings.installed_module("shifter/client/shifterimg.py"):
        log("shifterimg is not installed: the test images are not pre-pulled through the gateway")
        return
    env = {**os.environ, "SHIFTER_UDIROOT_CONF": str(settings.udiroot_conf)}
    for reference in references:
        started = time.monotonic()
        result = subprocess.run([str(shifterimg), "pull", f"docker:{reference}"], capture_output=True,
                                text=True, env=env, timeout=900)
        if result.returncode != 0:
            raise DaemonError(f"shifterimg pull docker:{reference} failed: "
                              f"{(result.stderr or result.stdout).strip()}")
        log(f"gateway pulled {reference} in {time.monotonic() - started:.1f} s")


def pids_alive(settings: Settings, names: list[str]) -> list[str]:
    pids = pid_registry(settings)
    return [name for name in names if pids.pid(name) is not None]


def _crash_signs(settings: Settings) -> list[str]:
    """Signs that a previous cluster crashed: a recorded daemon died or a namespace is gone.

    A dead slurmd alone is not one: `up` restarts just that node (see _recover_nodes).
    """
    pids = pid_registry(settings)
    signs = [f"{name} died" for name in pids.names()
             if pids.pid(name) is None and not name.startswith("slurmd-")]
    if pids.names():
        signs += [f"namespace of {n} is gone" for n in settings.node_names
                  if not network.netns_exists(settings.netns(n))]
    return signs


def _dead_nodes(settings: Settings) -> list[str]:
    pids = pid_registry(settings)
    return [node for node in settings.node_names
            if slurm.slurmd_name(node) in pids.names() and pids.pid(slurm.slurmd_name(node)) is None]


def _hold_node_namespaces(settings: Settings, node: str) -> dict[str, int] | None:
    """Descriptors of the mount, UTS and IPC namespaces a dead node's survivors still live in.

    A job's slurmstepd outlives its slurmd, as on a real node; when none is left the node's
    namespaces are gone with it and the node starts afresh (None).
    """
    net = os.stat(network.NETNS_DIR / settings.netns(node)).st_ino
    host_mnt = os.stat("/proc/self/ns/mnt").st_ino
    for pid in cleanup.node_processes():
        held: dict[str, int] = {}
        try:
            if (Path(f"/proc/{pid}/comm").read_text().strip() != "slurmstepd"  # not a task in its own namespaces
                    or os.stat(f"/proc/{pid}/ns/net").st_ino != net
                    or os.stat(f"/proc/{pid}/ns/mnt").st_ino == host_mnt):
                continue
            for kind in ("mnt", "uts", "ipc"):
                held[kind] = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY)
            return held
        except OSError:
            for fd in held.values():
                os.close(fd)
    return None


def _recover_nodes(settings: Settings) -> None:
    """Restart only the slurmds that died, in their nodes' own namespaces when a job still holds
    them; the controller and the other nodes, and so every job, keep running."""
    from .testing import Cluster

    for node in _dead_nodes(settings):
        held = _hold_node_namespaces(settings, node)
        log(f"slurmd of {node} died: restarting it "
            + ("in the node's namespaces" if held else "(no process of the node is left: fresh namespaces)"))
        Cluster.from_state_dir(settings.state_dir).restart_node(node, held)


def test_images(debian: bool) -> list[images.TestImage]:
    chosen = [images.BUSYBOX_IMAGE, images.MULTILAYER_IMAGE]
    if debian:
        from .debian import DEBIAN_IMAGE
        from .mpich import MPICH_IMAGE
        chosen += [DEBIAN_IMAGE, MPICH_IMAGE]
    return chosen


def up(settings: Settings, debian: bool) -> None:
    if os.geteuid() != 0:
        raise DaemonError("the local cluster needs root (network namespaces, munged, slurmd)")
    started = time.monotonic()
    previous = Settings.load(settings.state_dir)
    fresh = previous is None or not pid_registry(previous).names()
    crashed = _crash_signs(previous) if previous is not None else []
    if previous is not None and (previous != settings or crashed):
        why = ", ".join(crashed) or f"it had {previous.nodes} nodes, prefix {previous.prefix}"
        log(f"taking the previous cluster down first ({why})")
        down(previous)
        fresh = True
    elif previous is None and cleanup.leftovers(settings, []):
        log("cleaning leftovers of an earlier cluster")
        cleanup.clean(settings)
    _prepare_dirs(settings)
    settings.save()
    cleanup.claim_memory_cgroup(settings)
    pids = pid_registry(settings)
    users.ensure_test_users()
    hostdirs.ensure(settings)
    users.write_site_etc(settings)
    if settings.fake_gpus and not settings.fake_gpu_driver.is_dir():
        from . import fakegpu

        log(f"building the fake GPU driver in {settings.fake_gpu_driver} ({settings.fake_gpus} GPUs per node)")
        fakegpu.build_driver(str(settings.fake_gpu_driver))
    _write_udiroot_conf(settings)
    _announce(pids, munge.NAME, "munged")
    munge.start(settings, pids)
    network.ensure_bridge()
    for node in settings.node_names:
        network.ensure_node(node)
    if not fresh and pids.pid(slurm.CONTROLLER) is not None:
        _recover_nodes(settings)
    _start_slurm(settings, pids, fresh)
    _announce(pids, registry.NAME, "the registry")
    registry.start(settings, pids)
    references = images.build_and_push(test_images(debian))
    log(f"test images in the registry: {' '.join(references)}")
    _start_gateway(settings, pids)
    _pull_through_gateway(settings, references)
    wrong = problems(settings)
    if wrong:
        raise DaemonError("the cluster is up but unhealthy: " + "; ".join(wrong))
    write_env(settings, references)
    log(f"up in {time.monotonic() - started:.1f} s: nodes {' '.join(settings.node_names)}")


def debian_image() -> None:
    """Build demo/debian:bookworm (debootstrap once, cached); push it when the registry runs."""
    from .debian import DEBIAN_IMAGE
    started = time.monotonic()
    layout = images.build(DEBIAN_IMAGE)
    log(f"debian image layout ready in {time.monotonic() - started:.1f} s: {layout.root}")
    if registry.answers():
        images.push(DEBIAN_IMAGE, layout)
        log(f"pushed {DEBIAN_IMAGE.reference}")


# --- down -------------------------------------------------------------------------

def down(settings: Settings) -> None:
    pids = pid_registry(settings)
    _stop_nodes(settings, pids)
    for name in (*gatewaysvc.names(settings), *STOP_ORDER):
        pids.stop(name)
    for name in pids.names():  # anything else a newer version recorded
        pids.stop(name)
    cleanup.clean(settings)
    settings.env_file.unlink(missing_ok=True)
    log("down")


def check_clean(settings: Settings) -> list[str]:
    """What `down` left behind (empty when nothing): processes, mounts, loops, network, cgroup."""
    deadline = time.monotonic() + 5
    while True:  # the kernel frees autoclear loop devices asynchronously
        found = cleanup.leftovers(settings, pids_alive(settings, pid_registry(settings).names()))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


# --- env and status -------------------------------------------------------------

def env_lines(settings: Settings, references: list[str]) -> list[str]:
    values = {
        "SLURM_CONF": str(settings.slurm_conf),
        "SHIFTER_GATEWAY": settings.gateway_url,
        "SHIFTER_GATEWAYS": " ".join(settings.gateway_urls),
        "SHIFTER_REGISTRY": REGISTRY_ADDR,
        "SHIFTER_UDIROOT_CONF": str(settings.udiroot_conf),
        "SHIFTER_NODES": " ".join(settings.node_names),
        "SHIFTER_TEST_IMAGES": " ".join(references),
        "SHIFTER_CLUSTER_STATE": str(settings.state_dir),
        "SHIFTER_PREFIX": str(settings.prefix),
    }
    lines = [f"export {key}={shlex.quote(value)}" for key, value in values.items()]
    lines.append(f'export PATH={shlex.quote(str(settings.prefix / "bin"))}:"$PATH"')
    return lines


def write_env(settings: Settings, references: list[str]) -> None:
    write_file(settings.env_file, "\n".join(env_lines(settings, references)) + "\n")


def problems(settings: Settings) -> list[str]:
    """What is wrong with the running cluster (empty when healthy)."""
    pids = pid_registry(settings)
    found = [f"{name} is not running" for name in pids.names() if pids.pid(name) is None]
    if not munge.healthy():
        found.append("munge credentials do not round-trip")
    found += slurm.healthy(settings, pids)
    if not registry.answers():
        found.append(f"registry {REGISTRY_ADDR} does not answer /v2/")
    if gatewaysvc.installed(settings):
        found += [f"gateway {settings.gateway_local_url_of(i)} does not answer /api/status"
                  for i in range(settings.gateways) if gatewaysvc.status(settings, i) is None]
    return found


def status(settings: Settings) -> list[str]:
    """Print what runs; returns the problems (empty when healthy)."""
    pids = pid_registry(settings)
    for name in pids.names():
        pid = pids.pid(name)
        print(f"{name:14} {'pid ' + str(pid) if pid else 'NOT RUNNING'}")
    for node, state in slurm.node_states(settings).items():
        print(f"node {node:10} {state}")
    return problems(settings)
