"""GPU injection with real mounts on a fake GPU node (no GPU here: the driver and the devices are fakes).

What stands in (and only that), from localcluster/fakegpu.py: a driver tree built by the test
(versioned shared objects made from localcluster/fake_gpu/*.c, a loader cache made by the
host's ldconfig, a driver version file, an ``nvidia-smi`` that prints what it sees) and a node
/dev whose NVIDIA nodes are made with mknod (major 195) in a private mount namespace
(tests/root/fake_gpu/node.py).  setupRoot,
the launchers and unsetupRoot are the real ones, with real mounts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from localcluster import fakegpu
from shifter.formats.meta import ImageMeta, write_meta
from tests.root.conftest import PYTHON, REPO

HERE = os.path.join(REPO, "tests", "root", "fake_gpu")
VERSION = fakegpu.VERSION
GPU_IMAGE_ID = "9" * 64
SITE_RESOURCES = "/opt/shifter/site-resources"
LIBDIR = fakegpu.LIBDIR


def _build_image(work: str, images: str) -> None:
    """An image with no driver: glibc, busybox, a program that loads libcuda.so.1, and a CUDA stub."""
    tree = os.path.join(work, "tree-fake-gpu")
    # lib/firmware/nvidia/<version>: the image ships the directory (empty), as the GSP firmware needs a
    # place in the image's read-only /lib; /run and /var/log it lacks, so they are made on the tmpfs
    for sub in ("bin", "usr/bin", "lib64", "lib/x86_64-linux-gnu", "usr/local/cuda/lib64/stubs", "etc", "opt",
                f"lib/firmware/nvidia/{VERSION}"):
        os.makedirs(os.path.join(tree, sub))
    shutil.copy("/bin/busybox", os.path.join(tree, "bin/busybox"))
    for applet in ("sh", "cat", "ls", "env", "stat", "readlink", "touch"):
        os.symlink("busybox", os.path.join(tree, "bin", applet))
    shutil.copy(os.path.realpath("/lib64/ld-linux-x86-64.so.2"), os.path.join(tree, "lib64/ld-linux-x86-64.so.2"))
    shutil.copy(os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6"), os.path.join(tree, "lib/x86_64-linux-gnu"))
    fakegpu.build_program("gpuprobe", os.path.join(tree, "usr/bin/gpuprobe"))
    fakegpu.fake_library(os.path.join(tree, "usr/local/cuda/lib64/stubs/libcuda.so.1"), "libcuda.so.1", "image-stub")
    subprocess.run(["mksquashfs", tree, os.path.join(images, f"{GPU_IMAGE_ID}.squashfs"), "-noappend", "-quiet",
                    "-all-root"], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    write_meta(os.path.join(images, f"{GPU_IMAGE_ID}.meta"), ImageMeta(format="squashfs", env=[
        "PATH=/usr/bin:/bin", "LD_LIBRARY_PATH=/usr/local/cuda/lib64/stubs", "NVIDIA_VISIBLE_DEVICES=all",
        "CUDA_VISIBLE_DEVICES=0,1,2,3"]))


@pytest.fixture
def fake_gpu_site(clean_site):
    site = clean_site
    driver = os.path.join(site.base, "fake_gpu_driver")
    if not os.path.isdir(driver):
        fakegpu.build_driver(driver)
        _build_image(site.base, site.images)
    pipe = os.path.join(site.base, "fake-mps-pipe")
    os.makedirs(pipe, exist_ok=True)
    os.chmod(pipe, 0o1777)
    site.write_config(f"siteResources={SITE_RESOURCES}\ngpuRecipe=nvidia\ngpuDriverRoot={driver}\n"
                      f"siteEnv=CUDA_MPS_PIPE_DIRECTORY={pipe}\n")
    return site


class FakeGpuNode:
    """Steps run in one private mount namespace with a fake GPU /dev (tests/root/fake_gpu/node.py)."""

    def __init__(self, site) -> None:
        self.site = site
        self.steps: list[dict] = []

    def setup(self, jobid: str, user, *args: str) -> int:
        argv = [os.path.join(self.site.bin, "setupRoot"), "--config", self.site.conf, "--job-id", jobid,
                "-U", str(user.uid), "-G", str(user.gid), "-u", user.name, *args, "id", GPU_IMAGE_ID]
        self.steps.append({"argv": argv, "env": {"PATH": "/usr/bin:/bin"}})
        return len(self.steps) - 1

    def shifter(self, jobid: str, user, *argv: str, launcher: str = "shifter", **env: str) -> int:
        job_env = self.site.job_env(jobid, SHIFTER_IMAGE=GPU_IMAGE_ID, **env)
        self.steps.append({"argv": [os.path.join(self.site.bin, launcher), *argv], "env": job_env,
                           "uid": user.uid, "gid": user.gid, "groups": list(user.groups)})
        return len(self.steps) - 1

    def unsetup(self, *args: str) -> int:
        self.steps.append({"argv": [os.path.join(self.site.bin, "unsetupRoot"), "--config", self.site.conf, *args],
                           "env": {"PATH": "/usr/bin:/bin"}})
        return len(self.steps) - 1

    def run(self, gpus: int = 4, amd_gpus: int = 0) -> list[dict]:
        spec = os.path.join(self.site.base, "fake_gpu_spec.json")
        with open(spec, "w") as fh:
            json.dump({"gpus": gpus, "amd_gpus": amd_gpus, "steps": self.steps, "watch": self.site.udi_mount}, fh)
        out = subprocess.run(["unshare", "--mount", "--propagation", "private", PYTHON,
                              os.path.join(HERE, "node.py"), spec], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


def _ok(result: dict) -> str:
    assert result["rc"] == 0, result["stderr"]
    return result["stdout"]


def _env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_fake_gpu_job_sees_only_its_gpus_and_the_drivers_libraries(fake_gpu_site, users):
    site, user = fake_gpu_site, users[0]
    node = FakeGpuNode(site)
    setup = node.setup("701", user, "--gpus", "1,3")
    smi = node.shifter("701", user, "nvidia-smi")
    probe = node.shifter("701", user, "gpuprobe")
    # Slurm's node indices for the job's GPUs (no ConstrainDevices): CUDA numbers them 0,1 inside
    env_fast = node.shifter("701", user, "env", CUDA_VISIBLE_DEVICES="1,3", GPU_DEVICE_ORDINAL="3")
    env_python = node.shifter("701", user, "env", CUDA_VISIBLE_DEVICES="1,3", GPU_DEVICE_ORDINAL="3",
                              launcher="shifter-python")
    listing = node.shifter("701", user, "ls", f"{SITE_RESOURCES}/lib64", f"{SITE_RESOURCES}/bin")
    link = node.shifter("701", user, "readlink", f"{SITE_RESOURCES}/lib64/libcuda.so.1")
    write = node.shifter("701", user, "sh", "-c", f"echo x > {SITE_RESOURCES}/lib64/libcuda.so.1")
    pipe = os.path.join(site.base, "fake-mps-pipe")
    host_paths = node.shifter("701", user, "sh", "-c",
                              f"cat /lib/firmware/nvidia/{VERSION}/{fakegpu.FIRMWARE_FILE} "
                              "/var/log/nvidia-mps/control.log"
                              f" && stat -c '%n %F' /run/nvidia-persistenced/socket && touch {pipe}/client-701"
                              f" && ls /lib/firmware/nvidia && echo MPS=$CUDA_MPS_PIPE_DIRECTORY")
    firmware_write = node.shifter("701", user, "touch", f"/lib/firmware/nvidia/{VERSION}/x")
    unsetup = node.unsetup("--job-id", "701")
    doctor = node.shifter("701", user, "doctor")
    results = node.run()

    _ok(results[setup])
    assert "not placed" not in results[setup]["stderr"]
    # the running driver's firmware (read-only), the persistenced socket, the MPS log (site default)
    # and pipe directory (the site's siteEnv value, writable): each at its own path
    assert _ok(results[host_paths]).splitlines() == [
        f"fake GSP firmware {VERSION}", "fake MPS control log", "/run/nvidia-persistenced/socket socket",
        VERSION, f"MPS={pipe}"]
    assert os.path.exists(f"{pipe}/client-701")
    os.unlink(f"{pipe}/client-701")
    assert results[firmware_write]["rc"] != 0
    assert _ok(results[smi]).splitlines() == [
        f"driver {VERSION} from {SITE_RESOURCES}/lib64/libnvidia-ml.so.1",
        "/dev/nvidia0 hidden Permission denied",
        "/dev/nvidia1 char 195:1",
        "/dev/nvidia2 hidden Permission denied",
        "/dev/nvidia3 char 195:3",
        "/dev/nvidiactl char 195:255",
        "/dev/nvidia-uvm char 509:0",
    ]
    # the host driver's libcuda wins over the image's stub on the image's own LD_LIBRARY_PATH
    assert _ok(results[probe]) == f"libcuda {VERSION} from {SITE_RESOURCES}/lib64/libcuda.so.1\n"
    for index in (env_fast, env_python):
        env = _env(_ok(results[index]))
        assert env["NVIDIA_VISIBLE_DEVICES"] == "1,3"  # the allocation, not the image's "all"
        assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
        # Slurm's value for the task (not the image's), renumbered as the container shows the GPUs
        assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["GPU_DEVICE_ORDINAL"] == "1"
        assert env["LD_LIBRARY_PATH"] == f"{SITE_RESOURCES}/lib64:/usr/local/cuda/lib64/stubs"
        assert env["PATH"].startswith(f"{SITE_RESOURCES}/bin:")
    assert sorted(_ok(results[listing]).split()) == sorted([
        f"{SITE_RESOURCES}/bin:", f"{SITE_RESOURCES}/lib64:", "nvidia-smi",
        "libcuda.so.1", f"libcuda.so.{VERSION}", "libnvidia-ml.so.1", f"libnvidia-ml.so.{VERSION}",
        "libnvidia-ptxjitcompiler.so.1", f"libnvidia-ptxjitcompiler.so.{VERSION}"])  # no stale cfg, no glcore
    assert _ok(results[link]) == f"libcuda.so.{VERSION}\n"
    assert results[write]["rc"] != 0  # bound read-only
    _ok(results[unsetup])
    assert results[unsetup]["mounts"] == [], "left behind after unsetupRoot"
    assert os.listdir(site.udi_mount) == []
    report = results[doctor]["stdout"].splitlines()
    driver = os.path.join(site.base, "fake_gpu_driver")
    lib = f"{driver}/{LIBDIR}"
    assert f"ok   GPU driver: nvidia {VERSION} (driver root {driver}, siteResources {SITE_RESOURCES})" in report
    assert ("ok   GPU devices: 4 GPU(s): /dev/nvidia0 /dev/nvidia1 /dev/nvidia2 /dev/nvidia3; control: /dev/nvidiactl "
            "/dev/nvidia-uvm /dev/nvidia-uvm-tools /dev/nvidia-modeset; MIG capabilities: /dev/nvidia-caps") in report
    assert (f"ok   GPU libraries (64-bit): libcuda.so.{VERSION} libnvidia-ml.so.{VERSION} "
            f"libnvidia-ptxjitcompiler.so.{VERSION}") in report
    assert (f"WARN GPU libraries: of another driver version, not used: {lib}/libnvidia-cfg.so.470.82.01 "
            "-> remove them and run ldconfig") in report
    assert f"ok   GPU binaries: nvidia-smi ({driver}/usr/bin/nvidia-smi)" in report
    assert (f"ok   GPU host paths: /lib/firmware/nvidia/{VERSION} ({driver}/lib/firmware/nvidia/{VERSION}) "
            f"/run/nvidia-persistenced/socket ({driver}/run/nvidia-persistenced/socket) {pipe} "
            f"/var/log/nvidia-mps ({driver}/var/log/nvidia-mps)") in report
    assert not [line for line in report if line.startswith("FAIL GPU")]


def test_fake_gpu_doctor_names_what_is_missing(fake_gpu_site, users):
    """A node without the driver: this host (no NVIDIA nodes in /dev) is a CPU node; on the fake GPU
    node, a driver root without a driver is a failure naming each missing part."""
    site, user = fake_gpu_site, users[0]
    empty = os.path.join(site.base, "no_driver")
    os.makedirs(os.path.join(empty, "etc"), exist_ok=True)
    site.write_config(f"siteResources={SITE_RESOURCES}\ngpuRecipe=nvidia\ngpuDriverRoot={empty}\n")
    out = site.shifter(user, "doctor", env={"PATH": "/usr/bin:/bin", "SHIFTER_UDIROOT_CONF": site.conf})
    version = f"{empty}/proc/driver/nvidia/version: No such file or directory (is the nvidia kernel driver loaded?)"
    assert [line for line in out.stdout.splitlines() if " GPU" in line] == [
        f"WARN GPU: no GPU on this node: {version}; /dev/nvidiactl: missing or not a character device; "
        "no GPU device nodes matching /dev/nvidia([0-9]+) -> only GPU nodes need the driver; jobs without GPUs "
        "run here"]
    os.makedirs(os.path.join(empty, "proc/driver/nvidia"), exist_ok=True)
    with open(os.path.join(empty, "proc/driver/nvidia/version"), "w") as fh:
        fh.write(f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {VERSION}  Sat Aug 19 01:15:15 UTC 2023\n")
    node = FakeGpuNode(site)
    doctor = node.shifter("0", user, "doctor")
    report = node.run()[doctor]
    assert report["rc"] == 1
    assert [line for line in report["stdout"].splitlines() if line.startswith("FAIL GPU")] == [
        f"FAIL GPU: {empty}/etc/ld.so.cache: no loader cache -> GPU jobs on this node fail until this is fixed",
        f"FAIL GPU: no 64-bit libcuda.so.{VERSION} in the loader cache of {empty} -> GPU jobs on this node fail "
        "until this is fixed",
        f"FAIL GPU: no 64-bit libnvidia-ml.so.{VERSION} in the loader cache of {empty} -> GPU jobs on this node "
        "fail until this is fixed"]


def test_fake_gpu_job_without_gpus_gets_nothing(fake_gpu_site, users):
    site, user = fake_gpu_site, users[0]
    node = FakeGpuNode(site)
    setup = node.setup("702", user)
    devices = node.shifter("702", user, "stat", "-c", "%n %F", "/dev/nvidia0", "/dev/nvidia3", "/dev/nvidiactl",
                           "/dev/nvidia-uvm-tools", "/dev/nvidia-caps")
    probe = node.shifter("702", user, "gpuprobe")
    env = node.shifter("702", user, "env")
    resources = node.shifter("702", user, "ls", SITE_RESOURCES)
    host_paths = node.shifter("702", user, "ls", "/run/nvidia-persistenced", "/var/log/nvidia-mps")
    unsetup = node.unsetup("--job-id", "702")
    results = node.run()

    _ok(results[setup])
    assert _ok(results[devices]).splitlines() == [
        "/dev/nvidia0 regular empty file", "/dev/nvidia3 regular empty file", "/dev/nvidiactl regular empty file",
        "/dev/nvidia-uvm-tools regular empty file", "/dev/nvidia-caps directory"]
    assert _ok(results[probe]) == "libcuda image-stub from /usr/local/cuda/lib64/stubs/libcuda.so.1\n"
    job_env = _env(_ok(results[env]))
    assert not {"NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"} & set(job_env)
    assert job_env["LD_LIBRARY_PATH"] == "/usr/local/cuda/lib64/stubs"
    assert results[resources]["rc"] != 0
    assert results[host_paths]["rc"] != 0 and results[host_paths]["stdout"] == ""
    _ok(results[unsetup])
    assert results[unsetup]["mounts"] == []


def test_fake_gpu_module_none_keeps_devices_but_not_the_driver(fake_gpu_site, users):
    site, user = fake_gpu_site, users[0]
    node = FakeGpuNode(site)
    # --gpus-local: Slurm numbers from 0 in tasks (ConstrainDevices), so its value is kept as is
    setup = node.setup("703", user, "--gpus", "1", "--gpus-local", "-m", "none")
    devices = node.shifter("703", user, "stat", "-c", "%n %F", "/dev/nvidia0", "/dev/nvidia1", SHIFTER_MODULE="none")
    probe = node.shifter("703", user, "gpuprobe", SHIFTER_MODULE="none")
    env = node.shifter("703", user, "env", SHIFTER_MODULE="none", CUDA_VISIBLE_DEVICES="0")
    unsetup = node.unsetup("--job-id", "703")
    results = node.run(gpus=2)

    _ok(results[setup])
    assert _ok(results[devices]).splitlines() == ["/dev/nvidia0 regular empty file",
                                                  "/dev/nvidia1 character special file"]
    assert "image-stub" in _ok(results[probe])
    job_env = _env(_ok(results[env]))
    assert job_env["NVIDIA_VISIBLE_DEVICES"] == "1" and "NVIDIA_DRIVER_CAPABILITIES" not in job_env
    assert job_env["CUDA_VISIBLE_DEVICES"] == "0"
    _ok(results[unsetup])


def test_fake_gpu_allocation_the_node_lacks_fails_cleanly(fake_gpu_site, users):
    site, user = fake_gpu_site, users[0]
    node = FakeGpuNode(site)
    missing = node.setup("704", user, "--gpus", "5")
    bad = node.setup("705", user, "--gpus", "0,x")
    results = node.run(gpus=2)
    assert results[missing]["rc"] != 0
    assert "allocated GPU(s) 5 have no device node in /dev" in results[missing]["stderr"]
    assert results[bad]["rc"] != 0 and "invalid GPU list '0,x'" in results[bad]["stderr"]
    assert results[bad]["mounts"] == [] and os.listdir(site.udi_mount) == []


def test_fake_gpu_amd_recipe_shows_the_allocated_render_node_and_kfd(fake_gpu_site, users):
    """The AMD recipe is data only: render nodes by index, /dev/kfd, the image's own ROCm."""
    site, user = fake_gpu_site, users[0]
    site.write_config(f"siteResources={SITE_RESOURCES}\ngpuRecipe=amd\n")
    node = FakeGpuNode(site)
    setup = node.setup("706", user, "--gpus", "1")
    devices = node.shifter("706", user, "stat", "-c", "%n %F", "/dev/dri/renderD128", "/dev/dri/renderD129",
                           "/dev/kfd")
    env = node.shifter("706", user, "env", ROCR_VISIBLE_DEVICES="1")  # Slurm's node index (no ConstrainDevices)
    plain = node.setup("707", user)
    plain_devices = node.shifter("707", user, "stat", "-c", "%n %F", "/dev/dri/renderD129", "/dev/kfd")
    unsetup = node.unsetup("--all")
    results = node.run(gpus=0, amd_gpus=2)
    _ok(results[setup])
    assert _ok(results[devices]).splitlines() == ["/dev/dri/renderD128 regular empty file",
                                                  "/dev/dri/renderD129 character special file",
                                                  "/dev/kfd character special file"]
    assert _env(_ok(results[env]))["ROCR_VISIBLE_DEVICES"] == "0"  # ROCm's only GPU here; no driver libraries
    assert f"{SITE_RESOURCES}" not in _env(_ok(results[env])).get("LD_LIBRARY_PATH", "")
    _ok(results[plain])
    assert _ok(results[plain_devices]).splitlines() == ["/dev/dri/renderD129 regular empty file",
                                                        "/dev/kfd regular empty file"]
    _ok(results[unsetup])
    assert results[unsetup]["mounts"] == []


def test_fake_gpu_host_paths_never_hide_what_the_image_has(tmp_path):
    """The way to a host path is made on the tmpfs only where the image has nothing (an empty /run);
    below a directory the image fills (/lib, /var/log) the path is placed only if the image has it,
    otherwise it is a note.  A fake driver tree and a plain directory as the image."""
    import socket

    driver, image = tmp_path / "driver", tmp_path / "image"
    (driver / "lib/firmware/nvidia/1.0").mkdir(parents=True)
    (driver / "lib/firmware/nvidia/1.0" / fakegpu.FIRMWARE_FILE).write_text("fw\n")
    (driver / "run/nvidia-persistenced").mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(driver / "run/nvidia-persistenced/socket"))
    (driver / "var/log/nvidia-mps").mkdir(parents=True)
    (driver / "var/log/nvidia-mps/control.log").write_text("log\n")
    (image / "lib/x86_64-linux-gnu").mkdir(parents=True)  # /lib with content, no firmware
    (image / "run").mkdir()  # empty: nothing of the image is lost by making it on the tmpfs
    (image / "var/log/apt").mkdir(parents=True)  # /var/log with content, no nvidia-mps
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", PYTHON,
                          os.path.join(HERE, "placement.py"), str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["notes"] == [
        "/lib/firmware/nvidia/1.0: not placed (the image's read-only tree lacks its directory)",
        "/var/log/nvidia-mps: not placed (the image's read-only tree lacks its directory)"]
    assert result["shown"] == {"/lib/firmware/nvidia/1.0": False, "/run/nvidia-persistenced/socket": True,
                               "/var/log/nvidia-mps": False, "/run listing": ["nvidia-persistenced"],
                               "/var/log listing": ["apt"]}
