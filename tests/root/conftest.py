"""Fixtures for the node-runtime tests: real mounts, loop devices, namespaces and users.

They need root: every test here is skipped (with the reason) otherwise.  Everything lives
under one directory in /run that the session creates and removes; after every test the
environments are torn down and the test fails if a mount, a loop device on the test images or
a process chrooted into a test root is left.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys

import pytest

from shifter.formats.meta import ImageMeta, write_meta

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
USERS = ("shifter-rt1", "shifter-rt2")
GROUP = "shifter-rtg"
IMAGE_ID = "b" * 64
PRIVATE_ID = "c" * 64
HOSTILE_ID = "f" * 64
JOB_IMAGE_REQUEST = "docker:test/busybox:latest"

pytestmark = pytest.mark.root


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: real mounts, loop devices and user namespaces")
        for item in items:
            if "tests/root/" in str(item.fspath):
                item.add_marker(skip)


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


class Users:
    """Throwaway unprivileged users (created unless they already exist, removed at the end)."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.created_group = False

    def ensure(self) -> None:
        try:
            import grp

            grp.getgrnam(GROUP)
        except KeyError:
            subprocess.run(["groupadd", GROUP], check=True)
            self.created_group = True
        for name in USERS:
            try:
                pwd.getpwnam(name)
            except KeyError:
                subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", "-G", GROUP, name],
                               check=True)
                self.created.append(name)
            else:
                subprocess.run(["usermod", "-aG", GROUP, name], check=True)

    def remove(self) -> None:
        for name in self.created:
            subprocess.run(["userdel", name], check=False)
        if self.created_group:
            subprocess.run(["groupdel", GROUP], check=False)


class Account:
    def __init__(self, name: str) -> None:
        entry = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid
        self.groups = sorted(set(os.getgrouplist(name, entry.pw_gid)))


def _build_image(work: str, name: str, os_release: str) -> str:
    """A busybox image: applets, a setuid copy of busybox, /etc/os-release, /opt/app, /data."""
    tree = os.path.join(work, f"tree-{name}")
    for sub in ("bin", "etc", "usr/bin", "var/lib/app", "opt/app", "data", "home"):
        os.makedirs(os.path.join(tree, sub), exist_ok=True)
    shutil.copy("/bin/busybox", os.path.join(tree, "bin/busybox"))
    for applet in ("sh", "cat", "ls", "id", "true", "echo", "env", "grep", "touch", "stat", "pwd", "sleep"):
        os.symlink("busybox", os.path.join(tree, "bin", applet))
    suid = os.path.join(tree, "bin/busybox-suid")
    shutil.copy("/bin/busybox", suid)
    os.chmod(suid, 0o4755)
    with open(os.path.join(tree, "etc/os-release"), "w") as fh:
        fh.write(os_release)
    with open(os.path.join(tree, "etc/imagefile"), "w") as fh:
        fh.write("from the image\n")
    with open(os.path.join(tree, "opt/app/marker"), "w") as fh:
        fh.write("app\n")
    image = os.path.join(work, "images", f"{name}.squashfs")
    subprocess.run(["mksquashfs", tree, image, "-noappend", "-quiet", "-comp", "lz4", "-all-root"],
                   check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    return image


class Site:
    """One test node: a directory tree with images, a udiRoot.conf and the three commands."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.images = os.path.join(base, "images")
        self.bin = os.path.join(base, "bin")
        self.site_dir = os.path.join(base, "site1")
        self.conf = os.path.join(base, "udiRoot.conf")
        self.udi_mount = os.path.join(base, "udi")
        self.loop_mount = os.path.join(base, "loop")
        self.cache = os.path.join(base, "cache")

    def make(self) -> None:
        os.makedirs(self.base, 0o755)
        os.chmod(self.base, 0o755)
        for sub in (self.images, self.bin, self.site_dir, os.path.join(self.base, "etc")):
            os.makedirs(sub, 0o755, exist_ok=True)
        _build_image(self.base, IMAGE_ID, 'NAME="ShifterTestBox"\nID=shiftertestbox\n')
        write_meta(os.path.join(self.images, f"{IMAGE_ID}.meta"),
                   ImageMeta(format="squashfs", env=["PATH=/usr/bin:/bin", "FROM_IMAGE=yes"], workdir="/opt/app",
                             entrypoint=["/bin/echo", "entry"], cmd=["from-cmd"]))
        shutil.copy(os.path.join(self.images, f"{IMAGE_ID}.squashfs"),
                    os.path.join(self.images, f"{PRIVATE_ID}.squashfs"))
        rt1 = pwd.getpwnam(USERS[0]).pw_uid
        write_meta(os.path.join(self.images, f"{PRIVATE_ID}.meta"),
                   ImageMeta(format="squashfs", env=["PATH=/bin"], user_acl=[rt1]))
        self._hostile_image()
        for name in ("passwd", "group", "nsswitch.conf"):
            shutil.copy(f"/etc/{name}", os.path.join(self.base, "etc", name))
        os.makedirs(os.path.join(self.site_dir, "shared"), 0o755)
        with open(os.path.join(self.site_dir, "shared/hello"), "w") as fh:
            fh.write("hello from the site\n")
        os.makedirs(os.path.join(self.site_dir, "rootonly"), 0o700)
        for name, module in (("setupRoot", "setuproot"), ("unsetupRoot", "unsetuproot")):
            self._wrapper(name, "from shifter.cmdline import exit_fast\n"
                                f"from {module}.__main__ import main\nexit_fast(main)\n")
        self._wrapper("shifter-python", "from shifter.launch.cli import main\nmain()\n")
        self.build_launcher(os.path.join(self.bin, "shifter"), os.path.join(self.bin, "shifter-python"))
        self.write_config()
        subprocess.run([PYTHON, "-m", "compileall", "-q", os.path.join(REPO, "shifter"),
                        os.path.join(REPO, "setuproot"), os.path.join(REPO, "unsetuproot")],
                       check=True, stdout=subprocess.DEVNULL)

    def build_launcher(self, target: str, python_launcher: str) -> None:
        """bin/shifter as `make launcher` builds it, with this site's paths compiled in."""
        subprocess.run(["gcc", "-O2", "-Wall", "-Werror", f'-DSHIFTER_CONFIG_FILE="{self.conf}"',
                        f'-DSHIFTER_PYTHON_LAUNCHER="{python_launcher}"',
                        os.path.join(REPO, "shifter/launch/fastlaunch.c"),
                        "-o", target], check=True)

    def _hostile_image(self) -> None:
        """An image that plants a reuse marker, replaces /etc with a symlink, and links /data -> /etc."""
        tree = os.path.join(self.base, "tree-hostile")
        for sub in ("bin", "var", "opt"):
            os.makedirs(os.path.join(tree, sub))
        shutil.copy("/bin/busybox", os.path.join(tree, "bin/busybox"))
        for applet in ("sh", "cat", "ls"):
            os.symlink("busybox", os.path.join(tree, "bin", applet))
        os.symlink("/host-etc", os.path.join(tree, "etc"))
        os.symlink("/etc", os.path.join(tree, "data"))
        with open(os.path.join(tree, "var/shifterConfig.json"), "w") as fh:
            fh.write('{"identifier":"forged","user":"x","volMap":"","modules":""}\n')
        subprocess.run(["mksquashfs", tree, os.path.join(self.images, f"{HOSTILE_ID}.squashfs"), "-noappend",
                        "-quiet", "-all-root"], check=True, stdout=subprocess.DEVNULL)
        shutil.rmtree(tree)
        write_meta(os.path.join(self.images, f"{HOSTILE_ID}.meta"), ImageMeta(format="squashfs", env=["PATH=/bin"]))

    def _wrapper(self, name: str, body: str) -> None:
        """What `make install` writes: the venv's interpreter with -I -S, the code on sys.path."""
        path = os.path.join(self.bin, name)
        with open(path, "w") as fh:
            fh.write(f"#!{PYTHON} -IS\nimport sys\nsys.path.insert(0, {REPO!r})\n{body}")
        os.chmod(path, 0o755)

    def write_config(self, extra: str = "") -> None:
        text = (f"udiMount={self.udi_mount}\nloopMount={self.loop_mount}\nimagePath={self.images}\n"
                f"udiRootPath={REPO}\netcPath={self.base}/etc\nrootfsType=tmpfs\n"
                f"siteFs={self.site_dir}:/site1\nmaxGroupCount=31\nmountUdiRootWritable=0\n"
                f"perNodeCachePath={self.cache}\nallowLibcPwdCalls=1\n{extra}")
        with open(self.conf, "w") as fh:
            fh.write(text)
        os.chmod(self.conf, 0o644)

    # -- commands -----------------------------------------------------------------

    def setup(self, jobid: str, account: Account, *args: str, image: str = IMAGE_ID,
              image_type: str = "id") -> subprocess.CompletedProcess:
        argv = [os.path.join(self.bin, "setupRoot"), "--config", self.conf, "--job-id", jobid,
                "-U", str(account.uid), "-G", str(account.gid), "-u", account.name, *args, image_type, image]
        return _run(argv, env={"PATH": "/usr/bin:/bin"})

    def unsetup(self, *args: str) -> subprocess.CompletedProcess:
        return _run([os.path.join(self.bin, "unsetupRoot"), "--config", self.conf, *args],
                    env={"PATH": "/usr/bin:/bin"})

    def job_env(self, jobid: str, **extra: str) -> dict[str, str]:
        env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": jobid, "SHIFTER_UDIROOT_CONF": self.conf,
               "SHIFTER_IMAGETYPE": "id", "SHIFTER_IMAGE": IMAGE_ID,
               "SHIFTER_IMAGEREQUEST": JOB_IMAGE_REQUEST}
        env.update(extra)
        return env

    def shifter(self, account: Account, *args: str, env: dict[str, str], cwd: str = "/",
                launcher: str = "shifter") -> subprocess.CompletedProcess:
        """Run the launcher (bin/shifter, or another in bin/) as the unprivileged ``account``."""
        return _run([os.path.join(self.bin, launcher), *args], env=env, cwd=cwd, user=account.uid,
                    group=account.gid, extra_groups=account.groups)

    # -- leftovers ------------------------------------------------------------------

    def mounts(self) -> list[str]:
        from shifter.runtime.mounts import mounts_under

        # udiMount and loopMount stay private binds of themselves (setuproot/build.py _isolate_base)
        return [point for point in mounts_under(self.base) if point not in (self.udi_mount, self.loop_mount)]

    def loop_devices(self) -> list[str]:
        """Loop devices whose backing file is one of this site's files."""
        found = []
        for name in os.listdir("/sys/block"):
            try:
                with open(f"/sys/block/{name}/loop/backing_file") as fh:
                    backing = fh.read().strip()
            except OSError:
                continue
            if backing.startswith(self.base):
                found.append(f"{name}: {backing}")
        return found

    def processes(self) -> list[int]:
        from shifter.runtime.teardown import processes_rooted_in

        return processes_rooted_in(self.udi_mount)

    def leftovers(self) -> dict[str, list]:
        jobs = sorted(os.listdir(self.udi_mount)) if os.path.isdir(self.udi_mount) else []
        loops = sorted(os.listdir(self.loop_mount)) if os.path.isdir(self.loop_mount) else []
        caches = sorted(os.listdir(self.cache)) if os.path.isdir(self.cache) else []
        result = {"mounts": self.mounts(), "loop devices": self.loop_devices(), "processes": self.processes(),
                  "job dirs": jobs + loops, "cache files": caches}
        return {k: v for k, v in result.items() if v}

    def wait_no_loops(self, timeout: float = 5.0) -> list[str]:
        """Autoclear frees a loop device asynchronously after the last unmount: give it a moment."""
        import time

        deadline = time.monotonic() + timeout
        while self.loop_devices() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.loop_devices()

    def destroy(self) -> None:
        from shifter.runtime.mounts import unmount_tree

        subprocess.run([os.path.join(self.bin, "unsetupRoot"), "--config", self.conf, "--all"], check=False)
        unmount_tree(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def users():
    if os.geteuid() != 0:
        pytest.skip("needs root to create test users")
    created = Users()
    created.ensure()
    yield [Account(name) for name in USERS]
    created.remove()


@pytest.fixture(scope="session")
def site(users, tmp_path_factory):
    base = f"/run/shifter-rt-{os.getpid()}"
    node = Site(base)
    node.make()
    yield node
    node.destroy()


@pytest.fixture
def fuse_mode():
    """Set /dev/fuse's mode for a test (it is 0600 on these machines) and restore it afterwards."""
    original = os.stat("/dev/fuse").st_mode & 0o777

    def set_mode(mode: int) -> None:
        os.chmod("/dev/fuse", mode)

    yield set_mode
    os.chmod("/dev/fuse", original)


def spotless(site):
    """Yield ``site`` with its default config; afterwards tear every environment down and fail the
    test if anything is left (a generator for the clean_* fixtures)."""
    site.write_config()
    yield site
    result = site.unsetup("--all")
    site.wait_no_loops()
    left = site.leftovers()
    site.write_config()
    assert result.returncode == 0, result.stderr
    assert not left, f"left behind: {left}"


@pytest.fixture
def clean_site(site):
    """The site, checked to be spotless after the test (every environment torn down first)."""
    yield from spotless(site)
