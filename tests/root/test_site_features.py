"""Modules, populateEtcDynamically, the job sshd and the memory cgroup, with real mounts and users."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.root.conftest import IMAGE_ID, REPO


def _root(site, jobid: str) -> str:
    return os.path.join(site.udi_mount, jobid, "root")


@pytest.fixture
def module_site(clean_site):
    site = clean_site
    mod = os.path.join(site.base, "mod-mpich")
    os.makedirs(os.path.join(mod, "lib"), exist_ok=True)
    with open(os.path.join(mod, "lib/libmpi.so"), "w") as fh:
        fh.write("not really a library\n")
    hook = os.path.join(site.base, "roothook.sh")
    with open(hook, "w") as fh:
        fh.write("#!/bin/sh\nset -e\necho ran > etc/roothook-ran\n")
    failing = os.path.join(site.base, "failhook.sh")
    with open(failing, "w") as fh:
        fh.write("echo broken hook >&2\nexit 3\n")
    site.write_config(
        f"module_mpich_copyPath={mod}\nmodule_mpich_roothook={hook}\n"
        "module_mpich_siteEnv=MPICH_MODULE=on\nmodule_mpich_siteEnvPrepend=PATH=/opt/udiImage/modules/mpich/bin\n"
        "module_mpich_conflict=openmpi\nmodule_openmpi_siteEnv=OMPI=1\n"
        f"module_broken_roothook={failing}\nsiteEnv=SITE_WIDE=1\n")
    return site


def test_module_copy_path_roothook_env_and_marker(module_site, users):
    site, user = module_site, users[0]
    result = site.setup("301", user, "-m", "mpich")
    assert result.returncode == 0, result.stderr
    root = _root(site, "301")
    with open(os.path.join(root, "opt/udiImage/modules/mpich/lib/libmpi.so")) as fh:
        assert fh.read() == "not really a library\n"
    with open(os.path.join(root, "etc/roothook-ran")) as fh:
        assert fh.read() == "ran\n"
    with open(os.path.join(root, "var/shifterConfig.json")) as fh:
        assert fh.read().endswith('"modules":"mpich,"}\n')
    out = site.shifter(user, "env", env=site.job_env("301", SHIFTER_MODULE="mpich"))
    assert out.returncode == 0, out.stderr
    env = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert env["MPICH_MODULE"] == "on" and env["SITE_WIDE"] == "1"
    assert env["PATH"].startswith("/opt/udiImage/modules/mpich/bin:")


def test_module_conflicts_unknown_and_failing_hook(module_site, users):
    site, user = module_site, users[0]
    for args, message in ((("-m", "mpich,openmpi"), "conflict"), (("-m", "nope"), "unknown shifter module"),
                          (("-m", "broken"), "roothook")):
        result = site.setup("302", user, *args)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert site.mounts() == []


def test_populate_etc_dynamically_with_users_to_import(clean_site, users):
    site, user = clean_site, users[0]
    site.write_config("populateEtcDynamically=1\nusersToImport=sshd\n")
    result = site.setup("303", user)
    assert result.returncode == 0, result.stderr
    root = _root(site, "303")
    with open(os.path.join(root, "etc/passwd")) as fh:
        names = [line.split(":")[0] for line in fh]
    assert names == [user.name, "sshd"]
    import grp

    with open(os.path.join(root, "etc/group")) as fh:
        assert f"shifter-rtg:x:{grp.getgrnam('shifter-rtg').gr_gid}:{user.name}\n" in fh.read()
    assert os.path.exists(os.path.join(root, "etc/nsswitch.conf"))


@pytest.fixture(scope="session")
def udi_image(site):
    path = os.path.join(site.base, "udiimage")
    subprocess.run([os.path.join(REPO, ".venv/bin/python"), "-m", "shifter.packtool", "udiimage", "--force", path],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return path


@pytest.fixture
def memory_cgroup():
    """A cgroup v1 memory directory of our own; setupRoot creates shifter/uid_*/job_* below it."""
    path = f"/sys/fs/cgroup/memory/shifter-rt-{os.getpid()}"
    if not os.path.isdir("/sys/fs/cgroup/memory"):
        pytest.skip("no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
    os.mkdir(path)
    yield path
    for sub in ("shifter",):
        try:
            os.rmdir(os.path.join(path, sub))
        except FileNotFoundError:
            pass
    os.rmdir(path)


def test_job_sshd_as_the_user_and_memory_cgroup(clean_site, users, udi_image, memory_cgroup):
    """setupRoot -s in a private network namespace (the sshd listens on port 1204 there only)."""
    site, user = clean_site, users[0]
    site.write_config(f"optUdiImage={udi_image}\n")
    key = os.path.join(site.base, "userkey")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-f", key, "-N", ""], check=True)
    with open(key + ".pub") as fh:
        pubkey = fh.read().strip()
    setup = [os.path.join(site.bin, "setupRoot"), "--config", site.conf, "--job-id", "304",
             "--memory-cgroup", memory_cgroup, "-U", str(user.uid), "-G", str(user.gid), "-u", user.name,
             "-s", pubkey, "id", IMAGE_ID]
    ssh = ["ssh", "-i", key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o",
           "BatchMode=yes", "-p", "1204", f"{user.name}@127.0.0.1",
           "cat /etc/os-release; grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs)' /proc/self/status"]
    cgroup = os.path.join(memory_cgroup, f"shifter/uid_{user.uid}/job_304")
    script = ("ip link set lo up || exit 90\n"
              f"{_quote(setup)} || exit 91\n"
              f"cat {cgroup}/cgroup.procs > {site.base}/procs\n"
              f"timeout 20 {_quote(ssh)}\n")
    out = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ShifterTestBox" in out.stdout
    status = dict(line.split(":\t", 1) for line in out.stdout.splitlines() if ":\t" in line)
    assert status["Uid"].split()[0] == str(user.uid)
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    with open(os.path.join(site.base, "procs")) as fh:
        sshd_pids = [int(p) for p in fh.read().split()]
    assert sshd_pids, "the sshd runs in the job's memory cgroup"
    with open(f"/proc/{sshd_pids[0]}/status") as fh:
        assert f"Uid:\t{user.uid}" in fh.read()
    result = site.unsetup("--job-id", "304", "--memory-cgroup", memory_cgroup)
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(cgroup)
    assert not any(_alive(pid) for pid in sshd_pids)


def test_bad_pubkey_refused(clean_site, users, udi_image):
    site = clean_site
    site.write_config(f"optUdiImage={udi_image}\n")
    result = site.setup("305", users[0], "-s", "not a key\nAllowUsers root")
    assert result.returncode == 1 and "public key" in result.stderr


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for init to reap it (this sandbox's pid 1 does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _quote(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def test_doctor_reports_each_check(clean_site, users):
    site = clean_site
    env = {"PATH": "/usr/bin:/bin", "SHIFTER_UDIROOT_CONF": site.conf}
    out = site.shifter(users[0], "doctor", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"ok   udiRoot.conf: {site.conf} parses")
    for check in ("filesystem squashfs", "loop devices", "user namespaces", "imagePath", "memory cgroup",
                  "srun --image=... (step images)", "--writable"):
        assert f" {check}: " in out.stdout
    fuse = "ok   shifter --image=... inside a task" if os.stat("/dev/fuse").st_mode & 0o006 == 0o006 else \
        "WARN shifter --image=... inside a task: not available here"
    assert fuse in out.stdout, out.stdout
    os.chmod(site.conf, 0o666)
    try:
        out = site.shifter(users[0], "doctor", env=env)
    finally:
        os.chmod(site.conf, 0o644)
    assert out.returncode == 1 and out.stdout.startswith("FAIL udiRoot.conf:"), out.stdout


def test_local_image_type_when_allowed(clean_site, users):
    site, user = clean_site, users[0]
    tree = os.path.join(site.base, "localimg")
    if not os.path.isdir(tree):
        os.makedirs(os.path.join(tree, "bin"))
        os.makedirs(os.path.join(tree, "etc"))
        subprocess.run(["cp", "/bin/busybox", os.path.join(tree, "bin/busybox")], check=True)
        os.symlink("busybox", os.path.join(tree, "bin/cat"))
        with open(os.path.join(tree, "etc/os-release"), "w") as fh:
            fh.write("NAME=LocalTree\n")
    refused = site.setup("306", user, image=tree, image_type="local")
    assert refused.returncode == 1 and "allowLocalChroot" in refused.stderr
    site.write_config("allowLocalChroot=1\n")
    result = site.setup("306", user, image=tree, image_type="local")
    assert result.returncode == 0, result.stderr
    env = site.job_env("306", SHIFTER_IMAGETYPE="local", SHIFTER_IMAGE=tree, SHIFTER_IMAGEREQUEST=f"local:{tree}")
    out = site.shifter(user, "/bin/cat", "/etc/os-release", env=env)
    assert out.returncode == 0 and out.stdout == "NAME=LocalTree\n", out.stderr


def test_root_hook_that_a_user_can_change_is_never_run(module_site, users):
    """A roothook the user owns (or in a directory the user may write) is refused, not run as root."""
    site, user = module_site, users[0]
    user_dir = os.path.join(site.base, "user-hooks")
    os.makedirs(user_dir, exist_ok=True)
    hook = os.path.join(user_dir, "hook.sh")
    marker = os.path.join(site.base, "user-hook-ran")
    with open(hook, "w") as fh:
        fh.write(f"#!/bin/sh\ntouch {marker}\n")
    for owner, dir_mode in (((user.uid, user.gid), 0o755), ((0, 0), 0o777)):
        os.chown(hook, *owner)
        os.chmod(user_dir, dir_mode)
        site.write_config(f"module_evil_roothook={hook}\n")
        result = site.setup("331", user, "-m", "evil")
        assert result.returncode == 2 and "may be changed by someone other than root" in result.stderr, result.stderr
        assert not os.path.exists(marker)
        assert site.mounts() == []
    os.chmod(user_dir, 0o755)
    os.unlink(hook)
    os.rmdir(user_dir)
