"""A full filesystem ends a pull with one line naming the directory and the step
(issue 10, "Disk"): a small real tmpfs holds the blob cache or the scratch space."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster.oci import file, gzip_bytes, tar_bytes
from shifter.errors import ShifterError
from tests.unit.gateway.test_pull_bounds import Registry, pull, spec_for


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def big_registry() -> Iterator[Registry]:
    reg = Registry(gzip_bytes(tar_bytes([file("noise", os.urandom(2 << 20))])))
    yield reg
    reg.close()


def test_a_full_cache_filesystem_names_the_directory_and_the_download(
        big_registry: Registry, small_fs: Path, tmp_path: Path) -> None:
    spec = spec_for(big_registry, tmp_path)
    spec.cache_dir = str(small_fs)
    with pytest.raises(ShifterError) as err:
        pull(spec)
    assert str(err.value) == (f"no space left on {small_fs}/blobs/sha256 while downloading layer"
                              f" {big_registry.digest(big_registry.layer)[:19]}")
    assert [p for p in os.listdir(small_fs / "blobs" / "sha256") if ".partial-" in p] == []


def test_a_full_scratch_filesystem_names_the_directory_and_the_conversion(
        big_registry: Registry, small_fs: Path, tmp_path: Path) -> None:
    spec = spec_for(big_registry, tmp_path)
    spec.expand_dir = str(small_fs)
    with pytest.raises(ShifterError) as err:
        pull(spec)
    assert str(err.value) == f"no space left on {small_fs} while converting (tar2sqfs)"
    assert os.listdir(small_fs) == []
