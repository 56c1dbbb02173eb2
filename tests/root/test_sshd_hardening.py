"""The job sshd against hostile images and other users: root runs nothing the image chose."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from shifter.formats.meta import ImageMeta, write_meta
from tests.root.conftest import IMAGE_ID, REPO

PRELOAD_ID = "d" * 64
MARKER = "PRELOAD-RAN-AS-ROOT"

# a library the image names in /etc/ld.so.preload: its constructor leaves a mark when root loads it
_PRELOAD_C = r"""
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

__attribute__((constructor)) static void mark(void)
{
    if (getuid() != 0 && geteuid() != 0)
        return;
    write(2, "%(marker)s\n", strlen("%(marker)s\n"));
    int fd = open("/preload-ran", O_WRONLY | O_CREAT, 0644);
    if (fd >= 0)
        close(fd);
}
"""


def _root(site, jobid: str) -> str:
    return os.path.join(site.udi_mount, jobid, "root")


@pytest.fixture(scope="session")
def udi_image(site):
    path = os.path.join(site.base, "udiimage")
    if not os.path.isdir(path):
        subprocess.run([os.path.join(REPO, ".venv/bin/python"), "-m", "shifter.packtool", "udiimage", "--force",
                        path], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return path


@pytest.fixture(scope="session")
def preload_image(site):
    """A busybox image whose /etc/ld.so.preload names its own library (built here with gcc)."""
    tree = os.path.join(site.base, "tree-preload")
    for sub in ("bin", "etc", "lib", "var", "opt", "home"):
        os.makedirs(os.path.join(tree, sub))
    shutil.copy("/bin/busybox", os.path.join(tree, "bin/busybox"))
    for applet in ("sh", "cat", "ls", "id"):
        os.symlink("busybox", os.path.join(tree, "bin", applet))
    source = os.path.join(site.base, "preload.c")
    with open(source, "w") as fh:
        fh.write(_PRELOAD_C % {"marker": MARKER})
    library = os.path.join(tree, "lib/libshifter-preload.so")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", library, source], check=True)
    with open(os.path.join(tree, "etc/ld.so.preload"), "w") as fh:
        fh.write("/lib/libshifter-preload.so\n")
    subprocess.run(["mksquashfs", tree, os.path.join(site.images, f"{PRELOAD_ID}.squashfs"), "-noappend",
                    "-quiet", "-all-root"], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    write_meta(os.path.join(site.images, f"{PRELOAD_ID}.meta"), ImageMeta(format="squashfs", env=["PATH=/bin"]))
    return PRELOAD_ID


def _pubkey(site) -> str:
    key = os.path.join(site.base, "userkey-hardening")
    if not os.path.exists(key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-f", key, "-N", ""], check=True)
    with open(key + ".pub") as fh:
        return fh.read().strip()


def test_image_ld_so_preload_never_runs_as_root(clean_site, users, udi_image, preload_image):
    """Preparing the sshd (host keys) must not load the image's preload library as root."""
    site, user = clean_site, users[0]
    site.write_config(f"optUdiImage={udi_image}\n")
    result = site.setup("320", user, "-s", _pubkey(site), "--defer-sshd", image=preload_image)
    assert result.returncode == 0, result.stderr
    root = _root(site, "320")
    with open(os.path.join(root, "etc/ld.so.preload")) as fh:
        assert "libshifter-preload" in fh.read()  # the trap was really in place
    assert MARKER not in result.stderr + result.stdout
    assert not os.path.lexists(os.path.join(root, "preload-ran"))
    key = os.path.join(root, "opt/udiImage/etc/ssh_host_ecdsa_key")
    info = os.lstat(key)
    assert (info.st_uid, info.st_mode & 0o777) == (user.uid, 0o600)
    with open(key) as fh:
        assert fh.readline() == "-----BEGIN EC PRIVATE KEY-----\n"


def _ccm_task(site, jobid: str, uid: int) -> str:
    from spank_plugin.hooks import PlugstackArgs
    from spank_plugin.stephooks import ccm_task

    conf = PlugstackArgs(shifter_config=site.conf, enable_ccm=True)
    return ccm_task(conf, {"job-id": jobid, "uid": str(uid), "gid": "0"})


def test_ccm_task_of_a_job_not_submitted_with_ccm_gets_no_root(clean_site, users):
    """A task that sets SLURM_SPANK_SHIFTER_CCM=1 itself makes the shim ask; the job's state says no."""
    from shifter.errors import ShifterError

    site, user = clean_site, users[0]
    assert site.setup("321", user).returncode == 0
    with pytest.raises(ShifterError, match="not submitted with --ccm"):
        _ccm_task(site, "321", user.uid)


def test_ccm_task_of_a_ccm_job_gets_its_root(clean_site, users):
    site, user = clean_site, users[0]
    site.write_config("allowLocalChroot=1\n")
    result = site.setup("322", user, image="/", image_type="local")
    assert result.returncode == 0, result.stderr
    assert _ccm_task(site, "322", user.uid) == _root(site, "322")


def test_ccm_task_never_reads_setup_error_through_a_symlink(clean_site, users):
    """setup.error lives in the user's directory: a symlink to a root-only file is not read."""
    from shifter.errors import ShifterError

    site, user = clean_site, users[0]
    canary = os.path.join(site.base, "canary-rootonly")
    with open(canary, "w") as fh:
        fh.write("SECRET-FIRST-LINE\n")
    os.chmod(canary, 0o600)
    job_dir = os.path.join(site.udi_mount, "323")
    os.makedirs(job_dir, 0o700)
    os.chown(job_dir, user.uid, user.gid)
    pid = os.fork()
    if pid == 0:  # the user plants the link in the directory they own
        try:
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            os.symlink(canary, os.path.join(job_dir, "setup.error"))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.islink(os.path.join(job_dir, "setup.error"))
    with pytest.raises(ShifterError) as caught:
        _ccm_task(site, "323", user.uid)
    assert "SECRET" not in str(caught.value) and "not a plain file" in str(caught.value)
    os.unlink(os.path.join(job_dir, "setup.error"))
    with open(os.path.join(job_dir, "setup.error"), "w") as fh:  # the user's own file: not trusted either
        fh.write("SECRET-USER-LINE\n")
    os.chown(os.path.join(job_dir, "setup.error"), user.uid, user.gid)
    with pytest.raises(ShifterError, match="not root's own file"):
        _ccm_task(site, "323", user.uid)
    os.unlink(os.path.join(job_dir, "setup.error"))
    os.rmdir(job_dir)
    os.unlink(canary)


def test_ccm_task_reports_the_prolog_setup_error(clean_site, users):
    from shifter.errors import ShifterError
    from spank_plugin.hooks import JobRequest, PlugstackArgs, record_setup_error

    site, user = clean_site, users[0]
    req = JobRequest(job_id="324", uid=user.uid, gid=user.gid, user=user.name, image_type="id", image=IMAGE_ID,
                     volumes=[], modules=None, ssh_pubkey=None, node_spec="")
    os.makedirs(site.udi_mount, 0o755, exist_ok=True)  # setupRoot made it on this node before it failed
    record_setup_error(PlugstackArgs(shifter_config=site.conf), req, "image not found\nsecond line")
    with pytest.raises(ShifterError, match="could not be built: image not found$"):
        _ccm_task(site, "324", user.uid)
    shutil.rmtree(os.path.join(site.udi_mount, "324"))


_SQUATTER = """
import socket, sys, time
family = socket.AF_INET6 if sys.argv[1] == "v6" else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
if family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 1204))
s.listen(1)
open(sys.argv[2], "w").close()
time.sleep(60)
"""


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_sshd_port_taken_by_another_user_fails_the_request(clean_site, users, udi_image, family):
    """Another user listening on 1204 (all of it, or only its IPv6 half) makes the job fail, not drain."""
    _squat_and_setup(clean_site, users, udi_image, family)


def _squat_and_setup(clean_site, users, udi_image, family: str, *extra: str) -> None:
    import shlex

    site, squatter = clean_site, users[1]
    site.write_config(f"optUdiImage={udi_image}\n")
    ready_dir = os.path.join(site.base, f"squatter-{family}")
    os.makedirs(ready_dir, exist_ok=True)
    os.chown(ready_dir, squatter.uid, squatter.gid)
    ready = os.path.join(ready_dir, "ready")
    errors = os.path.join(site.base, "setup-errors")
    script_file = os.path.join(site.base, "squatter.py")
    with open(script_file, "w") as fh:
        fh.write(_SQUATTER)
    os.chmod(script_file, 0o644)
    setup = [os.path.join(site.bin, "setupRoot"), "--config", site.conf, "--job-id", "325", "-U",
             str(users[0].uid), "-G", str(users[0].gid), "-u", users[0].name, "-s", _pubkey(site), *extra, "id",
             IMAGE_ID]
    squat = ["setpriv", f"--reuid={squatter.uid}", f"--regid={squatter.gid}", "--clear-groups",
             "/usr/bin/python3", script_file, family, ready]
    script = ("ip link set lo up || exit 90\n"
              f"{' '.join(map(shlex.quote, squat))} & squatter=$!\n"
              f"for i in $(seq 200); do [ -e {ready} ] && break; sleep 0.05; done\n"
              f"[ -e {ready} ] || exit 92\n"
              f"{' '.join(map(shlex.quote, setup))} 2>{errors}; status=$?\n"
              "kill $squatter; wait $squatter\n"
              "exit $status\n")
    out = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    with open(errors) as fh:
        stderr = fh.read()
    assert out.returncode == 1, out.stderr + stderr
    assert "port 1204 is taken" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not os.path.lexists(os.path.join(site.udi_mount, "325"))
    shutil.rmtree(ready_dir)


def test_deferred_sshd_port_taken_fails_the_prolog(clean_site, users, udi_image):
    """With --defer-sshd (the extern step starts the daemon) a squatter is refused in the prolog."""
    _squat_and_setup(clean_site, users, udi_image, "v4", "--defer-sshd")


def _known_hosts(site, jobid: str) -> str:
    with open(os.path.join(_root(site, jobid), "opt/udiImage/etc/ssh_known_hosts")) as fh:
        return fh.read()


def test_host_key_is_the_jobs_on_every_node_and_strictly_checked(clean_site, users, udi_image):
    """The same job gets the same host key on each node; another job, or another user, does not."""
    site, user, other = clean_site, users[0], users[1]
    site.write_config(f"optUdiImage={udi_image}\n")
    assert site.setup("326", user, "-s", _pubkey(site), "--defer-sshd").returncode == 0
    first = _known_hosts(site, "326")
    assert first.startswith("* ecdsa-sha2-nistp256 ") and first.count("\n") == 1
    with open(os.path.join(_root(site, "326"), "etc/ssh/ssh_config")) as fh:
        config = fh.read()
    assert "StrictHostKeyChecking yes" in config and "GlobalKnownHostsFile /opt/udiImage/etc/ssh_known_hosts" in config
    with open(os.path.join(_root(site, "326"), "opt/udiImage/etc/sshd_config")) as fh:
        assert [line for line in fh.read().splitlines() if line.startswith("HostKey")] == [
            "HostKey /opt/udiImage/etc/ssh_host_ecdsa_key"]
    assert site.unsetup("--job-id", "326").returncode == 0
    assert site.setup("326", user, "-s", _pubkey(site), "--defer-sshd").returncode == 0  # "another node"
    assert _known_hosts(site, "326") == first
    assert site.setup("327", user, "-s", _pubkey(site), "--defer-sshd").returncode == 0
    assert site.setup("328", other, "-s", _pubkey(site), "--defer-sshd").returncode == 0
    keys = {_known_hosts(site, job).split()[2] for job in ("326", "327", "328")}
    assert len(keys) == 3


def test_ssh_with_strict_checking_reaches_the_jobs_sshd(clean_site, users, udi_image):
    """A client that trusts only the job's known_hosts line logs in; one with another job's line refuses."""
    import shlex

    site, user = clean_site, users[0]
    site.write_config(f"optUdiImage={udi_image}\n")
    key = os.path.join(site.base, "userkey-hardening")
    _pubkey(site)
    setup = [os.path.join(site.bin, "setupRoot"), "--config", site.conf, "--job-id", "329", "-U", str(user.uid),
             "-G", str(user.gid), "-u", user.name, "-s", _pubkey(site), "id", IMAGE_ID]
    wrong = os.path.join(site.base, "wrong_known_hosts")
    with open(wrong, "w") as fh:  # a well-formed line for another key
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", wrong + ".key"], check=True)
        with open(wrong + ".key.pub") as pub:
            fh.write("* " + pub.read())
    known = os.path.join(_root(site, "329"), "opt/udiImage/etc/ssh_known_hosts")

    def ssh(known_hosts: str) -> str:
        return " ".join(map(shlex.quote, [
            "ssh", "-i", key, "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-p", "1204", f"{user.name}@127.0.0.1",
            "echo in-the-job"]))
    script = ("ip link set lo up || exit 90\n"
              f"{' '.join(map(shlex.quote, setup))} || exit 91\n"
              f"timeout 20 {ssh(known)} || exit 92\n"
              f"timeout 20 {ssh(wrong)} && exit 93\n"
              "exit 0\n")
    out = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("in-the-job") == 1
    assert "host key" in out.stderr.lower() or "verification failed" in out.stderr.lower(), out.stderr
    for name in ("wrong_known_hosts", "wrong_known_hosts.key", "wrong_known_hosts.key.pub"):
        os.unlink(os.path.join(site.base, name))


CLIENT_ID = "e" * 64


@pytest.fixture(scope="session")
def client_image(site):
    """An image with its own /usr/bin/ssh, and /bin an absolute symlink to a host directory holding
    a file named ssh (a canary standing in for a host binary such as /usr/bin/ssh)."""
    canary_dir = os.path.join(site.base, "host-canary-bin")
    os.makedirs(canary_dir, exist_ok=True)
    with open(os.path.join(canary_dir, "ssh"), "w") as fh:
        fh.write("HOST CANARY\n")
    tree = os.path.join(site.base, "tree-client")
    for sub in ("usr/bin", "etc", "var", "opt", "home"):
        os.makedirs(os.path.join(tree, sub))
    with open(os.path.join(tree, "usr/bin/ssh"), "w") as fh:
        fh.write("the image's own client\n")
    os.symlink(canary_dir, os.path.join(tree, "bin"))
    subprocess.run(["mksquashfs", tree, os.path.join(site.images, f"{CLIENT_ID}.squashfs"), "-noappend",
                    "-quiet", "-all-root"], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    write_meta(os.path.join(site.images, f"{CLIENT_ID}.meta"), ImageMeta(format="squashfs", env=["PATH=/bin"]))
    return canary_dir


def test_ssh_client_bind_never_lands_on_a_host_file(clean_site, users, udi_image, client_image):
    """The image's /bin -> <host dir>: the client bind stays inside the root; the image's own is replaced."""
    site, user = clean_site, users[0]
    site.write_config(f"optUdiImage={udi_image}\n")
    canary = os.path.join(client_image, "ssh")
    result = site.setup("330", user, "-s", _pubkey(site), "--defer-sshd", image=CLIENT_ID)
    assert result.returncode == 0, result.stderr
    root = _root(site, "330")
    assert os.readlink(os.path.join(root, "bin")) == client_image  # the trap was in place
    with open(canary) as fh:
        assert fh.read() == "HOST CANARY\n"
    assert not any(point == canary for point in site.mounts())
    with open(os.path.join(root, "usr/bin/ssh"), "rb") as bound, open(os.path.join(udi_image, "bin/ssh"), "rb") as ours:
        assert bound.read(4096) == ours.read(4096)  # the udiImage's client over the image's own
    with pytest.raises(OSError):
        open(os.path.join(root, "usr/bin/ssh"), "ab").close()  # read-only
    assert site.unsetup("--job-id", "330").returncode == 0
    with open(canary) as fh:
        assert fh.read() == "HOST CANARY\n"


def test_ccm_task_reads_no_root_only_file_while_the_user_swaps_setup_error(clean_site, users):
    """The user exchanges setup.error (root's) with a symlink to a root-only file, in a loop."""
    from shifter.errors import ShifterError
    from spank_plugin.hooks import JobRequest, PlugstackArgs, record_setup_error
    from tests.race import swapping

    site, user = clean_site, users[0]
    canary = os.path.join(site.base, "canary-race")
    with open(canary, "w") as fh:
        fh.write("SECRET-RACE-LINE\n")
    os.chmod(canary, 0o600)
    os.makedirs(site.udi_mount, 0o755, exist_ok=True)
    req = JobRequest(job_id="332", uid=user.uid, gid=user.gid, user=user.name, image_type="id", image=IMAGE_ID,
                     volumes=[], modules=None, ssh_pubkey=None, node_spec="")
    record_setup_error(PlugstackArgs(shifter_config=site.conf), req, "the real reason")
    job_dir = os.path.join(site.udi_mount, "332")
    os.chown(job_dir, user.uid, user.gid)  # the layout without POSIX ACLs: the user owns the job directory
    decoy = os.path.join(job_dir, "decoy")
    os.symlink(canary, decoy)
    os.lchown(decoy, user.uid, user.gid)
    seen = set()
    with swapping(os.path.join(job_dir, "setup.error"), decoy, uid=user.uid, gid=user.gid,
                  max_seconds=10) as swapper:
        for _ in range(2000):
            try:
                _ccm_task(site, "332", user.uid)
            except ShifterError as err:
                seen.add(str(err))
    assert swapper.swaps > 100, "the race did not run"
    assert not any("SECRET" in message for message in seen), seen
    assert any("the real reason" in message for message in seen), seen
    shutil.rmtree(job_dir)
    os.unlink(canary)


def test_squatter_after_the_prolog_fails_the_jobs_tasks(clean_site, users, udi_image):
    """With --defer-sshd a user who takes port 1204 between the prolog and the extern step gets the job's
    tasks refused with the reason, not a job that runs while someone else holds its sshd's port."""
    import shlex
    import sys

    site, user, squatter = clean_site, users[0], users[1]
    site.write_config(f"optUdiImage={udi_image}\n")
    ready_dir = os.path.join(site.base, "late-squatter")
    os.makedirs(ready_dir, exist_ok=True)
    os.chown(ready_dir, squatter.uid, squatter.gid)
    ready = os.path.join(ready_dir, "ready")
    script_file = os.path.join(site.base, "squatter.py")
    with open(script_file, "w") as fh:
        fh.write(_SQUATTER)
    os.chmod(script_file, 0o644)
    setup = [os.path.join(site.bin, "setupRoot"), "--config", site.conf, "--job-id", "326", "-U", str(user.uid),
             "-G", str(user.gid), "-u", user.name, "-s", _pubkey(site), "--defer-sshd", "id", IMAGE_ID]
    squat = ["setpriv", f"--reuid={squatter.uid}", f"--regid={squatter.gid}", "--clear-groups",
             "/usr/bin/python3", script_file, "v4", ready]
    extern = [sys.executable, "-c",
              "import sys; from spank_plugin.hooks import PlugstackArgs; from spank_plugin.stephooks import extern; "
              f"sys.exit(extern(PlugstackArgs(shifter_config={site.conf!r}, extern_cgroup=True, enable_sshd=True), "
              f"{{'job-id': '326', 'uid': '{user.uid}', 'gid': '{user.gid}'}}))"]
    script = ("ip link set lo up || exit 90\n"
              f"{' '.join(map(shlex.quote, setup))} || exit 91\n"
              f"{' '.join(map(shlex.quote, squat))} & squatter=$!\n"
              f"for i in $(seq 200); do [ -e {ready} ] && break; sleep 0.05; done\n"
              f"[ -e {ready} ] || exit 92\n"
              f"{' '.join(map(shlex.quote, extern))}; status=$?\n"
              "kill $squatter; wait $squatter\n"
              "exit $status\n")
    try:
        out = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": REPO})
        assert out.returncode == 1, out.stdout + out.stderr
        assert "the job's sshd did not start" in out.stderr and "Traceback" not in out.stderr, out.stderr
        task = site.shifter(user, "true", env=site.job_env("326"))
        assert task.returncode != 0 and "the job's sshd did not start" in task.stderr, task.stderr
        assert "port 1204" in task.stderr and "Traceback" not in task.stderr, task.stderr
    finally:
        assert site.unsetup("--job-id", "326").returncode == 0
        shutil.rmtree(ready_dir)
    assert not os.path.lexists(os.path.join(site.udi_mount, "326"))
