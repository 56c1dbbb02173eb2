"""GPU recipes: what one vendor's driver puts on a node, as data (``shifter/formats/recipes/<name>.json``).

Why data: what a vendor's driver puts on a node (device nodes, user-space libraries, tools,
environment variables) changes with driver releases and differs between vendors; the code
(runtime/gpudiscovery.py, runtime/gpu.py) only knows how to find and bind what a recipe names.
Here: reading a recipe, and the pure parsers discovery and the SPANK hooks share (the loader
cache's ``ldconfig -p`` lines, Slurm's GPU lists, siteEnv values).  Nothing here touches the node.
"""

from __future__ import annotations

import json
import os
import re
import stat

from shifter.errors import ShifterError
from shifter.record import Record

RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
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


def site_env_values(site_env: list[str]) -> dict[str, str]:
    """udiRoot.conf's ``siteEnv`` settings as a dict (the last one of a name wins, as in the container)."""
    return dict(item.split("=", 1) for item in site_env if "=" in item)


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
