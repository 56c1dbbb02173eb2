"""Merge an image's layers into one clean tar stream, in a single streaming pass.

Why streaming and top-down: unpacking every layer to disk and then squashing the tree
(the original's pipeline) writes and re-reads every file; on this machine writing 18k
files costs 10-17 s of system time alone.  Instead the layers are read *from the top
layer down*: the first time a path is seen it is final (later layers win), so it is
emitted at once and every older version is skipped without ever being written.
Whiteouts and opaque whiteouts only hide entries of lower layers, so they are recorded
when a layer ends and consulted for the layers below it.  The output is one tar stream
that ``tar2sqfs`` packs while we produce it (see ``gateway.convert``): gzip inflate runs
in its own inflater process (ISA-L's ``igzip``, else ``pigz``), compression in tar2sqfs's
worker threads, so both cores work at once and no file of the image ever touches the disk.
File bodies go from the inflater's pipe to the tar2sqfs pipe with ``splice`` (1 MiB pipe
buffers), never through Python.

Measured here (bench/pull.py, cold cache, download included, medians): the 3-layer
debootstrap Debian image (92 MB compressed) in 0.91 s against 1.38 s for the floor
(extract to tmpfs + mksquashfs zstd-3) and 11.2 s for the original's skopeo/umoci/mksquashfs
pipeline (docs/performance.md has the stage profile); earlier, with pigz, a 2.1 GB 3-layer
image in 15.2 s against 14.3 s and 157 s.  Lower layers are
inflated ahead while the upper ones stream (``_Prefetch``), which keeps both cores busy
while tar2sqfs's single reader works through directories of small files.

The tar reader and writer are a few dozen lines of our own instead of ``tarfile``: only
headers are parsed and rebuilt (the field notes measured a tarfile-based merge at ~10 s
for 1.2 GB on its own), and names stay ``bytes`` from end to end, so non-UTF-8 names can
never raise.  Hardlinks whose target an upper layer replaced or deleted keep their old
content (a second pass over that one layer, see ``Flattener._replay``).

Safety rules (each entry is untrusted), either neutralised or refused with a
``ShifterError`` naming the layer and the path:

* names are confined to the image root: a leading ``/`` or ``./`` is stripped
  (as GNU tar does); a ``..`` component is refused ("path escapes the image root");
* an entry below a symlink or file of its own layer, or below a lower layer's
  symlink/file that an upper layer writes through, is refused ("written through");
  nothing is ever resolved through a symlink, so no link can redirect a write;
* hardlinks must name an earlier regular file or symlink of the image, inside the root;
* whiteouts naming ``.``/``..``/nothing are refused; ``.wh..wh..opq`` hides the lower
  layers' content of its directory; other ``.wh..wh.*`` (aufs metadata) are dropped;
* device nodes and fifos are dropped; setuid/setgid bits cleared; owner forced to root;
  every file and directory made world-readable (``a+rX``, as the original did);
* pax records other than path/linkpath/size/mtime are dropped, so xattrs
  (``SCHILY.xattr.security.capability`` and friends) never reach the image;
* the uncompressed bytes read from all layers are capped (a decompression bomb stops
  with a failure naming the limit); declared entry sizes are checked before reading;
* numeric fields are strict: a size, mode, mtime or pax length that is not a plain
  non-negative number is refused ("corrupt tar header"), and the reader never moves
  backwards, so no header can make a layer loop;
* a name or link longer than ``MAX_PATH`` bytes, a component longer than ``NAME_MAX`` or
  a path deeper than ``MAX_DEPTH`` is refused, and the paths the merge remembers (emitted,
  implicit parents, whiteouts, hardlink targets) are capped in number (``MAX_PATHS``,
  ``MaxImagePaths``) and in total bytes (``INDEX_BYTES_PER_PATH`` times that): memory
  grows linearly in the entries, each costing its path's length plus a fixed overhead
  (docs/gateway.md, "Limits on hostile layers");
* a path in a message has its control characters escaped (``printable``), so a name
  can never drive the terminal of whoever reads a status.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from gateway.bounds import PIGZ_MEMORY, Deadline, limited
from shifter.errors import ShifterError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_CHUNK = 1 << 20
_READ = 256 << 10       # header reads fill the buffer this much at a time
_SPLICE_MIN = 64 << 10  # file bodies at least this long bypass Python's buffers
_F_SETPIPE_SZ = 1031
_MAX_META_RECORD = 1 << 20  # pax / GNU long-name records larger than this are refused
MAX_DIR_ENTRIES = 100_000  # see Flattener._count_child
_MAX_MTIME = 8**11 - 1
MAX_PATH = 4096          # bytes in a name or link target (Linux PATH_MAX)
NAME_MAX = 255           # bytes in one path component (squashfs and Linux NAME_MAX)
MAX_DEPTH = 256          # components in one path; real images stay far below 64
MAX_PATHS = 4_000_000    # paths the merge remembers over all layers (MaxImagePaths)
INDEX_BYTES_PER_PATH = 128  # their total length, per path allowed: 512 MiB for the default
_OCTAL = re.compile(rb"[0-7]+")
_DECIMAL = re.compile(rb"[0-9]{1,30}")
_PAX_TIME = re.compile(rb"-?[0-9]{1,30}(\.[0-9]{0,30})?")

# kinds of emitted paths
_DIR, _IMPLICIT, _FILE, _SYMLINK, _DROPPED = 1, 2, 3, 4, 5
_NON_DIRS = (_FILE, _SYMLINK, _DROPPED)
_REGULAR = (b"0", b"\0", b"7")
_KIND_NAME = {_DIR: "directory", _IMPLICIT: "directory", _FILE: "file", _SYMLINK: "symlink",
              _DROPPED: "device node"}

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_WH = b".wh."
_WH_META = b".wh..wh."
_OPAQUE = b".wh..wh..opq"


@dataclass
class Layer:
    """A layer blob on disk; ``number`` is 1-based from the bottom, used in messages.

    ``ready``, when set, says whether the blob is downloaded and verified yet, waiting at most
    the given seconds, and raises the download's failure: the merge starts on the top layer
    while the lower ones are still arriving, and never reads a blob before its digest matched.
    """

    path: str
    number: int
    ready: Callable[[float], bool] | None = None


@dataclass
class FlattenStats:
    entries: int = 0
    dropped_devices: int = 0
    cleared_setid: int = 0
    dropped_xattrs: int = 0
    bytes_read: int = 0


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\u2028``).

    Status messages reach users' terminals (``shifterimg``); a layer path or a tool's
    message quoting one must not carry escape sequences or line breaks there.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _fmt(path: bytes) -> str:
    """A path for a message: undecodable bytes and control characters shown as escapes,
    length bounded."""
    text = path[:400].decode("utf-8", "backslashreplace")
    text = text if len(text) <= 200 and len(path) <= 400 else text[:200] + "..."
    return printable(text)


def _parse_number(field: bytes) -> int | None:
    """Octal (NUL/space padded) or GNU base-256 numeric field; None when it is neither.

    A negative base-256 value is returned as such (GNU tar writes pre-1970 times so);
    the caller decides whether a negative value is acceptable.
    """
    if field and field[0] & 0x80:
        value = int.from_bytes(field, "big") & ((1 << (8 * len(field) - 1)) - 1)
        if field[0] & 0x40:  # two's complement over the field's remaining bits
            value -= 1 << (8 * len(field) - 1)
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    return int(text, 8) if _OCTAL.fullmatch(text) else None


def _cstring(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def normalise(name: bytes) -> bytes | None:
    """The path relative to the image root, or None when it contains ``..``.

    Leading ``/``, empty and ``.`` components are removed; ``b""`` is the root itself.
    """
    parts = [p for p in name.split(b"/") if p and p != b"."]
    if b".." in parts:
        return None
    return b"/".join(parts)


def _ancestors(path: bytes) -> Iterator[bytes]:
    i = path.find(b"/")
    while i != -1:
        yield path[:i]
        i = path.find(b"/", i + 1)


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _grow_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer: with the default 64 KiB the three processes of the
    pipeline (the inflater, us, tar2sqfs) run in lock-step and the two cores idle."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _CHUNK)


class _Output:
    """Buffered writes to a file descriptor; long file bodies are spliced in the kernel."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.can_splice = True

    def write(self, data: bytes | memoryview) -> None:
        self.buf += data
        if len(self.buf) >= _CHUNK:
            self.flush()

    def write_direct(self, data: memoryview) -> None:
        self.flush()
        while data:
            data = data[os.write(self.fd, data):]

    def flush(self) -> None:
        done, size = 0, len(self.buf)
        if size:
            with memoryview(self.buf) as view:
                while done < size:
                    done += os.write(self.fd, view[done:])
            del self.buf[:]


class _Reader:
    """Exact reads from a decompressed layer stream, counting bytes against the limit.

    ``source`` is a file descriptor (an inflater's pipe or an uncompressed blob), from which file
    bodies are moved to the output with ``splice`` and never enter Python, or a readable
    object (the in-process zstd decompressor).
    """

    def __init__(self, source: int | BinaryIO, layer: Layer, budget: _Budget) -> None:
        self.fd = source if isinstance(source, int) else None
        self.stream = None if isinstance(source, int) else source
        self.layer = layer
        self.budget = budget
        self.buf = bytearray()
        self.pos = 0
        self.scratch = bytearray(_CHUNK)

    def _raw_into(self, view: memoryview) -> int:
        if self.fd is not None:
            n = os.readv(self.fd, [view])
        else:
            assert self.stream is not None
            n = self.stream.readinto(view)  # type: ignore[attr-defined]
        self.budget.consume(n, self.layer)
        return n

    def _truncated(self) -> ShifterError:
        return ShifterError(f"layer {self.layer.number}: truncated tar stream")

    def read_exact(self, n: int, allow_eof: bool = False) -> bytes:
        self._forward(n)
        while len(self.buf) - self.pos < n:
            if self.pos:
                del self.buf[:self.pos]
                self.pos = 0
            with memoryview(self.scratch) as view:
                got = self._raw_into(view[:max(n - len(self.buf), _READ)])
                if not got:
                    break
                self.buf += view[:got]
        avail = len(self.buf) - self.pos
        if avail < n:
            if allow_eof and avail == 0:
                return b""
            raise self._truncated()
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return data

    def copy(self, n: int, out: _Output | None) -> None:
        """Copy (or skip, when ``out`` is None) exactly ``n`` bytes."""
        self._forward(n)
        take = min(n, len(self.buf) - self.pos)
        if take:
            if out is not None:
                with memoryview(self.buf) as view:
                    out.write(view[self.pos:self.pos + take])
            self.pos += take
            n -= take
        if n and out is not None and self.fd is not None and out.can_splice and n >= _SPLICE_MIN:
            out.flush()
            n = self._splice(n, out)
        with memoryview(self.scratch) as view:
            while n:
                got = self._raw_into(view[:min(n, _CHUNK)])
                if not got:
                    raise self._truncated()
                if out is not None:
                    if got >= _SPLICE_MIN:
                        out.write_direct(view[:got])
                    else:
                        out.write(view[:got])
                n -= got

    def _forward(self, n: int) -> None:
        """The stream only ever moves forward: a negative length (a header parsed wrongly)
        would re-read the same bytes forever."""
        if n < 0:
            raise ShifterError(f"layer {self.layer.number}: corrupt tar stream (negative length {n})")

    def _splice(self, n: int, out: _Output) -> int:
        """Move ``n`` bytes fd to fd in the kernel; returns what is left (on EINVAL: all)."""
        assert self.fd is not None
        while n:
            try:
                moved = os.splice(self.fd, out.fd, n)
            except OSError as err:
                if err.errno == errno.EINVAL:
                    out.can_splice = False  # not a pipe on either side: copy instead
                    return n
                raise
            if not moved:
                raise self._truncated()
            self.budget.consume(moved, self.layer)
            n -= moved
        return 0

    def drain(self) -> None:
        """Read to EOF (the end-of-archive blocks and any trailer), still counted."""
        self.pos = len(self.buf)
        with memoryview(self.scratch) as view:
            while self._raw_into(view):
                pass


class _Budget:
    """The decompression-bomb guard: total uncompressed bytes read from all layers; and,
    checked as often, the pull's deadline (a layer that trickles out of a stalled
    decompressor, or a conversion that runs too long, ends the pull)."""

    def __init__(self, limit: int, deadline: Deadline | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.deadline = deadline

    def check_declared(self, size: int, layer: Layer) -> None:
        if self.used + size > self.limit:
            self._fail(layer)

    def consume(self, n: int, layer: Layer) -> None:
        self.used += n
        if self.used > self.limit:
            self._fail(layer)
        if self.deadline is not None and self.deadline.expired():
            raise self.deadline.error(f"converting layer {layer.number}")

    def _fail(self, layer: Layer) -> None:
        raise ShifterError(
            f"layer {layer.number}: image exceeds the size limit of {self.limit} bytes"
            " uncompressed (max_image_bytes); refusing a possible decompression bomb")


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
                    _grow_pipe(proc.stdout.fileno())
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


class _Prefetch:
    """Inflate lower layers into scratch files while the upper ones stream.

    The merge reads layers top-down, so a bottom layer's single-threaded inflate would
    otherwise only start when everything above it is done, while tar2sqfs's reader
    thread (slow on directories of many small files) leaves a core idle.  One background
    thread inflates the next layers, one at a time, each file capped at the remaining
    size limit (``prlimit --fsize`` for the inflater).  A layer not started yet when the merge
    needs it is streamed instead; a failed prefetch is dropped and the layer streamed,
    which then reports the real problem.  Files are removed as soon as they are read.
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
            downloaded = self._downloaded(layer)
            with self.lock:
                if self.stopping or not downloaded or self.state[layer.number] != "pending":
                    self.done[layer.number].set()
                    continue
                self.state[layer.number] = "running"
            path = None
            with contextlib.suppress(Exception):  # on failure the merge streams this layer
                if _compression(layer.path):  # an uncompressed layer is read in place
                    path = self._inflate(layer, self.limit - used)
            if path:
                used += os.path.getsize(path)
            with self.lock:
                if path and not self.stopping:
                    self.paths[layer.number] = path
                elif path:
                    os.unlink(path)
                self.state[layer.number] = "finished"
            self.done[layer.number].set()

    def _inflate(self, layer: Layer, limit: int) -> str:
        fd, path = tempfile.mkstemp(prefix=f".layer{layer.number}-", suffix=".tar", dir=self.scratch)
        try:
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
            return path
        except BaseException:
            os.unlink(path)
            raise

    def take(self, layer: Layer) -> str | None:
        """The inflated file for ``layer``, or None to stream it (never started, or failed)."""
        number = layer.number
        with self.lock:
            state = self.state.get(number)
            if state is None:
                return None
            if state == "pending":
                self.state[number] = "skipped"
                return None
        self.done[number].wait()
        with self.lock:
            return self.paths.pop(number, None)

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


@dataclass
class _Entry:
    name: bytes          # raw name from the archive
    path: bytes          # normalised path ("" = root)
    kind: bytes          # typeflag
    mode: int
    size: int
    mtime: int
    link: bytes
    had_xattrs: bool


class TarWriter:
    """Writes sanitised GNU-format headers (root owner) to the output stream."""

    def __init__(self, out: _Output) -> None:
        self.out = out

    @staticmethod
    def _number(value: int, width: int) -> bytes:
        if value < 8 ** (width - 1):
            return b"%0*o\0" % (width - 1, value)
        return bytes([0x80]) + value.to_bytes(width - 1, "big")

    def _record(self, name: bytes, mode: int, size: int, mtime: int, typeflag: bytes,
                link: bytes) -> bytes:
        hdr = bytearray(BLOCK)
        hdr[0:len(name)] = name
        hdr[100:108] = self._number(mode, 8)
        hdr[108:116] = self._number(0, 8)
        hdr[116:124] = self._number(0, 8)
        hdr[124:136] = self._number(size, 12)
        hdr[136:148] = self._number(mtime, 12)
        hdr[148:156] = b" " * 8
        hdr[156:157] = typeflag
        hdr[157:157 + len(link)] = link
        hdr[257:265] = b"ustar  \0"
        hdr[265:269] = b"root"
        hdr[297:301] = b"root"
        hdr[148:156] = b"%06o\0 " % sum(hdr)
        return bytes(hdr)

    def _long(self, typeflag: bytes, value: bytes) -> bytes:
        data = value + b"\0"
        return (self._record(b"././@LongLink", 0o644, len(data), 0, typeflag, b"")
                + data + bytes(_padded(len(data)) - len(data)))

    def header(self, path: bytes, mode: int, size: int, mtime: int, typeflag: bytes,
               link: bytes = b"") -> None:
        prefix = b""
        if len(path) > 100:
            prefix += self._long(b"L", path)
        if len(link) > 100:
            prefix += self._long(b"K", link)
        self.out.write(prefix + self._record(path[:100], mode, size, mtime, typeflag, link[:100]))

    def end(self) -> None:
        self.out.write(_ZERO_BLOCK * 2)
        self.out.flush()


def _sanitise_mode(mode: int, is_dir: bool) -> int:
    """Clear setuid/setgid, keep sticky, make readable by all (a+rX,u+w)."""
    mode &= 0o1777
    mode |= 0o644
    if is_dir or mode & 0o111:
        mode |= 0o111
    return mode


def _check_shape(name: bytes, path: bytes, link: bytes, layer: Layer) -> None:
    """Refuse names no filesystem could hold; they also bound what the merge keeps per path."""
    if len(name) > MAX_PATH or len(link) > MAX_PATH:
        what = "name" if len(name) > MAX_PATH else f"link target of {_fmt(name)}"
        raise ShifterError(f"layer {layer.number}: {what} longer than {MAX_PATH} bytes"
                           + (f": {_fmt(name)}" if what == "name" else ""))
    if len(path) <= NAME_MAX:
        return  # the common case: no component can be too long, nor the path too deep
    parts = path.split(b"/")
    if len(parts) > MAX_DEPTH:
        raise ShifterError(f"layer {layer.number}: path deeper than {MAX_DEPTH} components: {_fmt(name)}")
    if any(len(part) > NAME_MAX + (len(_WH) if part.startswith(_WH) else 0) for part in parts):
        raise ShifterError(f"layer {layer.number}: a component longer than {NAME_MAX} bytes"
                           f" in {_fmt(name)}")


def _parse_pax(data: bytes, layer: Layer) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        space = data.find(b" ", pos)
        if space == -1 or not _DECIMAL.fullmatch(data[pos:space]):
            raise ShifterError(f"layer {layer.number}: corrupt pax header")
        length = int(data[pos:space])
        record = data[space + 1:pos + length]
        if space == -1 or length <= 0 or pos + length > len(data) or not record.endswith(b"\n") \
                or b"=" not in record:
            raise ShifterError(f"layer {layer.number}: corrupt pax header")
        key, _, value = record[:-1].partition(b"=")
        records[key] = value
        pos += length
    return records


class Flattener:
    """Top-down merge of layers into one sanitised tar stream (see the module docstring)."""

    def __init__(self, out_fd: int, max_bytes: int, max_paths: int | None = None,
                 max_index_bytes: int | None = None, deadline: Deadline | None = None) -> None:
        self.deadline = deadline
        self.max_paths = MAX_PATHS if max_paths is None else max_paths
        self.max_index_bytes = (self.max_paths * INDEX_BYTES_PER_PATH if max_index_bytes is None
                                else max_index_bytes)
        self.paths = 0          # paths remembered, and their total length (see _charge)
        self.index_bytes = 0
        self.out = _Output(out_fd)
        self.writer = TarWriter(self.out)
        self.budget = _Budget(max_bytes, deadline)
        self.stats = FlattenStats()
        self.emitted: dict[bytes, tuple[int, int]] = {}   # path -> (kind, layer number)
        self.whiteouts: set[bytes] = set()                 # from upper layers: hide path + subtree
        self.opaque: set[bytes] = set()                    # from upper layers: hide lower children
        self.whiteout_dirs: list[bytes] = []               # directories that may hold only whiteouts
        self.children: dict[bytes, int] = {}               # directory -> entries emitted in it
        # per layer, for hardlinks: path -> the regular file it names, files whose content
        # was not emitted, and links waiting for that content (see _replay)
        self.canonical: dict[bytes, bytes] = {}
        self.skipped: set[bytes] = set()
        self.deferred: dict[bytes, list[bytes]] = {}

    # -- the driver -------------------------------------------------------------------

    def run(self, layers: list[Layer], layer_done: Callable[[Layer], None] | None = None,
            scratch: str | None = None) -> FlattenStats:
        """Merge ``layers`` (bottom first, as in the manifest) and end the stream.

        With a ``scratch`` directory, lower layers are decompressed ahead (see _Prefetch).
        """
        order = list(reversed(layers))
        prefetch = _Prefetch(order[1:], scratch, self.budget.limit, self.deadline) if scratch else None
        try:
            for layer in order:
                self._await(layer)
                ready = prefetch.take(layer) if prefetch else None
                source = Layer(ready, layer.number) if ready else layer
                try:
                    with open_layer(source, self.deadline) as raw:
                        self._layer(_Reader(raw, source, self.budget))
                finally:
                    if ready:
                        os.unlink(ready)
                if layer_done is not None:
                    layer_done(layer)
        finally:
            if prefetch:
                prefetch.close()
        for path in self.whiteout_dirs:  # still without an entry of their own: create them
            if self.emitted[path][0] == _IMPLICIT:
                self.writer.header(path, 0o755, 0, 0, b"5")
                self.emitted[path] = (_DIR, self.emitted[path][1])
        self.writer.end()
        self.stats.bytes_read = self.budget.used
        return self.stats

    def _layer(self, reader: _Reader) -> None:
        layer = reader.layer
        new_whiteouts: list[bytes] = []
        new_opaque: list[bytes] = []
        self.canonical = {}
        self.skipped = set()
        self.deferred = {}
        for entry in self._entries(reader):
            base = entry.path.rsplit(b"/", 1)[-1]
            if base.startswith(_WH):
                self._whiteout(entry, base, layer, new_whiteouts, new_opaque)
                reader.copy(_padded(entry.size), None)
                continue
            emit = self._decide(entry, layer)
            if not emit and (entry.kind in _REGULAR or entry.kind == b"1"):
                self._charge(entry.path, layer.number)  # kept as a hardlink target (canonical)
            if entry.kind in _REGULAR:
                self.canonical[entry.path] = entry.path
                if not emit:
                    self.skipped.add(entry.path)
            elif entry.kind == b"1":
                target = normalise(entry.link)
                if target:
                    self.canonical[entry.path] = self.canonical.get(target, target)
            if emit:
                self._emit(entry, layer, reader)
            else:
                reader.copy(_padded(entry.size), None)
        reader.drain()
        if self.deferred:
            self._replay(layer)
        self.whiteouts.update(new_whiteouts)
        self.opaque.update(new_opaque)

    def _replay(self, layer: Layer) -> None:
        """Emit visible hardlinks whose target file this layer had hidden or shadowed.

        In overlay semantics such a link keeps the *old* content, which we skipped when
        we saw it; a second pass over this one layer copies it under the first link's name
        (rare: e.g. an upper layer deleted or replaced only one name of a hardlinked file).
        """
        with open_layer(layer, self.deadline) as raw:
            reader = _Reader(raw, layer, self.budget)
            for entry in self._entries(reader):
                links = self.deferred.pop(entry.path, None) if entry.kind in _REGULAR else None
                if not links:
                    reader.copy(_padded(entry.size), None)
                    continue
                first = links[0]
                self.writer.header(first, _sanitise_mode(entry.mode, False), entry.size, entry.mtime, b"0")
                reader.copy(_padded(entry.size), self.out)
                for other in links[1:]:
                    self.writer.header(other, 0o644, 0, entry.mtime, b"1", first)
                self.stats.entries += len(links)
                if not self.deferred:
                    break
            reader.drain()

    def _await(self, layer: Layer) -> None:
        """Block until ``layer``'s blob is downloaded and verified (its failure is raised),
        checking the pull's deadline twice a second."""
        while layer.ready is not None and not layer.ready(0.5):
            if self.deadline is not None and self.deadline.expired():
                raise self.deadline.error(f"downloading layer {layer.number}")

    # -- reading ----------------------------------------------------------------------

    def _entries(self, reader: _Reader) -> Iterator[_Entry]:
        layer = reader.layer
        pax: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            hdr = reader.read_exact(BLOCK, allow_eof=True)
            if not hdr or hdr == _ZERO_BLOCK:
                return
            stored = _parse_number(hdr[148:156])
            if stored != sum(hdr[:148]) + 256 + sum(hdr[156:]):
                raise ShifterError(f"layer {layer.number}: corrupt tar header (bad checksum)")
            typeflag = hdr[156:157]
            size = _parse_number(hdr[124:136])
            if size is None or size < 0:
                raise ShifterError(f"layer {layer.number}: corrupt tar header (bad size)")
            if typeflag in (b"x", b"g", b"L", b"K"):
                if size > _MAX_META_RECORD:
                    raise ShifterError(f"layer {layer.number}: oversized tar metadata record")
                data = reader.read_exact(_padded(size))[:size]
                if typeflag == b"x":
                    pax = _parse_pax(data, layer)
                elif typeflag == b"L":
                    long_name = _cstring(data)
                elif typeflag == b"K":
                    long_link = _cstring(data)
                continue  # global pax headers are ignored on purpose
            if long_name is not None:
                name = long_name
            elif b"path" in pax:
                name = pax[b"path"]
            else:
                name = _cstring(hdr[0:100])
                if hdr[257:263] == b"ustar\0":
                    prefix = _cstring(hdr[345:500])
                    if prefix:
                        name = prefix + b"/" + name
            link = long_link if long_link is not None else pax.get(b"linkpath", _cstring(hdr[157:257]))
            if b"size" in pax:
                if not _DECIMAL.fullmatch(pax[b"size"]):
                    raise ShifterError(f"layer {layer.number}: corrupt pax size for {_fmt(name)}")
                size = int(pax[b"size"])
            mtime = _parse_number(hdr[136:148])
            if b"mtime" in pax:
                if not _PAX_TIME.fullmatch(pax[b"mtime"]):
                    raise ShifterError(f"layer {layer.number}: corrupt pax mtime for {_fmt(name)}")
                mtime = int(pax[b"mtime"].partition(b".")[0])
            if mtime is None:
                raise ShifterError(f"layer {layer.number}: corrupt tar header (bad mtime) for {_fmt(name)}")
            mtime = min(max(mtime, 0), _MAX_MTIME)  # squashfs keeps 32-bit times anyway
            if any(k.startswith(b"GNU.sparse") for k in pax) or typeflag == b"S":
                raise ShifterError(f"layer {layer.number}: sparse file {_fmt(name)} is not supported")
            had_xattrs = any(b"xattr" in k or k.startswith(b"SCHILY.acl") for k in pax)
            pax, long_name, long_link = {}, None, None
            if b"\0" in name or b"\0" in link:
                raise ShifterError(f"layer {layer.number}: NUL byte in a name: {_fmt(name)}")
            path = normalise(name)
            if path is None:
                raise ShifterError(f"layer {layer.number}: path escapes the image root: {_fmt(name)}")
            _check_shape(name, path, link, layer)
            if typeflag in (b"0", b"\0", b"7") and name.endswith(b"/"):
                typeflag = b"5"
            mode = _parse_number(hdr[100:108])
            if mode is None or mode < 0:
                raise ShifterError(f"layer {layer.number}: corrupt tar header (bad mode) for {_fmt(name)}")
            self.budget.check_declared(size, layer)
            yield _Entry(name, path, typeflag, mode, size, mtime, link, had_xattrs)

    # -- merging ----------------------------------------------------------------------

    def _whiteout(self, entry: _Entry, base: bytes, layer: Layer,
                  new_whiteouts: list[bytes], new_opaque: list[bytes]) -> None:
        parent = entry.path[:-len(base) - 1] if b"/" in entry.path else b""
        self._keep_parent(parent, layer.number)
        if base == _OPAQUE:
            new_opaque.append(parent)
            return
        if base.startswith(_WH_META):
            return  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): never part of the image
        target = base[len(_WH):]
        if target in (b"", b".", b".."):
            raise ShifterError(f"layer {layer.number}: whiteout names an invalid path: {_fmt(entry.name)}")
        self._charge(entry.path, layer.number)
        new_whiteouts.append(parent + b"/" + target if parent else target)

    def _hidden(self, path: bytes, number: int) -> bool:
        """True when an upper layer hides ``path`` (whiteout, opaque parent, or a file or
        link replacing one of its parents); a parent replaced in the *same* layer is an
        attempt to write through a link and is refused."""
        if b"" in self.opaque:
            return True  # an upper layer made the root itself opaque
        for anc in _ancestors(path):
            if anc in self.whiteouts or anc in self.opaque:
                return True
            seen = self.emitted.get(anc)
            if seen is not None and seen[0] in _NON_DIRS:
                if seen[1] == number:
                    raise ShifterError(
                        f"layer {number}: {_fmt(path)} is written through the"
                        f" {_KIND_NAME[seen[0]]} {_fmt(anc)}")
                return True  # an upper layer replaced the directory by a file or link
        return path in self.whiteouts

    def _decide(self, entry: _Entry, layer: Layer) -> bool:
        """True when this entry is the visible version of its path and must be emitted."""
        if not entry.path:
            return False  # the root's attributes are ours (root, 0755), never a layer's
        number = layer.number
        if self._hidden(entry.path, number):
            return False
        seen = self.emitted.get(entry.path)
        if seen is None:
            return True
        kind, where = seen
        is_dir = entry.kind == b"5"
        if kind == _IMPLICIT:
            if is_dir:
                return True  # first explicit attributes for a directory an upper layer needed
            raise ShifterError(
                f"layer {where}: entries are written through {_fmt(entry.path)}, which is a"
                f" {'symlink' if entry.kind == b'2' else 'non-directory'} in layer {number}")
        if where == number and not (is_dir and kind == _DIR):
            raise ShifterError(f"layer {number}: duplicate entry {_fmt(entry.name)}")
        return False  # an upper layer's version wins

    def _keep_parent(self, parent: bytes, number: int) -> None:
        """A whiteout's directory exists in its layer even if nothing else is emitted in it."""
        if not parent or self._hidden(parent, number):
            return
        seen = self.emitted.get(parent)
        if seen is None:
            self._register(parent, _IMPLICIT, number)
            self.whiteout_dirs.append(parent)

    def _emit(self, entry: _Entry, layer: Layer, reader: _Reader) -> None:
        writer = self.writer
        stats = self.stats
        kind = entry.kind
        if entry.had_xattrs:
            stats.dropped_xattrs += 1
        if kind in (b"3", b"4", b"6"):
            stats.dropped_devices += 1
            reader.copy(_padded(entry.size), None)
            self._register(entry.path, _DROPPED, layer.number)  # still hides lower versions
            return
        if entry.mode & 0o6000:
            stats.cleared_setid += 1
        if kind == b"5":
            writer.header(entry.path, _sanitise_mode(entry.mode, True), 0, entry.mtime, b"5")
            reader.copy(_padded(entry.size), None)
            self._register(entry.path, _DIR, layer.number)
        elif kind in (b"0", b"\0", b"7"):
            writer.header(entry.path, _sanitise_mode(entry.mode, False), entry.size, entry.mtime, b"0")
            reader.copy(_padded(entry.size), self.out)
            self._register(entry.path, _FILE, layer.number)
        elif kind == b"2":
            if not entry.link or len(entry.link) > 4095:
                raise ShifterError(f"layer {layer.number}: invalid symlink target for {_fmt(entry.name)}")
            writer.header(entry.path, 0o777, 0, entry.mtime, b"2", entry.link)
            reader.copy(_padded(entry.size), None)
            self._register(entry.path, _SYMLINK, layer.number)
        elif kind == b"1":
            target = normalise(entry.link)
            if target is None or not target:
                raise ShifterError(f"layer {layer.number}: hardlink {_fmt(entry.name)} points outside"
                                   f" the image root: {_fmt(entry.link)}")
            canonical = self.canonical.get(target, target)
            if canonical in self.skipped:  # the target's content here was hidden: copy it later
                self.deferred.setdefault(canonical, []).append(entry.path)
                self._register(entry.path, _FILE, layer.number)
                reader.copy(_padded(entry.size), None)
                return
            seen = self.emitted.get(target)
            if seen is None or seen[0] not in (_FILE, _SYMLINK):
                what = "a missing target" if seen is None else f"a {_KIND_NAME[seen[0]]}"
                raise ShifterError(f"layer {layer.number}: hardlink {_fmt(entry.name)} points to"
                                   f" {what}: {_fmt(entry.link)}")
            writer.header(entry.path, 0o644, 0, entry.mtime, b"1", target)
            reader.copy(_padded(entry.size), None)
            self._register(entry.path, seen[0], layer.number)
        else:
            raise ShifterError(f"layer {layer.number}: unsupported tar entry type {kind!r}"
                               f" for {_fmt(entry.name)}")
        stats.entries += 1

    def _register(self, path: bytes, kind: int, number: int) -> None:
        if path not in self.emitted:
            self._count_child(path, number)
            self._charge(path, number)
        self.emitted[path] = (kind, number)
        for anc in _ancestors(path):
            if anc not in self.emitted:
                self._count_child(anc, number)
                self._charge(anc, number)
                self.emitted[anc] = (_IMPLICIT, number)

    def _charge(self, path: bytes, number: int) -> None:
        """Count a path the merge keeps in memory: the caps on their number and total
        length are what make the merge's memory linear in the entries (MAX_PATHS,
        INDEX_BYTES_PER_PATH), whatever the nesting of the names."""
        self.paths += 1
        self.index_bytes += len(path)
        if self.paths > self.max_paths:
            raise ShifterError(f"layer {number}: the image has more than {self.max_paths} paths"
                               " (MaxImagePaths)")
        if self.index_bytes > self.max_index_bytes:
            raise ShifterError(f"layer {number}: the image's paths add up to more than"
                               f" {self.max_index_bytes} bytes (deeply nested names?)")

    def _count_child(self, path: bytes, number: int) -> None:
        """Refuse huge directories: tar2sqfs 1.2 scans a directory's whole child list for
        every entry it adds, so a directory of n entries costs O(n^2) (40,000 took 16 s)."""
        parent = path.rpartition(b"/")[0]
        count = self.children.get(parent, 0) + 1
        self.children[parent] = count
        if count > MAX_DIR_ENTRIES:
            raise ShifterError(f"layer {number}: directory {_fmt(parent) or '/'} has more than"
                               f" {MAX_DIR_ENTRIES} entries")


def flatten(layers: list[Layer], out_fd: int, max_bytes: int,
            layer_done: Callable[[Layer], None] | None = None, scratch: str | None = None,
            deadline: Deadline | None = None, max_paths: int | None = None) -> FlattenStats:
    """Write the merged, sanitised tar stream of ``layers`` (bottom first) to ``out_fd``."""
    _grow_pipe(out_fd)
    return Flattener(out_fd, max_bytes, max_paths, deadline=deadline).run(layers, layer_done, scratch)
