"""The cluster's test images: built once into cached OCI layouts, pushed to the local registry.

- ``demo/busybox:latest``: busybox-static with applet links, its own /etc/os-release, and a
  config with Env, Entrypoint, Cmd and WorkingDir.
- ``demo/multilayer:latest``: the busybox layer plus two more; the last deletes a file with a
  whiteout and replaces a directory's content with an opaque whiteout.
- ``demo/debian:bookworm``: a debootstrap minbase rootfs split into 3 layers (see debian.py);
  built only when asked, because debootstrap takes minutes.

Each layout lives under /var/cache/shifter-slurm/images/<name>/ with a stamp of the recipe
that built it; a matching stamp means no rebuild, and a registry that already holds the
manifest digest of the last push means no push (``oci.push_image`` sends the blobs).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .layers import OCI_MANIFEST, Layer, LayerWriter, OciLayout
from .oci import push_image
from .settings import IMAGE_CACHE_DIR, REGISTRY_ADDR

RECIPE_VERSION = "1"
BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh", "ash", "cat", "ls", "id", "env", "true", "false", "sleep", "hostname", "grep", "echo",
    "printf", "pwd", "whoami", "uname", "head", "tail", "wc", "mkdir", "rmdir", "rm", "touch", "test",
    "[", "sed", "awk", "stat", "readlink", "ln", "cp", "mv", "chmod", "date", "find", "xargs", "sort",
    "uniq", "tr", "cut", "dirname", "basename", "which", "kill", "ps", "mount", "umount", "df", "du",
    "tee", "vi",
)
DEMO_OS_RELEASE = (
    'NAME="Shifter Demo BusyBox"\nID=shifter-demo\nVERSION_ID=1\n'
    'PRETTY_NAME="Shifter Demo BusyBox 1"\n'
)
BUSYBOX_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
BUSYBOX_GROUP = "root:x:0:\nnogroup:x:65534:\n"
DEMO_CONFIG = {
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "DEMO_VAR=from-image"],
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo hello from the shifter demo image"],
    "WorkingDir": "/srv/demo",
}


@dataclass(frozen=True)
class TestImage:
    """One test image: where it goes in the registry and how to build its layers."""

    repo: str
    tag: str
    build: Callable[[OciLayout], tuple[list[Layer], dict[str, Any], list[str]]]
    inputs: Callable[[], str]

    @property
    def cache(self) -> Path:
        return IMAGE_CACHE_DIR / "images" / f"{self.repo.replace('/', '_')}_{self.tag}"

    @property
    def reference(self) -> str:
        return f"{REGISTRY_ADDR}/{self.repo}:{self.tag}"


def _busybox_layer(layout: OciLayout, layers: list[Layer]) -> None:
    with layout.layer(layers) as layer:
        for directory in ("bin", "etc", "root", "srv", "srv/demo", "usr", "usr/bin", "var"):
            layer.directory(directory)
        layer.directory("tmp", 0o1777)
        layer.host_file("bin/busybox", BUSYBOX)
        for applet in APPLETS:
            layer.symlink(f"bin/{applet}", "busybox")
        layer.symlink("usr/bin/env", "../../bin/busybox")
        layer.file("etc/os-release", DEMO_OS_RELEASE.encode())
        layer.file("etc/passwd", BUSYBOX_PASSWD.encode())
        layer.file("etc/group", BUSYBOX_GROUP.encode())
        layer.file("srv/demo/README", b"the demo image's working directory\n")


def build_busybox(layout: OciLayout) -> tuple[list[Layer], dict[str, Any], list[str]]:
    layers: list[Layer] = []
    _busybox_layer(layout, layers)
    return layers, dict(DEMO_CONFIG), ["busybox-static with applet links and a demo os-release"]


def _write_multilayer_middle(layer: LayerWriter) -> None:
    for directory in ("data", "opt", "opt/replaced", "opt/replaced/sub"):
        layer.directory(directory)
    layer.file("data/keep.txt", b"kept\n")
    layer.file("data/remove-me.txt", b"this file is deleted by a whiteout in the next layer\n")
    layer.file("opt/replaced/old.txt", b"hidden by an opaque whiteout\n")
    layer.file("opt/replaced/sub/old-deep.txt", b"hidden by an opaque whiteout\n")
    layer.file("etc/layer2", b"2\n")


def _write_multilayer_top(layer: LayerWriter) -> None:
    layer.directory("data")
    layer.whiteout("data/remove-me.txt")
    layer.directory("opt")
    layer.directory("opt/replaced")
    layer.opaque("opt/replaced")
    layer.file("opt/replaced/new.txt", b"from the top layer\n")
    layer.file("etc/layer3", b"3\n")


def build_multilayer(layout: OciLayout) -> tuple[list[Layer], dict[str, Any], list[str]]:
    layers: list[Layer] = []
    _busybox_layer(layout, layers)
    with layout.layer(layers) as layer:
        layer.directory("etc")
        _write_multilayer_middle(layer)
    with layout.layer(layers) as layer:
        layer.directory("etc")
        _write_multilayer_top(layer)
    config = {"Env": ["PATH=/usr/bin:/bin", "LAYERS=3"], "Cmd": ["/bin/sh"], "WorkingDir": "/data"}
    return layers, config, ["busybox base", "files and a directory to be replaced",
                            "whiteout of data/remove-me.txt, opaque whiteout of opt/replaced"]


def _busybox_inputs() -> str:
    return hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()


BUSYBOX_IMAGE = TestImage("demo/busybox", "latest", build_busybox, _busybox_inputs)
MULTILAYER_IMAGE = TestImage("demo/multilayer", "latest", build_multilayer, _busybox_inputs)


def build(image: TestImage) -> OciLayout:
    """The image's cached OCI layout, rebuilt only when its recipe or inputs changed."""
    stamp = f"{RECIPE_VERSION} {image.inputs()}"
    layout = OciLayout(image.cache)
    stamp_file = image.cache / "recipe.stamp"
    if layout.manifest_digest() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return layout
    work = image.cache.with_name(image.cache.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    fresh = OciLayout(work)
    layers, config, history = image.build(fresh)
    fresh.write_image(image.tag, layers, config, history)
    (work / "recipe.stamp").write_text(stamp)
    shutil.rmtree(image.cache, ignore_errors=True)
    work.rename(image.cache)
    return OciLayout(image.cache)


def registry_digest(image: TestImage) -> str | None:
    """The manifest digest the registry holds for the image's tag, or None."""
    request = urllib.request.Request(f"http://{REGISTRY_ADDR}/v2/{image.repo}/manifests/{image.tag}",
                                     method="HEAD", headers={"Accept": OCI_MANIFEST})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.headers.get("Docker-Content-Digest")
    except (OSError, urllib.error.URLError):
        return None


def push(image: TestImage, layout: OciLayout) -> str:
    """Push the cached layout with oci.push_image, unless the registry already holds it."""
    stamp = layout.root / "pushed.digest"
    if stamp.exists() and registry_digest(image) == stamp.read_text().strip():
        return stamp.read_text().strip()
    manifest = layout.manifest()
    config = json.loads(layout.blob_path(manifest["config"]["digest"]).read_bytes())
    layers = [layout.blob_path(layer["digest"]) for layer in manifest["layers"]]
    digest = push_image(f"http://{REGISTRY_ADDR}", image.repo, image.tag, layers, config)
    if registry_digest(image) != digest:
        raise RuntimeError(f"registry does not hold {digest} for {image.reference} after the push")
    stamp.write_text(digest + "\n")
    return digest


def build_and_push(images: list[TestImage]) -> list[str]:
    """Build (cached) and push each image; returns their references."""
    for image in images:
        push(image, build(image))
    return [image.reference for image in images]


def main() -> None:
    """`python -m localcluster.images`: print the manifests of the cached layouts (debug aid)."""
    for image in (BUSYBOX_IMAGE, MULTILAYER_IMAGE):
        print(image.reference, json.dumps(build(image).manifest(), indent=1))


if __name__ == "__main__":
    main()
