"""Root paths of setupRoot/unsetupRoot run while the job's user races them (tests/race.py).

Each test repeats a real setup and teardown many times, within a bounded time, while the user
swaps a directory it controls with a symlink to a host directory holding canary files, and
asserts that root never touched the canaries.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

from tests.race import swapping

_TRIALS = 40
_SECONDS = 25.0
_PAIRS = 3
_CANARIES = [f"canary{index}" for index in range(8)]


def _host_canaries(site) -> str:
    """A host directory the user must never see emptied (root's, like /etc)."""
    host = os.path.join(site.base, "host-canaries")
    shutil.rmtree(host, ignore_errors=True)
    os.mkdir(host, 0o755)
    for name in _CANARIES:
        with open(os.path.join(host, name), "w") as fh:
            fh.write("keep\n")
    return host


def _plant_swap_pairs(job_dir: str, host: str, user) -> list[tuple[str, str]]:
    """What the user can do in its own job directory: ``dN`` (a directory whose entries have the
    canaries' names) next to ``lN`` (a symlink to the host directory)."""
    pairs = []
    for index in range(_PAIRS):
        directory, link = os.path.join(job_dir, f"d{index}"), os.path.join(job_dir, f"l{index}")
        os.mkdir(directory)
        for name in _CANARIES + [f"filler{n}" for n in range(100)]:
            with open(os.path.join(directory, name), "w"):
                pass
        os.symlink(host, link)
        for path in (directory, link, *[os.path.join(directory, n) for n in os.listdir(directory)]):
            os.lchown(path, user.uid, user.gid)
        pairs.append((directory, link))
    return pairs


def test_epilog_delete_never_follows_a_swapped_symlink(clean_site, users):
    site, user = clean_site, users[0]
    host = _host_canaries(site)
    deadline = time.monotonic() + _SECONDS
    trials = swaps = 0
    try:
        while trials < _TRIALS and time.monotonic() < deadline:
            trials += 1
            result = site.setup("801", user)
            assert result.returncode == 0, result.stderr
            job_dir = os.path.join(site.udi_mount, "801")
            os.chown(job_dir, user.uid, user.gid)  # the layout without POSIX ACLs: the user owns its job directory
            pairs = _plant_swap_pairs(job_dir, host, user)
            with contextlib.ExitStack() as stack:
                swappers = [stack.enter_context(swapping(a, b, uid=user.uid, gid=user.gid, max_seconds=10))
                            for a, b in pairs]
                time.sleep(0.02)
                result = site.unsetup("--job-id", "801")
            swaps += sum(s.swaps for s in swappers)
            assert sorted(os.listdir(host)) == _CANARIES, f"trial {trials}: root deleted host files"
            # a refusal (a swapped-in directory of another filesystem) is allowed; leftovers are not
            if result.returncode != 0:
                assert "801" in result.stderr and "Traceback" not in result.stderr, result.stderr
            assert site.unsetup("--job-id", "801").returncode == 0
            assert not os.path.lexists(job_dir)
    finally:
        shutil.rmtree(host, ignore_errors=True)
    assert trials >= 5 and swaps > 0


def _mounts_at(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line for line in fh if line.split()[4] == path]


def test_user_volume_target_never_lands_outside_the_allowed_places(clean_site, users):
    """The user swaps an intermediate component of its target (in the host's /tmp, seen as the
    container's /tmp) with a relative symlink to /opt; the volume must never cover /opt/udiImage."""
    site, user = clean_site, users[0]
    base = f"/tmp/shifter-race-{os.getpid()}"
    os.mkdir(base, 0o755)
    os.chown(base, user.uid, user.gid)
    pairs, volumes = [], []
    for index in range(1):  # one volume: a refusal of any volume ends the setup, and with it the trial
        directory, link = f"{base}/a{index}", f"{base}/l{index}"
        os.makedirs(f"{directory}/udiImage")
        os.symlink("../../opt", link)
        for path in (directory, f"{directory}/udiImage", link):
            os.lchown(path, user.uid, user.gid)
        pairs.append((directory, link))
        volumes += ["-v", f"/site1/shared:{directory}/udiImage"]
    deadline = time.monotonic() + _SECONDS
    trials = swaps = refused = 0
    try:
        while trials < _TRIALS and time.monotonic() < deadline:
            trials += 1
            with contextlib.ExitStack() as stack:
                swappers = [stack.enter_context(swapping(a, b, uid=user.uid, gid=user.gid, max_seconds=10))
                            for a, b in pairs]
                time.sleep(0.02)
                result = site.setup("802", user, *volumes)
            swaps += sum(s.swaps for s in swappers)
            root = _root(site, "802")
            covered = _mounts_at(os.path.join(root, "opt/udiImage"))
            assert result.returncode in (0, 1), result.stderr
            refused += result.returncode == 1
            assert not covered, f"trial {trials}: a user volume covers /opt/udiImage: {covered}"
            assert site.unsetup("--job-id", "802").returncode == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert trials >= 5 and swaps > 0


def _root(site, jobid: str) -> str:
    return os.path.join(site.udi_mount, jobid, "root")


def test_local_image_copy_never_hands_the_user_a_host_secret(clean_site, users):
    """A ``local:`` tree whose /etc the user owns and whose files it swaps with symlinks to a
    root-only host file: a copy must carry the owner and mode of what was read, never the user's."""
    site, user = clean_site, users[0]
    site.write_config("allowLocalChroot=1\n")
    secret = os.path.join(site.base, "secret")
    with open(secret, "w") as fh:
        fh.write("SECRET\n")
    os.chmod(secret, 0o600)
    tree = os.path.join(site.base, "localrace")
    os.makedirs(os.path.join(tree, "etc"))
    os.makedirs(os.path.join(tree, "bin"))
    pairs = []
    for index in range(_PAIRS):
        plain, link = os.path.join(tree, "etc", f"f{index}"), os.path.join(tree, "etc", f"l{index}")
        with open(plain, "w") as fh:
            fh.write("mine\n")
        os.symlink(secret, link)
        pairs.append((plain, link))
    # a root-owned tree with a user-writable directory inside, as /tmp is in local:/
    for path in (os.path.join(tree, "etc"), *[p for pair in pairs for p in pair]):
        os.lchown(path, user.uid, user.gid)
    deadline = time.monotonic() + _SECONDS
    trials = swaps = 0
    try:
        while trials < _TRIALS and time.monotonic() < deadline:
            trials += 1
            with contextlib.ExitStack() as stack:
                swappers = [stack.enter_context(swapping(a, b, uid=user.uid, gid=user.gid, max_seconds=10))
                            for a, b in pairs]
                time.sleep(0.02)
                result = site.setup("803", user, image=tree, image_type="local")
            swaps += sum(s.swaps for s in swappers)
            assert result.returncode == 0, result.stderr
            etc = os.path.join(_root(site, "803"), "etc")
            for name in os.listdir(etc) if result.returncode == 0 else []:
                path = os.path.join(etc, name)
                info = os.lstat(path)
                if not os.path.isfile(path) or os.path.islink(path):
                    continue
                with open(path) as fh:
                    if fh.read() == "SECRET\n":
                        assert info.st_uid == 0 and info.st_mode & 0o077 == 0, \
                            f"trial {trials}: /etc/{name} hands the host secret to the user"
            assert site.unsetup("--job-id", "803").returncode == 0
    finally:
        shutil.rmtree(tree, ignore_errors=True)
        os.unlink(secret)
    assert trials >= 5 and swaps > 0
