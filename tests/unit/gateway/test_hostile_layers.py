"""Hostile layers (issue 3, "Hostile input"): each yields a clean image with the offending
entry neutralised, or a ShifterError naming the problem; never a file outside the image
root and never a crash.  Real pipeline (our flattener + tar2sqfs), real ``sqfs2tar``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster.oci import (
    device,
    directory,
    file,
    gzip_bytes,
    hardlink,
    read_squashfs,
    symlink,
    tar_bytes,
    zstd_bytes,
)
from shifter.errors import ShifterError
from tests.layer_blobs import end_of_archive, pax_member, raw_header, squash, write_layers


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A work directory inside an otherwise empty directory we can check for escapes."""
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    return work


def _snapshot(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root)
            for n in dirs + files}


def build(work: Path, *layers: bytes, limit: int = 1 << 30, max_paths: int | None = None):
    """Squash ``layers``; assert nothing appeared outside ``work``; return the entries."""
    outside = work.parent.parent.parent
    blobs = write_layers(work, layers)
    before = _snapshot(outside)
    output = work / "image.squashfs"
    try:
        squash(work, blobs, None, limit, max_paths)
    finally:
        created = _snapshot(outside) - before
        assert created <= {"a/b/work/image.squashfs"}, f"files appeared outside the image: {created}"
    image = read_squashfs(output)
    for name, (info, _) in image.items():
        assert not name.startswith("/") and ".." not in name.split("/"), name
        assert info.uid == 0 and info.gid == 0
    return image


def refused(work: Path, pattern: str, *layers: bytes, limit: int = 1 << 30,
            max_paths: int | None = None) -> None:
    with pytest.raises(ShifterError, match=pattern):
        build(work, *layers, limit=limit, max_paths=max_paths)
    assert not (work / "image.squashfs").exists(), "a half-made image was left behind"


def test_dotdot_path_is_refused(sandbox: Path) -> None:
    refused(sandbox, r"layer 1: path escapes the image root: \.\./\.\./escaped",
            tar_bytes([file("ok", b"1"), file("../../escaped", b"x")]))
    refused(sandbox, r"layer 2: path escapes the image root: usr/\.\./\.\./x",
            tar_bytes([file("ok", b"1")]), gzip_bytes(tar_bytes([file("usr/../../x", b"x")])))
    assert not (sandbox.parent / "escaped").exists()


def test_absolute_path_is_confined_to_the_root(sandbox: Path) -> None:
    image = build(sandbox, tar_bytes([file("/etc/abs", b"abs"), directory("/opt")]))
    assert image["etc/abs"][1] == b"abs" and image["opt"][0].isdir()


def test_symlink_out_of_the_root_then_a_file_through_it_is_refused(sandbox: Path) -> None:
    escape = "../../../../../../tmp"
    # across layers: the upper layer writes through the lower layer's link
    refused(sandbox, r"entries are written through evil, which is a symlink in layer 1",
            tar_bytes([symlink("evil", escape)]), tar_bytes([file("evil/passwd", b"pwned")]))
    # within one layer
    refused(sandbox, r"layer 1: evil/passwd is written through the symlink evil",
            tar_bytes([symlink("evil", "/etc"), file("evil/passwd", b"pwned")]))
    assert not Path("/tmp/passwd").exists() or Path("/tmp/passwd").read_bytes() != b"pwned"


def test_escaping_symlink_alone_is_kept_as_a_link(sandbox: Path) -> None:
    # a link's target is resolved inside the container at run time: harmless by itself
    image = build(sandbox, tar_bytes([symlink("up", "../../../../etc/shadow")]))
    assert image["up"][0].issym() and image["up"][0].linkname == "../../../../etc/shadow"


def test_hardlink_outside_or_to_a_missing_target_is_refused(sandbox: Path) -> None:
    refused(sandbox, r"layer 1: hardlink h points outside the image root: \.\./\.\./etc/shadow",
            tar_bytes([hardlink("h", "../../etc/shadow")]))
    refused(sandbox, r"layer 1: hardlink h points to a missing target: etc/shadow",
            tar_bytes([hardlink("h", "etc/shadow")]))
    refused(sandbox, r"hardlink h points to a directory: etc",
            tar_bytes([directory("etc"), hardlink("h", "etc")]))
    image = build(sandbox, tar_bytes([file("etc/passwd", b"root"), hardlink("h", "/etc/passwd")]))
    assert image["h"][1] == b"root" or image["etc/passwd"][1] == b"root"


def test_device_nodes_and_fifos_are_dropped(sandbox: Path) -> None:
    import tarfile

    image = build(sandbox, tar_bytes([file("lower", b"x"), directory("dev")]),
                  tar_bytes([device("dev/mem", tarfile.CHRTYPE, 1, 1),
                             device("dev/sda", tarfile.BLKTYPE, 8, 0), device("fifo", tarfile.FIFOTYPE),
                             device("lower", tarfile.CHRTYPE, 0, 0)]))
    assert set(image) == {".", "dev"}  # the device at "lower" still hides the lower file
    assert all(info.isdir() or info.isreg() for info, _ in image.values())


def test_setuid_and_setgid_bits_are_cleared(sandbox: Path) -> None:
    image = build(sandbox, tar_bytes([file("su", b"su", 0o4755), file("wall", b"w", 0o2755),
                                      directory("shared", 0o3777)]))
    assert image["su"][0].mode == 0o755
    assert image["wall"][0].mode == 0o755
    assert image["shared"][0].mode == 0o1777  # sticky stays, setgid goes


def test_security_capability_xattrs_are_dropped(sandbox: Path) -> None:
    layer = tar_bytes([file("ping", b"elf", 0o755, xattrs={"security.capability": "\x01\x00\x00\x02",
                                                          "user.note": "x"})])
    image = build(sandbox, layer)
    info = image["ping"][0]
    assert not any("xattr" in key for key in info.pax_headers), info.pax_headers
    stat = subprocess.run(["unsquashfs", "-stat", str(sandbox / "image.squashfs")],
                          capture_output=True, text=True, check=True).stdout
    assert "Xattrs are not stored" in stat


def test_whiteout_naming_dotdot_is_refused(sandbox: Path) -> None:
    refused(sandbox, r"layer 2: whiteout names an invalid path: etc/\.wh\.\.\.",
            tar_bytes([file("etc/passwd", b"x")]), tar_bytes([file("etc/.wh...")]))
    refused(sandbox, r"whiteout names an invalid path",
            tar_bytes([file("etc/passwd", b"x")]), tar_bytes([file(".wh..")]))


def test_opaque_whiteout_cannot_reach_outside_its_directory(sandbox: Path) -> None:
    image = build(sandbox, tar_bytes([file("keep/a", b"a"), file("dir/old", b"o")]),
                  tar_bytes([file("dir/.wh..wh..opq"), file("dir/new", b"n")]))
    assert image["keep/a"][1] == b"a" and "dir/old" not in image and image["dir/new"][1] == b"n"
    refused(sandbox, r"path escapes the image root", tar_bytes([file("keep/a")]),
            tar_bytes([file("../.wh..wh..opq")]))


def test_non_utf8_names_survive_without_crashing(sandbox: Path) -> None:
    name = b"caf\xe9/\xff\xfename"
    image = build(sandbox, zstd_bytes(tar_bytes([file(name, b"bytes")])))
    key = name.decode("utf-8", "surrogateescape")
    assert image[key][1] == b"bytes"


def test_non_utf8_name_in_an_error_message_is_printable(sandbox: Path) -> None:
    with pytest.raises(ShifterError) as err:
        build(sandbox, tar_bytes([file(b"../\xff", b"x")]))
    assert "\\xff" in str(err.value)


def test_decompression_bomb_stops_at_the_limit(sandbox: Path) -> None:
    bomb = gzip_bytes(tar_bytes([file("zeros", bytes(32 << 20))]))
    assert len(bomb) < 200_000
    refused(sandbox, r"layer 1: image exceeds the size limit of 1048576 bytes", bomb, limit=1 << 20)
    # a bomb hidden in a layer's trailer after the end-of-archive blocks is counted too
    trailer = gzip_bytes(tar_bytes([file("a", b"a")]) + bytes(8 << 20))
    refused(sandbox, r"size limit of 4194304 bytes", trailer, limit=4 << 20)


def test_garbage_and_corrupt_headers_fail_cleanly(sandbox: Path) -> None:
    refused(sandbox, r"layer 1: corrupt tar header", b"\x01" * 4096)
    good = bytearray(tar_bytes([file("a", b"a")]))
    good[124:136] = b"77777777777\0"  # size field changed: checksum no longer matches
    refused(sandbox, r"layer 1: corrupt tar header", bytes(good))


def test_huge_directory_is_refused_before_tar2sqfs_goes_quadratic(sandbox: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.flatten

    monkeypatch.setattr(gateway.flatten, "MAX_DIR_ENTRIES", 50)
    refused(sandbox, r"layer 1: directory many has more than 50 entries",
            tar_bytes([file(f"many/f{i}", b"") for i in range(51)]))
    assert len(build(sandbox, tar_bytes([file(f"many/f{i}", b"") for i in range(50)]))) == 52


def test_corrupt_zstd_and_unsupported_compression_fail_cleanly(sandbox: Path) -> None:
    good = zstd_bytes(tar_bytes([file("a", os.urandom(300_000))]))
    refused(sandbox, r"layer 1: (zstd decompression failed|truncated tar stream)", good[:20_000] + bytes(5000))
    refused(sandbox, r"layer 1: unsupported compression \(xz or bzip2\)", b"\xfd7zXZ\x00" + bytes(100))


def test_absurd_timestamps_are_clamped_and_non_numbers_refused(sandbox: Path) -> None:
    huge, old, fraction = file("huge", b"h"), file("old", b"o"), file("fraction", b"f")
    huge[0].pax_headers = {"mtime": "9" * 30}
    old[0].pax_headers = {"mtime": "-86400"}
    fraction[0].pax_headers = {"mtime": "1700000000.123456789"}
    image = build(sandbox, tar_bytes([huge, old, fraction]))
    assert image["huge"][1] == b"h" and image["old"][1] == b"o"
    assert image["old"][0].mtime == 0 and image["fraction"][0].mtime == 1_700_000_000
    for value in ("1e300", "inf", "nan", "0x10", " 1"):
        member = file("t", b"t")
        member[0].pax_headers = {"mtime": value}
        refused(sandbox, r"layer 1: corrupt pax mtime for t$", tar_bytes([member]))


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the body runs longer than ``seconds``."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_NEXT = raw_header(b"next", b"0", b"00000000001\0") + b"x" + bytes(511) + end_of_archive()


@pytest.mark.parametrize("records, header", [
    ({b"size": b"-512"}, None),       # moved the reader back onto its own header: looped forever
    ({b"size": b"-1"}, None),
    ({b"size": b"+1"}, None),
    ({b"size": b"1_0"}, None),
    ({b"size": b" 1"}, None),
    ({b"size": b""}, None),
    ({}, raw_header(b"f", b"0", b"-0000000001\0")),
    ({}, raw_header(b"f", b"0", b"\xff" * 12)),         # negative base-256
    ({}, raw_header(b"f", b"0", b"0o000000001\0")),
    ({}, raw_header(b"f", b"0", mtime=b"zzzzzzzzzzz\0")),
    ({}, raw_header(b"f", b"0", mode=b"0000999\0")),
])
def test_negative_or_non_numeric_sizes_are_refused_without_looping(
        sandbox: Path, records: dict[bytes, bytes], header: bytes | None) -> None:
    layer = pax_member(records, _NEXT) if records else header + end_of_archive()
    with time_bound(20):
        refused(sandbox, r"^layer 1: corrupt (pax size|tar header)", layer)


def test_reader_never_moves_backwards(sandbox: Path) -> None:
    from gateway.tarread import Budget, Layer, Reader

    blob = sandbox / "blob"
    blob.write_bytes(bytes(1024))
    with open(blob, "rb", buffering=0) as fh:
        reader = Reader(fh.fileno(), Layer(str(blob), 3), Budget(1 << 20))
        reader.read_exact(512)
        for move in (lambda: reader.copy(-512, None), lambda: reader.read_exact(-1)):
            with pytest.raises(ShifterError, match=r"layer 3: corrupt tar stream \(negative length"):
                move()
        assert reader.pos == 512


def _flatten_peak(work: Path, layer: bytes, **limits: int) -> tuple[str | None, int, float]:
    """Run the flattener alone (output to /dev/null): (error, peak traced bytes, seconds)."""
    from gateway.flatten import Flattener

    blobs = write_layers(work, (layer,))
    out = os.open(os.devnull, os.O_WRONLY)
    error = None
    tracemalloc.start()
    started = time.monotonic()
    try:
        with time_bound(30):
            Flattener(out, 1 << 30, **limits).run(blobs)
    except ShifterError as err:
        error = str(err)
    finally:
        seconds = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        os.close(out)
    return error, peak, seconds


def test_deep_names_are_refused_in_bounded_time_and_memory(sandbox: Path) -> None:
    # 8,000 levels in one name: every ancestor prefix kept cost 64 MB; 40,000 cost 3 GB
    deep = file(b"a/" * 8000 + b"f", b"x")
    error, peak, seconds = _flatten_peak(sandbox, tar_bytes([deep]))
    assert error == "layer 1: name longer than 4096 bytes: " + "a/" * 100 + "..."
    assert peak < 8 << 20 and seconds < 5, (peak, seconds)
    error, peak, _ = _flatten_peak(sandbox, tar_bytes([file(b"d/" * 300 + b"f", b"x")]))
    assert error is not None and error.startswith("layer 1: path deeper than 256 components: d/d/")
    error, _, _ = _flatten_peak(sandbox, tar_bytes([file(b"x/" + b"n" * 256, b"x")]))
    assert error is not None and error.startswith("layer 1: a component longer than 255 bytes in x/nnn")
    assert _flatten_peak(sandbox, tar_bytes([file(b"d/" * 255 + b"f", b"x")]))[0] is None


def test_the_merge_memory_is_linear_in_its_paths_and_capped(sandbox: Path) -> None:
    # each entry at the largest allowed depth and length under its own top directory: the
    # ancestors kept are what the index cap counts
    deep = [file(b"t%03d/" % i + b"/".join([b"c" * 14] * 254) + b"/f", b"") for i in range(400)]
    layer = tar_bytes(deep)
    error, peak, _ = _flatten_peak(sandbox, layer, max_index_bytes=16 << 20)
    assert error == "layer 1: the image's paths add up to more than 16777216 bytes (deeply nested names?)"
    # each kept path costs at most twice its length (its entry and its parent's child
    # count) plus a fixed overhead: the bound docs/gateway.md states
    assert peak < 2 * (16 << 20) + (8 << 20), peak
    error, _, _ = _flatten_peak(sandbox, tar_bytes([file(f"f{i}") for i in range(101)]), max_paths=100)
    assert error == "layer 1: the image has more than 100 paths (MaxImagePaths)"
    # the setting reaches the flattener through the converter, with tar2sqfs running
    refused(sandbox, r"^layer 1: the image has more than 1000 paths \(MaxImagePaths\)$",
            tar_bytes([file(f"d{i % 10}/f{i}") for i in range(1001)]), max_paths=1000)
    # a plain image: memory grows with the paths, by less than their length plus 400 bytes each
    flat = tar_bytes([file(f"dir{i % 50}/file-{i:06d}") for i in range(20_000)])
    error, peak, _ = _flatten_peak(sandbox, flat)
    assert error is None and peak < 20_050 * (20 + 400) + (4 << 20), peak


def test_control_characters_in_a_path_are_escaped_in_the_message(sandbox: Path) -> None:
    with pytest.raises(ShifterError) as err:
        build(sandbox, tar_bytes([file("../\x1b]0;owned\x07\x1b[2J\nFAKE: ok\u2028".encode(), b"x")]))
    message = str(err.value)
    assert message == "layer 1: path escapes the image root: ../\\x1b]0;owned\\x07\\x1b[2J\\nFAKE: ok\\u2028"
    assert message.isprintable()
