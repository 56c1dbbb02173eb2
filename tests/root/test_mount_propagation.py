"""A node whose root mount is shared (systemd's default): no job mount reaches another namespace.

setupRoot runs inside ``unshare -m --propagation shared``; a peer namespace (made from it with
propagation unchanged, like a PrivateTmp service's) must see none of the job's mounts, and the
job's loop device must go away with unsetupRoot.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.root.conftest import REPO

DRIVER = r"""
import os, subprocess, sys, time
sys.path.insert(0, {repo!r})
from shifter.runtime.mounts import mounts_under
setup, unsetup = {setup!r}, {unsetup!r}
udi, loop, jobid = {udi!r}, {loop!r}, {jobid!r}
peer = subprocess.Popen(["unshare", "-m", "--propagation", "unchanged", "sleep", "60"])
time.sleep(0.3)
try:
    result = subprocess.run(setup, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    job_mounts = mounts_under(os.path.join(udi, jobid)) + mounts_under(os.path.join(loop, jobid))
    assert job_mounts, "the job's environment is not mounted"
    table = f"/proc/{{peer.pid}}/mountinfo"
    leaked = mounts_under(os.path.join(udi, jobid), table) + mounts_under(os.path.join(loop, jobid), table)
    print("LEAKED", leaked)
    for base in (udi, loop):
        fields = [line.split() for line in open("/proc/self/mountinfo") if line.split()[4] == base]
        print("BASE", base, fields[-1][6:fields[-1].index("-")] if fields else None)
    result = subprocess.run(unsetup, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
finally:
    peer.kill()
    peer.wait()
"""


def test_job_mounts_stay_out_of_peer_namespaces_on_a_shared_root(clean_site, users):
    site, user = clean_site, users[0]
    jobid = "401"
    setup = [os.path.join(site.bin, "setupRoot"), "--config", site.conf, "--job-id", jobid, "-U", str(user.uid),
             "-G", str(user.gid), "-u", user.name, "id", "b" * 64]
    unsetup = [os.path.join(site.bin, "unsetupRoot"), "--config", site.conf, "--job-id", jobid]
    script = DRIVER.format(repo=REPO, setup=setup, unsetup=unsetup, udi=site.udi_mount, loop=site.loop_mount,
                           jobid=jobid)
    result = subprocess.run(["unshare", "-m", "--propagation", "shared", sys.executable, "-c", script],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LEAKED []" in result.stdout, result.stdout
    for base in (site.udi_mount, site.loop_mount):
        assert f"BASE {base} []" in result.stdout, result.stdout  # a private mount of its own
    assert site.wait_no_loops() == [], "a copy in another namespace keeps the loop device busy"



def _fields(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        found = [line.split() for line in fh if line.split()[4] == path]
    return found[-1][6:found[-1].index("-")]


def test_a_shared_udimount_is_made_private_whatever_its_spelling(clean_site, users):
    site, user = clean_site, users[0]
    assert site.setup("402", user).returncode == 0  # udiMount is a mount of its own from now on
    assert site.unsetup("--job-id", "402").returncode == 0
    subprocess.run(["mount", "--make-shared", site.udi_mount], check=True)
    assert any(field.startswith("shared:") for field in _fields(site.udi_mount))
    site.write_config(f"udiMount={site.udi_mount}/\n")  # the later key wins: a trailing /
    assert site.setup("403", user).returncode == 0
    assert _fields(site.udi_mount) == []  # private again
    from shifter.runtime.mounts import mount_points

    assert mount_points().count(site.udi_mount) == 1  # bound once, never stacked
