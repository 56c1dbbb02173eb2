"""Property: whatever tar streams a hostile image carries, the flattener and tar2sqfs give
either a clean image confined to its root or one printable line naming the layer, within a
time and memory bound (issue 10).

Layers are built from raw headers (tests/layer_blobs.py), so sizes, numeric fields, pax
records and names can be anything, not only what ``tarfile`` would write; each layer is
plain, gzip or zstd.  ``HOSTILE_EXAMPLES`` sets the number of examples (default 100, about
5 s here; ``HOSTILE_EXAMPLES=5000`` for a long run, see docs/gateway.md).
"""

from __future__ import annotations

import os
import re
import tempfile
import tracemalloc
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from localcluster.oci import gzip_bytes, read_squashfs, zstd_bytes
from shifter.errors import ShifterError
from tests.layer_blobs import end_of_archive, pax_member, raw_header, squash, write_layers
from tests.unit.gateway.test_hostile_layers import _snapshot, time_bound

EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "100"))

components = st.one_of(
    st.sampled_from([b"..", b".", b"", b"etc", b"usr", b"bin", b"a", b".wh..wh..opq", b".wh.a",
                     b".wh.etc", b".wh..", b".wh.", b"\xff\xfe", b"\x1b[2J", b"x\ny", b"a" * 300]),
    st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")),
)
names = st.lists(components, min_size=1, max_size=6).map(b"/".join) | st.sampled_from(
    [b"/", b"./", b"/etc/passwd", b"../../escape", b"a/" * 300 + b"f", b"x" * 5000])
octal = st.integers(min_value=0, max_value=8**11 - 1).map(lambda v: b"%011o\0" % v)
mostly_valid = st.sampled_from([True, True, True, False])
numeric = st.one_of(octal, st.sampled_from([b"-0000000001\0", b"\xff" * 12, b"\x80" + bytes(10) + b"\x05",
                                            b"0o00000001\0", b"zzzzzzzzzzz\0", b"           ", b""]))
pax_values = st.one_of(st.sampled_from([b"-512", b"-1", b"0", b"1", b"+1", b" 1", b"1e300", b"inf",
                                        b"99999999999999999999999", b"", b"1.5"]),
                       st.binary(max_size=12))
pax_records = st.dictionaries(
    st.sampled_from([b"size", b"mtime", b"path", b"linkpath", b"SCHILY.xattr.security.capability",
                     b"GNU.sparse.size", b"comment"]), pax_values | names, max_size=3)


@st.composite
def members(draw: st.DrawFn) -> bytes:
    name = draw(names)
    typeflag = draw(st.sampled_from([b"0", b"0", b"5", b"5", b"2", b"1", b"3", b"6", b"7", b"S", b"K", b"L",
                                     b"g", b"Z"]))
    data = draw(st.binary(max_size=600)) if typeflag in (b"0", b"7", b"L", b"K") else b""
    size = b"%011o\0" % len(data) if draw(mostly_valid) else draw(numeric)
    mode = b"0000755\0" if draw(mostly_valid) else draw(numeric)
    mtime = b"%011o\0" % 1_700_000_000 if draw(mostly_valid) else draw(numeric)
    header = raw_header(name[:100], typeflag, size, mode, mtime)
    link = draw(names)
    header = header[:157] + link[:100].ljust(100, b"\0") + header[257:]
    header = header[:148] + b" " * 8 + header[156:]
    header = header[:148] + b"%06o\0 " % sum(header) + header[156:]
    body = data + bytes(-len(data) % 512)
    member = header + body
    if not draw(mostly_valid):
        records = draw(pax_records)
        if len(name) > 100 and draw(st.booleans()):
            records[b"path"] = name
        member = pax_member(records, b"") + member
    return member


@st.composite
def layers(draw: st.DrawFn) -> list[bytes]:
    result = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        stream = b"".join(draw(st.lists(members(), max_size=6)))
        ending = draw(st.sampled_from(["end", "none", "truncated", "trailer"]))
        if ending == "end":
            stream += end_of_archive()
        elif ending == "truncated" and stream:
            stream = stream[:draw(st.integers(min_value=0, max_value=len(stream) - 1))]
        elif ending == "trailer":
            stream += end_of_archive() + draw(st.binary(max_size=64))
        compress = draw(st.sampled_from([bytes, gzip_bytes, zstd_bytes]))
        result.append(compress(stream))
    return result


_ONE_LINE = re.compile(r"layer [1-3]: [^\n]+")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.data_too_large])
@given(layers())
def test_hostile_tar_streams_give_a_clean_image_or_one_line(blobs: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as top:
        outside = Path(top)
        work = outside / "a" / "b" / "work"
        work.mkdir(parents=True)
        written = write_layers(work, tuple(blobs))
        before = _snapshot(outside)
        output = work / "image.squashfs"
        tracemalloc.start()
        error = None
        try:
            with time_bound(20):
                squash(work, written, None, 64 << 20)
        except ShifterError as err:
            error = str(err)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        created = _snapshot(outside) - before
        assert peak < 96 << 20, peak
        event("refused: " + error.split(": ")[1][:30] if error else "clean image")
        if error is not None:
            assert _ONE_LINE.fullmatch(error) and error.isprintable(), error
            assert created == set(), created
            return
        assert created == {"a/b/work/image.squashfs"}, created
        for name, (info, _) in read_squashfs(output).items():
            assert not name.startswith("/") and ".." not in name.split("/"), name
            assert info.uid == 0 and info.gid == 0 and not info.mode & 0o6000
            assert info.isdir() or info.isreg() or info.issym() or info.islnk(), name
