"""Entry points the gateway's workers call: resolve, build_image, publish, remove_published.

``resolve`` is cheap (manifests and the small config blob, which is cached by digest) so
a re-pull of an unchanged tag can be recognised by its id without downloading layers.
``build_image`` downloads the missing blobs (3 at a time, top layer first, each verified
while it streams) and flattens and converts them in one streaming pass (``gateway.convert``)
that starts as soon as the top layer is verified, while the lower ones still arrive.
Every failure is a ShifterError whose message names the problem.  A pull has one deadline
(``PullDeadline``, ``gateway.bounds``) that every step checks; a full filesystem is reported
as "no space left on <dir> while <step>"; the layers' declared sizes are checked against
``MaxImageBytes`` before anything is downloaded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field

from gateway.blobcache import BlobCache
from gateway.bounds import Deadline
from gateway.convert import squash_layers
from gateway.oci import INDEX_TYPES, check_reference, select_platform
from gateway.publish import PublishTarget, publish_files, remove_files
from gateway.registry import RegistryClient
from gateway.tarread import Layer
from shifter.errors import ShifterError
from shifter.formats.meta import ImageMeta, format_meta

__all__ = ["Location", "PullSpec", "ResolvedImage", "BuiltImage", "PublishTarget",
           "resolve", "build_image", "publish", "remove_published", "image_meta"]

_PARALLEL_DOWNLOADS = 3
_MAX_CONFIG = 16 << 20
_LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
)


@dataclass
class Location:
    """One entry of imagemanager.json "Locations" (or the default location)."""

    url: str
    auth_method: str = "token"
    cacert: str | None = None


@dataclass
class PullSpec:
    """Everything a worker needs to pull one image."""

    location: Location
    repository: str
    reference: str
    credentials: tuple[str, str] | None
    cache_dir: str
    expand_dir: str
    platform: tuple[str, str, str | None] = ("linux", "amd64", None)
    converter_options: list[str] | None = None
    max_image_bytes: int = 64 << 30
    pull_deadline: float = 3600.0
    max_image_paths: int = 4_000_000
    started: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> Deadline:
        return Deadline(self.pull_deadline, self.started)


@dataclass
class ResolvedImage:
    image_id: str          # hex of the platform manifest digest
    manifest_digest: str
    private: bool          # the registry required credentials
    config: dict
    layers: list[dict]


@dataclass
class BuiltImage:
    squashfs_path: str     # a temporary file under expand_dir; the caller removes it
    meta: ImageMeta


def _client(spec: PullSpec) -> RegistryClient:
    check_reference(spec.repository, spec.reference)
    loc = spec.location
    return RegistryClient(loc.url, spec.repository, spec.credentials, loc.cacert, loc.auth_method)


def _check_layers(manifest: dict) -> list[dict]:
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ShifterError("image manifest lists no layers")
    for number, desc in enumerate(layers, 1):
        if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str) \
                or not isinstance(desc.get("size"), int) or desc["size"] < 0:
            raise ShifterError(f"layer {number}: invalid descriptor in the manifest")
        media = desc.get("mediaType", _LAYER_TYPES[1])
        if media not in _LAYER_TYPES:
            raise ShifterError(f"layer {number}: unsupported media type {media!r}")
        if desc.get("urls"):
            raise ShifterError(f"layer {number}: foreign (non-distributable) layers are not supported")
    return layers


def _resolve(spec: PullSpec, client: RegistryClient) -> ResolvedImage:
    cache = BlobCache(spec.cache_dir)
    digest, media_type, doc = client.manifest(spec.reference)
    if media_type in INDEX_TYPES:
        entry = select_platform(doc, spec.platform)
        digest, media_type, doc = client.manifest(str(entry.get("digest", "")))
        if media_type in INDEX_TYPES:
            raise ShifterError("nested image indexes are not supported")
    layers = _check_layers(doc)
    config_desc = doc.get("config")
    if not isinstance(config_desc, dict) or not isinstance(config_desc.get("digest"), str):
        raise ShifterError("image manifest has no config")
    config_digest = config_desc["digest"]
    path = cache.path(config_digest)
    if cache.has(config_digest, config_desc.get("size")):
        with open(path, "rb") as handle:
            data = handle.read(_MAX_CONFIG + 1)
    else:
        data = client.blob_bytes(config_digest, _MAX_CONFIG)
        _store(cache.dir, path, data)
    try:
        config = json.loads(data)
    except ValueError:
        raise ShifterError("image config is not valid JSON") from None
    if not isinstance(config, dict):
        raise ShifterError("image config is not a JSON object")
    return ResolvedImage(digest[len("sha256:"):], digest, client.private, config, layers)


def _store(directory: str, path: str, data: bytes) -> None:
    fd, partial = tempfile.mkstemp(prefix=".config.partial-", dir=directory)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(partial, 0o600)  # gateway-only, like the blobs
    os.rename(partial, path)


def resolve(spec: PullSpec) -> ResolvedImage:
    """The platform manifest's digest (the image id), config and layers; no layer download."""
    with _disk_full(spec.cache_dir, "storing the image config"):
        resolved = _resolve(spec, _client(spec))
    spec.deadline.check("resolving the tag")
    return resolved


@contextlib.contextmanager
def _disk_full(directory: str, step: str) -> Iterator[None]:
    """ENOSPC/EDQUOT as one line naming the directory and the step."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ShifterError(f"no space left on {directory} while {step}") from None


def _check_declared_size(layers: list[dict], limit: int) -> None:
    """Refuse before downloading: compressed layers larger than the limit on the whole
    image can only fill the cache for an image that would be refused anyway."""
    total = sum(desc["size"] for desc in layers)
    if total > limit:
        raise ShifterError(f"image layers declare {total} bytes, more than the size limit of"
                           f" {limit} bytes (MaxImageBytes)")


def image_meta(config: dict) -> ImageMeta:
    """.meta fields from an image config (Entrypoint, Cmd, WorkingDir, Env)."""
    inner = config.get("config") or {}
    if not isinstance(inner, dict):
        raise ShifterError("image config: 'config' is not an object")

    def argv(key: str) -> list[str] | None:
        value = inner.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ShifterError(f"image config: {key} is not a list of strings")
        return list(value) or None

    env = inner.get("Env") or []
    if not isinstance(env, list) or not all(isinstance(v, str) for v in env):
        raise ShifterError("image config: Env is not a list of strings")
    workdir = inner.get("WorkingDir") or None
    if workdir is not None and not isinstance(workdir, str):
        raise ShifterError("image config: WorkingDir is not a string")
    meta = ImageMeta(entrypoint=argv("Entrypoint"), cmd=argv("Cmd"), workdir=workdir, env=list(env))
    try:  # the .meta writer's checks, before any layer is downloaded
        format_meta(meta)
    except ShifterError as err:
        raise ShifterError(f"image config: {err}") from None
    return meta


class _Progress:
    """Byte and layer counters shared by the download threads; reported from the caller's thread."""

    def __init__(self, layers: list[dict], report: Callable[[str, dict], None]) -> None:
        self.report = report
        self.lock = threading.Lock()
        self.info = {"layers": len(layers), "layers_done": 0, "bytes": 0,
                     "bytes_total": sum(d["size"] for d in layers)}

    def add_bytes(self, n: int) -> None:
        with self.lock:
            self.info["bytes"] += n

    def layer_done(self, size: int, downloaded: bool) -> None:
        with self.lock:
            self.info["layers_done"] += 1
            if not downloaded:
                self.info["bytes"] += size

    def send(self, phase: str) -> None:
        with self.lock:
            info = dict(self.info)
        self.report(phase, info)


def _chain(done: Future[str], into: Future[str]) -> None:
    """Copy a finished download's outcome into the future the merge waits on."""
    if into.done():
        return
    if done.cancelled():
        into.cancel()
    elif done.exception() is not None:
        into.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        into.set_result(done.result())


class _Downloads:
    """The missing blobs, fetched in parallel (top layer first) while the conversion runs.

    The merge reads layers top-down, so it starts as soon as the top layer is verified
    while the lower ones still arrive; each layer's ``ready`` (``tarread.Layer``) waits for
    its own download and raises its failure.  The deadline is checked on every chunk
    received (a download that trickles stops within a chunk's time) and by the waiting
    thread twice a second, which gives up without waiting for a stuck download (its thread
    ends with its connection).
    """

    def __init__(self, spec: PullSpec, client: RegistryClient, layers: list[dict],
                 progress: _Progress) -> None:
        self.cache = BlobCache(spec.cache_dir)
        self.deadline = spec.deadline
        self.client = client
        self.progress = progress
        self.pool = ThreadPoolExecutor(max_workers=_PARALLEL_DOWNLOADS)
        self.paths = {number: self.cache.path(desc["digest"]) for number, desc in enumerate(layers, 1)}
        # the top layer alone first, at the full speed of one connection: the merge starts on
        # it; the lower ones follow in parallel while it is converted
        top = len(layers)
        self.futures: dict[int, Future[str]] = {top: self.pool.submit(self._one, layers[-1])}
        self.lower: dict[int, Future[str]] = {number: Future() for number in range(1, top)}
        self.futures.update(self.lower)
        self.futures[top].add_done_callback(lambda _: self._start_lower(layers))

    def _start_lower(self, layers: list[dict]) -> None:
        for number, future in self.lower.items():
            with contextlib.suppress(RuntimeError):  # the pool was shut down: the pull failed
                self.pool.submit(self._one, layers[number - 1]).add_done_callback(
                    lambda done, into=future: _chain(done, into))

    def _one(self, desc: dict) -> str:
        digest = desc["digest"]

        def received(n: int) -> None:
            self.progress.add_bytes(n)
            self.deadline.check(f"downloading layer {digest[:19]}")

        cached = self.cache.has(digest, desc["size"])
        with _disk_full(self.cache.dir, f"downloading layer {digest[:19]}"):
            path = self.cache.fetch(self.client, digest, desc["size"], received)
        self.progress.layer_done(desc["size"], downloaded=not cached)
        return path

    def ready(self, number: int) -> Callable[[float], bool]:
        future = self.futures[number]

        def wait_for(timeout: float) -> bool:
            try:
                future.result(timeout)  # raises the download's failure
            except FuturesTimeout:
                return False
            return True
        return wait_for

    def layers(self) -> list[Layer]:
        return [Layer(self.paths[number], number, self.ready(number)) for number in sorted(self.futures)]

    def wait_top(self) -> None:
        """Report download progress until the top layer is verified (the merge's first need)."""
        top = self.ready(max(self.futures))
        while not top(0.5):
            self.progress.send("PULLING")
            self.deadline.check("downloading layers")

    def all_done(self) -> bool:
        return all(future.done() for future in self.futures.values())

    def finish(self) -> None:
        """Every download done (each layer was awaited by the merge; this re-raises nothing new)."""
        for future in self.futures.values():
            future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def build_image(spec: PullSpec, resolved: ResolvedImage,
                progress: Callable[[str, dict], None]) -> BuiltImage:
    """Download, verify, flatten and convert; the squashfs is a temporary file in expand_dir."""
    meta = image_meta(resolved.config)
    client = _client(spec)
    layers = _check_layers({"layers": resolved.layers})
    _check_declared_size(layers, spec.max_image_bytes)
    counters = _Progress(layers, progress)
    counters.send("PULLING")
    downloads = _Downloads(spec, client, layers, counters)
    try:
        return _convert(spec, resolved, meta, layers, downloads, progress)
    finally:
        downloads.close()


def _convert(spec: PullSpec, resolved: ResolvedImage, meta: ImageMeta, layers: list[dict],
             downloads: _Downloads, progress: Callable[[str, dict], None]) -> BuiltImage:
    """Flatten and convert while the lower layers still download (``_Downloads``)."""
    downloads.wait_top()
    os.makedirs(spec.expand_dir, exist_ok=True)
    fd, output = tempfile.mkstemp(prefix=f"{resolved.image_id[:16]}-", suffix=".squashfs",
                                  dir=spec.expand_dir)
    os.close(fd)
    # conversion progress counts compressed layer bytes, converted top layer first; while
    # lower layers still download, the download counters are reported (PULLING) instead
    conversion = {"layers": len(layers), "layers_done": 0, "bytes": 0,
                  "bytes_total": sum(d["size"] for d in layers)}
    pulling = [True]

    def report() -> None:
        if pulling[0]:
            downloads.progress.send("PULLING")
            if not downloads.all_done():
                return
            pulling[0] = False  # the last PULLING report above counted every layer
        progress("CONVERSION", dict(conversion))

    def layer_done(layer: Layer) -> None:
        conversion["layers_done"] += 1
        conversion["bytes"] += layers[layer.number - 1]["size"]
        report()

    report()
    try:
        with _disk_full(spec.expand_dir, "converting"):
            squash_layers(downloads.layers(), output, spec.converter_options, spec.max_image_bytes,
                          layer_done, spec.deadline, spec.max_image_paths)
        downloads.finish()
        if pulling[0]:
            report()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(output)
        raise
    if downloads.client.private:  # a blob needed the credentials
        resolved.private = True
    return BuiltImage(output, meta)


def publish(built: BuiltImage, image_id: str, meta: ImageMeta, target: PublishTarget) -> None:
    """Atomically place ``<id>.squashfs`` and then ``<id>.meta`` into the target's imageDir."""
    publish_files(built.squashfs_path, image_id, meta, target)


def remove_published(image_id: str, target: PublishTarget) -> None:
    """Remove a published image (``.meta`` first); missing files are not an error."""
    remove_files(image_id, target)


def layers_need_credentials(spec: PullSpec, resolved: ResolvedImage) -> bool:
    """Ask the registry for every layer (the answer's headers only): did any need credentials?

    For layers that are already cached from a private pull: the cache alone never proves
    that a registry serves them to anyone.
    """
    client = _client(spec)
    for desc in _check_layers({"layers": resolved.layers}):
        resp = client.get(f"blobs/{desc['digest']}")
        try:
            if resp.status != 200:
                raise ShifterError(f"registry: layer {desc['digest'][7:19]} answered {resp.status}")
        finally:
            resp.close()
    return client.private
