"""GPUs in the container: the binds of one job, planned from a node's discovery and made into its root.

The recipe (data) is shifter/formats/gpurecipe.py, what the node offers shifter/runtime/gpudiscovery.py.
The device nodes are the node's own ``/dev`` (the container's ``/dev`` is a bind of it): the
allocated GPUs' nodes and the control nodes stay visible, every other GPU's node is covered
with an inaccessible empty file, and a job without GPUs gets all of them covered.  Slurm's
``ConstrainDevices`` (the device cgroup) remains the enforcement; this only keeps what is
shown consistent with the allocation.  Run by setupRoot as root.
"""

from __future__ import annotations

import os
import stat

from shifter.errors import ShifterError
from shifter.record import Record
from shifter.runtime.gpudiscovery import Discovery, HostPath


class Injection(Record):
    """What setupRoot binds into one job's root, decided before anything is mounted."""

    __slots__ = ("discovery", "gpus", "userspace", "site_resources", "hide_file", "hide_dir", "local_ids")
    discovery: Discovery
    gpus: list[int]  # allocated indices; empty: the job has no GPU, everything is covered
    userspace: bool  # False: devices only (the job brings its own driver libraries)
    local_ids: bool  # Slurm numbers the job's GPUs from 0 in tasks (task/cgroup with ConstrainDevices=yes)
    site_resources: str
    hide_file: str  # an empty root-owned mode-0 file and directory that cover what is not allocated
    hide_dir: str


def plan_injection(discovery: Discovery, gpus: list[int], userspace: bool, site_resources: str,
                   hide_file: str, hide_dir: str, local_ids: bool = False) -> Injection:
    """Check the allocation against the node: an allocated GPU the node lacks is the node's fault."""
    from shifter.errors import NodeError

    if gpus:
        if discovery.problems:
            raise NodeError(f"GPU job on a node without a usable {discovery.recipe.name} driver: "
                            + "; ".join(discovery.problems))
        missing = [index for index in gpus if index not in discovery.gpus]
        if missing:
            raise NodeError(f"allocated GPU(s) {','.join(map(str, missing))} have no device node in "
                            f"{discovery.recipe.gpu_dir}")
    return Injection(discovery=discovery, gpus=gpus, userspace=userspace, site_resources=site_resources.rstrip("/"),
                     hide_file=hide_file, hide_dir=hide_dir, local_ids=local_ids)


def environment_operations(injection: Injection) -> list[tuple[str, str, str]]:
    """The container environment for the job (shifter/formats/environment.py operations); none without GPUs.

    ``CUDA_VISIBLE_DEVICES`` must name the same GPUs inside as it does to a bare-metal task of
    the same step.  CUDA numbers the GPUs a process can open.  With task/cgroup and
    ConstrainDevices=yes the device cgroup already limits that set to the allocation, Slurm
    numbers from 0 accordingly, and the container changes nothing: the value is kept.  Without
    it a bare-metal task opens every GPU of the node and Slurm gives node indices, but in the
    container the job's other GPUs are covered, so each index is renumbered to its place among
    the job's GPUs (the ``%`` operation; nothing to do when the job holds GPUs 0..n-1).
    """
    if not injection.gpus:
        return []
    values = {"gpus": ",".join(map(str, injection.gpus)),
              "capabilities": ",".join(injection.discovery.recipe.capabilities)}
    ops: list[tuple[str, str, str]] = []
    for name, template in injection.discovery.recipe.environment.items():
        if name == "NVIDIA_DRIVER_CAPABILITIES" and not injection.userspace:
            continue
        ops.append(("=", name, template.format(**values)))
    if not injection.local_ids and injection.gpus != list(range(len(injection.gpus))):
        ops += [("%", name, values["gpus"]) for name in injection.discovery.recipe.renumber_variables]
    if injection.userspace:
        dirs = [f"{injection.site_resources}/lib{bits}" for bits in (64, 32)
                if any(lib.bits == bits for lib in injection.discovery.libraries)]
        if dirs:
            ops.append(("^", "LD_LIBRARY_PATH", ":".join(dirs)))
        if injection.discovery.binaries:
            ops.append(("^", "PATH", f"{injection.site_resources}/bin"))
    return ops


def hidden_devices(injection: Injection) -> tuple[list[str], list[str]]:
    """(device nodes, directories) of the node that the job must not see."""
    discovery = injection.discovery
    nodes = [path for index, path in sorted(discovery.gpus.items()) if index not in injection.gpus]
    dirs: list[str] = []
    if not injection.gpus:
        nodes += discovery.control
        dirs += discovery.capability_dirs
    return nodes, dirs


def make_hide_sources(hide_file: str, hide_dir: str) -> None:
    """The empty file and directory (root's, mode 0) that are bound over what is hidden."""
    os.close(os.open(hide_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0))
    os.chmod(hide_file, 0)
    os.mkdir(hide_dir, 0)
    os.chmod(hide_dir, 0)


def _bind_file(source: str, root_fd: int, target: str, propagation: int, readonly: bool = True) -> None:
    from shifter.runtime import fdpath

    source_fd = os.open(source, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        target_fd = fdpath.open_in_root(root_fd, target, os.O_PATH | os.O_NOFOLLOW)
        try:
            fdpath.bind_fd(source_fd, target_fd, readonly=readonly, nodev=False, propagation=propagation)
        finally:
            os.close(target_fd)
    finally:
        os.close(source_fd)


def _new_file(dir_fd: int, name: str) -> None:
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd))


def inject(injection: Injection, root: str, tmpfs_dev: int, propagation: int, image_dir: str | None = None) -> None:
    """Bind the driver's files under siteResources and cover the devices the job may not see.

    Runs after /dev is bound and before the image's directories are, so siteResources is made
    on the container's tmpfs.  Every container path is resolved inside the root by the kernel.
    """
    from shifter.runtime import fdpath

    root_fd = fdpath.open_dir(root)
    try:
        if image_dir is not None:
            prepare_host_paths(injection, root_fd, image_dir, tmpfs_dev)
        nodes, dirs = hidden_devices(injection)
        for path in nodes:
            _bind_file(injection.hide_file, root_fd, path, propagation)
        for path in dirs:
            _bind_file(injection.hide_dir, root_fd, path, propagation)
        if not injection.gpus or not injection.userspace:
            return
        discovery = injection.discovery
        groups: list[tuple[str, list[tuple[str, str, list[str]]]]] = [
            (f"lib{bits}", [(lib.file, lib.host, lib.links) for lib in discovery.libraries if lib.bits == bits])
            for bits in (64, 32)]
        groups.append(("bin", [(name, host, []) for name, host in discovery.binaries]))
        for sub, items in groups:
            if not items:
                continue
            dir_fd = fdpath.make_dirs_in_root(root_fd, f"{injection.site_resources}/{sub}", device=tmpfs_dev)
            try:
                if os.fstat(dir_fd).st_dev != tmpfs_dev:
                    raise ShifterError(f"siteResources {injection.site_resources}: not on the container's tmpfs "
                                       "(the image or a site volume provides it)")
                for name, host, links in items:
                    _new_file(dir_fd, name)
                    _bind_file(host, root_fd, f"{injection.site_resources}/{sub}/{name}", propagation)
                    for link in links:
                        os.symlink(name, link, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        os.close(root_fd)


def _image_has_content(image_fd: int, path: str) -> bool:
    """Whether the image has ``path`` as anything but a missing or empty directory (resolved in the image)."""
    from shifter.runtime import fdpath

    try:
        fd = fdpath.open_in_root(image_fd, path, os.O_PATH | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:  # a file where a directory would be, a link loop: the image's, left alone
        return True
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            return True
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        try:
            return bool(os.listdir(listing))
        finally:
            os.close(listing)
    finally:
        os.close(fd)


def prepare_host_paths(injection: Injection, root_fd: int, image_dir: str, tmpfs_dev: int) -> None:
    """Before the image's directories are bound: make the way to each host path on the tmpfs where
    the image has nothing there (no ``/run``, an empty ``/run``, no ``/var/log``), so no content of
    the image is hidden.  Below a directory the image fills, the image's own tree must hold the path
    (see :func:`bind_host_paths`)."""
    from shifter.runtime import fdpath

    if not injection.gpus or not injection.userspace or not injection.discovery.host_paths:
        return
    image_fd = fdpath.open_dir(image_dir)
    try:
        for item in injection.discovery.host_paths:
            parts = [p for p in item.path.split("/") if p]
            for count in range(1, len(parts) + 1):
                prefix = "/".join(parts[:count])
                try:
                    os.close(fdpath.open_in_root(root_fd, prefix, os.O_PATH | os.O_NOFOLLOW))
                    continue  # the site's (a tmpfs directory, /tmp): the next component decides
                except FileNotFoundError:
                    pass
                except OSError:
                    break  # not a directory on the way: bind_host_paths says so
                if _image_has_content(image_fd, prefix):
                    break
                directory = "/".join(parts if item.kind == "directory" else parts[:-1])
                try:
                    fdpath.make_dirs_in_root(root_fd, directory, device=tmpfs_dev)
                except OSError:
                    break  # below a host bind: bind_host_paths says so
                break
    finally:
        os.close(image_fd)


def bind_host_paths(injection: Injection, root: str, tmpfs_dev: int, propagation: int) -> list[str]:
    """After the image's directories are bound: bind each host path at its own path; returns what
    could not be placed (one line each).  A target is created only on the container's tmpfs; one
    the container already shows as the same object (``/tmp/nvidia-mps`` in the host's /tmp) is
    left as it is."""
    from shifter.runtime import fdpath

    if not injection.gpus or not injection.userspace:
        return []
    notes = []
    root_fd = fdpath.open_dir(root)
    try:
        for item in injection.discovery.host_paths:
            try:
                source_fd = os.open(item.host, os.O_PATH | os.O_CLOEXEC)
            except OSError as exc:
                notes.append(f"{item.path}: not placed ({item.host}: {exc.strerror})")
                continue
            try:
                target_fd = _host_path_target(root_fd, item, tmpfs_dev)
                if target_fd is None:
                    notes.append(f"{item.path}: not placed (the image's read-only tree lacks its directory)")
                    continue
                try:
                    source, target = os.fstat(source_fd), os.fstat(target_fd)
                    if (source.st_dev, source.st_ino) != (target.st_dev, target.st_ino):
                        fdpath.bind_fd(source_fd, target_fd, readonly=not item.writable, propagation=propagation)
                except OSError as exc:
                    notes.append(f"{item.path}: not placed ({exc.strerror})")
                finally:
                    os.close(target_fd)
            finally:
                os.close(source_fd)
    finally:
        os.close(root_fd)
    return notes


def _host_path_target(root_fd: int, item: HostPath, tmpfs_dev: int) -> int | None:
    """An O_PATH descriptor of the container's ``item.path`` (created on the tmpfs if missing), or None."""
    from shifter.runtime import fdpath

    try:
        return fdpath.open_in_root(root_fd, item.path, os.O_PATH | os.O_NOFOLLOW)
    except FileNotFoundError:
        pass
    except OSError:
        return None
    parent, name = os.path.split(item.path.rstrip("/"))
    try:
        parent_fd = fdpath.open_in_root(root_fd, parent, os.O_PATH | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        if os.fstat(parent_fd).st_dev != tmpfs_dev:
            return None
        if item.kind == "directory":
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        else:
            _new_file(parent_fd, name)
    except OSError:
        return None
    finally:
        os.close(parent_fd)
    try:
        return fdpath.open_in_root(root_fd, item.path, os.O_PATH | os.O_NOFOLLOW)
    except OSError:
        return None
