"""First process of a node: give it its own state dirs, hosts file and hostname, then exec slurmd.

Started as ``nsenter --net=<netns> unshare -m -u --ipc --propagation private -- python -m
localcluster.nodeinit ...``, so everything mounted here lives only in this node's private
mount namespace and dies with it.  The runtime's per-node state dirs (udiMount, loopMount)
get a fresh tmpfs, so two nodes on one host never see each other's job environments.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def _mount(argv: list[str]) -> None:
    result = subprocess.run(["mount", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"nodeinit: mount {' '.join(argv)}: {result.stderr.strip()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nodeinit")
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--tmpfs", action="append", default=[], metavar="DIR=MODE",
                        help="mount a private tmpfs with this mode on DIR")
    parser.add_argument("--hosts", help="file to bind-mount over /etc/hosts")
    parser.add_argument("--memory-cgroup", metavar="DIR",
                        help="create this memory cgroup and bind it over /sys/fs/cgroup/memory "
                             "(the node's own; localcluster/features.py)")
    parser.add_argument("--shared-root", metavar="PIDFILE",
                        help="make every mount shared, as systemd does, and start a peer mount namespace "
                             "(like a PrivateTmp service's) whose pid goes to PIDFILE")
    parser.add_argument("--fake-gpus", type=int, default=0, metavar="N",
                        help="replace /dev by a copy with N fake NVIDIA GPUs (localcluster/fakegpu.py)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- program and arguments to exec")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("missing the command to exec")
    socket.sethostname(args.hostname)
    if args.fake_gpus:  # first: the --tmpfs /dev/shm below goes on the node's new /dev
        from localcluster.fakegpu import make_dev

        try:
            make_dev(args.fake_gpus)
        except OSError as exc:
            sys.exit(f"nodeinit: fake GPUs: {exc}")
    for spec in args.tmpfs:
        path, _, mode = spec.partition("=")
        os.makedirs(path, exist_ok=True)
        _mount(["-t", "tmpfs", "-o", f"mode={mode or '0755'},nosuid,nodev", "tmpfs", path])
    if args.hosts:
        _mount(["--bind", args.hosts, "/etc/hosts"])
    if args.memory_cgroup:
        os.makedirs(args.memory_cgroup, exist_ok=True)
        _mount(["--bind", args.memory_cgroup, "/sys/fs/cgroup/memory"])
    if args.shared_root:
        _mount(["--make-rshared", "/"])
        peer = subprocess.Popen(["unshare", "--mount", "--propagation", "unchanged", "--", "sleep", "infinity"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        with open(args.shared_root, "w") as fh:
            fh.write(f"{peer.pid}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
