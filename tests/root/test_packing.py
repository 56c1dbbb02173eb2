"""packtool against the host's real OpenSSH and MPICH, checked in real chroots.

The chroot holds only the packed udiImage at /opt/udiImage, a static busybox as /bin/sh and a
minimal /etc: no /lib, no /usr.  Whatever runs there can only load what was packed.  Each
command runs in a private mount namespace (``unshare -m``) where /dev/null is bound in, then
chroots and, for the sshd, drops to a throwaway unprivileged user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time

import pytest

from shifter.packing.relocate import GLIBC_SONAMES, HOST_KEY_TYPES, LIB_DIR, read_elf

PYTHON = sys.executable
USER = "shifter-pk1"
MPICH = "/usr/lib/x86_64-linux-gnu/libmpich.so.12"

# Runs as root in a fresh mount namespace: bind /dev/null in, chroot, drop to uid:gid, exec.
ENTER = """
import os, sys
from shifter.runtime import linux
root, uid, gid, argv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
linux.bind("/dev/null", root + "/dev/null", nodev=False)
os.chroot(root)
os.chdir("/")
env = {"PATH": "/bin", "HOME": "/"}
if uid:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    env["HOME"] = "/home/" + os.environ["PK_USER"]
env.update(kv.split("=", 1) for kv in os.environ.get("PK_ENV", "").split() if kv)
os.execve(argv[0], argv, env)
"""


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)


def _in_root(root: str, uid: int, gid: int, argv: list[str]) -> list[str]:
    return ["unshare", "-m", "--propagation", "private", "--", PYTHON, "-c", ENTER, root, str(uid), str(gid),
            *argv]


def _env(extra: str = "") -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PK_USER": USER, "PK_ENV": extra}


@pytest.fixture(scope="module")
def account():
    created = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-d", f"/home/{USER}", "-s", "/bin/sh", USER], check=True)
        created = True
    yield pwd.getpwnam(USER)
    if created:
        subprocess.run(["userdel", USER], check=False)


@pytest.fixture(scope="module")
def udi_image(tmp_path_factory) -> str:
    dest = str(tmp_path_factory.mktemp("pack") / "udiImage")
    result = _run([PYTHON, "-m", "shifter.packtool", "udiimage", dest])
    assert result.returncode == 0, result.stderr
    return dest


def _make_root(base: str, udi_image: str, account) -> str:
    """The chroot: /opt/udiImage, busybox as /bin/sh, /etc/passwd and group, /tmp, the user's home."""
    root = os.path.join(base, "root")
    for sub in ("opt", "bin", "etc", "dev", "tmp", "home"):
        os.makedirs(os.path.join(root, sub), 0o755)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    shutil.copytree(udi_image, os.path.join(root, "opt/udiImage"), symlinks=True)
    shutil.copy("/bin/busybox", os.path.join(root, "bin/busybox"))
    os.symlink("busybox", os.path.join(root, "bin/sh"))
    with open(os.path.join(root, "etc/passwd"), "w") as fh:
        fh.write(f"root:x:0:0:root:/:/bin/sh\n{USER}:x:{account.pw_uid}:{account.pw_gid}::/home/{USER}:/bin/sh\n")
    with open(os.path.join(root, "etc/group"), "w") as fh:
        fh.write(f"root:x:0:\n{USER}:x:{account.pw_gid}:\n")
    open(os.path.join(root, "dev/null"), "w").close()
    home = os.path.join(root, "home", USER)
    os.makedirs(home, 0o755)
    os.chown(home, account.pw_uid, account.pw_gid)
    return root


def _prepare_sshd(root: str, account, pubkey: str) -> None:
    """What setupRoot does: host keys owned by the user, AllowUsers, the authorised key."""
    etc = os.path.join(root, "opt/udiImage/etc")
    for kind in HOST_KEY_TYPES:
        key = f"/opt/udiImage/etc/ssh_host_{kind}_key"
        result = _run(_in_root(root, 0, 0, ["/opt/udiImage/bin/ssh-keygen", "-q", "-t", kind, "-f", key,
                                            "-N", ""]), env=_env())
        assert result.returncode == 0, result.stderr
        os.chown(root + key, account.pw_uid, account.pw_gid)
    with open(root + "/opt/udiImage/etc/ssh_host_ecdsa_key.pub") as pub, \
            open(os.path.join(etc, "ssh_known_hosts"), "w") as known:  # the packed client checks strictly
        known.write("* " + pub.read())
    config = os.path.join(etc, "sshd_config")
    with open(config) as fh:
        text = fh.read()
    assert "AllowUsers ToBeReplaced\n" in text
    with open(config, "w") as fh:
        fh.write(text.replace("AllowUsers ToBeReplaced", f"AllowUsers {USER}"))
    with open(os.path.join(etc, "user_auth_keys"), "w") as fh:
        fh.write(pubkey)
    os.chmod(os.path.join(etc, "user_auth_keys"), 0o444)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"sshd exited: {proc.stderr.read()}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"sshd did not listen on {port}")


def test_udiimage_runs_with_nothing_from_the_host(udi_image, account, tmp_path):
    root = _make_root(str(tmp_path), udi_image, account)
    assert sorted(os.listdir(root)) == ["bin", "dev", "etc", "home", "opt", "tmp"]  # no /lib, no /usr
    sshd = read_elf(os.path.join(udi_image, "sbin/sshd"))
    assert sshd.interpreter == f"/opt/udiImage/{LIB_DIR}/ld-linux-x86-64.so.2"
    assert sshd.rpath == (f"/opt/udiImage/{LIB_DIR}",) and not sshd.runpath
    assert read_elf(os.path.join(udi_image, LIB_DIR, "libcrypto.so.3")).rpath == ("$ORIGIN",)

    result = _run(_in_root(root, 0, 0, ["/opt/udiImage/bin/ssh-keygen", "-t", "ed25519", "-f", "/tmp/k",
                                        "-N", ""]), env=_env())
    assert result.returncode == 0, result.stderr
    assert os.path.getsize(os.path.join(root, "tmp/k")) > 0
    with open(os.path.join(root, "tmp/k.pub")) as fh:
        assert fh.read().startswith("ssh-ed25519 ")

    _prepare_sshd(root, account, "")
    sshd_test = ["/opt/udiImage/sbin/sshd", "-t", "-f", "/opt/udiImage/etc/sshd_config"]
    result = _run(_in_root(root, account.pw_uid, account.pw_gid, sshd_test), env=_env())
    assert result.returncode == 0, result.stderr

    # DT_RPATH is searched before LD_LIBRARY_PATH: libraries the environment points at are never tried
    poison = os.path.join(root, "poison")
    os.mkdir(poison)
    for name in ("libc.so.6", "libcrypto.so.3", "libz.so.1"):
        with open(os.path.join(poison, name), "w") as fh:
            fh.write("not a library\n")
    result = _run(_in_root(root, 0, 0, ["/opt/udiImage/bin/ssh", "-V"]),
                  env=_env("LD_LIBRARY_PATH=/poison LD_DEBUG=libs"))
    assert result.returncode == 0, result.stderr
    assert "OpenSSH_" in result.stderr
    assert "/poison" not in result.stderr.replace("LD_LIBRARY_PATH", "")
    loaded = [line.split("calling init: ")[1] for line in result.stderr.splitlines()
              if "calling init: " in line]
    assert loaded and all(path.startswith(f"/opt/udiImage/{LIB_DIR}/") for path in loaded), loaded


def test_packed_sshd_as_the_user_accepts_the_users_key(udi_image, account, tmp_path):
    root = _make_root(str(tmp_path), udi_image, account)
    key = str(tmp_path / "id_ed25519")
    result = _run(["ssh-keygen", "-q", "-t", "ed25519", "-f", key, "-N", ""])
    assert result.returncode == 0, result.stderr
    with open(key + ".pub") as fh:
        pubkey = fh.read()
    _prepare_sshd(root, account, pubkey)
    udiroot = os.path.join(root, "home", USER, ".udiRoot")
    os.mkdir(udiroot, 0o700)
    shutil.copy(key, os.path.join(udiroot, "id_rsa.key"))  # where ssh_config's IdentityFile points
    for path in (udiroot, os.path.join(udiroot, "id_rsa.key")):
        os.chown(path, account.pw_uid, account.pw_gid)

    port = _free_port()
    sshd = subprocess.Popen(
        _in_root(root, account.pw_uid, account.pw_gid,
                 ["/opt/udiImage/sbin/sshd", "-D", "-e", "-f", "/opt/udiImage/etc/sshd_config",
                  "-p", str(port), "-o", "ListenAddress=127.0.0.1"]),
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_listening(port, sshd)
        with open(f"/proc/{sshd.pid}/status") as fh:
            uids = next(line for line in fh if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {str(account.pw_uid)}  # the sshd runs as the user, not as root

        def host_ssh(identity: str) -> list[str]:
            return ["ssh", "-F", "/dev/null", "-i", identity, "-p", str(port), "-o", "BatchMode=yes",
                    "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                    "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]

        probe = "test -x /opt/udiImage/sbin/sshd && test ! -e /usr && echo in-container $HOME"
        result = _run([*host_ssh(key), f"{USER}@127.0.0.1", probe])
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"in-container /home/{USER}"
        # the packed client with the packed ssh_config (~/.udiRoot/id_rsa.key, the job's host key only)
        packed_ssh = ["/opt/udiImage/bin/ssh", "-F", "/opt/udiImage/etc/ssh_config", "-p", str(port),
                      "-o", "BatchMode=yes", f"{USER}@127.0.0.1", "echo", "packed-client"]
        result = _run(_in_root(root, account.pw_uid, account.pw_gid, packed_ssh), env=_env())
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "packed-client"
        # root cannot log in, and another key is refused
        result = _run([*host_ssh(key), "root@127.0.0.1", "true"])
        assert result.returncode == 255 and "Permission denied" in result.stderr
        other = str(tmp_path / "other")
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-f", other, "-N", ""])
        result = _run([*host_ssh(other), f"{USER}@127.0.0.1", "true"])
        assert result.returncode == 255 and "Permission denied" in result.stderr
    finally:
        sshd.terminate()
        sshd.wait(timeout=10)
        sshd.stderr.close()


UCX_PLUGINS = "/usr/lib/x86_64-linux-gnu/ucx"

MPI_PROGRAM = r"""
#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {
    char version[MPI_MAX_LIBRARY_VERSION_STRING], line[4096];
    int length, rank;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Get_library_version(version, &length);
    printf("rank %d %.5s\n", rank, version);
    FILE *maps = fopen("/proc/self/maps", "r");
    while (fgets(line, sizeof line, maps)) fputs(line, stdout);
    MPI_Finalize();
    return 0;
}
"""


def test_module_packs_mpich_without_the_c_library(tmp_path):
    if not os.path.exists(MPICH) or not shutil.which("mpicc"):
        pytest.skip(f"{MPICH} or mpicc not installed (Debian's libmpich-dev)")
    dest = str(tmp_path / "mpich")
    result = _run([PYTHON, "-m", "shifter.packtool", "module", dest, MPICH,
                   "--alias", "libmpi.so.12=libmpich.so.12", "--plugin-dir", UCX_PLUGINS])
    assert result.returncode == 0, result.stderr
    libdir = os.path.join(dest, LIB_DIR)
    packed = set(os.listdir(libdir))
    assert {"libmpich.so.12", "libmpi.so.12", "libucp.so.0", "libhwloc.so.15", "ucx"} <= packed
    assert os.readlink(os.path.join(libdir, "libmpi.so.12")) == "libmpich.so.12"
    assert not packed & GLIBC_SONAMES
    excluded_seen = set()
    for name in packed - {"libmpi.so.12", "ucx"}:
        elf = read_elf(os.path.join(libdir, name))
        assert elf.runpath == ("$ORIGIN",) and not elf.rpath, name
        for needed in elf.needed:
            assert needed in packed or needed in GLIBC_SONAMES, f"{name} needs {needed}"
            if needed in GLIBC_SONAMES:
                excluded_seen.add(needed)
    assert "libc.so.6" in excluded_seen
    plugin = read_elf(os.path.join(libdir, "ucx", "libuct_cma.so.0"))
    assert plugin.runpath == ("$ORIGIN", "$ORIGIN/..")
    assert all(needed in packed or needed in GLIBC_SONAMES for needed in plugin.needed)

    # an MPI program built against the host's MPICH loads the injected copies (UCX's transports
    # too), and the C library from the system, when LD_LIBRARY_PATH names the module, as
    # module_mpich_siteEnvPrepend does in a container
    source = tmp_path / "ranks.c"
    source.write_text(MPI_PROGRAM)
    program = str(tmp_path / "ranks")
    result = _run(["mpicc", str(source), "-o", program])
    assert result.returncode == 0, result.stderr
    assert "libmpich.so.12" in read_elf(program).needed
    result = _run([program], env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": libdir})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("rank 0 MPICH")
    maps = {line.split()[-1] for line in result.stdout.splitlines()[1:] if line.split()[-1].startswith("/")}
    for name in ("libmpich.so.12", "libucp.so.0", "libucs.so.0", "ucx/libuct_cma.so.0.0.0"):
        assert os.path.join(libdir, name) in maps, name
    leaked = [path for path in maps if not path.startswith(libdir)
              and ("/libmpich" in path or "/libuc" in path)]
    assert not leaked, leaked
    assert any(os.path.basename(path) == "libc.so.6" and not path.startswith(dest) for path in maps)


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    not_elf = tmp_path / "notes.txt"
    not_elf.write_text("hello\n")
    result = _run([PYTHON, "-m", "shifter.packtool", "module", str(tmp_path / "m"), str(not_elf)])
    assert result.returncode != 0
    assert result.stderr.strip() == f"packtool: {not_elf}: not an ELF file"
    result = _run([PYTHON, "-m", "shifter.packtool", "module", str(tmp_path / "m"),
                   "/lib/x86_64-linux-gnu/libc.so.6"])
    assert result.returncode != 0 and "part of the C library" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if os.path.exists(MPICH):
        result = _run([PYTHON, "-m", "shifter.packtool", "module", str(tmp_path / "m"), MPICH,
                       "--alias", "libmpi.so.12=libnothere.so.1"])
        assert result.returncode != 0 and "libnothere.so.1 is not packed" in result.stderr
    (tmp_path / "exists").mkdir()
    result = _run([PYTHON, "-m", "shifter.packtool", "udiimage", str(tmp_path / "exists")])
    assert result.returncode != 0 and "already exists" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["exists", "notes.txt"]  # no half-made directory
