"""A step's own environment (setupRoot/unsetupRoot --step-id) and the launcher entering it."""

from __future__ import annotations

import os

from tests.root.conftest import PRIVATE_ID


def test_step_environment_is_entered_by_its_tasks_and_removed_alone(clean_site, users, fuse_mode):
    site, user = clean_site, users[0]
    fuse_mode(0o600)  # no FUSE for users: only a prepared environment can serve another request
    assert site.setup("301", user).returncode == 0
    volume = "/site1/shared:/data"
    step = site.setup("301", user, "--step-id", "4", "-v", volume)
    assert step.returncode == 0, step.stderr
    assert sorted(os.listdir(site.udi_mount)) == ["301", "301.4"]
    env = site.job_env("301", SLURM_STEP_ID="4", SHIFTER_VOLUME=volume)
    out = site.shifter(user, "cat", "/data/hello", env=env)
    assert (out.returncode, out.stdout) == (0, "hello from the site\n"), out.stderr
    job = site.shifter(user, "sh", "-c", "ls /data; echo rc=$?", env=site.job_env("301", SLURM_STEP_ID="5"))
    assert job.stdout.endswith("rc=0\n") and "hello" not in job.stdout, job.stdout + job.stderr
    # another user cannot enter it (the step's directory is the job user's, 0700)
    intruder = site.shifter(users[1], "cat", "/data/hello", env=env)
    assert intruder.returncode != 0 and "hello from the site" not in intruder.stdout
    # another step of the same job with another request does not get step 4's environment
    other = site.shifter(user, "true", env=site.job_env("301", SLURM_STEP_ID="4", SHIFTER_VOLUME="/site1:/data"))
    assert other.returncode != 0
    assert site.unsetup("--job-id", "301", "--step-id", "4").returncode == 0
    assert sorted(os.listdir(site.udi_mount)) == ["301"]
    assert site.setup("301", user, "--step-id", "6", "-v", volume).returncode == 0
    assert site.unsetup("--job-id", "301").returncode == 0, "the job's teardown takes its steps along"
    assert os.listdir(site.udi_mount) == [] and os.listdir(site.loop_mount) == []


def test_step_setup_failure_is_the_requests_and_leaves_nothing(clean_site, users):
    site = clean_site
    refused = site.setup("302", users[1], "--step-id", "1", image=PRIVATE_ID)
    assert refused.returncode == 1 and "private image" in refused.stderr, refused.stderr
    assert site.leftovers() == {}
    assert site.setup("302", users[0], "--step-id", "x").returncode == 1
    assert site.setup("303", users[0], "--step-id", "2").returncode == 0
    assert site.unsetup("--all").returncode == 0
    assert os.listdir(site.udi_mount) == []
