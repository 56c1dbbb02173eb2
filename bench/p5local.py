"""P5 on a gateway of its own, without the cluster: idle, and while the Debian image is expired
and pulled again in a loop (``bench.lookups.pull_and_expire_load``).

Brings up a munged, a docker-registry holding a small image (the one looked up) and the
cached Debian layout (``python -m localcluster debian-image`` builds it once), and one gateway
(``python -m gateway.service``) with the test suite's configuration; stops all of them at
the end. Prints one JSON document: the runs of each side, alternating, and their medians.

    .venv/bin/python -m bench.p5local --runs 3 --seconds 10
    .venv/bin/python -m bench.p5local --api-processes 1 --api-processes 2   # APIProcesses compared
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for sub in (_ROOT, _ROOT / "tests"):
    if str(sub) not in sys.path:
        sys.path.insert(0, str(sub))

from fixtures_registry import GatewayProcess, Munged, Registry, gateway_config  # noqa: E402

from bench.lookups import measure_p5  # noqa: E402
from localcluster import oci  # noqa: E402
from localcluster.debian import DEBIAN_IMAGE  # noqa: E402
from localcluster.layers import OciLayout  # noqa: E402


def _push_debian(registry: Registry) -> str:
    layout = OciLayout(DEBIAN_IMAGE.cache)
    manifest = layout.manifest()
    config = json.loads(layout.blob_path(manifest["config"]["digest"]).read_bytes())
    layers = [layout.blob_path(layer["digest"]) for layer in manifest["layers"]]
    oci.push_image(registry.url, DEBIAN_IMAGE.repo, DEBIAN_IMAGE.tag, layers, config)
    return f"docker:{registry.addr}/{DEBIAN_IMAGE.repo}:{DEBIAN_IMAGE.tag}"


def _cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[-1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _service_cpu(pid: int, api_processes: int) -> float:
    """The gateway's CPU seconds: the process, or with APIProcesses > 1 its API processes
    (its direct children; their conversion processes are not counted, as with one process)."""
    if api_processes == 1:
        return _cpu_seconds(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return _cpu_seconds(pid) + sum(_cpu_seconds(int(c)) for c in children)


def _children_cpu() -> float:
    """user + system seconds of this process's waited-for children (the load generator)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.p5local", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds; each measures every side once, alternating")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one measurement")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--idle-only", action="store_true", help="no pull-and-expire load")
    parser.add_argument("--checkout", action="append", type=Path, default=[],
                        help="run this checkout's gateway (repeat to compare; default: this one)")
    parser.add_argument("--api-processes", action="append", type=int, default=[],
                        help="the gateway's APIProcesses (repeat to compare; default: 1)")
    args = parser.parse_args()
    if not DEBIAN_IMAGE.cache.exists() and not args.idle_only:
        print(f"bench.p5local: no Debian layout in {DEBIAN_IMAGE.cache} (python -m localcluster debian-image)",
              file=sys.stderr)
        return 1
    checkouts = [c.resolve() for c in args.checkout] or [_ROOT]
    root = Path(tempfile.mkdtemp(prefix="shifter-p5-"))
    munged = Munged().start()
    registry = Registry(root).start()
    gateways: list[GatewayProcess] = []
    try:
        layer = oci.tar_bytes([oci.file("bin/hello", b"hello\n", 0o755)])
        oci.push_image(registry.url, "test/small", "v1", [oci.gzip_bytes(layer)], oci.image_config([layer]))
        small = f"docker:{registry.addr}/test/small:v1"
        busy = None if args.idle_only else _push_debian(registry)
        processes = args.api_processes or [1]
        sides = [(checkout, n) for checkout in checkouts for n in processes]
        for number, (checkout, n) in enumerate(sides):
            home = root / f"gw{number}"
            home.mkdir()
            extra = {"APIProcesses": n} if n != 1 else {}  # an older checkout may not know the key
            config = gateway_config(home, registry, munged.socket, AccessLog=str(home / "access.log"), **extra)
            gateways.append(GatewayProcess(home, config, repo=checkout))
        results: dict[str, list[dict]] = {}
        for _ in range(args.runs):
            for (checkout, n), gateway in zip(sides, gateways, strict=True):
                gateway.start()
                assert gateway.proc is not None
                name = checkout.name if len(processes) == 1 else f"{checkout.name} x{n}"
                for side in ("idle",) if busy is None else ("idle", "loaded"):
                    gw0, mu0 = _service_cpu(gateway.proc.pid, n), _cpu_seconds(munged.pid or 0)
                    cl0 = _children_cpu()
                    result = measure_p5(gateway.url, "testsys", small, args.seconds, args.clients, munged.socket,
                                        busy_tag=busy if side == "loaded" else None)
                    requests = max(1, result["requests"])
                    result["gateway_cpu_us"] = (_service_cpu(gateway.proc.pid, n) - gw0) / requests * 1e6
                    result["munged_cpu_us"] = (_cpu_seconds(munged.pid or 0) - mu0) / requests * 1e6
                    if side == "idle":  # the load generator (a child process), its munge encodes included
                        result["client_cpu_us"] = (_children_cpu() - cl0) / requests * 1e6
                    result["load1"] = os.getloadavg()[0]
                    results.setdefault(f"{name} {side}", []).append(result)
                gateway.stop()
        keys = ("lookups_per_s", "p50_ms", "p99_ms", "errors", "load_cycles", "gateway_cpu_us", "munged_cpu_us",
                "client_cpu_us", "load1")
        summary = {
            name: {
                "lookups_per_s": statistics.median(r["lookups_per_s"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                "gateway_cpu_us": statistics.median(r["gateway_cpu_us"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
                "runs": [{k: r.get(k) for k in keys} for r in runs],
            }
            for name, runs in results.items()
        }
        print(json.dumps(summary, indent=2))
    finally:
        for gateway in gateways:
            gateway.stop()
        registry.stop()
        munged.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
