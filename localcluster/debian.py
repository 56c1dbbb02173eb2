"""demo/debian:bookworm: a debootstrap minbase rootfs, built once, cached, split into 3 layers.

debootstrap runs only when the cached rootfs tarball is missing (it takes minutes and needs
the Debian mirror).  The tarball is then cut into three layers of similar size, the way
real images grow: /usr's programs and libraries, then /usr/share and /etc, then /var and
everything else.  /dev is kept empty, like the images registries serve (the gateway must
still cope with device nodes: that is a hostile-input test).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .cleanup import mounts_under
from .images import TestImage
from .layers import Layer, OciLayout
from .settings import IMAGE_CACHE_DIR

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
ROOTFS_TAR = IMAGE_CACHE_DIR / f"debian-{SUITE}-minbase.tar"
# Path prefix -> layer (the longest matching prefix wins; everything else goes to layer 2):
# programs and libraries, then shared data and /etc, then /var and the rest, ~70 MB each.
LAYER_OF = {"usr": 0, "usr/share": 1, "etc": 1, "var": 2}


def cache_exists() -> bool:
    return ROOTFS_TAR.exists()


def _unmount_below(root: Path) -> None:
    for _, point in sorted(mounts_under(root), key=lambda m: -len(m[1])):
        subprocess.run(["umount", "-l", point], capture_output=True)


def build_rootfs_tarball() -> Path:
    """Run debootstrap once and keep the result as a plain tar (numeric owners, xattrs dropped)."""
    if ROOTFS_TAR.exists():
        return ROOTFS_TAR
    IMAGE_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    work = IMAGE_CACHE_DIR / "debootstrap.work"
    _unmount_below(work)
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    print(f"debian: debootstrap --variant=minbase {SUITE} (once; cached in {ROOTFS_TAR})",
          file=sys.stderr, flush=True)
    try:
        result = subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(work), MIRROR],
                                capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
            raise RuntimeError(f"debootstrap failed with status {result.returncode}:\n{tail}")
        tmp = ROOTFS_TAR.with_suffix(".tar.tmp")
        subprocess.run(["tar", "-C", str(work), "--numeric-owner", "--sort=name", "-cf", str(tmp), "."],
                       check=True)
        os.replace(tmp, ROOTFS_TAR)
    finally:
        _unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)
    print(f"debian: rootfs built in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return ROOTFS_TAR


def _layer_index(name: str) -> int | None:
    """Which layer a rootfs entry belongs to; None for device nodes and the like under /dev."""
    path = name.removeprefix("./").strip("/")
    if not path:
        return None  # the root itself
    parts = path.split("/")
    if parts[0] == "dev" and path != "dev":
        return None
    for depth in range(len(parts), 0, -1):
        layer = LAYER_OF.get("/".join(parts[:depth]))
        if layer is not None:
            return layer
    return 2


def build_debian(layout: OciLayout) -> tuple[list[Layer], dict[str, Any], list[str]]:
    rootfs = build_rootfs_tarball()
    layers: list[Layer] = []
    with tarfile.open(rootfs, "r:") as source, ExitStack() as stack:
        writers = [stack.enter_context(layout.layer(layers)) for _ in range(3)]
        placed: dict[str, int] = {}
        for member in source:
            index = _layer_index(member.name)
            if index is None:
                continue
            member.name = member.name.removeprefix("./")
            placed[member.name] = index
            target = member.linkname.removeprefix("./") if member.islnk() else None
            if target is not None and placed.get(target) != index:
                # A hard link cannot reach into another layer: store the content instead.
                data = source.extractfile(member)
                member.type, member.linkname = tarfile.REGTYPE, ""
                member.size = source.getmember("./" + target).size
                writers[index].copy_member(member, data)
            elif member.isreg():
                writers[index].copy_member(member, source.extractfile(member))
            else:
                if target is not None:
                    member.linkname = target
                writers[index].copy_member(member, None)
    # layout.layer appends in exit order (last writer first): restore /usr, /etc+/var, rest.
    layers.reverse()
    config = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
              "Cmd": ["/bin/bash"]}
    return layers, config, ["debootstrap minbase: /usr without /usr/share",
                            "debootstrap minbase: /usr/share and /etc",
                            "debootstrap minbase: /var and the rest"]


def _debian_inputs() -> str:
    stat = ROOTFS_TAR.stat() if ROOTFS_TAR.exists() else None
    return hashlib.sha256(f"{SUITE} split2 {stat.st_size if stat else 0} {stat.st_mtime if stat else 0}"
                          .encode()).hexdigest()


DEBIAN_IMAGE = TestImage("demo/debian", SUITE, build_debian, _debian_inputs)
