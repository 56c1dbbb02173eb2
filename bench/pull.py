"""P3 and P3f: pull + convert of an image from the local registry, against the original's
pipeline and against the floor, measured in the same run (BENCHMARKS.md).

- ours: ``gateway.pipeline.resolve`` + ``build_image`` with an empty blob cache (download,
  verify, flatten, tar2sqfs zstd-3), exactly what a gateway worker runs;
- original: ``skopeo copy`` to an OCI layout, ``umoci unpack --rootless``,
  ``mksquashfs -all-root -no-xattrs`` with its default gzip (the original's working path);
- floor: decompress and extract the (already downloaded) layers with ``tar`` + ``pigz``/``zstd``,
  then ``mksquashfs`` of the extracted tree with our compressor (zstd level 3).

All scratch space (layouts, unpacked trees, outputs) is on tmpfs when it has room, so the
baselines are not slowed by disk writes; each timing is the median of ``runs`` runs, and the
runs of ours and of the floor alternate (after one warm-up run of ours), so that load from
other work on the machine falls on both.

Both are measured on two images: the Debian test image (the goal's image) and
``demo/bench-big:v1``, a 1 GB, 4-layer image with files from 512 B to 110 MB and whiteouts
that the benchmark builds and pushes itself (``bench/bigimage.py``), under ``"big"``.

Usage: ``python bench/pull.py 127.0.0.1:5000 demo/debian bookworm [--runs N] [--workdir D] [--big]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import pipeline  # noqa: E402


def _url(registry: str) -> str:
    return registry if registry.startswith(("http://", "https://")) else f"http://{registry}"


def _scratch(workdir: str, need: int) -> str:
    """A fresh scratch directory: on /dev/shm when it has room for ``need`` bytes."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > need:
        return tempfile.mkdtemp(prefix="shifter-bench-", dir=shm)
    os.makedirs(workdir, exist_ok=True)
    return tempfile.mkdtemp(prefix="scratch-", dir=workdir)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode()[-500:]}")


def _spec(registry: str, repo: str, tag: str, scratch: str) -> pipeline.PullSpec:
    return pipeline.PullSpec(location=pipeline.Location(_url(registry)), repository=repo, reference=tag,
                             credentials=None, cache_dir=os.path.join(scratch, "cache"),
                             expand_dir=os.path.join(scratch, "expand"))


def run_ours(registry: str, repo: str, tag: str, scratch: str) -> tuple[float, int]:
    """One cold pull + convert; returns (seconds, squashfs bytes)."""
    shutil.rmtree(os.path.join(scratch, "cache"), ignore_errors=True)
    spec = _spec(registry, repo, tag, scratch)
    started = time.perf_counter()
    resolved = pipeline.resolve(spec)
    built = pipeline.build_image(spec, resolved, lambda *_: None)
    elapsed = time.perf_counter() - started
    size = os.path.getsize(built.squashfs_path)
    os.unlink(built.squashfs_path)
    return elapsed, size


def run_original(registry: str, repo: str, tag: str, scratch: str) -> tuple[float, int]:
    layout, bundle, out = (os.path.join(scratch, n) for n in ("oci", "bundle", "original.sqfs"))
    for path in (layout, bundle):
        shutil.rmtree(path, ignore_errors=True)
    host = _url(registry).split("://", 1)[1]
    started = time.perf_counter()
    _run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{host}/{repo}:{tag}", f"oci:{layout}:{tag}"])
    _run(["umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}", bundle])
    _run(["mksquashfs", os.path.join(bundle, "rootfs"), out, "-all-root", "-no-xattrs", "-noappend",
          "-no-progress", "-quiet"])
    elapsed = time.perf_counter() - started
    size = os.path.getsize(out)
    shutil.rmtree(layout)
    shutil.rmtree(bundle)
    os.unlink(out)
    return elapsed, size


def _decompressor(path: str) -> str:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic.startswith(b"\x1f\x8b"):
        return "pigz"
    if magic == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return ""


def run_floor(blobs: list[str], scratch: str) -> tuple[float, float, int]:
    """Extract the layers in order, then squash with zstd-3; returns (extract s, squash s, bytes)."""
    tree, out = os.path.join(scratch, "floor-tree"), os.path.join(scratch, "floor.sqfs")
    shutil.rmtree(tree, ignore_errors=True)
    os.makedirs(tree)
    started = time.perf_counter()
    for blob in blobs:
        tool = _decompressor(blob)
        _run(["tar", "-x", "--no-same-owner", "--no-same-permissions", "-C", tree, "-f", blob,
              *(["-I", tool] if tool else [])])
    extracted = time.perf_counter()
    _run(["mksquashfs", tree, out, "-comp", "zstd", "-Xcompression-level", "3", "-all-root",
          "-no-xattrs", "-noappend", "-no-progress", "-quiet"])
    done = time.perf_counter()
    size = os.path.getsize(out)
    shutil.rmtree(tree)
    os.unlink(out)
    return extracted - started, done - extracted, size


def measure_p3(registry: str, repo: str, tag: str, workdir: str, runs: int = 3,
               original_runs: int = 1) -> dict:
    """The P3 record (ours / original) with the P3f record (ours / floor) under "P3f"."""
    os.makedirs(workdir, exist_ok=True)
    probe_dir = tempfile.mkdtemp(prefix="probe-", dir=workdir)
    try:
        resolved = pipeline.resolve(_spec(registry, repo, tag, probe_dir))
    finally:
        shutil.rmtree(probe_dir)
    compressed = sum(d["size"] for d in resolved.layers)
    scratch = _scratch(workdir, compressed * 12)
    try:
        run_ours(registry, repo, tag, scratch)  # warm-up; it leaves every blob for the floor
        kept = os.path.join(scratch, "floor-blobs")
        os.makedirs(kept)
        blobs = []
        for desc in resolved.layers:
            blobs.append(os.path.join(kept, desc["digest"].split(":")[1]))
            os.rename(os.path.join(scratch, "cache", "blobs", "sha256", os.path.basename(blobs[-1])), blobs[-1])
        ours, floors = [], []
        for _ in range(runs):  # interleaved: a burst of load on this shared machine hits both
            ours.append(run_ours(registry, repo, tag, scratch))
            floors.append(run_floor(blobs, scratch))
        originals = [run_original(registry, repo, tag, scratch) for _ in range(original_runs)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ours_s = statistics.median(t for t, _ in ours)
    floor_s = statistics.median(e + s for e, s, _ in floors)
    original_s = statistics.median(t for t, _ in originals)
    where = "tmpfs" if scratch.startswith("/dev/shm") else workdir
    image = f"{repo}:{tag} ({len(resolved.layers)} layers, {compressed / 1e6:.0f} MB compressed)"
    p3f = {"value": round(ours_s / floor_s, 3), "unit": "ratio", "goal": "<= 0.65", "runs": runs,
           "baseline": f"floor on {image}: extract {statistics.median(e for e, _, _ in floors):.2f} s"
                       f" + mksquashfs zstd-3 {statistics.median(s for _, s, _ in floors):.2f} s"
                       f" = {floor_s:.2f} s median ({where})",
           "measured": f"ours (cold cache: download, verify, flatten, tar2sqfs zstd-3) {ours_s:.2f} s median"}
    return {"value": round(ours_s / original_s, 3), "unit": "ratio", "goal": "<= 0.2", "runs": runs,
            "baseline": f"original pipeline on {image}: skopeo copy + umoci unpack --rootless +"
                        f" mksquashfs gzip {original_s:.2f} s median of {original_runs} ({where})",
            "measured": f"ours {ours_s:.2f} s median of {runs}",
            "sizes": {"layers_compressed": compressed, "ours_squashfs": ours[-1][1],
                      "original_squashfs": originals[-1][1], "floor_squashfs": floors[-1][2]},
            "P3f": p3f}


def measure_p3_big(registry: str, workdir: str, runs: int = 3, original_runs: int = 1) -> dict:
    """P3 and P3f on the 1 GB image, which is built (once, cached in ``workdir``) and pushed here."""
    from bench import bigimage

    repo, tag = bigimage.ensure(_url(registry), workdir)
    return measure_p3(registry, repo, tag, workdir, runs, original_runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("registry")
    parser.add_argument("repo")
    parser.add_argument("tag")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--original-runs", type=int, default=1)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--big", action="store_true", help="also the 1 GB image (built on first use)")
    args = parser.parse_args()
    result = measure_p3(args.registry, args.repo, args.tag, args.workdir, args.runs, args.original_runs)
    if args.big:
        result["big"] = measure_p3_big(args.registry, args.workdir, args.runs, args.original_runs)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
