"""Write OCI image layers and OCI image layouts (the test-image builder's output format).

A layer is written as a tar stream piped through ``pigz -n`` (deterministic gzip, both
cores), hashed on the way in (the diff_id) and on the way out (the blob digest).  An image
is an OCI layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/...``) that skopeo
or our own pusher can send to a registry.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EPOCH = 1_700_000_000  # fixed mtime: the same recipe always gives the same digests
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class Blob:
    """A content-addressed file: its digest ("sha256:...") and size in bytes."""

    digest: str
    size: int

    def descriptor(self, media_type: str) -> dict[str, Any]:
        return {"mediaType": media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Layer:
    blob: Blob
    diff_id: str


class _HashingPipe(io.RawIOBase):
    """A write-only stream that hashes what passes through on its way to `sink`."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.sink.write(data)
        return len(data)


class LayerWriter:
    """Adds entries to one layer's tar stream (all owned by root unless told otherwise)."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar

    @staticmethod
    def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name.lstrip("/"))
        info.type, info.mode, info.mtime = kind, mode, EPOCH
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    def directory(self, name: str, mode: int = 0o755) -> None:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))

    def host_file(self, name: str, source: Path, mode: int = 0o755) -> None:
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = source.stat().st_size
        with open(source, "rb") as data:
            self.tar.addfile(info, data)

    def symlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.tar.addfile(info)

    def whiteout(self, path: str) -> None:
        """Delete `path` of a lower layer (an empty ``.wh.<name>`` file beside it)."""
        parent, _, base = path.strip("/").rpartition("/")
        self.file(f"{parent}/.wh.{base}" if parent else f".wh.{base}", b"", 0o644)

    def opaque(self, directory: str) -> None:
        """Hide everything lower layers put in `directory` (``.wh..wh..opq``)."""
        self.file(f"{directory.strip('/')}/.wh..wh..opq", b"", 0o644)

    def copy_member(self, member: tarfile.TarInfo, data: Any) -> None:
        self.tar.addfile(member, data)

    def host_entry(self, name: str, source: Path) -> None:
        """Copy a host file, directory or symlink as `name`, keeping its mode, owned by root."""
        info = self.tar.gettarinfo(str(source), name.lstrip("/"))
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = EPOCH
        if info.isreg():
            with open(source, "rb") as data:
                self.tar.addfile(info, data)
        elif info.isdir() or info.issym():
            self.tar.addfile(info)
        else:
            raise ValueError(f"{source}: only files, directories and symlinks go into a test layer")


class OciLayout:
    """An OCI image layout directory holding one tagged image."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.split(":", 1)[1]

    def _store(self, tmp: Path) -> Blob:
        sha = hashlib.sha256()
        with open(tmp, "rb") as data:
            while chunk := data.read(1 << 20):
                sha.update(chunk)
        blob = Blob(f"sha256:{sha.hexdigest()}", tmp.stat().st_size)
        tmp.chmod(0o644)
        os.replace(tmp, self.blob_path(blob.digest))
        return blob

    def add_json(self, document: dict[str, Any]) -> Blob:
        self.blobs.mkdir(parents=True, exist_ok=True)
        tmp = self.blobs / ".json.tmp"
        tmp.write_bytes(json.dumps(document, sort_keys=True, separators=(",", ":")).encode())
        return self._store(tmp)

    @contextmanager
    def layer(self, result: list[Layer]) -> Iterator[LayerWriter]:
        """Write one gzip layer; on exit the finished Layer is appended to `result`."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.blobs, prefix=".layer", suffix=".tmp")
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as out:
            pigz = subprocess.Popen(["pigz", "-n", "-6", "-c"], stdin=subprocess.PIPE, stdout=out)
            assert pigz.stdin is not None
            pipe = _HashingPipe(pigz.stdin)
            try:
                with tarfile.open(fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    yield LayerWriter(tar)
            finally:
                pigz.stdin.close()
                if pigz.wait() != 0:
                    raise RuntimeError(f"pigz failed with status {pigz.returncode} writing {tmp}")
        result.append(Layer(self._store(tmp), f"sha256:{pipe.sha.hexdigest()}"))

    def write_image(self, tag: str, layers: list[Layer], config: dict[str, Any],
                    history: list[str]) -> Blob:
        """Write the config, the manifest and index.json; returns the manifest blob."""
        image_config = {
            "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created": "2023-11-14T22:13:20Z", "created_by": step} for step in history],
        }
        config_blob = self.add_json(image_config)
        manifest = self.add_json({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": config_blob.descriptor(OCI_CONFIG),
            "layers": [layer.blob.descriptor(OCI_LAYER_GZIP) for layer in layers],
        })
        index = {"schemaVersion": 2, "manifests": [
            {**manifest.descriptor(OCI_MANIFEST), "annotations": {"org.opencontainers.image.ref.name": tag}}]}
        (self.root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (self.root / "index.json").write_text(json.dumps(index, indent=1))
        return manifest

    def adopt_layers(self, base: OciLayout) -> list[Layer]:
        """The layers of the image in `base`, hard-linked (or copied) into this layout: an image
        built on another one shares its layer blobs, as in a registry."""
        manifest = base.manifest()
        config = json.loads(base.blob_path(manifest["config"]["digest"]).read_bytes())
        self.blobs.mkdir(parents=True, exist_ok=True)
        layers = []
        for descriptor, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
            target = self.blob_path(descriptor["digest"])
            if not target.exists():
                try:
                    os.link(base.blob_path(descriptor["digest"]), target)
                except OSError:
                    shutil.copyfile(base.blob_path(descriptor["digest"]), target)
            layers.append(Layer(Blob(descriptor["digest"], descriptor["size"]), diff_id))
        return layers

    def manifest(self) -> dict[str, Any]:
        index = json.loads((self.root / "index.json").read_text())
        return json.loads(self.blob_path(index["manifests"][0]["digest"]).read_bytes())

    def manifest_digest(self) -> str | None:
        try:
            return json.loads((self.root / "index.json").read_text())["manifests"][0]["digest"]
        except (OSError, ValueError, KeyError, IndexError):
            return None
