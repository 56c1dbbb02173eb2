"""GPUs in the container: a vendor recipe (data), discovery on the node, and the binds of one job.

Why data: what a vendor's driver puts on a node (device nodes, user-space libraries, tools,
environment variables) changes with driver releases and differs between vendors; the code
here only knows how to find and bind what a recipe (``shifter/recipes/<name>.json``) names.

Discovery runs once per node and job in the prolog (setupRoot), as root, and reads only the
site's side: the running driver's version file, the host's loader cache (``ldconfig -p -C``
of the driver root's ``etc/ld.so.cache``), and the driver root's files.  Nothing is read from
the image.  A library is used only when its real file carries the running driver's version
(``libcuda.so.535.104.05`` for driver 535.104.05): a stale library of an older driver in the
cache would fail with "driver/library version mismatch" inside the container.

The device nodes are the node's own ``/dev`` (the container's ``/dev`` is a bind of it): the
allocated GPUs' nodes and the control nodes stay visible, every other GPU's node is covered
with an inaccessible empty file, and a job without GPUs gets all of them covered.  Slurm's
``ConstrainDevices`` (the device cgroup) remains the enforcement; this only keeps what is
shown consistent with the allocation.
"""

from __future__ import annotations

import json
import os
import re
import stat

from shifter.errors import ShifterError
from shifter.record import Record

RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
LDCONFIG = "/sbin/ldconfig"
# variables only the allocation decides: an image's value for them is dropped
ALLOCATION_VARIABLES = frozenset({"NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
                                  "HIP_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL"})
HOST_PATH_KINDS = {"directory": stat.S_ISDIR, "socket": stat.S_ISSOCK}
_RECIPE_NAME = re.compile(r"[a-z0-9][a-z0-9-]*\Z")
_CACHE_LINE = re.compile(r"^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(/\S.*?)\s*$")


class Recipe(Record):
    """One vendor's recipe, as in its JSON file."""

    __slots__ = ("name", "version_file", "version_pattern", "gpu_dir", "gpu_pattern", "gpu_major", "gpu_index_base",
                 "control_devices", "required_devices", "capability_directories", "libraries",
                 "required_libraries", "binaries", "binary_directories", "capabilities", "environment",
                 "renumber_variables", "host_paths")
    name: str
    version_file: str | None  # None: the driver's user-space comes with the image (no libraries injected)
    version_pattern: str
    gpu_dir: str
    gpu_pattern: str
    gpu_major: int | None
    gpu_index_base: int  # the node number of GPU 0 (renderD128 is AMD's GPU 0)
    control_devices: list[str]
    required_devices: list[str]
    capability_directories: list[str]
    libraries: dict[str, list[str]]  # capability -> soname prefixes
    required_libraries: list[str]
    binaries: dict[str, list[str]]  # capability -> program names
    binary_directories: list[str]
    capabilities: list[str]
    environment: dict[str, str]
    renumber_variables: list[str]  # Slurm's device-index variables, renumbered when Slurm used node indices
    host_paths: list[dict]  # {"path", "kind": directory|socket, "writable", "variable"}: bound at the same path


class CacheEntry(Record):
    """One line of ``ldconfig -p``: a library name, its word size and the path the cache gives."""

    __slots__ = ("name", "bits", "path")
    name: str
    bits: int  # 64 or 32
    path: str


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


def recipe_names() -> list[str]:
    """The recipes shipped with the package."""
    return sorted(name[:-5] for name in os.listdir(RECIPE_DIR) if name.endswith(".json"))


def load_recipe(name: str) -> Recipe:
    """Read ``recipes/<name>.json``; an unknown name is one clear error listing the known ones."""
    if not _RECIPE_NAME.match(name) or name not in recipe_names():
        raise ShifterError(f"unknown GPU recipe {name!r} (known: {', '.join(recipe_names()) or 'none'})")
    with open(os.path.join(RECIPE_DIR, f"{name}.json")) as fh:
        data = json.load(fh)
    name = data["name"]
    devices = data.get("gpu_devices", {})
    return Recipe(
        name=name, version_file=data.get("version_file"), version_pattern=data.get("version_pattern", ""),
        gpu_dir=devices.get("directory", "/dev"), gpu_pattern=devices["pattern"], gpu_major=devices.get("major"),
        gpu_index_base=int(devices.get("index_base", 0)),
        control_devices=list(data.get("control_devices", [])), required_devices=list(data.get("required_devices", [])),
        capability_directories=list(data.get("capability_directories", [])),
        libraries={k: list(v) for k, v in data.get("libraries", {}).items()},
        required_libraries=list(data.get("required_libraries", [])),
        binaries={k: list(v) for k, v in data.get("binaries", {}).items()},
        binary_directories=list(data.get("binary_directories", [])),
        capabilities=list(data.get("capabilities", [])), environment=dict(data.get("environment", {})),
        renumber_variables=list(data.get("renumber_variables", [])),
        host_paths=[_host_path_entry(name, entry) for entry in data.get("host_paths", [])])


def _host_path_entry(recipe: str, entry: dict) -> dict:
    """One ``host_paths`` item, checked: a recipe mistake is one clear error, not a bind elsewhere."""
    path, kind = entry.get("path", ""), entry.get("kind")
    if not path.startswith("/") or ".." in path.split("/") or kind not in HOST_PATH_KINDS:
        raise ShifterError(f"recipe {recipe}: bad host_paths entry {entry!r} (want an absolute path and kind "
                           f"{' or '.join(sorted(HOST_PATH_KINDS))})")
    return {"path": path, "kind": kind, "writable": bool(entry.get("writable", False)),
            "variable": entry.get("variable")}


def driver_version(text: str, recipe: Recipe) -> str | None:
    """The running driver's version from the version file's text, or None."""
    match = re.search(recipe.version_pattern, text)
    return match.group(1) if match else None


def _bits(flags: str) -> int | None:
    """``libc6,x86-64`` -> 64, ``libc6`` -> 32 (i386); other ABIs (x32, soft-float...) -> None."""
    words = [w.strip() for w in flags.split(",")]
    if words[0] != "libc6":
        return None
    rest = [w for w in words[1:] if not w.startswith(("hwcap:", "OS ABI:"))]
    if not rest:
        return 32
    if len(rest) == 1 and rest[0] in ("x86-64", "AArch64", "64bit", "IA-64", "riscv64-lp64d"):
        return 64
    return None


def parse_loader_cache(text: str) -> list[CacheEntry]:
    """The entries of ``ldconfig -p`` output (the header and trailer lines are skipped)."""
    entries = []
    for line in text.splitlines():
        match = _CACHE_LINE.match(line)
        if not match:
            continue
        bits = _bits(match.group(2))
        if bits is not None:
            entries.append(CacheEntry(name=match.group(1), bits=bits, path=match.group(3)))
    return entries


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
    from shifter import fdpath

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


def site_env_values(site_env: list[str]) -> dict[str, str]:
    """udiRoot.conf's ``siteEnv`` settings as a dict (the last one of a name wins, as in the container)."""
    return dict(item.split("=", 1) for item in site_env if "=" in item)


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


def parse_gpu_ids(text: str) -> list[int]:
    """Slurm's ``SLURM_JOB_GPUS`` (``0,2`` or ranges ``0-3``): sorted unique indices; bad text is an error."""
    ids: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        low, sep, high = item.partition("-")
        if not low.isdigit() or not low.isascii() or (sep and not (high.isdigit() and high.isascii())):
            raise ShifterError(f"invalid GPU list {text!r}: want indices such as 0,1 or 0-3")
        first, last = int(low), int(high) if sep else int(low)
        if last < first or last - first > 4096:
            raise ShifterError(f"invalid GPU range {item!r} in {text!r}")
        ids.update(range(first, last + 1))
    return sorted(ids)


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
    """The container environment for the job (shifter/environment.py operations); none without GPUs.

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
    from shifter import fdpath

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
    from shifter import fdpath

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
    from shifter import fdpath

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
    from shifter import fdpath

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
    from shifter import fdpath

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
    from shifter import fdpath

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
