"""Place GPU host paths in a container root shaped like setupRoot's (fake_gpu tests, root only).

Run as ``unshare --mount --propagation private python placement.py WORKDIR``: WORKDIR holds
``driver/`` (the node's files), ``image/`` (a plain directory standing in for the squashfs);
a tmpfs root is made, the image's top-level entries are bound read-only as setupRoot does
(after shifter.runtime.gpu.prepare_host_paths), then shifter.runtime.gpu.bind_host_paths runs.  Prints one
JSON object: the notes and what the container shows at each path.  Everything mounted goes
with the namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from shifter.formats import gpurecipe  # noqa: E402
from shifter.runtime import fdpath, gpu, gpudiscovery, linux  # noqa: E402


def main() -> None:
    work = sys.argv[1]
    root, image, driver = (os.path.join(work, name) for name in ("root", "image", "driver"))
    os.mkdir(root)
    subprocess.run(["mount", "-t", "tmpfs", "fake_gpu_root", root], check=True)
    os.mkdir(os.path.join(root, "var"))  # a site directory, as setupRoot makes it
    recipe = gpurecipe.load_recipe("nvidia")
    found = gpudiscovery.Discovery(recipe=recipe, version="1.0", libraries=[], binaries=[], gpus={0: "/dev/nvidia0"},
                                   control=[], capability_dirs=[], stale=[], problems=[],
                                   host_paths=gpudiscovery.find_host_paths(recipe, "1.0", driver))
    injection = gpu.Injection(discovery=found, gpus=[0], userspace=True, site_resources="/sr", hide_file="",
                              hide_dir="", local_ids=False)
    tmpfs_dev = os.stat(root).st_dev
    root_fd = fdpath.open_dir(root)
    gpu.prepare_host_paths(injection, root_fd, image, tmpfs_dev)
    os.close(root_fd)
    for relpath in ("", "var"):  # as container._bind_image_dir: what the site made is not the image's
        for name in sorted(os.listdir(os.path.join(image, relpath))):
            source, target = os.path.join(image, relpath, name), os.path.join(root, relpath, name)
            if relpath == "" and name == "var" or os.path.lexists(target):
                continue
            os.mkdir(target)
            linux.bind(source, target, readonly=True)
    notes = gpu.bind_host_paths(injection, root, tmpfs_dev, linux.MS_PRIVATE)
    shown = {}
    for item in found.host_paths:
        target = os.path.join(root, item.path.lstrip("/"))
        shown[item.path] = sorted(os.listdir(target)) if os.path.isdir(target) else os.path.exists(target)
    shown["/run listing"] = sorted(os.listdir(os.path.join(root, "run")))
    shown["/var/log listing"] = sorted(os.listdir(os.path.join(root, "var/log")))
    print(json.dumps({"notes": notes, "shown": shown}))


if __name__ == "__main__":
    main()
