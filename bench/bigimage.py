"""demo/bench-big:v1, the 1 GB multi-layer image of P3 and P3f, built by the benchmark itself.

The Debian test image is 204 MB of tar in 3 layers; a pipeline that overlaps its stages
well on it can still stall on what that image lacks: files of 100 MB (one layer inflating
for seconds while the merge waits), many small files in one layer, whiteouts that make
the merge skip most of a lower layer's bytes.  This image has them all, in 4 gzip layers
(about 1.04 GB of tar):

1. 16,000 small files (512 B to 48 KiB) in 200 directories, 400 symlinks, 100 hardlinks;
2. 360 files of 256 KiB to 2 MiB in 12 directories;
3. three files of 90-110 MB;
4. whiteouts of 2,000 files of layer 1, an opaque whiteout of one directory of layer 2,
   a whiteout of one big file of layer 3, 100 files of layer 1 replaced, 40 new files.

File contents are slices of a fixed pool of random bytes (like compressed data), 16-letter
"text" (about 2:1) and 4-letter runs (about 4:1), so that zstd and gzip do real work; each
slice starts at its own offset, so no two files share a squashfs block. Built once
(deterministic, seeded) into ``<workdir>/bench-big-v1`` with ``pigz -6``, and pushed to
the registry unless it already holds the tag.

The floor of P3f (``tar -x`` of one layer after the other) does not apply whiteouts, so on
this image it squashes what layer 4 deletes: a floor that does more work than a correct one.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localcluster.oci import push_image  # noqa: E402

REPO, TAG = "demo/bench-big", "v1"
_VERSION = "bench-big-v1"
_POOL = 48 << 20


def _pool(rng: random.Random) -> bytes:
    """Mixed-compressibility bytes: 1 MiB segments of random, 16-letter and 4-letter data."""
    text16 = bytes.maketrans(bytes(range(256)), bytes(b"etaoinshrdlucmfw"[i % 16] for i in range(256)))
    text4 = bytes.maketrans(bytes(range(256)), bytes(b"\0 ab"[i % 4] for i in range(256)))
    parts = []
    for i in range(_POOL >> 20):
        seg = rng.randbytes(1 << 20)
        parts.append(seg if i % 3 == 0 else seg.translate(text16 if i % 3 == 1 else text4))
    return b"".join(parts)


class _Writer:
    """One layer: a tar stream through ``pigz -6`` into ``path``, its diff_id on the way."""

    def __init__(self, path: Path, pool: bytes, rng: random.Random) -> None:
        with open(path, "wb") as out:  # pigz keeps its own copy of the descriptor
            self.proc = subprocess.Popen(["pigz", "-6", "-n", "-T"], stdin=subprocess.PIPE, stdout=out)
        self.hash = hashlib.sha256()
        self.pool, self.rng = pool, rng
        self.tar = tarfile.open(fileobj=self, mode="w|", format=tarfile.GNU_FORMAT)  # noqa: SIM115

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        return len(data)

    def _info(self, name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.mtime = kind, mode, size, 1_700_000_000
        return info

    def directory(self, name: str) -> None:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, 0o755))

    def file(self, name: str, size: int) -> None:
        chunks, left = [], size
        while left:  # 4 MiB slices, each from its own offset: no block repeats
            take = min(left, 4 << 20)
            start = self.rng.randrange(_POOL - take)
            chunks.append(self.pool[start:start + take])
            left -= take
        self.tar.addfile(self._info(name, tarfile.REGTYPE, 0o644, size), io.BytesIO(b"".join(chunks)))

    def link(self, name: str, target: str, kind: bytes) -> None:
        info = self._info(name, kind, 0o777 if kind == tarfile.SYMTYPE else 0o644)
        info.linkname = target
        self.tar.addfile(info)

    def close(self) -> str:
        self.tar.close()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            raise RuntimeError("pigz failed")
        return "sha256:" + self.hash.hexdigest()


def _small_name(i: int) -> str:
    return f"base/d{i % 200:03d}/f{i:05d}.dat"


def build(cache: Path) -> tuple[list[Path], dict]:
    """The four layer blobs (bottom first) and the image config, built once into ``cache``."""
    done = cache / "config.json"
    layers = [cache / f"layer{n}.tar.gz" for n in range(1, 5)]
    if done.exists() and all(p.exists() for p in layers):
        return layers, json.loads(done.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    rng = random.Random(14)
    pool = _pool(rng)
    diff_ids = []
    w = _Writer(layers[0], pool, rng)
    for d in range(200):
        w.directory(f"base/d{d:03d}")
    for i in range(16_000):
        w.file(_small_name(i), min(int(rng.lognormvariate(9.2, 1.0)), 48 << 10) + 512)
    for i in range(400):
        w.link(f"base/d{i % 200:03d}/s{i:04d}", f"f{i:05d}.dat", tarfile.SYMTYPE)
    for i in range(100):
        w.link(f"base/d{i % 200:03d}/h{i:04d}", _small_name(i + 1000), tarfile.LNKTYPE)
    diff_ids.append(w.close())
    w = _Writer(layers[1], pool, rng)
    for d in range(12):
        w.directory(f"lib/m{d:02d}")
        for i in range(30):
            w.file(f"lib/m{d:02d}/lib{i:02d}.so", rng.randrange(256 << 10, 2 << 20))
    diff_ids.append(w.close())
    w = _Writer(layers[2], pool, rng)
    w.directory("data")
    for i in range(3):
        w.file(f"data/big{i}.bin", rng.randrange(90_000_000, 110_000_000))
    diff_ids.append(w.close())
    w = _Writer(layers[3], pool, rng)
    for i in range(2_000):
        d, _, f = _small_name(i * 7 % 16_000).rpartition("/")
        w.file(f"{d}/.wh.{f}", 0)
    w.file("lib/m03/.wh..wh..opq", 0)
    w.file("lib/m03/new.so", 1 << 20)
    w.file("data/.wh.big1.bin", 0)
    for i in range(100):
        w.file(_small_name(i * 13 % 16_000 + 1), rng.randrange(512, 32 << 10))
    for i in range(40):
        w.file(f"app/new{i:02d}.bin", rng.randrange(64 << 10, 1 << 20))
    diff_ids.append(w.close())
    config = {"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/usr/bin:/bin"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    done.write_text(json.dumps(config))
    return layers, config


def _has_tag(registry_url: str) -> bool:
    request = urllib.request.Request(f"{registry_url}/v2/{REPO}/manifests/{TAG}", method="HEAD",
                                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status == 200
    except (OSError, urllib.error.URLError):
        return False


def ensure(registry_url: str, workdir: str) -> tuple[str, str]:
    """Build (once) and push (unless present) the image; returns (repository, tag)."""
    if not _has_tag(registry_url):
        layers, config = build(Path(workdir) / _VERSION)
        push_image(registry_url, REPO, TAG, [str(p) for p in layers], config)
    return REPO, TAG


if __name__ == "__main__":
    url = sys.argv[1] if sys.argv[1].startswith("http") else f"http://{sys.argv[1]}"
    print(ensure(url, sys.argv[2] if len(sys.argv) > 2 else "/tmp"))
