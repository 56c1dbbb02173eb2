"""What a node offers for a GPU recipe: discovery, once per node and job in the prolog (setupRoot), as root.

It reads only the site's side: the running driver's version file, the host's loader cache
(``ldconfig -p -C`` of the driver root's ``etc/ld.so.cache``), and the driver root's files.
Nothing is read from the image.  A library is used only when its real file carries the running
driver's version (``libcuda.so.535.104.05`` for driver 535.104.05): a stale library of an older
driver in the cache would fail with "driver/library version mismatch" inside the container.
"""

from __future__ import annotations

import os
import re
import stat

from shifter.errors import ShifterError
from shifter.formats.gpurecipe import (
    HOST_PATH_KINDS,
    CacheEntry,
    Recipe,
    driver_version,
    parse_loader_cache,
)
from shifter.record import Record

LDCONFIG = "/sbin/ldconfig"


class Library(Record):
    """A driver library to bind: its real file on the host and the names that link to it."""

    __slots__ = ("bits", "host", "file", "links", "capability")
    bits: int
    host: str  # absolute host path of the real file
    file: str  # its base name, e.g. libcuda.so.535.104.05
    links: list[str]  # sonames to create next to it, e.g. libcuda.so.1
    capability: str


class Discovery(Record):
    """What a node offers for one recipe; ``problems`` says exactly what is missing."""

    __slots__ = ("recipe", "version", "libraries", "binaries", "gpus", "control", "capability_dirs",
                 "stale", "problems", "host_paths")
    _defaults = {"host_paths": []}
    recipe: Recipe
    version: str | None
    libraries: list[Library]
    binaries: list[tuple[str, str]]  # (name, host path)
    gpus: dict[int, str]  # GPU index -> node device path
    control: list[str]
    capability_dirs: list[str]
    stale: list[str]  # libraries of another driver version, skipped
    problems: list[str]
    host_paths: list[HostPath]


class HostPath(Record):
    """A driver file or directory of the node bound at the same path in the container."""

    __slots__ = ("host", "path", "kind", "writable")
    host: str  # where it is on the node (site-trusted)
    path: str  # where it goes in the container (resolved inside the root)
    kind: str  # directory or socket
    writable: bool


def loader_cache_text(driver_root: str, ldconfig: str = LDCONFIG) -> str:
    """``ldconfig -p`` of the driver root's cache, run from the host (never from an image)."""
    import subprocess

    cache = os.path.join(driver_root, "etc/ld.so.cache")
    if not os.path.isfile(cache):
        raise ShifterError(f"{cache}: no loader cache")
    result = subprocess.run([ldconfig, "-p", "-C", cache], capture_output=True, env={"PATH": "/usr/sbin:/sbin"},
                            stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise ShifterError(f"{ldconfig} -p -C {cache} failed" + (f": {detail[-1]}" if detail else ""))
    return result.stdout.decode(errors="surrogateescape")


def _under(driver_root: str, path: str) -> str:
    return path if driver_root in ("", "/") else driver_root.rstrip("/") + path


def _real_file(driver_root: str, path: str) -> str | None:
    """The real file ``path`` names in the driver root (links resolved inside it), or None."""
    from shifter.runtime import fdpath

    try:
        root_fd = fdpath.open_dir(driver_root or "/")
    except OSError:
        return None
    try:
        fd = fdpath.open_in_root(root_fd, path, os.O_PATH)
    except OSError:
        return None
    finally:
        os.close(root_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return fdpath.real_path(fd)
    finally:
        os.close(fd)


def _capability_of(recipe: Recipe, name: str, capabilities: list[str]) -> str | None:
    for capability in capabilities:
        for prefix in recipe.libraries.get(capability, []):
            if name.startswith(prefix):
                return capability
    return None


def select_libraries(entries: list[CacheEntry], recipe: Recipe, version: str, driver_root: str = "/",
                     capabilities: list[str] | None = None) -> tuple[list[Library], list[str]]:
    """The recipe's libraries in the cache whose real file has ``version``; and the stale ones skipped.

    ``libcuda.so.1 -> libcuda.so.535.104.05`` is taken; ``libcuda.so -> libcuda.so.1`` (the
    link for the build-time linker) adds nothing; a ``libcuda.so.470.82.01`` left by an older
    driver is reported as stale.  64-bit and 32-bit libraries are kept apart.
    """
    wanted = recipe.capabilities if capabilities is None else capabilities
    found: dict[tuple[int, str], Library] = {}
    stale: list[str] = []
    suffix = ".so." + version
    for entry in entries:
        capability = _capability_of(recipe, entry.name, wanted)
        if capability is None:
            continue
        real = _real_file(driver_root, entry.path)
        if real is None:
            continue
        base = os.path.basename(real)
        if not base.endswith(suffix):
            if real not in stale:
                stale.append(real)
            continue
        library = found.get((entry.bits, real))
        if library is None:
            library = found[(entry.bits, real)] = Library(bits=entry.bits, host=real, file=base, links=[],
                                                          capability=capability)
        if entry.name != base and ".so." in entry.name and entry.name not in library.links:
            library.links.append(entry.name)
    return sorted(found.values(), key=lambda lib: (-lib.bits, lib.file)), stale


def find_binaries(recipe: Recipe, driver_root: str = "/", capabilities: list[str] | None = None
                  ) -> list[tuple[str, str]]:
    """(name, host path) of each of the recipe's programs found in its binary directories."""
    wanted = recipe.capabilities if capabilities is None else capabilities
    found = []
    for capability in wanted:
        for name in recipe.binaries.get(capability, []):
            for directory in recipe.binary_directories:
                real = _real_file(driver_root, f"{directory}/{name}")
                if real is not None and os.access(real, os.X_OK):
                    found.append((name, real))
                    break
    return found


def _char_device(path: str, major: int | None) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISCHR(info.st_mode) and (major is None or os.major(info.st_rdev) == major)


def node_gpus(recipe: Recipe) -> dict[int, str]:
    """The node's GPU device nodes (``/dev/nvidia0``...), by index."""
    pattern = re.compile(recipe.gpu_pattern + r"\Z")
    found = {}
    try:
        names = os.listdir(recipe.gpu_dir)
    except OSError:
        return {}
    for name in names:
        match = pattern.match(name)
        path = os.path.join(recipe.gpu_dir, name)
        if match and _char_device(path, recipe.gpu_major) and int(match.group(1)) >= recipe.gpu_index_base:
            found[int(match.group(1)) - recipe.gpu_index_base] = path
    return found


def find_host_paths(recipe: Recipe, version: str, driver_root: str = "/",
                    site_env: dict[str, str] | None = None) -> list[HostPath]:
    """The recipe's ``host_paths`` present on the node (the GSP firmware of the running driver,
    the persistenced socket, the MPS directories).  A path is looked up under the driver root,
    as libraries are; an entry with a ``variable`` the site sets in udiRoot.conf's siteEnv
    (``CUDA_MPS_PIPE_DIRECTORY=/var/mps``) takes that value instead, as a path of the node."""
    found = []
    for entry in recipe.host_paths:
        value = (site_env or {}).get(entry["variable"] or "")
        if value and value.startswith("/") and ".." not in value.split("/"):
            host = path = os.path.normpath(value)
        else:
            path = entry["path"].format(version=version)
            host = _under(driver_root, path)
        try:
            info = os.stat(host)
        except OSError:
            continue
        if HOST_PATH_KINDS[entry["kind"]](info.st_mode):
            found.append(HostPath(host=host, path=path, kind=entry["kind"], writable=entry["writable"]))
    return found


def discover(recipe: Recipe, driver_root: str = "/", ldconfig: str = LDCONFIG, userspace: bool = True,
             site_env: dict[str, str] | None = None) -> Discovery:
    """Everything the node offers for ``recipe``; never raises for a missing part, lists it instead.

    Without ``userspace`` only the device nodes are looked at (a job without GPUs, or one that
    brings its own driver libraries): no loader cache is read.
    """
    problems: list[str] = []
    version = None
    version_path = _under(driver_root, recipe.version_file or "")
    if userspace and recipe.version_file:
        try:
            with open(version_path) as fh:
                version = driver_version(fh.read(), recipe)
            if version is None:
                problems.append(f"{version_path}: no driver version found in it")
        except FileNotFoundError as exc:
            problems.append(f"{version_path}: {exc.strerror} (is the {recipe.name} kernel driver loaded?)")
        except OSError as exc:
            problems.append(f"{version_path}: {exc.strerror}")
    libraries: list[Library] = []
    stale: list[str] = []
    if version is not None:
        try:
            entries = parse_loader_cache(loader_cache_text(driver_root, ldconfig))
        except (ShifterError, OSError) as exc:
            problems.append(str(exc))
            entries = []
        libraries, stale = select_libraries(entries, recipe, version, driver_root)
        have = {lib.file for lib in libraries if lib.bits == 64}
        for prefix in recipe.required_libraries:
            if not any(name.startswith(prefix) for name in have):
                problems.append(f"no 64-bit {prefix}.{version} in the loader cache of {driver_root or '/'}")
    control = [path for path in recipe.control_devices if os.path.exists(path)]
    for path in recipe.required_devices:
        if not _char_device(path, None):
            problems.append(f"{path}: missing or not a character device")
    gpus = node_gpus(recipe)
    if not gpus:
        problems.append(f"no GPU device nodes matching {recipe.gpu_dir}/{recipe.gpu_pattern}")
    return Discovery(recipe=recipe, version=version, libraries=libraries,
                     binaries=find_binaries(recipe, driver_root) if userspace else [], gpus=gpus, control=control,
                     capability_dirs=[p for p in recipe.capability_directories if os.path.isdir(p)],
                     stale=stale, problems=problems,
                     host_paths=find_host_paths(recipe, version, driver_root, site_env) if version else [])


def _slurm_settings(path: str) -> dict[str, str]:
    """``Key=Value`` lines of a Slurm config file, keys lower-cased (Slurm's keys are case-insensitive)."""
    settings = {}
    with open(path, errors="replace") as fh:
        for line in fh:
            key, sep, value = line.split("#", 1)[0].strip().partition("=")
            if sep and key.strip():
                settings[key.strip().lower()] = value.strip()
    return settings


def slurm_numbers_gpus_locally(slurm_conf: str) -> bool:
    """Whether Slurm gives tasks job-relative GPU indices: TaskPlugin with task/cgroup and
    ConstrainDevices=yes in the cgroup.conf beside slurm.conf (srun(1), --gpu-bind).

    An unreadable slurm.conf is an error (the prolog gets SLURM_CONF from slurmd); a missing
    cgroup.conf means Slurm's default, ConstrainDevices=no.
    """
    try:
        plugins = _slurm_settings(slurm_conf).get("taskplugin", "")
    except OSError as exc:
        raise ShifterError(f"{slurm_conf}: {exc.strerror}") from None
    if not any(p.strip() in ("task/cgroup", "cgroup") for p in plugins.split(",")):
        return False
    try:
        cgroup = _slurm_settings(os.path.join(os.path.dirname(slurm_conf), "cgroup.conf"))
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ShifterError(f"{os.path.join(os.path.dirname(slurm_conf), 'cgroup.conf')}: {exc.strerror}") from None
    return cgroup.get("constraindevices", "no").lower() in ("yes", "true", "1")
