"""Build layer tars and push images to an OCI registry, with nothing but the stdlib.

Used by the gateway's tests and the local cluster's image builder: ``push_image`` uploads
blobs (monolithic upload, skipped when the registry has them) and an OCI manifest;
``push_index`` adds a multi-platform index.  The tar helpers build layers with exactly the
entries a test needs, hostile ones included (``..`` names, devices, setuid bits, xattrs).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable

import zstandard

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

Member = tuple[tarfile.TarInfo, bytes]
Layer = bytes | str | os.PathLike


# -- layer tars -----------------------------------------------------------------------


def _info(name: str | bytes, kind: bytes, mode: int) -> tarfile.TarInfo:
    if isinstance(name, bytes):  # non-UTF-8 names travel as surrogate escapes
        name = name.decode("utf-8", "surrogateescape")
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_700_000_000
    return info


def file(name: str | bytes, data: bytes = b"", mode: int = 0o644,
         xattrs: dict[str, str] | None = None) -> Member:
    info = _info(name, tarfile.REGTYPE, mode)
    info.size = len(data)
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return info, data


def directory(name: str | bytes, mode: int = 0o755) -> Member:
    return _info(name, tarfile.DIRTYPE, mode), b""


def symlink(name: str | bytes, target: str) -> Member:
    info = _info(name, tarfile.SYMTYPE, 0o777)
    info.linkname = target
    return info, b""


def hardlink(name: str | bytes, target: str) -> Member:
    info = _info(name, tarfile.LNKTYPE, 0o644)
    info.linkname = target
    return info, b""


def device(name: str, kind: bytes = tarfile.CHRTYPE, major: int = 1, minor: int = 3) -> Member:
    info = _info(name, kind, 0o666)
    info.devmajor, info.devminor = major, minor
    return info, b""


def tar_bytes(members: Iterable[Member]) -> bytes:
    """An uncompressed pax tar of ``members``, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


def zstd_bytes(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


# -- pushing --------------------------------------------------------------------------


def _layer_type(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return LAYER_GZIP
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return LAYER_ZSTD
    return LAYER_TAR


class _Registry:
    def __init__(self, url: str, repo: str, auth: tuple[str, str] | None) -> None:
        self.url = url.rstrip("/")
        self.repo = repo
        self.headers: dict[str, str] = {}
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def request(self, method: str, url: str, data: object = None, headers: dict[str, str] | None = None):
        req = urllib.request.Request(url, data=data, method=method,  # type: ignore[arg-type]
                                     headers={**self.headers, **(headers or {})})
        try:
            return urllib.request.urlopen(req, timeout=600)
        except urllib.error.HTTPError as err:
            if method == "HEAD" and err.code == 404:
                return None
            body = err.read(2000).decode("utf-8", "replace")
            raise RuntimeError(f"{method} {url}: {err.code} {body}") from None

    def push_blob(self, layer: Layer) -> tuple[str, int, bytes]:
        """Upload one blob (bytes or a file path); returns (digest, size, first bytes)."""
        if isinstance(layer, bytes):
            digest = "sha256:" + hashlib.sha256(layer).hexdigest()
            size, head = len(layer), layer[:4]
        else:
            sha = hashlib.sha256()
            with open(layer, "rb") as handle:
                head = handle.read(4)
                handle.seek(0)
                while chunk := handle.read(1 << 20):
                    sha.update(chunk)
            digest, size = "sha256:" + sha.hexdigest(), os.path.getsize(layer)
        exists = self.request("HEAD", f"{self.url}/v2/{self.repo}/blobs/{digest}")
        if exists is not None:
            exists.close()
            return digest, size, head
        with self.request("POST", f"{self.url}/v2/{self.repo}/blobs/uploads/", data=b"") as resp:
            location = urllib.parse.urljoin(self.url + "/", resp.headers["Location"])
        target = location + ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if isinstance(layer, bytes):
            self.request("PUT", target, data=layer, headers=headers).close()
        else:
            with open(layer, "rb") as handle:
                self.request("PUT", target, data=handle, headers=headers).close()
        return digest, size, head

    def push_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        url = f"{self.url}/v2/{self.repo}/manifests/{reference}"
        with self.request("PUT", url, data=body, headers={"Content-Type": media_type}) as resp:
            resp.read()
        return "sha256:" + hashlib.sha256(body).hexdigest()


def push_image(registry_url: str, repo: str, tag: str, layers: list[Layer], config: dict,
               auth: tuple[str, str] | None = None) -> str:
    """Push ``layers`` (bottom first; tar, tar+gzip or tar+zstd bytes, or file paths) and
    ``config`` as an OCI image ``repo:tag``; returns the manifest digest."""
    registry = _Registry(registry_url, repo, auth)
    descriptors = []
    for layer in layers:
        digest, size, head = registry.push_blob(layer)
        descriptors.append({"mediaType": _layer_type(head), "digest": digest, "size": size})
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest, config_size, _ = registry.push_blob(config_bytes)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
                "layers": descriptors}
    return registry.push_manifest(tag, json.dumps(manifest).encode(), OCI_MANIFEST)


def push_index(registry_url: str, repo: str, tag: str, manifests: list[tuple[str, dict]],
               auth: tuple[str, str] | None = None) -> str:
    """Push an OCI index ``repo:tag`` over already pushed manifests given as
    ``(manifest digest, platform dict)``; returns the index digest."""
    registry = _Registry(registry_url, repo, auth)
    entries = []
    for digest, platform in manifests:
        with registry.request("GET", f"{registry.url}/v2/{repo}/manifests/{digest}",
                              headers={"Accept": OCI_MANIFEST}) as resp:
            size = len(resp.read())
        entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size, "platform": platform})
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    return registry.push_manifest(tag, json.dumps(index).encode(), OCI_INDEX)


def image_config(layers: list[bytes], env: list[str] | None = None, cmd: list[str] | None = None,
                 entrypoint: list[str] | None = None, workdir: str | None = None,
                 architecture: str = "amd64") -> dict:
    """A minimal image config; ``layers`` are the *uncompressed* tars (for rootfs.diff_ids)."""
    inner: dict = {"Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    if cmd is not None:
        inner["Cmd"] = cmd
    if entrypoint is not None:
        inner["Entrypoint"] = entrypoint
    if workdir is not None:
        inner["WorkingDir"] = workdir
    return {"architecture": architecture, "os": "linux", "config": inner,
            "rootfs": {"type": "layers",
                       "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]}}


# -- inspecting a built image ----------------------------------------------------------


def read_squashfs(path: str | os.PathLike) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    """Every entry of a squashfs image as ``{name: (TarInfo, data)}``, read with the real
    ``sqfs2tar``; names undecodable as UTF-8 keep their bytes as surrogate escapes."""
    import subprocess

    done = subprocess.run(["sqfs2tar", "-r", ".", os.fspath(path)], capture_output=True, check=True)
    entries: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(done.stdout), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tar:
        for info in tar:
            handle = tar.extractfile(info) if info.isreg() else None
            name = info.name[2:] if info.name.startswith("./") else info.name
            entries[name or "."] = (info, handle.read() if handle else b"")
    return entries
