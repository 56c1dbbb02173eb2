"""The job sshd against hostile images and other users: root runs nothing the image chose."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from shifter.meta import ImageMeta, write_meta
from tests.root.conftest import REPO

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
    for kind in ("ed25519",):
        key = os.path.join(root, f"opt/udiImage/etc/ssh_host_{kind}_key")
        info = os.lstat(key)
        assert (info.st_uid, info.st_mode & 0o777) == (user.uid, 0o600)
        with open(key) as fh:
            assert fh.readline().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
