"""The race harness itself, and shifter/runtime/fdpath.py against it.

The harness must really swap as the unprivileged user (or every race test would pass
vacuously), and fdpath's descriptor walks must hold where a path-string walk loses.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from shifter.runtime import fdpath
from tests.race import swapping


@pytest.fixture
def arena(users):
    """A user-owned directory holding ``d`` (a directory) and ``l`` (a symlink to a host
    directory with canaries), as a user would prepare a swap (in /run: pytest's tmp_path is
    not reachable by other users)."""
    user = users[0]
    top = Path(tempfile.mkdtemp(prefix="shifter-race-", dir="/run"))
    os.chmod(top, 0o755)
    base = top / "arena"
    host = top / "host"
    base.mkdir()
    host.mkdir()
    for index in range(5):
        (host / f"canary{index}").write_text("keep\n")
    os.chown(base, user.uid, user.gid)
    (base / "d").mkdir()
    os.chown(base / "d", user.uid, user.gid)
    os.symlink(str(host), base / "l")
    os.lchown(base / "l", user.uid, user.gid)
    yield user, base, host
    shutil.rmtree(top)


def test_harness_swaps_as_the_user_and_stops(arena):
    user, base, _host = arena
    with swapping(str(base / "d"), str(base / "l"), uid=user.uid, gid=user.gid, max_seconds=5) as swapper:
        time.sleep(0.2)
        seen = {os.path.islink(base / "d") for _ in range(2000)}
    assert swapper.swaps > 100
    assert seen == {True, False}
    with pytest.raises(ChildProcessError):
        os.waitpid(swapper.pid, os.WNOHANG)


def test_harness_cannot_swap_what_the_user_may_not_rename(arena):
    user, base, _host = arena
    os.chown(base, 0, 0)
    with swapping(str(base / "d"), str(base / "l"), uid=user.uid, gid=user.gid, max_seconds=5) as swapper:
        time.sleep(0.2)
    assert swapper.swaps == 0
    assert os.path.isdir(base / "d") and os.path.islink(base / "l")


def test_harness_respects_its_count_bound(arena):
    user, base, _host = arena
    with swapping(str(base / "d"), str(base / "l"), uid=user.uid, gid=user.gid, max_swaps=7) as swapper:
        time.sleep(0.3)
    assert swapper.swaps == 7


def test_remove_tree_never_deletes_through_a_swapped_symlink(arena):
    user, base, host = arena
    trials = 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and trials < 30:
        trials += 1
        job = base / "job"
        job.mkdir()
        os.chown(job, user.uid, user.gid)
        os.rename(base / "d", job / "d") if (base / "d").exists() else None
        if not (job / "d").exists():
            (job / "d").mkdir()
            os.chown(job / "d", user.uid, user.gid)
        for index in range(50):
            (job / "d" / f"f{index}").write_text("x")
        if not os.path.lexists(job / "l"):
            os.symlink(str(host), job / "l")
            os.lchown(job / "l", user.uid, user.gid)
        parent = fdpath.open_dir(str(base))
        try:
            with swapping(str(job / "d"), str(job / "l"), uid=user.uid, gid=user.gid, max_seconds=5):
                try:
                    fdpath.remove_tree(parent, "job")
                except OSError:
                    pass  # a refusal is fine; a deleted canary is not
            if os.path.lexists(job):
                fdpath.remove_tree(parent, "job")
        finally:
            os.close(parent)
        assert sorted(os.listdir(host)) == [f"canary{i}" for i in range(5)], f"trial {trials}"
    assert trials >= 5


def test_open_in_root_keeps_absolute_links_and_dotdot_inside(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "inside").write_text("in\n")
    os.symlink("/etc", root / "data")
    os.symlink("../../../../..", root / "up")
    root_fd = fdpath.open_dir(str(root))
    try:
        fd = fdpath.open_in_root(root_fd, "data/inside", os.O_RDONLY)
        assert os.read(fd, 10) == b"in\n"
        os.close(fd)
        fd = fdpath.open_in_root(root_fd, "up/etc", os.O_PATH)
        assert fdpath.relative_to(root_fd, fd) == "/etc"
        os.close(fd)
        with pytest.raises(OSError):
            fdpath.open_no_symlinks(root_fd, "data/inside", os.O_RDONLY)
        with pytest.raises(OSError):
            fdpath.open_in_root(root_fd, "/proc/self/root/etc/passwd", os.O_RDONLY)
    finally:
        os.close(root_fd)


def test_make_dirs_in_root_creates_inside_through_a_link(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink("/etc", root / "data")
    root_fd = fdpath.open_dir(str(root))
    try:
        fd = fdpath.make_dirs_in_root(root_fd, "/data/a/b")
        assert fdpath.relative_to(root_fd, fd) == "/etc/a/b"
        os.close(fd)
        assert not os.path.exists("/etc/a/b")
        with pytest.raises(OSError):
            fdpath.make_dirs_in_root(root_fd, "/x/y", device=os.stat(root).st_dev + 1)
    finally:
        os.close(root_fd)


def test_fallback_walk_refuses_links(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    os.symlink("a", root / "l")
    monkeypatch.setattr(fdpath, "_have_openat2", False)
    root_fd = fdpath.open_dir(str(root))
    try:
        os.close(fdpath.open_in_root(root_fd, "a", os.O_PATH))
        for path in ("l", "l/", "a/../a"):
            with pytest.raises(OSError):
                fdpath.open_in_root(root_fd, path, os.O_PATH)
    finally:
        os.close(root_fd)


def test_bind_fd_restricts_before_attaching_and_leaves_nothing_on_failure(tmp_path):
    from shifter.runtime.mounts import mounts_under

    source, target, afile = tmp_path / "source", tmp_path / "target", tmp_path / "file"
    source.mkdir()
    target.mkdir()
    afile.write_text("")
    (source / "x").write_text("x\n")
    source_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    target_fd, file_fd = fdpath.open_dir(str(target)), os.open(afile, os.O_PATH)
    try:
        with pytest.raises(OSError):
            fdpath.bind_fd(source_fd, file_fd)  # a directory onto a file: refused by move_mount
        assert mounts_under(str(tmp_path)) == []
        fdpath.bind_fd(source_fd, target_fd, readonly=True)
        try:
            assert (target / "x").read_text() == "x\n"
            flags = os.statvfs(target).f_flag
            assert flags & os.ST_RDONLY and flags & os.ST_NOSUID and flags & os.ST_NODEV
        finally:
            from shifter.runtime import linux

            linux.umount2(str(target))
    finally:
        for fd in (source_fd, target_fd, file_fd):
            os.close(fd)
    assert mounts_under(str(tmp_path)) == []
