"""Local publishing: a squashfs on the imageDir's filesystem is linked, not copied; another
filesystem's is copied; either way the image appears whole, with its mode, and never
replaces an existing one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.publish import PublishTarget, publish_files
from shifter.formats.meta import ImageMeta

IMAGE_ID = "b" * 64


def _built(directory: Path) -> Path:
    squashfs = directory / "built.squashfs"
    squashfs.write_bytes(b"hsqs" + os.urandom(100_000))
    os.chmod(squashfs, 0o600)
    return squashfs


def test_same_filesystem_image_is_linked_whole_with_its_mode(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    squashfs = _built(tmp_path)
    publish_files(str(squashfs), IMAGE_ID, ImageMeta(), PublishTarget(str(images)))
    published = images / f"{IMAGE_ID}.squashfs"
    assert os.stat(published).st_ino == os.stat(squashfs).st_ino  # no second write of the bytes
    assert published.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in images.iterdir()) == [f"{IMAGE_ID}.meta", f"{IMAGE_ID}.squashfs"]
    squashfs.unlink()  # the scratch directory goes; the image stays
    assert published.read_bytes()[:4] == b"hsqs"


def test_an_existing_image_is_never_replaced_by_a_link(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / f"{IMAGE_ID}.squashfs").write_bytes(b"first")
    publish_files(str(_built(tmp_path)), IMAGE_ID, ImageMeta(), PublishTarget(str(images)))
    assert (images / f"{IMAGE_ID}.squashfs").read_bytes() == b"first"


def test_another_filesystems_image_is_copied(tmp_path: Path) -> None:
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the test's tmp_path")
    images = tmp_path / "images"
    images.mkdir()
    scratch = Path(os.path.realpath("/dev/shm")) / f"publish-test-{os.getpid()}"
    scratch.mkdir()
    try:
        squashfs = _built(scratch)
        publish_files(str(squashfs), IMAGE_ID, ImageMeta(), PublishTarget(str(images)))
        published = images / f"{IMAGE_ID}.squashfs"
        assert published.read_bytes() == squashfs.read_bytes()
        assert os.stat(published).st_ino != os.stat(squashfs).st_ino
    finally:
        for child in scratch.iterdir():
            child.unlink()
        scratch.rmdir()
    assert sorted(p.name for p in images.iterdir()) == [f"{IMAGE_ID}.meta", f"{IMAGE_ID}.squashfs"]
