"""Run commands on a fake GPU node (fake_gpu tests): a private mount namespace whose /dev is a
tmpfs with copies of the host's device nodes plus NVIDIA-shaped ones made with mknod.

Stands in only for what cannot exist here (a GPU and its driver).  Started as
``unshare --mount --propagation private python node.py SPEC.json``; everything it mounts
disappears with the namespace.  SPEC: {"gpus": N, "steps": [{"argv", "env", "uid"?, "gid"?,
"groups"?}], "watch": DIR}; prints one JSON list: per step rc, stdout, stderr and the mounts
under DIR afterwards.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

NVIDIA_MAJOR = 195
UVM_MAJOR = 509  # dynamic on a real node; any free major does for a node nobody opens
CAPS_MAJOR = 508


def _mount(source: str, target: str, fstype: str | None, flags: list[str]) -> None:
    argv = ["mount"] + (["-t", fstype] if fstype else []) + flags + [source, target]
    subprocess.run(argv, check=True)


def fake_dev(gpus: int) -> None:
    """/dev as a GPU node has it: the host's nodes, loop devices, and the NVIDIA ones."""
    stage = f"/run/fake_gpu_dev.{os.getpid()}"
    os.mkdir(stage, 0o755)
    _mount("fake_gpu_dev", stage, "tmpfs", ["-o", "mode=0755"])
    with os.scandir("/dev") as entries:
        for entry in entries:
            info = entry.stat(follow_symlinks=False)
            target = os.path.join(stage, entry.name)
            if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                os.mknod(target, info.st_mode, info.st_rdev)
                os.chown(target, info.st_uid, info.st_gid)
                os.chmod(target, stat.S_IMODE(info.st_mode))
            elif stat.S_ISLNK(info.st_mode):
                os.symlink(os.readlink(entry.path), target)
            elif stat.S_ISDIR(info.st_mode):
                os.mkdir(target, stat.S_IMODE(info.st_mode))
                _mount(entry.path, target, None, ["--rbind"])
    for index in range(64):  # loop devices appear on demand when their node is opened
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
    _mount(stage, "/dev", None, ["--move"])
    os.rmdir(stage)


def mounts_under(path: str) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4]
            if point.startswith(path.rstrip("/") + "/"):
                found.append(point)
    return found


def main() -> None:
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    fake_dev(spec["gpus"])
    results = []
    for step in spec["steps"]:
        extra = {}
        if "uid" in step:
            extra = {"user": step["uid"], "group": step["gid"], "extra_groups": step["groups"]}
        proc = subprocess.run(step["argv"], env=step["env"], capture_output=True, text=True, timeout=120,
                              cwd="/", **extra)
        results.append({"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
                        "mounts": mounts_under(spec["watch"])})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
