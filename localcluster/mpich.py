"""demo/mpich:latest: the Debian image plus Debian's MPICH and a small MPI test program.

The base layers are those of demo/debian:bookworm (hard-linked from its cached layout, so
the registry and the gateway share them).  One more layer holds what ``apt-get install mpich``
would add to that image, taken from the host, which runs the same Debian release: the files
``dpkg -L`` lists for ``mpich`` and ``libmpich12`` and every dependency the base image does
not already have, the image's dpkg status extended with their entries, and ``/opt/mpi_ring``
(tests/data/mpi_ring.c compiled on the host with ``mpicc``).  No mirror is needed.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from . import images
from .debian import DEBIAN_IMAGE, build_rootfs_tarball
from .layers import Layer, LayerWriter, OciLayout

MPI_PACKAGES = ("mpich", "libmpich12")
MPI_PROGRAM_SOURCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "mpi_ring.c"
MPI_PROGRAM = "opt/mpi_ring"
HOST_DPKG = Path("/var/lib/dpkg")
# Documentation is not needed to run anything; leaving it out keeps the layer small.
SKIPPED_PREFIXES = ("usr/share/doc/", "usr/share/man/", "usr/share/info/", "usr/share/lintian/")
RECIPE = "mpich-1"


def parse_dpkg_status(text: str) -> dict[str, str]:
    """Installed packages of a dpkg status file: name -> its stanza (text, no trailing blank line)."""
    packages = {}
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^([\w-]+): ?(.*)$", stanza, re.MULTILINE))
        if fields.get("Package") and fields.get("Status", "").endswith(" installed"):
            packages.setdefault(fields["Package"], stanza.strip("\n"))
    return packages


def _depends(stanza: str) -> list[list[str]]:
    """The Pre-Depends and Depends of a stanza as alternatives: [["hwloc-nox", "hwloc"], ...]."""
    groups = []
    for field in ("Pre-Depends", "Depends"):
        match = re.search(rf"^{field}: (.*)$", stanza, re.MULTILINE)
        for clause in (match.group(1).split(",") if match else []):
            groups.append([re.sub(r"[\s(:].*", "", alt.strip()) for alt in clause.split("|")])
    return groups


def package_closure(roots: tuple[str, ...], host: dict[str, str], base: set[str]) -> list[str]:
    """The installed host packages `roots` need, transitively, that the base image lacks."""
    needed: list[str] = []
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in needed or name in base:
            continue
        if name not in host:
            raise RuntimeError(f"package {name} is not installed on the host: apt-get install mpich")
        needed.append(name)
        for alternatives in _depends(host[name]):
            if not any(alt in base or alt in needed for alt in alternatives):
                todo.append(next((alt for alt in alternatives if alt in host), alternatives[0]))
    return sorted(needed)


def _host_list_file(package: str) -> Path:
    for name in (f"{package}.list", f"{package}:amd64.list"):
        if (HOST_DPKG / "info" / name).exists():
            return HOST_DPKG / "info" / name
    raise RuntimeError(f"no dpkg file list for {package} on the host")


class _BaseTree:
    """What the base rootfs holds: its names, its symlinks and its dpkg status."""

    def __init__(self, rootfs: Path) -> None:
        self.names: set[str] = set()
        self.symlinks: dict[str, str] = {}
        self.status = ""
        with tarfile.open(rootfs, "r:") as tar:
            for member in tar:
                name = member.name.removeprefix("./").strip("/")
                self.names.add(name)
                if member.issym():
                    self.symlinks[name] = member.linkname
                elif name == "var/lib/dpkg/status":
                    data = tar.extractfile(member)
                    self.status = data.read().decode() if data else ""

    def canonical(self, path: str) -> str:
        """`path` with the base image's directory symlinks (bin -> usr/bin, ...) resolved, so an
        upper layer never writes through a symlink of a lower one."""
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            link = self.symlinks.get("/".join(parts[:depth]))
            if link is not None and not link.startswith("/"):
                parent = "/".join(parts[:depth - 1])
                resolved = f"{parent}/{link}" if parent else link
                return self.canonical("/".join([resolved, *parts[depth:]]))
        return "/".join(parts)


def _add_package_files(layer: LayerWriter, package: str, base: _BaseTree, written: set[str]) -> None:
    for line in _host_list_file(package).read_text().splitlines():
        host_path = Path(line)
        name = base.canonical(line)
        if not name or name in written or name.startswith(SKIPPED_PREFIXES) or not host_path.exists():
            continue
        if host_path.is_dir() and not host_path.is_symlink() and name in base.names:
            continue  # a directory the base image already has
        written.add(name)
        layer.host_entry(name, host_path)


def _compile_mpi_program(out: Path) -> None:
    result = subprocess.run(["mpicc", "-O2", "-Wall", "-o", str(out), str(MPI_PROGRAM_SOURCE)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"mpicc {MPI_PROGRAM_SOURCE} failed: {result.stderr.strip()}")


def build_mpich(layout: OciLayout) -> tuple[list[Layer], dict[str, Any], list[str]]:
    base_layout = images.build(DEBIAN_IMAGE)
    layers = layout.adopt_layers(base_layout)
    base = _BaseTree(build_rootfs_tarball())
    host = parse_dpkg_status((HOST_DPKG / "status").read_text())
    packages = package_closure(MPI_PACKAGES, host, set(parse_dpkg_status(base.status)))
    with tempfile.TemporaryDirectory() as tmp, layout.layer(layers) as layer:
        program = Path(tmp) / "mpi_ring"
        _compile_mpi_program(program)
        written: set[str] = set()
        for package in packages:
            _add_package_files(layer, package, base, written)
            layer.host_entry(f"var/lib/dpkg/info/{_host_list_file(package).name}", _host_list_file(package))
        status = base.status.rstrip("\n") + "\n\n" + "\n\n".join(host[p] for p in packages) + "\n"
        layer.file("var/lib/dpkg/status", status.encode())
        layer.directory("opt")
        layer.host_entry(MPI_PROGRAM, program)
    config = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
              "Cmd": [f"/{MPI_PROGRAM}"]}
    history = [entry["created_by"] for entry in _history(base_layout)]
    return layers, config, [*history, f"MPICH from the host's packages ({', '.join(packages)}) and "
                                      f"/{MPI_PROGRAM} built with mpicc"]


def _history(layout: OciLayout) -> list[dict[str, Any]]:
    manifest = layout.manifest()
    return json.loads(layout.blob_path(manifest["config"]["digest"]).read_bytes()).get("history", [])


def _mpich_inputs() -> str:
    host = parse_dpkg_status((HOST_DPKG / "status").read_text())
    versions = "".join(host[p] for p in package_closure(MPI_PACKAGES, host, set()))
    digest = hashlib.sha256(f"{RECIPE} {DEBIAN_IMAGE.inputs()} ".encode())
    digest.update(versions.encode())
    digest.update(MPI_PROGRAM_SOURCE.read_bytes())
    return digest.hexdigest()


MPICH_IMAGE = images.TestImage("demo/mpich", "latest", build_mpich, _mpich_inputs)
