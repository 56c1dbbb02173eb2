"""A step's own environment (setupRoot/unsetupRoot --step-id) and the launcher entering it."""

from __future__ import annotations

import os

from tests.root.conftest import IMAGE_ID, PRIVATE_ID


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


def _step_hook(site, hook: str, *opts: str):
    """Run a step hook as slurmstepd's shim does: its own process, root, the site's config."""
    import subprocess
    import sys

    from tests.root.conftest import REPO

    code = (f"import sys; sys.path.insert(0, {REPO!r}); from spank_plugin.hooks import main; "
            f"sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-I", "-S", "-c", code, hook, f"shifter_config={site.conf}", *opts],
                          capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})


def test_step_hooks_build_and_remove_the_step_environment_in_their_own_process(clean_site, users, fuse_mode):
    """step-setup runs setupRoot's main in a forked child (no second interpreter): same result, same
    failure policy, and step-teardown removes the step's environment alone."""

    site, user = clean_site, users[0]
    fuse_mode(0o600)
    assert site.setup("311", user).returncode == 0
    ids = ("--job-id=311", f"--uid={user.uid}", f"--gid={user.gid}")
    volume = "/site1/shared:/data"
    built = _step_hook(site, "step-setup", *ids, "--step-id=2", f"--image={IMAGE_ID}", "--image-type=id",
                       f"--volume={volume}")
    assert (built.returncode, built.stdout) == (0, "prepared\n"), built.stderr
    assert sorted(os.listdir(site.udi_mount)) == ["311", "311.2"]
    out = site.shifter(user, "cat", "/data/hello", env=site.job_env("311", SLURM_STEP_ID="2", SHIFTER_VOLUME=volume))
    assert (out.returncode, out.stdout) == (0, "hello from the site\n"), out.stderr
    # a request the node cannot serve: recorded for the step's tasks, the step is not failed
    refused = _step_hook(site, "step-setup", *ids, "--step-id=3", f"--image={'a' * 64}", "--image-type=id")
    assert (refused.returncode, refused.stdout) == (0, "prepared\n"), refused.stderr
    assert "not found" in refused.stderr
    assert os.listdir(os.path.join(site.udi_mount, "311.3")) == ["setup.error"]
    for step in ("2", "3"):
        gone = _step_hook(site, "step-teardown", *ids, f"--step-id={step}")
        assert gone.returncode == 0, gone.stderr
    assert sorted(os.listdir(site.udi_mount)) == ["311"]
    assert site.unsetup("--job-id", "311").returncode == 0
