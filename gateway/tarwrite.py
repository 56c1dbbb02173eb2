"""The merged stream's writing side: sanitised tar headers and the buffered output feed.

Headers are rebuilt, never copied: owner root, GNU long names for paths over 100 bytes,
modes made world-readable with setuid/setgid cleared.  The output is a pipe to tar2sqfs
with a 1 MiB buffer; file bodies at least 64 KiB long skip the buffer (``write_direct``,
or ``splice`` from the reader's side, see ``gateway.tarread.Reader.copy``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from gateway.tarread import _CHUNK, _ZERO_BLOCK, BLOCK, padded

_F_SETPIPE_SZ = 1031


def grow_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer: with the default 64 KiB the three processes of the
    pipeline (the inflater, us, tar2sqfs) run in lock-step and the two cores idle."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _CHUNK)


class Output:
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


class TarWriter:
    """Writes sanitised GNU-format headers (root owner) to the output stream."""

    def __init__(self, out: Output) -> None:
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
                + data + bytes(padded(len(data)) - len(data)))

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


def sanitise_mode(mode: int, is_dir: bool) -> int:
    """Clear setuid/setgid, keep sticky, make readable by all (a+rX,u+w)."""
    mode &= 0o1777
    mode |= 0o644
    if is_dir or mode & 0o111:
        mode |= 0o111
    return mode
