"""The merge follows a lower layer's inflater through its scratch file (gateway.inflate._Follow).

What must hold: the bytes read are exactly the layer's uncompressed stream, counted once
against the size limit, whether the file was still growing, complete, or its prefetch
failed halfway (the layer then goes on from its blob, and a corrupt blob still reports
the streaming inflater's own error).
"""

from __future__ import annotations

import gzip
import os
import threading
import time
from pathlib import Path

import pytest
import zstandard

from gateway.inflate import _Follow
from gateway.tarread import Budget, Layer, Reader
from gateway.tarwrite import Output
from shifter.errors import ShifterError

DATA = os.urandom(300_000) + bytes(200_000) + os.urandom(100_000)  # splice-sized runs


def _follow(tmp_path: Path, blob: bytes, written: bytes, finished: threading.Event,
            ok: bool) -> tuple[_Follow, Path]:
    blob_path, partial = tmp_path / "blob", tmp_path / "partial.tar"
    blob_path.write_bytes(blob)
    partial.write_bytes(written)
    fd = os.open(partial, os.O_RDONLY)
    return _Follow(fd, str(partial), finished, lambda: ok, Layer(str(blob_path), 2), None), partial


def _copy_through_pipe(reader: Reader, n: int) -> bytes:
    """``reader.copy`` into a pipe (the splice path), drained by a thread."""
    rfd, wfd = os.pipe()
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(rfd, 1 << 16):
            got.extend(chunk)

    thread = threading.Thread(target=drain)
    thread.start()
    try:
        out = Output(wfd)
        reader.copy(n, out)
        out.flush()
    finally:
        os.close(wfd)
        thread.join()
        os.close(rfd)
    return bytes(got)


@pytest.mark.parametrize("compress", [gzip.compress, zstandard.ZstdCompressor().compress],
                         ids=["gzip", "zstd"])
def test_a_failed_prefetch_goes_on_from_the_blob_past_what_was_read(tmp_path: Path, compress) -> None:
    finished = threading.Event()
    finished.set()
    follow, partial = _follow(tmp_path, compress(DATA), DATA[:250_000], finished, ok=False)
    budget = Budget(1 << 30)
    with follow:
        reader = Reader(follow, follow.layer, budget)
        head = reader.read_exact(1000)
        body = _copy_through_pipe(reader, len(DATA) - 1000)
    assert head + body == DATA
    assert budget.used == len(DATA)  # the bytes skipped in the blob are not counted twice
    assert not partial.exists()


def test_a_growing_file_is_read_to_its_end_without_waiting_for_the_whole_layer(tmp_path: Path) -> None:
    finished = threading.Event()
    follow, partial = _follow(tmp_path, gzip.compress(DATA), b"", finished, ok=True)

    def inflater() -> None:
        with open(partial, "ab") as out:
            for start in range(0, len(DATA), 70_000):
                out.write(DATA[start:start + 70_000])
                out.flush()
                time.sleep(0.01)
        finished.set()

    writer = threading.Thread(target=inflater)
    writer.start()
    budget = Budget(1 << 30)
    try:
        with follow:
            reader = Reader(follow, follow.layer, budget)
            assert _copy_through_pipe(reader, len(DATA)) == DATA
            reader.drain()
    finally:
        writer.join()
    assert budget.used == len(DATA) and not follow.fallen_back


def test_a_corrupt_blob_behind_a_failed_prefetch_reports_the_inflaters_error(tmp_path: Path) -> None:
    blob = bytearray(gzip.compress(DATA))
    blob[len(blob) // 2:len(blob) // 2 + 64] = bytes(64)
    finished = threading.Event()
    finished.set()
    follow, _ = _follow(tmp_path, bytes(blob), DATA[:1000], finished, ok=False)
    with pytest.raises(ShifterError, match=r"^layer 2: (gzip decompression failed|truncated tar stream)"), follow:
        reader = Reader(follow, follow.layer, Budget(1 << 30))
        reader.read_exact(len(DATA))


def test_a_stalled_inflater_ends_at_the_deadline(tmp_path: Path) -> None:
    from gateway.bounds import Deadline

    follow, _ = _follow(tmp_path, gzip.compress(DATA), DATA[:1000], threading.Event(), ok=True)
    follow.deadline = Deadline(0.3)
    started = time.monotonic()
    with pytest.raises(ShifterError, match="layer 2"), follow:
        Reader(follow, follow.layer, Budget(1 << 30)).read_exact(len(DATA))
    assert time.monotonic() - started < 2
