"""Layer flattening into squashfs: overlay semantics, permissions, formats, converter options.

Every test builds real layer tars, runs the real pipeline (our flattener feeding the real
``tar2sqfs``) and reads the produced image back with the real ``sqfs2tar``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gateway.convert import compressor_options
from localcluster.oci import (
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
from tests.layer_blobs import squash, write_layers

LIMIT = 1 << 30


def build(tmp_path: Path, *layers: bytes, options: list[str] | None = None, limit: int = LIMIT):
    """Write ``layers`` (bottom first) as blobs, squash them, return the image's entries."""
    return read_squashfs(squash(tmp_path, write_layers(tmp_path, layers), options, limit))


def test_later_layers_win_and_whiteouts_hide_lower_entries(tmp_path: Path) -> None:
    base = tar_bytes([directory("etc"), file("etc/passwd", b"old"), file("etc/gone", b"x"),
                      directory("var/cache"), file("var/cache/a", b"a"), file("keep", b"k")])
    top = tar_bytes([file("etc/passwd", b"new"), file("etc/.wh.gone"), file("var/.wh.cache")])
    image = build(tmp_path, gzip_bytes(base), gzip_bytes(top))
    assert image["etc/passwd"][1] == b"new"
    assert "etc/gone" not in image
    assert "var" in image and "var/cache" not in image and "var/cache/a" not in image
    assert image["keep"][1] == b"k"
    assert not any(".wh." in name for name in image)


def test_whiteout_only_hides_lower_layers_and_a_path_can_come_back(tmp_path: Path) -> None:
    one = tar_bytes([file("a", b"1")])
    two = tar_bytes([file(".wh.a")])
    three = tar_bytes([file("a", b"3")])
    assert build(tmp_path, one, two, three)["a"][1] == b"3"
    assert "a" not in build(tmp_path, one, two)


def test_opaque_whiteout_replaces_directory_content(tmp_path: Path) -> None:
    base = tar_bytes([directory("opt/app"), file("opt/app/old", b"o"), directory("opt/app/sub"),
                      file("opt/app/sub/deep", b"d"), file("opt/other", b"x")])
    top = tar_bytes([directory("opt/app", 0o750), file("opt/app/.wh..wh..opq"), file("opt/app/new", b"n")])
    image = build(tmp_path, zstd_bytes(base), top)
    names = {n for n in image if n.startswith("opt/app")}
    assert names == {"opt/app", "opt/app/new"}
    assert image["opt/other"][1] == b"x"
    assert image["opt/app"][0].mode == 0o755  # a+rX applied to the upper directory's 0750


def test_upper_file_replaces_lower_directory_and_its_subtree(tmp_path: Path) -> None:
    base = tar_bytes([directory("d"), file("d/x", b"x"), symlink("s", "d")])
    top = tar_bytes([file("d", b"now a file"), directory("s"), file("s/y", b"y")])
    image = build(tmp_path, base, top)
    assert image["d"][0].isreg() and image["d"][1] == b"now a file"
    assert "d/x" not in image
    assert image["s"][0].isdir() and image["s/y"][1] == b"y"


def test_lower_directory_attributes_fill_directories_an_upper_layer_only_implied(tmp_path: Path) -> None:
    base = tar_bytes([directory("srv", 0o711), directory("srv/data", 0o700), file("srv/data/old", b"o")])
    top = tar_bytes([file("srv/data/new", b"n")])  # no directory entries at all
    image = build(tmp_path, base, top)
    assert image["srv/data/new"][1] == b"n" and image["srv/data/old"][1] == b"o"
    assert image["srv"][0].mode == 0o755 and image["srv/data"][0].mode == 0o755


def test_permissions_made_readable_and_owner_root(tmp_path: Path) -> None:
    layer = tar_bytes([directory("private", 0o700), file("private/secret", b"s", 0o600),
                       file("tool", b"#!", 0o700), directory("tmp", 0o1777)])
    image = build(tmp_path, layer)
    assert image["private"][0].mode == 0o755
    assert image["private/secret"][0].mode == 0o644
    assert image["tool"][0].mode == 0o755
    assert image["tmp"][0].mode == 0o1777
    assert all(info.uid == 0 and info.gid == 0 for info, _ in image.values())


def test_gzip_zstd_and_plain_layers_mix(tmp_path: Path) -> None:
    image = build(tmp_path, gzip_bytes(tar_bytes([file("g", b"gzip")])),
                  zstd_bytes(tar_bytes([file("z", b"zstd")])), tar_bytes([file("p", b"plain")]))
    assert (image["g"][1], image["z"][1], image["p"][1]) == (b"gzip", b"zstd", b"plain")


def test_hardlinks_and_long_names_survive(tmp_path: Path) -> None:
    long_dir = "d" * 120
    long_name = f"{long_dir}/{'f' * 200}"
    layer = tar_bytes([file("usr/bin/perl5", b"perl"), hardlink("usr/bin/perl", "usr/bin/perl5"),
                       file(long_name, b"long"), symlink("link", "/" + "t" * 300)])
    image = build(tmp_path, layer)
    assert image[long_name][1] == b"long"
    assert image["link"][0].linkname == "/" + "t" * 300
    # sqfs2tar writes the second name of a shared inode as a tar hard link: one inode, two names
    perl = sorted((image[n][0].type, image[n][0].linkname, image[n][1])
                  for n in ("usr/bin/perl", "usr/bin/perl5"))
    assert perl[0] == (b"0", "", b"perl") and perl[1][0] == b"1"
    assert perl[1][1].endswith(("usr/bin/perl", "usr/bin/perl5"))


def test_big_file_is_copied_exactly(tmp_path: Path) -> None:
    data = bytes(range(256)) * 20_000 + b"tail"
    image = build(tmp_path, gzip_bytes(tar_bytes([file("blob", data)])))
    assert image["blob"][1] == data


def test_default_compressor_is_zstd_level_3(tmp_path: Path) -> None:
    build(tmp_path, tar_bytes([file("a", b"a")]))
    stat = subprocess.run(["unsquashfs", "-stat", str(tmp_path / "image.squashfs")],
                          capture_output=True, text=True, check=True).stdout
    assert "Compression zstd" in stat and "compression-level 3" in stat
    assert "Xattrs are not stored" in stat


def test_converter_options_accept_both_spellings_and_refuse_others() -> None:
    assert compressor_options(None) == ["-c", "zstd", "-X", "level=3"]
    assert compressor_options(["-comp", "xz", "-b", "1M", "-no-xattrs", "-all-root"]) == \
        ["-c", "xz", "-b", "1048576"]
    assert compressor_options(["-Xcompression-level", "9"]) == ["-c", "zstd", "-X", "level=9"]
    assert compressor_options(["-c", "lz4", "-j", "2"]) == ["-c", "lz4", "-j", "2"]
    with pytest.raises(ShifterError, match="unsupported option '-r'"):
        compressor_options(["-r", "/etc"])
    with pytest.raises(ShifterError, match="unknown compressor"):
        compressor_options(["-comp", "bogus"])


def test_converter_options_reach_tar2sqfs(tmp_path: Path) -> None:
    build(tmp_path, tar_bytes([file("a", b"a")]), options=["-comp", "gzip"])
    stat = subprocess.run(["unsquashfs", "-stat", str(tmp_path / "image.squashfs")],
                          capture_output=True, text=True, check=True).stdout
    assert "Compression gzip" in stat


def test_tar2sqfs_failure_is_reported_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(ShifterError, match="squashfs conversion failed: tar2sqfs"):
        build(tmp_path, tar_bytes([file("a", b"a")]), options=["-c", "zstd", "-X", "level=999"])
    assert not (tmp_path / "image.squashfs").exists()


def test_corrupt_gzip_layer_names_the_layer(tmp_path: Path) -> None:
    good = gzip_bytes(tar_bytes([file("a", b"a" * 100_000)]))
    broken = good[:len(good) // 2] + bytes(len(good) // 2)
    with pytest.raises(ShifterError, match="layer 2: (gzip decompression failed|truncated)"):
        build(tmp_path, tar_bytes([file("b", b"b")]), broken)
    assert not (tmp_path / "image.squashfs").exists()


def test_hardlink_keeps_old_content_when_an_upper_layer_replaces_or_deletes_its_target(
        tmp_path: Path) -> None:
    base = tar_bytes([file("bin/perl5", b"old perl"), hardlink("bin/perl", "bin/perl5"),
                      hardlink("bin/perl-again", "bin/perl"), file("lib/a", b"lib a"), hardlink("lib/b", "lib/a")])
    top = tar_bytes([file("bin/perl5", b"new perl"), file("lib/.wh.a")])
    image = build(tmp_path, gzip_bytes(base), top)
    assert image["bin/perl5"][1] == b"new perl"
    linked = {n: image[n] for n in ("bin/perl", "bin/perl-again")}
    assert all(info.isreg() or info.islnk() for info, _ in linked.values())
    regular = [n for n, (info, _) in linked.items() if info.isreg()]
    assert len(regular) == 1 and image[regular[0]][1] == b"old perl"
    assert "lib/a" not in image and image["lib/b"][1] == b"lib a"


def test_prefetching_lower_layers_gives_the_same_stream_and_cleans_up(tmp_path: Path) -> None:
    from gateway.flatten import flatten

    tars = [tar_bytes([file(f"l{n}/{i}", bytes([n]) * 5000) for i in range(200)] + [file("same", bytes([n]))])
            for n in range(4)]
    blobs = write_layers(tmp_path, tuple(gzip_bytes(data) if n % 2 else zstd_bytes(data)
                                         for n, data in enumerate(tars, 1)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    streams = []
    for use_scratch in (None, str(scratch)):
        out = tmp_path / f"out-{bool(use_scratch)}.tar"
        with open(out, "wb") as handle:
            flatten(blobs, handle.fileno(), 1 << 30, scratch=use_scratch)
        streams.append(out.read_bytes())
    assert streams[0] == streams[1]
    assert not list(scratch.iterdir())


def test_bomb_in_a_prefetched_lower_layer_still_names_the_limit(tmp_path: Path) -> None:
    bomb = gzip_bytes(tar_bytes([file("zeros", bytes(24 << 20))]))
    with pytest.raises(ShifterError, match=r"layer 1: image exceeds the size limit of 8388608 bytes"):
        build(tmp_path, bomb, tar_bytes([file("top", b"t")]), gzip_bytes(tar_bytes([file("mid", b"m")])),
              limit=8 << 20)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".layer")] == []
