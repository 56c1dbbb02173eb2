"""``shifter doctor``: check, on a node, everything the runtime needs; one line per check.

Each line is ``ok``, ``WARN`` or ``FAIL``, the check, what was found and, when it is not ok,
what to do about it.  The exit status is 1 when any check fails.  Run it as root for the
prolog's view (loop devices, cgroups), as a user for the launcher's (user namespaces, fuse).
"""

from __future__ import annotations

import os
import sys

OK, WARN, FAIL = "ok", "WARN", "FAIL"


class Report:
    def __init__(self) -> None:
        self.failed = False

    def line(self, status: str, check: str, detail: str, fix: str = "") -> None:
        if status == FAIL:
            self.failed = True
        text = f"{status:<4} {check}: {detail}"
        print(text + (f" -> {fix}" if fix and status != OK else ""))


def _check_config(report: Report, path: str):
    from shifter.errors import ShifterError
    from shifter.formats.config import load_config

    try:
        config = load_config(path)
    except ShifterError as err:
        report.line(FAIL, "udiRoot.conf", str(err), "fix the file (root-owned, not group/other-writable)")
        return None
    report.line(OK, "udiRoot.conf", f"{path} parses, owned by root")
    return config


def _filesystems() -> set[str]:
    with open("/proc/filesystems") as fh:
        return {line.split()[-1] for line in fh if line.strip()}


def _check_kernel(report: Report) -> None:
    filesystems = _filesystems()
    for fs, why in (("squashfs", "image mounts"), ("tmpfs", "container roots"), ("xfs", "perNodeCache")):
        status = OK if fs in filesystems else (WARN if fs == "xfs" else FAIL)
        report.line(status, f"filesystem {fs}", "supported" if status == OK else f"not in /proc/filesystems ({why})",
                    f"modprobe {fs}")
    if os.path.exists("/dev/loop-control"):
        report.line(OK, "loop devices", "/dev/loop-control present")
    else:
        report.line(FAIL, "loop devices", "/dev/loop-control missing", "modprobe loop")


def _check_user_namespaces(report: Report) -> None:
    from shifter.runtime import linux

    try:
        with open("/proc/sys/user/max_user_namespaces") as fh:
            limit = int(fh.read())
    except OSError:
        limit = -1
    if limit == 0:
        report.line(FAIL, "user namespaces", "user.max_user_namespaces is 0", "sysctl user.max_user_namespaces=15000")
        return
    pid = os.fork()
    if pid == 0:
        try:
            if os.getuid() == 0:
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
            linux.unshare(linux.CLONE_NEWUSER)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        report.line(OK, "user namespaces", "an unprivileged process can create one")
    else:
        report.line(FAIL, "user namespaces", "an unprivileged unshare(CLONE_NEWUSER) failed",
                    "enable kernel.unprivileged_userns_clone / user.max_user_namespaces")


def _check_fuse(report: Report) -> bool:
    """squashfuse and /dev/fuse, for ``shifter --image`` inside a task; True when users can use them."""
    from shifter.launch.fresh import SQUASHFUSE_CANDIDATES, find_squashfuse

    found = find_squashfuse()
    if found:
        report.line(OK, "squashfuse", found)
    else:
        report.line(WARN, "squashfuse", f"none of {', '.join(SQUASHFUSE_CANDIDATES)}",
                    "apt-get install squashfuse (needed for the fresh path only)")
    try:
        mode = os.stat("/dev/fuse").st_mode & 0o777
    except FileNotFoundError:
        report.line(WARN, "/dev/fuse", "missing", "modprobe fuse (fresh path only)")
        return False
    status = OK if mode & 0o006 == 0o006 else WARN
    report.line(status, "/dev/fuse", f"mode {mode:04o}", "chmod 0666 /dev/fuse so users can build private environments")
    return bool(found) and status == OK


def _check_other_images(report: Report, fuse_usable: bool) -> None:
    """Which ways to another image than the job's (and to --writable) this node offers."""
    filesystems = _filesystems()
    kernel = "squashfs" in filesystems and os.path.exists("/dev/loop-control")
    report.line(OK if kernel else FAIL, "srun --image=... (step images)",
                "built by slurmstepd with the kernel's squashfs" if kernel else "needs squashfs and loop devices")
    report.line(OK if fuse_usable else WARN, "shifter --image=... inside a task",
                "through squashfuse" if fuse_usable else "not available here (needs squashfuse and /dev/fuse)",
                "use srun --image=... instead, or install squashfuse and open /dev/fuse to users")
    report.line(OK if "overlay" in filesystems else WARN, "--writable", "overlayfs supported"
                if "overlay" in filesystems else "overlay not in /proc/filesystems", "modprobe overlay")


def _check_paths(report: Report, config) -> None:
    if os.access(config.image_path, os.R_OK | os.X_OK):
        report.line(OK, "imagePath", f"{config.image_path} readable")
    else:
        report.line(FAIL, "imagePath", f"{config.image_path} missing or not readable", "mount the image store")
    udi = config.opt_udi_image
    if not udi:
        report.line(WARN, "udiImage sshd", "optUdiImage not set", "set optUdiImage (only needed for the job sshd)")
        return
    needed = ("sbin/sshd", "bin/ssh-keygen", "etc/sshd_config")
    missing = [p for p in needed if not os.path.exists(os.path.join(udi, p))]
    if missing:
        report.line(WARN, "udiImage sshd", f"{udi} lacks {', '.join(missing)}",
                    f"python -m shifter.packtool udiimage {udi}")
    else:
        report.line(OK, "udiImage sshd", f"{udi} has sshd, ssh-keygen and sshd_config")


def _check_cgroup(report: Report) -> None:
    if os.path.isdir("/sys/fs/cgroup/memory"):
        report.line(OK, "memory cgroup", "cgroup v1 memory at /sys/fs/cgroup/memory")
        return
    try:
        with open("/sys/fs/cgroup/cgroup.controllers") as fh:
            if "memory" in fh.read().split():
                report.line(OK, "memory cgroup", "cgroup v2 with the memory controller at /sys/fs/cgroup")
                return
    except OSError:
        pass
    report.line(WARN, "memory cgroup", "no memory controller found", "only needed with memory_cgroup")


def _check_gateway(report: Report, config) -> None:
    import socket
    from urllib.parse import urlsplit

    if not config.image_gateways:
        report.line(WARN, "image gateway", "imageGateway not set", "set it for --image lookups and submissions")
    for url in config.image_gateways:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname, port), timeout=3):
                report.line(OK, "image gateway", f"{url} accepts connections")
        except OSError as exc:
            report.line(FAIL, "image gateway", f"{url}: {exc.strerror or exc}", "start the gateway / check the URL")
    try:
        from shifter.client import munge

        munge.encode(b"")
        report.line(OK, "munge", "a credential was encoded")
    except Exception as exc:  # noqa: BLE001 - every failure is a finding to print
        report.line(FAIL, "munge", str(exc), "start munged and check its key")


def _check_gpu(report: Report, config) -> None:
    """What GPU jobs would get on this node (shifter/runtime/gpudiscovery.py), or exactly what is missing."""
    if not config.gpu_recipe:
        report.line(OK, "GPU", "gpuRecipe not set: jobs get no GPU devices or driver from the site")
        return
    from shifter.errors import ShifterError
    from shifter.formats.gpurecipe import load_recipe, site_env_values
    from shifter.runtime.gpudiscovery import discover

    try:
        found = discover(load_recipe(config.gpu_recipe), config.gpu_driver_root,
                         site_env=site_env_values(config.site_env))
    except (ShifterError, OSError) as exc:
        report.line(FAIL, "GPU", str(exc), "reinstall shifter-slurm (its recipes are missing)")
        return
    root = config.gpu_driver_root
    if found.version:
        report.line(OK, "GPU driver", f"{config.gpu_recipe} {found.version} (driver root {root}, siteResources "
                                      f"{config.site_resources})")
    if found.gpus:
        nodes = [found.gpus[i] for i in sorted(found.gpus)]
        report.line(OK, "GPU devices", f"{len(nodes)} GPU(s): {' '.join(nodes)}; control: {' '.join(found.control)}"
                    + (f"; MIG capabilities: {' '.join(found.capability_dirs)}" if found.capability_dirs else ""))
    for bits in (64, 32):
        names = [lib.file for lib in found.libraries if lib.bits == bits]
        if names:
            report.line(OK, f"GPU libraries ({bits}-bit)", " ".join(names))
    if found.stale:
        report.line(WARN, "GPU libraries", f"of another driver version, not used: {' '.join(found.stale)}",
                    "remove them and run ldconfig")
    if found.version:
        names = [f"{name} ({path})" for name, path in found.binaries]
        report.line(OK if names else WARN, "GPU binaries", " ".join(names) or "none of the recipe's programs found",
                    "install the driver's utilities (nvidia-smi)")
    if found.host_paths:
        shown = [item.path + (f" ({item.host})" if item.host != item.path else "") for item in found.host_paths]
        report.line(OK, "GPU host paths", " ".join(shown))
    if not found.gpus and not found.version:  # a CPU node sharing the GPU nodes' udiRoot.conf
        report.line(WARN, "GPU", "no GPU on this node: " + "; ".join(found.problems),
                    "only GPU nodes need the driver; jobs without GPUs run here")
        return
    for problem in found.problems:
        report.line(FAIL, "GPU", problem, "GPU jobs on this node fail until this is fixed")


def run(config_path: str) -> int:
    report = Report()
    config = _check_config(report, config_path)
    _check_kernel(report)
    _check_user_namespaces(report)
    _check_other_images(report, _check_fuse(report))
    if config is not None:
        _check_paths(report, config)
    _check_cgroup(report)
    if config is not None:
        _check_gateway(report, config)
        _check_gpu(report, config)
    sys.stdout.flush()
    return 1 if report.failed else 0
