"""`python -m localcluster up|down|env|status|check-clean`: the local test cluster's commands."""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import cluster
from .procs import DaemonError
from .settings import DEFAULT_GATEWAY_PORT, DEFAULT_PREFIX, DEFAULT_STATE_DIR, Settings


def _requested(args: argparse.Namespace) -> Settings:
    prefix = Path(args.prefix)
    return Settings(state_dir=Path(args.state_dir), prefix=prefix,
                    sysconfdir=Path(args.sysconfdir) if args.sysconfdir else prefix / "etc",
                    nodes=args.nodes, gateway_port=args.gateway_port, fake_gpus=args.fake_gpus,
                    gateways=args.gateways)


def _running(args: argparse.Namespace) -> Settings:
    """The settings the cluster was started with (falling back to the command line)."""
    return Settings.load(Path(args.state_dir)) or _requested(args)


@contextmanager
def _exclusive(state_dir: Path) -> Iterator[None]:
    """One `up` or `down` at a time on a state dir (several people share this machine)."""
    state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"cluster: another up/down is running on {state_dir}; waiting for it", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "env", "status", "check-clean", "debian-image"])
    parser.add_argument("--state-dir",
                        default=os.environ.get("SHIFTER_CLUSTER_STATE", str(DEFAULT_STATE_DIR)))
    parser.add_argument("--prefix", default=os.environ.get("PREFIX", str(DEFAULT_PREFIX)))
    parser.add_argument("--sysconfdir", default=os.environ.get("SYSCONFDIR", ""))
    parser.add_argument("--nodes", type=int, default=int(os.environ.get("NODES", "2")))
    parser.add_argument("--gateway-port", type=int,
                        default=int(os.environ.get("GATEWAY_PORT", str(DEFAULT_GATEWAY_PORT))),
                        help="the first gateway's port on 10.254.0.1 and 127.0.0.1, the others on the "
                             "next ports (default %(default)s)")
    parser.add_argument("--gateways", type=int, default=int(os.environ.get("GATEWAYS", "2") or 2),
                        help="gateway services on one store and imagePath, all in imageGateway "
                             "(default %(default)s)")
    parser.add_argument("--fake-gpus", type=int, default=int(os.environ.get("FAKE_GPUS", "0") or 0),
                        help="fake NVIDIA GPUs per node as Slurm GRES (localcluster/fakegpu.py; default 0)")
    parser.add_argument("--debian", action="store_true",
                        default=os.environ.get("DEBIAN_IMAGE", "0") not in ("", "0"),
                        help="also build and push demo/debian:bookworm (debootstrap, minutes the first time)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 and args.command != "env":
        print("cluster: the local cluster needs root (munged, slurmd in namespaces, loop devices)",
              file=sys.stderr)
        return 1
    try:
        if args.command == "up":
            from .debian import cache_exists
            with _exclusive(Path(args.state_dir)):
                cluster.up(_requested(args), debian=args.debian or cache_exists())
        elif args.command == "down":
            with _exclusive(Path(args.state_dir)):
                cluster.down(_running(args))
        elif args.command == "env":
            settings = _running(args)
            if not settings.env_file.exists():
                raise DaemonError("the local cluster is not up (no cluster.env): run `make cluster-up`")
            print(settings.env_file.read_text(), end="")
        elif args.command == "status":
            problems = cluster.status(_running(args))
            for problem in problems:
                print(f"PROBLEM: {problem}")
            return 1 if problems else 0
        elif args.command == "debian-image":
            cluster.debian_image()
        elif args.command == "check-clean":
            leftovers = cluster.check_clean(_running(args))
            for item in leftovers:
                print(f"left behind: {item}", file=sys.stderr)
            return 1 if leftovers else 0
    except (DaemonError, RuntimeError, ValueError) as err:
        print(f"cluster: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
