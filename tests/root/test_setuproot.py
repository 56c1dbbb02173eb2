"""setupRoot / unsetupRoot with real mounts, loop devices and users (reference section 2.5, 2.12)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from shifter.runtime import jobdir
from tests.root.conftest import HOSTILE_ID, IMAGE_ID, PRIVATE_ID, Account


def _root(site, jobid: str) -> str:
    return os.path.join(site.udi_mount, jobid, "root")


def test_setup_builds_the_root(clean_site, users):
    site, user = clean_site, users[0]
    result = site.setup("101", user, "-N", "n1/2 n2/2")
    assert result.returncode == 0, result.stderr
    root = _root(site, "101")
    with open(os.path.join(root, "etc/os-release")) as fh:
        assert "ShifterTestBox" in fh.read()
    with open(os.path.join(root, "etc/passwd")) as fh:
        assert any(line.startswith(f"{user.name}:x:{user.uid}:") for line in fh)
    assert os.readlink(os.path.join(root, "etc/mtab")) == "/proc/mounts"
    with open(os.path.join(root, "var/hostsfile")) as fh:
        assert fh.read() == "n1\nn1\nn2\nn2\n"
    with open(os.path.join(root, "var/shifterConfig.json")) as fh:
        assert fh.read() == f'{{"identifier":"{IMAGE_ID}","user":"{user.name}","volMap":"","modules":""}}\n'
    with open(os.path.join(root, "etc/group")) as fh:
        groups = fh.read()
    import grp

    assert f"shifter-rtg:x:{grp.getgrnam('shifter-rtg').gr_gid}:{user.name}\n" in groups  # a listed member
    assert "\nroot:" not in "\n" + groups, "gid 0 is dropped from the container's group file"
    with open(os.path.join(root, "site1/shared/hello")) as fh:
        assert fh.read() == "hello from the site\n"
    assert os.stat(os.path.join(root, "etc/shadow")).st_size == 0
    job_dir = os.path.join(site.udi_mount, "101")
    info = os.stat(job_dir)
    assert (info.st_uid, info.st_mode & 0o707) == (0, 0o700), "root's, nothing for others"
    assert jobdir.acl_users(os.getxattr(job_dir, jobdir.ACL_XATTR)) == [user.uid], "only the job's user enters"
    options = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            options[fields[4]] = fields[5].split(",")
    assert "ro" in options[root], "mountUdiRootWritable=0 must leave the root read-only"
    for sub in ("bin", "opt/app", "site1", "tmp"):
        assert {"nosuid", "nodev"} <= set(options[os.path.join(root, sub)]), sub
    assert "ro" in options[os.path.join(site.loop_mount, "101")]


def test_setup_refuses_bad_requests_and_leaves_nothing(clean_site, users):
    site, user = clean_site, users[0]
    cases = {
        ("-v", "/site1/shared:/etc/x"): "not allowed",
        ("-v", "/site1/shared:/opt/app:rec"): "reserved to the site",
        ("-v", "/site1/rootonly:/opt/app"): "not a directory you can read",
        ("-v", "/site1/shared:/no/such/dir"): "not a directory in the image",
        ("-m", "nosuchmodule"): "unknown shifter module",
    }
    for args, message in cases.items():
        result = site.setup("102", user, *args)
        assert result.returncode == 1, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        site.wait_no_loops()
        assert site.leftovers() == {}, (args, site.leftovers())


def test_setup_refuses_root_unknown_user_and_bad_job_ids(clean_site, users):
    site, user = clean_site, users[0]
    for jobid in ("12a", "../1", ""):
        result = site.setup(jobid, user)
        assert result.returncode == 1 and "job id" in result.stderr, result.stderr
    root = Account.__new__(Account)
    root.name, root.uid, root.gid, root.groups = "root", 0, 0, [0]
    result = site.setup("103", root)
    assert result.returncode == 1 and "root" in result.stderr
    result = site.setup("103", user, image="d" * 64)
    assert result.returncode == 1 and "not found" in result.stderr


def test_private_image_refused_to_another_user(clean_site, users):
    site = clean_site
    refused = site.setup("104", users[1], image=PRIVATE_ID)
    assert refused.returncode == 1 and "private image" in refused.stderr
    allowed = site.setup("104", users[0], image=PRIVATE_ID)
    assert allowed.returncode == 0, allowed.stderr


def test_user_volume_accepted(clean_site, users):
    site, user = clean_site, users[0]
    result = site.setup("105", user, "-v", "/site1/shared:/opt/app:ro", "-v", "/site1/shared:/data")
    assert result.returncode == 0, result.stderr
    root = _root(site, "105")
    with open(os.path.join(root, "opt/app/hello")) as fh:
        assert fh.read() == "hello from the site\n"
    with open(os.path.join(root, "var/shifterConfig.json")) as fh:
        assert '"volMap":"/site1/shared:/data;/site1/shared:/opt/app:ro"' in fh.read()
    out = site.shifter(user, "sh", "-c", "touch /opt/app/x 2>&1; echo rc=$?",
                       env=site.job_env("105", SHIFTER_VOLUME="/site1/shared:/opt/app:ro;/site1/shared:/data"))
    assert out.returncode == 0, out.stderr
    assert "rc=1" in out.stdout


def test_per_node_cache(clean_site, users):
    site, user = clean_site, users[0]
    result = site.setup("106", user, "-v", "/x:/data:perNodeCache=size=300M")
    assert result.returncode == 0, result.stderr
    root = _root(site, "106")
    info = os.stat(os.path.join(root, "data"))
    assert info.st_uid == user.uid
    assert os.listdir(site.cache) == [], "the backing file must be unlinked once mounted"
    with open("/proc/self/mountinfo") as fh:
        assert any(line.split()[4] == os.path.join(root, "data") and " xfs " in line for line in fh)
    out = site.shifter(user, "sh", "-c", "echo data > /data/f && cat /data/f",
                       env=site.job_env("106", SHIFTER_VOLUME="/x:/data:perNodeCache=size=300M"))
    assert out.stdout == "data\n", out.stderr


def test_two_jobs_at_once(clean_site, users):
    site = clean_site
    assert site.setup("107", users[0]).returncode == 0
    assert site.setup("108", users[1]).returncode == 0
    for jobid, user in (("107", users[0]), ("108", users[1])):
        out = site.shifter(user, "cat", "/etc/os-release", env=site.job_env(jobid))
        assert out.returncode == 0 and "ShifterTestBox" in out.stdout, out.stderr
    # one user cannot enter the other's environment (its job directory is 0700 and owned by the other)
    out = site.shifter(users[1], "true", env=site.job_env("107"))
    assert out.returncode != 0
    assert site.unsetup("--job-id", "107").returncode == 0
    out = site.shifter(users[1], "cat", "/etc/os-release", env=site.job_env("108"))
    assert out.returncode == 0, out.stderr


def test_stale_environment_of_same_job_is_cleaned(clean_site, users):
    site, user = clean_site, users[0]
    assert site.setup("109", user).returncode == 0
    count = len(site.mounts())
    again = site.setup("109", user, "-v", "/site1/shared:/data")
    assert again.returncode == 0, again.stderr
    # /data (an image directory) is now the user's volume instead: same number of mounts
    assert len(site.mounts()) == count
    assert os.path.exists(os.path.join(_root(site, "109"), "data/hello"))
    site.wait_no_loops()
    assert len(site.loop_devices()) == 1


def test_unsetup_twice_and_after_partial_setup(clean_site, users):
    site, user = clean_site, users[0]
    assert site.setup("110", user).returncode == 0
    for _ in range(2):
        result = site.unsetup("--job-id", "110")
        assert result.returncode == 0, result.stderr
        assert site.wait_no_loops() == [] and site.mounts() == []
    # a setup that died halfway: the job dir, a tmpfs root and a loop mount dir, nothing else
    from shifter.runtime import linux

    root = _root(site, "111")
    os.makedirs(root)
    os.makedirs(os.path.join(site.loop_mount, "111"))
    linux.mount("tmpfs", root, "tmpfs", linux.MS_NOSUID)
    os.mkdir(os.path.join(root, "proc"))
    linux.mount("proc", os.path.join(root, "proc"), "proc", linux.MS_NOSUID)
    result = site.unsetup("--job-id", "111")
    assert result.returncode == 0, result.stderr
    assert site.leftovers() == {}


def test_unsetup_without_arguments_uses_slurm_job_id(clean_site, users):
    site = clean_site
    assert site.setup("112", users[0]).returncode == 0
    import subprocess

    result = subprocess.run([os.path.join(site.bin, "unsetupRoot"), "--config", site.conf],
                            env={"SLURM_JOB_ID": "112"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(os.path.join(site.udi_mount, "112"))


def _cycles(site, user, count: int) -> None:
    for i in range(count):
        result = site.setup("120", user, "-v", "/site1/shared:/data", "-N", "n1/1")
        assert result.returncode == 0, (i, result.stderr)
        result = site.unsetup("--job-id", "120")
        assert result.returncode == 0, (i, result.stderr)
        assert site.mounts() == [], i
    assert site.wait_no_loops() == []
    assert site.leftovers() == {}


def test_setup_teardown_cycles(clean_site, users):
    _cycles(clean_site, users[0], 20)


@pytest.mark.slow
def test_setup_teardown_200_cycles(clean_site, users):
    _cycles(clean_site, users[0], 200)


def test_hostile_image_cannot_plant_marker_or_redirect_volumes(clean_site, users):
    site, user = clean_site, users[0]
    refused = site.setup("130", user, "-v", "/site1/shared:/data", image=HOSTILE_ID)
    assert refused.returncode == 1 and "leads to /etc" in refused.stderr, refused.stderr
    result = site.setup("130", user, image=HOSTILE_ID)
    assert result.returncode == 0, result.stderr
    root = _root(site, "130")
    with open(os.path.join(root, "var/shifterConfig.json")) as fh:
        assert fh.read() == f'{{"identifier":"{HOSTILE_ID}","user":"{user.name}","volMap":"","modules":""}}\n'
    assert os.path.isdir(os.path.join(root, "etc")) and not os.path.islink(os.path.join(root, "etc"))
    with open(os.path.join(root, "etc/passwd")) as fh:
        assert user.name in fh.read()


def test_volume_source_on_the_host_but_outside_the_site_filesystems_is_explained(clean_site, users):
    site, user = clean_site, users[0]
    visible = os.path.join(site.base, "hostdata")
    hidden = os.path.join(site.base, "rootonly-host", "data")
    os.makedirs(visible, 0o755)
    os.makedirs(hidden, 0o755)
    os.chmod(os.path.dirname(hidden), 0o700)  # the user cannot see that it exists
    result = site.setup("105", user, "-v", f"{visible}:/opt/app")
    assert result.returncode == 1, result.stderr
    assert f"source {visible} exists on the host but is not visible in the container" in result.stderr
    assert "/site1" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    result = site.setup("105", user, "-v", f"{hidden}:/opt/app")
    assert result.returncode == 1 and "not a directory you can read" in result.stderr, result.stderr
    assert "exists on the host" not in result.stderr, "root's view of the host must not leak"
    site.wait_no_loops()
    assert site.leftovers() == {}, site.leftovers()


def test_job_directory_is_the_users_to_read_and_nobody_elses_to_change(clean_site, users):
    """Only the job's user may enter it (an ACL on a root-owned directory), and not even it may rename
    or replace what root later mounts over and removes."""
    site, user, other = clean_site, users[0], users[1]
    assert site.setup("111", user).returncode == 0
    job_dir = os.path.join(site.udi_mount, "111")
    as_user = {"user": user.uid, "group": user.gid, "capture_output": True, "text": True}
    as_other = {"user": other.uid, "group": other.gid, "capture_output": True, "text": True}
    assert subprocess.run(["cat", os.path.join(job_dir, "image.meta")], **as_user).returncode == 0
    assert subprocess.run(["ls", job_dir], **as_other).returncode != 0, "another user lists the job directory"
    for argv in (["mv", os.path.join(job_dir, "launch.plan"), os.path.join(job_dir, "x")],
                 ["touch", os.path.join(job_dir, "planted")], ["chmod", "0777", job_dir]):
        result = subprocess.run(argv, **as_user)
        assert result.returncode != 0, f"the user could run {argv}"
    assert sorted(os.listdir(job_dir)) == ["image.meta", "launch.plan", "root", "userns"]
    out = site.shifter(user, "cat", "/etc/os-release", env=site.job_env("111"))
    assert out.returncode == 0, out.stderr


def test_request_error_is_recorded_on_a_node_that_never_built_a_job(clean_site, users):
    """setupRoot refused the request before making udiMount: the reason still reaches the user, and
    only that user (no drain, no traceback)."""
    from spank_plugin.hooks import JobRequest, PlugstackArgs, record_setup_error

    site, user, other = clean_site, users[0], users[1]
    udi_mount = os.path.join(site.base, "first-job-udi")  # this node never ran a job: no udiMount yet
    conf = os.path.join(site.base, "first-job.conf")
    with open(site.conf) as fh, open(conf, "w") as out:
        out.write(fh.read().replace(f"udiMount={site.udi_mount}\n", f"udiMount={udi_mount}\n"))
    req = JobRequest(job_id="112", uid=user.uid, gid=user.gid, user=user.name, image_type="id", image=IMAGE_ID,
                     volumes=[], modules=None, ssh_pubkey=None, node_spec="")
    try:
        record_setup_error(PlugstackArgs(shifter_config=conf), req, "volume /x: not allowed")
        error = os.path.join(udi_mount, "112", "setup.error")
        assert os.stat(udi_mount).st_uid == 0 and os.stat(error).st_uid == 0
        read = subprocess.run(["cat", error], user=user.uid, group=user.gid, capture_output=True, text=True)
        assert read.stdout == "volume /x: not allowed\n"
        assert subprocess.run(["cat", error], user=other.uid, group=other.gid, capture_output=True).returncode != 0
        out = site.shifter(user, "true", env=site.job_env("112", SHIFTER_UDIROOT_CONF=conf))
        assert out.returncode != 0 and "volume /x: not allowed" in out.stderr and "Traceback" not in out.stderr
        assert site.unsetup("--job-id", "112").returncode == 0
    finally:
        subprocess.run([os.path.join(site.bin, "unsetupRoot"), "--config", conf, "--job-id", "112"], check=True)
        shutil.rmtree(udi_mount)
