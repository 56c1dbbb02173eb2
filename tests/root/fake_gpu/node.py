"""Run commands on a fake GPU node (fake_gpu tests): a private mount namespace whose /dev is a
tmpfs with copies of the host's device nodes plus NVIDIA-shaped ones made with mknod
(localcluster/fakegpu.py).

Stands in only for what cannot exist here (a GPU and its driver).  Started as
``unshare --mount --propagation private python node.py SPEC.json``; everything it mounts
disappears with the namespace.  SPEC: {"gpus": N, "amd_gpus"?: M, "steps": [{"argv", "env", "uid"?, "gid"?,
"groups"?}], "watch": DIR}; prints one JSON list: per step rc, stdout, stderr and the mounts
under DIR afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from localcluster.fakegpu import make_dev  # noqa: E402


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
    make_dev(spec["gpus"], spec.get("amd_gpus", 0))
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
