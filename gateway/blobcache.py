"""The gateway's blob cache: verified layer blobs shared by concurrent pulls, and its pruning.

Apart from the registry client because it is local disk state with its own rules (a lock
file per blob across threads and gateway processes, a grace period before pruning), used
by the pull pipeline and by housekeeping; only a download goes through the client.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable

from gateway.oci import DIGEST_RE
from gateway.registry import RETRIES, RegistryClient, TransferError
from shifter.errors import ShifterError


class BlobCache:
    """Verified blobs at ``<cache_dir>/blobs/sha256/<hex>``; a per-blob lock file keeps
    concurrent pulls (threads or gateway processes) from downloading one blob twice."""

    def __init__(self, cache_dir: str) -> None:
        self.dir = os.path.join(cache_dir, "blobs", "sha256")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        for directory in (os.path.dirname(self.dir), self.dir):  # also caches made 0755 before
            os.chmod(directory, 0o700)

    def path(self, digest: str) -> str:
        if not DIGEST_RE.fullmatch(digest):
            raise ShifterError(f"unsupported blob digest {digest[:80]!r}")
        return os.path.join(self.dir, digest[7:])

    def has(self, digest: str, size: int | None) -> bool:
        try:
            st = os.stat(self.path(digest))
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def fetch(self, client: RegistryClient, digest: str, size: int, counter: Callable[[int], None]) -> str:
        """The cached path of ``digest``, downloading it unless present."""
        dest = self.path(digest)
        if self.has(digest, size):
            return dest
        with open(os.path.join(self.dir, f".{digest[7:]}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for attempt in range(RETRIES):
                if self.has(digest, size):
                    break
                try:
                    client.download(digest, size, dest, counter)
                except TransferError:
                    if attempt == RETRIES - 1:
                        raise
                    time.sleep(0.5 * 2 ** attempt)
        return dest


def prune_cache(cache_dir: str, keep: set[str], grace_seconds: float = 3600.0) -> list[str]:
    """Remove cached blobs whose digest is not in ``keep``, and leftover partial downloads
    and lock files, once older than ``grace_seconds`` (a pull in progress may be about to
    use a blob it has just fetched).  Returns the digests removed."""
    directory = os.path.join(cache_dir, "blobs", "sha256")
    removed: list[str] = []
    now = time.time()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        digest = f"sha256:{name}"
        is_blob = DIGEST_RE.fullmatch(digest) is not None
        if is_blob and digest in keep:
            continue
        try:
            if now - os.lstat(path).st_mtime < grace_seconds:
                continue
            os.unlink(path)
        except FileNotFoundError:
            continue
        if is_blob:
            removed.append(digest)
    return removed
