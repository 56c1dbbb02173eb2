"""Where a pull's time goes: each stage of ``build_image`` alone, and the stages together.

- ``alone``: download + digest (the blob cache, cold), sha256 of the blobs by itself, the
  gzip inflater alone, the merge into a tar file (inflaters included), tar2sqfs from that
  file, and publishing the squashfs into an imageDir on disk, from tmpfs (copy + fsync +
  rename) and from the same filesystem (fsync + link);
- ``together``: one cold ``build_image`` with a timeline: when each download ended, when
  the merge wrote its last byte to tar2sqfs, when tar2sqfs exited; CPU of the gateway's own
  process and of its tools (inflaters, tar2sqfs) over the whole build.

Wall is elapsed seconds; CPU is user + system seconds (``self``: this process; ``tools``:
the children it waited for).  Usage:
``python bench/stages.py 127.0.0.1:5000 demo/debian bookworm [--runs N] [--workdir D]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pull import _scratch, _spec  # noqa: E402
from gateway import blobcache, convert, pipeline  # noqa: E402
from gateway.flatten import flatten  # noqa: E402
from gateway.inflate import _inflater  # noqa: E402
from gateway.publish import PublishTarget, publish_files  # noqa: E402
from gateway.tarread import Layer  # noqa: E402


def _cpu() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


@contextmanager
def _stage(out: dict, name: str) -> Iterator[None]:
    started, (me, kids) = time.perf_counter(), _cpu()
    yield
    me2, kids2 = _cpu()
    out[name] = {"wall": time.perf_counter() - started, "self": me2 - me, "tools": kids2 - kids}


def _merge_to_file(layers: list[Layer], path: str, scratch: str) -> None:
    """The merge writing into a pipe (so that file bodies are spliced, as into tar2sqfs),
    which a thread splices on into ``path``."""
    rfd, wfd = os.pipe()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def drain() -> None:
        while os.splice(rfd, fd, 1 << 20):
            pass

    thread = threading.Thread(target=drain)
    thread.start()
    try:
        flatten(layers, wfd, 1 << 40, scratch=scratch)
    finally:
        os.close(wfd)
        thread.join()
        os.close(rfd)
        os.close(fd)


def alone(registry_addr: str, repo: str, tag: str, scratch: str, image_dir: str) -> dict:
    """Each stage by itself, in pipeline order, on the same blobs."""
    spec = _spec(registry_addr, repo, tag, scratch)
    shutil.rmtree(spec.cache_dir, ignore_errors=True)
    resolved = pipeline.resolve(spec)
    out: dict = {}
    cache, client = blobcache.BlobCache(spec.cache_dir), pipeline._client(spec)
    with _stage(out, "download + digest (one at a time)"):
        blobs = [cache.fetch(client, d["digest"], d["size"], lambda _: None) for d in resolved.layers]
    import hashlib
    with _stage(out, "sha256 of the blobs alone"):
        for blob in blobs:
            with open(blob, "rb") as fh:
                hashlib.file_digest(fh, "sha256")
    with _stage(out, f"inflate alone ({os.path.basename(_inflater())} -dc)"):
        for blob in blobs:
            subprocess.run([_inflater(), "-dc", blob], stdout=subprocess.DEVNULL, check=True)
    merged = os.path.join(scratch, "merged.tar")
    layers = [Layer(blob, n) for n, blob in enumerate(blobs, 1)]
    with _stage(out, "merge + inflate (into a pipe, as to tar2sqfs)"):
        _merge_to_file(layers, merged, scratch)
    squashfs = os.path.join(scratch, "out.squashfs")
    with _stage(out, "tar2sqfs alone (from that file)"), open(merged, "rb") as src:
        subprocess.run(convert.tar2sqfs_command(squashfs, None), stdin=src, stdout=subprocess.DEVNULL,
                       check=True)
    out["tar bytes"], out["squashfs bytes"] = os.path.getsize(merged), os.path.getsize(squashfs)
    os.unlink(merged)
    image_id, meta = "0" * 64, pipeline.image_meta(resolved.config)
    with _stage(out, "publish from tmpfs into an imageDir on disk (copy)"):
        publish_files(squashfs, image_id, meta, PublishTarget(image_dir))
    for name in os.listdir(image_dir):
        os.unlink(os.path.join(image_dir, name))
    # as tar2sqfs leaves it in an ExpandDirectory beside the imageDir: written, not yet synced
    beside = os.path.join(os.path.dirname(image_dir), f"expand-{os.getpid()}.squashfs")
    shutil.copyfile(squashfs, beside)
    os.unlink(squashfs)
    with _stage(out, "publish from the same filesystem (link)"):
        publish_files(beside, image_id, meta, PublishTarget(image_dir))
    os.unlink(beside)
    for name in os.listdir(image_dir):
        os.unlink(os.path.join(image_dir, name))
    return out


def together(registry_addr: str, repo: str, tag: str, scratch: str) -> dict:
    """One cold ``resolve`` + ``build_image`` with the moments each stage ended."""
    spec = _spec(registry_addr, repo, tag, scratch)
    shutil.rmtree(spec.cache_dir, ignore_errors=True)
    marks: dict[str, float] = {}
    fetch, squash_flatten = blobcache.BlobCache.fetch, convert.flatten
    started = time.perf_counter()

    def mark(name: str) -> None:
        marks.setdefault(name, time.perf_counter() - started)

    def timed_fetch(self: blobcache.BlobCache, *args: object, **kwargs: object) -> str:
        path = fetch(self, *args, **kwargs)  # type: ignore[arg-type]
        mark(f"download {len([k for k in marks if k.startswith('download')]) + 1} done")
        return path

    def timed_flatten(*args: object, **kwargs: object) -> object:
        mark("merge starts")
        try:
            return squash_flatten(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            mark("merge wrote its last byte")

    blobcache.BlobCache.fetch, convert.flatten = timed_fetch, timed_flatten  # type: ignore[method-assign]
    try:
        me, kids = _cpu()
        resolved = pipeline.resolve(spec)
        mark("resolved")
        built = pipeline.build_image(spec, resolved, lambda *_: None)
        mark("tar2sqfs exited (build_image returned)")
        me2, kids2 = _cpu()
    finally:
        blobcache.BlobCache.fetch, convert.flatten = fetch, squash_flatten  # type: ignore[method-assign]
    os.unlink(built.squashfs_path)
    return {"marks": dict(sorted(marks.items(), key=lambda kv: kv[1])), "cpu self": me2 - me,
            "cpu tools": kids2 - kids, "wall": marks["tar2sqfs exited (build_image returned)"]}


def _median(runs: list[dict], key: Callable[[dict], float]) -> float:
    return round(statistics.median(key(r) for r in runs), 3)


def profile(registry_addr: str, repo: str, tag: str, workdir: str, runs: int = 3) -> dict:
    """Medians over ``runs`` of the stages alone and of the timeline."""
    scratch = _scratch(workdir, 8 << 30)
    image_dir = tempfile.mkdtemp(prefix="imagedir-", dir=workdir)  # on disk, as in production
    try:
        alones, timelines = [], []
        for _ in range(runs):
            alones.append(alone(registry_addr, repo, tag, scratch, image_dir))
            timelines.append(together(registry_addr, repo, tag, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(image_dir, ignore_errors=True)
    stage_names = [k for k in alones[0] if isinstance(alones[0][k], dict)]
    return {
        "image": f"{repo}:{tag}", "runs": runs, "load average": os.getloadavg(),
        "alone": {k: {f: _median(alones, lambda r, k=k, f=f: r[k][f]) for f in ("wall", "self", "tools")}
                  for k in stage_names},
        "sizes": {k: alones[0][k] for k in ("tar bytes", "squashfs bytes")},
        "together": {"marks": {k: _median(timelines, lambda r, k=k: r["marks"].get(k, float("nan")))
                               for k in timelines[0]["marks"]},
                     "cpu self": _median(timelines, lambda r: r["cpu self"]),
                     "cpu tools": _median(timelines, lambda r: r["cpu tools"]),
                     "wall": _median(timelines, lambda r: r["wall"])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("registry")
    parser.add_argument("repo")
    parser.add_argument("tag")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    print(json.dumps(profile(args.registry, args.repo, args.tag, args.workdir, args.runs), indent=2))


if __name__ == "__main__":
    main()
