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


def test_a_step_of_the_jobs_modules_binds_the_jobs_udi_image(clean_site, users, tmp_path):
    """A step whose modules are the job's gets the job's /opt/udiImage bound read-only (no second copy);
    other modules, or a module with a roothook, get their own copy, as the job did."""
    site, user = clean_site, users[0]
    udi, mod, hook_mod = (tmp_path / name for name in ("udi", "mod", "hookmod"))
    for path in (udi / "etc", mod, hook_mod):
        path.mkdir(parents=True)
    (udi / "etc" / "sshd_config").write_text("Port 1204\n")
    (mod / "lib.so").write_text("module library\n")
    (hook_mod / "tool").write_text("hooked\n")
    hook = tmp_path / "roothook.sh"
    hook.write_text("#!/bin/sh\necho ran > opt/udiImage/modules/hk/ran\n")
    hook.chmod(0o755)
    os.chmod(tmp_path, 0o755)
    site.write_config(f"optUdiImage={udi}\nmodule_m1_copyPath={mod}\nmodule_m2_siteEnv=M2=1\n"
                      f"module_hk_copyPath={hook_mod}\nmodule_hk_roothook={hook}\ndefaultModules=m1\n")
    assert site.setup("321", user).returncode == 0

    def step_udi(step: str) -> str:
        return os.path.join(site.udi_mount, f"321.{step}", "root/opt/udiImage")

    same = site.setup("321", user, "--step-id", "1", "-v", "/site1/shared:/data")
    assert same.returncode == 0, same.stderr
    job_udi = os.path.join(site.udi_mount, "321", "root/opt/udiImage")
    assert os.path.samestat(os.stat(step_udi("1")), os.stat(job_udi)), "the step binds the job's tree"
    assert os.path.ismount(step_udi("1"))
    with open(os.path.join(step_udi("1"), "modules/m1/lib.so")) as fh:
        assert fh.read() == "module library\n"
    try:
        os.close(os.open(os.path.join(step_udi("1"), "etc/new"), os.O_WRONLY | os.O_CREAT, 0o644))
        raise AssertionError("the job's tree is writable through the step")
    except OSError as err:
        assert err.errno == 30  # EROFS
    other = site.setup("321", user, "--step-id", "2", "-m", "m2")
    assert other.returncode == 0, other.stderr
    assert not os.path.ismount(step_udi("2")) and os.listdir(os.path.join(step_udi("2"), "etc")) == ["sshd_config"]
    assert not os.path.exists(os.path.join(step_udi("2"), "modules/m1"))
    hooked = site.setup("321", user, "--step-id", "3", "-m", "hk")
    assert hooked.returncode == 0, hooked.stderr
    assert not os.path.ismount(step_udi("3"))
    with open(os.path.join(step_udi("3"), "modules/hk/ran")) as fh:
        assert fh.read() == "ran\n"
    for step in ("1", "2", "3"):
        assert site.unsetup("--job-id", "321", "--step-id", step).returncode == 0
    with open(os.path.join(job_udi, "etc/sshd_config")) as fh:
        assert fh.read() == "Port 1204\n", "the job's tree outlives its steps"
