"""unsetupRoot does everything it can, then reports what it could not do."""

from __future__ import annotations

import os

from tests.root.test_site_features import memory_cgroup  # noqa: F401  (fixture)


def test_unremovable_cgroup_still_releases_mounts_and_loop_device(clean_site, users, memory_cgroup):  # noqa: F811
    site, user = clean_site, users[0]
    result = site.setup("811", user, "--memory-cgroup", memory_cgroup)
    assert result.returncode == 0, result.stderr
    job_cgroup = os.path.join(memory_cgroup, f"shifter/uid_{user.uid}/job_811")
    blocker = os.path.join(job_cgroup, "blocker")  # a child cgroup: rmdir of the job's cgroup fails (EBUSY)
    os.mkdir(blocker)
    try:
        result = site.unsetup("--job-id", "811", "--memory-cgroup", memory_cgroup)
        assert result.returncode == 1
        assert "cannot remove cgroup" in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1, "one line"
        assert site.mounts() == []
        assert site.wait_no_loops() == []
        assert not os.path.lexists(os.path.join(site.udi_mount, "811"))
        assert not os.path.lexists(os.path.join(site.loop_mount, "811"))
    finally:
        os.rmdir(blocker)
    assert site.unsetup("--job-id", "811", "--memory-cgroup", memory_cgroup).returncode == 0
    assert not os.path.lexists(job_cgroup)
