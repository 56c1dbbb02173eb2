"""Open a layer blob as its uncompressed tar stream, and inflate lower layers ahead.

gzip is inflated in a separate process (ISA-L's ``igzip``, else ``pigz``, else ``gzip``),
so that it runs on the other core beside the merge; zstd in-process; an uncompressed tar
is read in place.  Every inflater runs under CPU-time and memory limits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

import zstandard

from gateway.bounds import PIGZ_MEMORY, Deadline, limited
from gateway.tarread import _CHUNK, Layer
from gateway.tarwrite import grow_pipe
from shifter.errors import ShifterError

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _inflater() -> str:
    """The gzip inflater: ISA-L's ``igzip`` where installed, else ``pigz``, else ``gzip``.

    igzip inflates the Debian test image's 204 MB in 0.23 s of CPU where pigz needs 0.70 s
    (its helper threads check the CRC and move the data again) and gzip 0.98 s; on two cores
    that CPU comes straight out of tar2sqfs's share.  All three take ``-dc``, verify the
    trailer's CRC and length and exit non-zero on a corrupt or truncated stream.
    """
    return shutil.which("igzip") or shutil.which("pigz") or "gzip"


def _last_line(errors: BinaryIO, status: int) -> str:
    errors.seek(0)
    lines = errors.read(2000).decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {status}"


def _inflater_command(deadline: Deadline | None, *args: str) -> list[str]:
    """The inflater under CPU-time and memory limits: a hostile stream cannot make it spin or grow."""
    return limited([_inflater(), *args], cpu=deadline.remaining() if deadline else None, memory=PIGZ_MEMORY)


@contextmanager
def open_layer(layer: Layer, deadline: Deadline | None = None) -> Iterator[int | BinaryIO]:
    """The layer's uncompressed tar stream; the compression is sniffed from the bytes.

    gzip is inflated by an ``igzip``/``pigz`` process (parallel to our parsing and to tar2sqfs);
    zstd in-process with ``zstandard`` (it inflates at ~1 GB/s, cheaper than a pipe);
    an uncompressed tar is read as is.  The decompressor's exit status is checked.
    """
    with open(layer.path, "rb", buffering=0) as blob:
        magic = os.pread(blob.fileno(), 4, 0)
        if magic.startswith(_GZIP_MAGIC):
            with tempfile.TemporaryFile() as errors:
                proc = subprocess.Popen(_inflater_command(deadline, "-dc"), stdin=blob, stdout=subprocess.PIPE,
                                        stderr=errors, bufsize=0)
                try:
                    assert proc.stdout is not None
                    grow_pipe(proc.stdout.fileno())
                    yield proc.stdout.fileno()
                except BaseException as err:
                    try:  # a corrupt stream ends the inflater first: wait briefly to report its error
                        failed = proc.wait(timeout=0.5 if isinstance(err, ShifterError) else 0)
                    except subprocess.TimeoutExpired:
                        failed = None
                    proc.kill()
                    proc.wait()
                    if failed and isinstance(err, ShifterError):  # the inflater saw corrupt data first
                        raise ShifterError(f"layer {layer.number}: gzip decompression failed"
                                           f" ({_last_line(errors, failed)})") from None
                    raise
                proc.stdout.close()
                if proc.wait() != 0:
                    raise ShifterError(f"layer {layer.number}: gzip decompression failed"
                                       f" ({_last_line(errors, proc.returncode)})")
        elif magic == _ZSTD_MAGIC:
            reader = zstandard.ZstdDecompressor().stream_reader(blob, read_size=_CHUNK,
                                                               read_across_frames=True)
            try:
                yield reader  # type: ignore[misc]
            except zstandard.ZstdError as err:
                raise ShifterError(f"layer {layer.number}: zstd decompression failed ({err})") from None
        elif magic.startswith((b"\xfd7zX", b"BZh")):
            raise ShifterError(f"layer {layer.number}: unsupported compression (xz or bzip2)")
        else:
            yield blob.fileno()


class _Follow:
    """A prefetched layer, read while its inflater may still be writing it.

    The merge follows the inflater through the scratch file instead of waiting for the
    whole layer (a 100 MB layer kept tar2sqfs idle for a second and more): at the end of
    what is written so far, ``more`` waits for the file to grow or the inflater to end.
    If the prefetch fails (a corrupt stream, its size cap, its CPU limit), the layer goes
    on from its blob, streamed by ``open_layer``, past the bytes already read: the merge
    sees one uninterrupted stream, and the streaming inflater reports the real problem.
    """

    def __init__(self, fd: int, path: str, finished: threading.Event, ok: Callable[[], bool],
                 layer: Layer, deadline: Deadline | None) -> None:
        self.file_fd = fd
        self.fd: int | None = fd
        self.stream: BinaryIO | None = None
        self.path = path
        self.finished = finished
        self.ok = ok
        self.layer = layer
        self.deadline = deadline
        self.fallen_back = False
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> _Follow:
        return self

    def __exit__(self, *exc: object) -> bool:
        try:
            return bool(self.stack.__exit__(*exc))  # type: ignore[arg-type]
        finally:
            os.close(self.file_fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def more(self) -> bool:
        """At the end of the bytes read so far: True when reading again may give more."""
        if self.fallen_back:
            return False
        while True:
            done = self.finished.is_set()
            if os.fstat(self.file_fd).st_size > os.lseek(self.file_fd, 0, os.SEEK_CUR):
                return True
            if done:
                if self.ok():
                    return False
                self._fall_back()
                return True
            self.finished.wait(0.002)
            if self.deadline is not None and self.deadline.expired():
                raise self.deadline.error(f"converting layer {self.layer.number}")

    def _fall_back(self) -> None:
        consumed = os.lseek(self.file_fd, 0, os.SEEK_CUR)
        raw = self.stack.enter_context(open_layer(self.layer, self.deadline))
        self.fd, self.stream = (raw, None) if isinstance(raw, int) else (None, raw)
        self.fallen_back = True
        while consumed:  # already read (and counted) from the file
            chunk = os.read(raw, min(consumed, _CHUNK)) if isinstance(raw, int) else raw.read(min(consumed, _CHUNK))
            if not chunk:
                raise ShifterError(f"layer {self.layer.number}: truncated tar stream")
            consumed -= len(chunk)


class Prefetch:
    """Inflate lower layers into scratch files ahead of the merge.

    The merge reads layers top-down, so a bottom layer's single-threaded inflate would
    otherwise only start when everything above it is done, while tar2sqfs's reader
    thread (slow on directories of many small files) leaves a core idle.  One background
    thread inflates the next layers, one at a time, each file capped at the remaining
    size limit (``prlimit --fsize`` for the inflater).  A layer not started yet when the merge
    needs it is streamed instead; one being inflated is followed (``_Follow``); a failed
    prefetch is dropped and the layer streamed, which then reports the real problem.
    Files are removed as soon as they are read.
    """

    def __init__(self, layers: list[Layer], scratch: str, limit: int,
                 deadline: Deadline | None = None) -> None:
        self.deadline = deadline
        self.layers = list(layers)  # an uncompressed one is skipped once downloaded (see _work)
        self.scratch = scratch
        self.limit = limit
        self.lock = threading.Lock()
        self.state: dict[int, str] = {layer.number: "pending" for layer in self.layers}
        self.paths: dict[int, str] = {}
        self.ok: dict[int, bool] = {}
        self.done: dict[int, threading.Event] = {layer.number: threading.Event() for layer in self.layers}
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._work, name="layer-prefetch", daemon=True)
        self.thread.start()

    def _downloaded(self, layer: Layer) -> bool:
        """Wait for the layer's download (if any); False when it failed or we stop first."""
        while layer.ready is not None and not self.stopping:
            try:
                if layer.ready(0.2):
                    return True
            except Exception:
                return False  # the merge waits for it too and reports the failure
        return not self.stopping

    def _work(self) -> None:
        used = 0
        for layer in self.layers:
            number = layer.number
            downloaded = self._downloaded(layer)
            compressed = downloaded and bool(_compression(layer.path))  # an uncompressed layer is read in place
            with self.lock:
                if self.stopping or not compressed or self.state[number] != "pending":
                    self.done[number].set()
                    continue
                fd, path = tempfile.mkstemp(prefix=f".layer{number}-", suffix=".tar", dir=self.scratch)
                self.paths[number] = path
                self.state[number] = "running"
            size = None
            with contextlib.suppress(Exception):  # on failure the merge streams this layer
                size = self._inflate(layer, fd, self.limit - used)
            with self.lock:
                self.ok[number] = size is not None and not self.stopping
                if self.ok[number]:
                    used += size or 0
                else:
                    self.paths.pop(number, None)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                self.state[number] = "finished"
            self.done[number].set()

    def _inflate(self, layer: Layer, fd: int, limit: int) -> int:
        """Inflate ``layer`` into ``fd`` (closed here); returns the bytes written."""
        with os.fdopen(fd, "wb") as out:
            if _compression(layer.path) == "gzip":
                with self.lock:
                    if self.stopping:
                        raise ShifterError("stopped")
                    self.proc = subprocess.Popen(
                        ["prlimit", f"--fsize={max(limit, 1)}", "--",
                         *_inflater_command(self.deadline, "-dc", "--", layer.path)],
                        stdout=out, stderr=subprocess.DEVNULL)
                if self.proc.wait() != 0:
                    raise ShifterError("inflater failed")
            else:
                with open(layer.path, "rb") as blob:
                    reader = zstandard.ZstdDecompressor().stream_reader(
                        blob, read_size=_CHUNK, read_across_frames=True)
                    written = 0
                    while chunk := reader.read(_CHUNK):
                        written += len(chunk)
                        if written > limit or self.stopping:
                            raise ShifterError("over the limit")
                        out.write(chunk)
                    out.flush()
            return os.fstat(out.fileno()).st_size

    def take(self, layer: Layer) -> _Follow | None:
        """``layer``'s inflated stream, complete or still growing, or None to stream it
        (never started, or failed); it never waits for the inflater."""
        number = layer.number
        with self.lock:
            state = self.state.get(number)
            if state is None:
                return None
            if state == "pending":
                self.state[number] = "skipped"
                return None
            path = self.paths.pop(number, None)
            if path is None:
                return None
            fd = os.open(path, os.O_RDONLY)
        return _Follow(fd, path, self.done[number], lambda: self.ok.get(number, False), layer, self.deadline)

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            proc = self.proc
            if proc is not None and proc.poll() is None:
                proc.kill()
        self.thread.join()
        for path in self.paths.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.paths.clear()


def _compression(path: str) -> str:
    with open(path, "rb") as blob:
        magic = blob.read(4)
    if magic.startswith(_GZIP_MAGIC):
        return "gzip"
    return "zstd" if magic == _ZSTD_MAGIC else ""
