"""A fake GPU node, for tests on machines without a GPU: NVIDIA-shaped device nodes and driver.

Stands in only for what cannot exist here (a GPU and its kernel driver); setupRoot, Slurm and
the launchers stay the real ones.  Used by the root tests (tests/root/test_fake_gpu.py) and,
with ``FAKE_GPUS=N``, by the local cluster (each node's /dev in its own mount namespace).

- :func:`make_dev` replaces /dev in the calling process's (private) mount namespace by a
  tmpfs holding the host's device nodes and /dev subdirectories (bound, so a later chmod on
  the host is seen), loop device nodes, and ``/dev/nvidia<N>`` (major 195),
  ``nvidiactl``, ``nvidia-modeset``, ``nvidia-uvm``, ``nvidia-uvm-tools`` and
  ``nvidia-caps/nvidia-cap1``.  Nothing is written to the host's /dev; it all disappears with
  the namespace.
- :func:`build_driver` makes a driver tree shaped like a real one under a directory (used as
  ``gpuDriverRoot``): versioned shared objects built from fake_gpu/libfake.c with their
  sonames, a stale library of an older version, a loader cache made by the host's ldconfig,
  ``proc/driver/nvidia/version``, and an ``nvidia-smi`` (fake_gpu/nvidia-smi.c) that prints
  the device nodes it sees and the libnvidia-ml it loaded; and the driver's other files a
  container gets at their own paths: GSP firmware ``lib/firmware/nvidia/<version>/`` (plus
  an older version's, which must not be used), the persistenced socket
  ``run/nvidia-persistenced/socket`` (a Unix socket nobody listens on) and the MPS log
  directory ``var/log/nvidia-mps``.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess

SOURCES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_gpu")
NVIDIA_MAJOR = 195
UVM_MAJOR = 509  # dynamic on a real node; any free major does for nodes nobody opens
CAPS_MAJOR = 508
KFD_MAJOR = 507  # dynamic on a real node too
DRI_MAJOR = 226
VERSION = "535.104.05"
STALE_VERSION = "470.82.01"
LIBDIR = "usr/lib/x86_64-linux-gnu"
LIBRARIES = ("libcuda", "libnvidia-ml", "libnvidia-ptxjitcompiler", "libnvidia-glcore")
LOOP_NODES = 256
FIRMWARE_FILE = "gsp_fake.bin"


def _mount(argv: list[str]) -> None:
    result = subprocess.run(["mount", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"mount {' '.join(argv)}: {result.stderr.strip()}")


def make_dev(gpus: int, amd_gpus: int = 0) -> None:
    """/dev as a GPU node has it; only in a private mount namespace (the caller's).

    With ``amd_gpus``, /dev/dri is a directory of its own with ``renderD128``... (major 226) and
    /dev/kfd is added, as the AMD kernel driver makes them.
    """
    stage = f"/run/fake_gpu_dev.{os.getpid()}"
    os.mkdir(stage, 0o755)
    _mount(["-t", "tmpfs", "-o", "mode=0755", "fake_gpu_dev", stage])
    with os.scandir("/dev") as entries:
        for entry in entries:
            info = entry.stat(follow_symlinks=False)
            target = os.path.join(stage, entry.name)
            if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                # the host's node itself, bound: a later chmod of it (the tests' /dev/fuse) is seen here
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                _mount(["--bind", entry.path, target])
            elif stat.S_ISLNK(info.st_mode):
                os.symlink(os.readlink(entry.path), target)
            elif stat.S_ISDIR(info.st_mode) and not (amd_gpus and entry.name == "dri"):
                os.mkdir(target, stat.S_IMODE(info.st_mode))
                _mount(["--rbind", entry.path, target])
    for index in range(LOOP_NODES):  # a loop device appears on demand when its node is opened
        target = os.path.join(stage, f"loop{index}")
        if not os.path.exists(target):
            os.mknod(target, stat.S_IFBLK | 0o660, os.makedev(7, index))
    nodes = {f"nvidia{i}": (NVIDIA_MAJOR, i) for i in range(gpus)}
    nodes.update({"nvidiactl": (NVIDIA_MAJOR, 255), "nvidia-modeset": (NVIDIA_MAJOR, 254),
                  "nvidia-uvm": (UVM_MAJOR, 0), "nvidia-uvm-tools": (UVM_MAJOR, 1)})
    for name, (major, minor) in nodes.items():
        os.mknod(os.path.join(stage, name), stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(os.path.join(stage, name), 0o666)
    os.mkdir(os.path.join(stage, "nvidia-caps"), 0o755)
    os.mknod(os.path.join(stage, "nvidia-caps/nvidia-cap1"), stat.S_IFCHR | 0o400, os.makedev(CAPS_MAJOR, 1))
    if amd_gpus:
        os.mkdir(os.path.join(stage, "dri"), 0o755)
        for index in range(amd_gpus):
            path = os.path.join(stage, f"dri/renderD{128 + index}")
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(DRI_MAJOR, 128 + index))
            os.chmod(path, 0o666)
        os.mknod(os.path.join(stage, "kfd"), stat.S_IFCHR | 0o666, os.makedev(KFD_MAJOR, 0))
        os.chmod(os.path.join(stage, "kfd"), 0o666)
    _mount(["--move", stage, "/dev"])
    os.rmdir(stage)


def _gcc(*args: str) -> None:
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", *args], check=True)


def fake_library(path: str, soname: str, version: str) -> None:
    """A shared object named by ``soname`` whose fake_driver_version() returns ``version``."""
    _gcc("-shared", "-fPIC", f'-DFAKE_VERSION="{version}"', f"-Wl,-soname,{soname}",
         os.path.join(SOURCES, "libfake.c"), "-o", path)


def build_program(name: str, output: str) -> None:
    """fake_gpu/<name>.c as a program (gpuprobe: loads libcuda.so.1 as CUDA does)."""
    _gcc(os.path.join(SOURCES, f"{name}.c"), "-o", output)


def build_driver(root: str) -> None:
    """The driver tree of a GPU node under ``root`` (see the module's docstring)."""
    lib = os.path.join(root, LIBDIR)
    os.makedirs(lib)
    for name in LIBRARIES:
        fake_library(os.path.join(lib, f"{name}.so.{VERSION}"), f"{name}.so.1", VERSION)
    fake_library(os.path.join(lib, f"libnvidia-cfg.so.{STALE_VERSION}"), "libnvidia-cfg.so.1", STALE_VERSION)
    os.makedirs(os.path.join(root, "etc"))
    with open(os.path.join(root, "etc/ld.so.conf"), "w") as fh:
        fh.write(f"/{LIBDIR}\n")
    subprocess.run(["ldconfig", "-r", root], check=True)  # the cache and the soname links
    os.makedirs(os.path.join(root, "usr/bin"))
    _gcc(os.path.join(SOURCES, "nvidia-smi.c"), os.path.join(lib, f"libnvidia-ml.so.{VERSION}"),
         "-o", os.path.join(root, "usr/bin/nvidia-smi"))
    os.makedirs(os.path.join(root, "proc/driver/nvidia"))
    with open(os.path.join(root, "proc/driver/nvidia/version"), "w") as fh:
        fh.write(f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {VERSION}  Sat Aug 19 01:15:15 UTC 2023\n"
                 "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    for version in (VERSION, STALE_VERSION):
        firmware = os.path.join(root, f"lib/firmware/nvidia/{version}")
        os.makedirs(firmware)
        with open(os.path.join(firmware, FIRMWARE_FILE), "w") as fh:
            fh.write(f"fake GSP firmware {version}\n")
    os.makedirs(os.path.join(root, "run/nvidia-persistenced"))
    with socket.socket(socket.AF_UNIX) as sock:  # the file stays after close: what a container binds
        sock.bind(os.path.join(root, "run/nvidia-persistenced/socket"))
    os.chmod(os.path.join(root, "run/nvidia-persistenced/socket"), 0o666)
    os.makedirs(os.path.join(root, "var/log/nvidia-mps"))
    with open(os.path.join(root, "var/log/nvidia-mps/control.log"), "w") as fh:
        fh.write("fake MPS control log\n")
