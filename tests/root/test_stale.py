"""Stale-environment detection (spank_plugin/stale.py) trusts only Slurm and root-owned state.

There is no Slurm controller in the root tests: a fake ``squeue`` on PATH stands in for it and
says the jobs are gone, so what is tested is which local signs may keep an environment alive.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from spank_plugin import stale


@pytest.fixture
def fake_squeue_says_gone(tmp_path, monkeypatch):
    tool = tmp_path / "squeue"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    monkeypatch.setattr(stale, "GRACE_SECONDS", 0.5)


def test_user_processes_and_touches_do_not_keep_a_dead_job_alive(clean_site, users, fake_squeue_says_gone):
    site, user = clean_site, users[0]
    for jobid in ("901", "902"):
        assert site.setup(jobid, user).returncode == 0
    as_user = {"user": user.uid, "group": user.gid}
    spoofers = [
        subprocess.Popen(["sleep", "30"], env={"SLURM_JOB_ID": "901"}, **as_user),
        subprocess.Popen(["bash", "-c", 'exec -a "slurmstepd: [901.0]" sleep 30'], **as_user),
        subprocess.Popen(["sleep", "30"], env={"SLURM_JOB_ID": "902"}),  # root's: a prolog of job 902
    ]
    try:
        time.sleep(0.7)
        job_dir = os.path.join(site.udi_mount, "901")
        os.chown(job_dir, user.uid, user.gid)  # the layout without POSIX ACLs, where the user may touch it
        subprocess.run(["touch", job_dir], check=True, user=user.uid, group=user.gid)
        found = stale.stale_job_ids(site.udi_mount, site.loop_mount, ["901", "902", "903"], current_job="903")
    finally:
        for proc in spoofers:
            proc.kill()
            proc.wait()
    assert found == ["901"]


def test_a_fresh_loop_mount_is_within_the_grace(clean_site, users, fake_squeue_says_gone):
    site, user = clean_site, users[0]
    assert site.setup("904", user).returncode == 0
    assert stale.stale_job_ids(site.udi_mount, site.loop_mount, ["904"], current_job="1") == []
    time.sleep(0.7)
    assert stale.stale_job_ids(site.udi_mount, site.loop_mount, ["904"], current_job="1") == ["904"]
