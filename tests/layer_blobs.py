"""Shared by the flattening tests: layer tars written as blobs and squashed by the real pipeline."""

from __future__ import annotations

from pathlib import Path

from gateway.convert import squash_layers
from gateway.tarread import Layer


def write_layers(workdir: Path, layers: tuple[bytes, ...]) -> list[Layer]:
    """Write ``layers`` (bottom first) as ``layer1``, ``layer2``... in ``workdir``."""
    blobs = []
    for number, data in enumerate(layers, 1):
        blob = workdir / f"layer{number}"
        blob.write_bytes(data)
        blobs.append(Layer(str(blob), number))
    return blobs


def squash(workdir: Path, blobs: list[Layer], options: list[str] | None, limit: int,
           max_paths: int | None = None) -> Path:
    """Squash ``blobs`` into ``workdir/image.squashfs`` (our flattener feeding tar2sqfs)."""
    output = workdir / "image.squashfs"
    squash_layers(blobs, str(output), options, limit, max_paths=max_paths)
    return output


def raw_header(name: bytes, typeflag: bytes = b"0", size: bytes = b"00000000000\0",
               mode: bytes = b"0000644\0", mtime: bytes = b"00000000000\0") -> bytes:
    """One ustar header with the numeric fields given verbatim (hostile values included)."""
    hdr = bytearray(512)
    hdr[0:len(name)] = name
    hdr[100:108] = mode.ljust(8, b"\0")
    hdr[108:116] = b"0000000\0"
    hdr[116:124] = b"0000000\0"
    hdr[124:136] = size.ljust(12, b"\0")
    hdr[136:148] = mtime.ljust(12, b"\0")
    hdr[148:156] = b" " * 8
    hdr[156:157] = typeflag
    hdr[257:263] = b"ustar\0"
    hdr[263:265] = b"00"
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def pax_member(records: dict[bytes, bytes], then: bytes) -> bytes:
    """A pax extended header carrying ``records`` verbatim, followed by the tar bytes ``then``."""
    body = b""
    for key, value in records.items():
        line = b" " + key + b"=" + value + b"\n"
        length = len(line) + 1
        while len(str(length).encode()) + len(line) != length:
            length += 1
        body += str(length).encode() + line
    padded = body + bytes(-len(body) % 512)
    return raw_header(b"PaxHeader", b"x", b"%011o\0" % len(body)) + padded + then


def end_of_archive() -> bytes:
    return bytes(1024)
