"""`make bench`: measure the metrics of BENCHMARKS.md on the running local cluster.

Writes bench/results.json.  `bench/run.py KEY...` (e.g. `P5m P6g`) measures only those
metrics and prints them without writing results.json.  Each metric is a ratio against a baseline measured
in the same run; a metric that cannot be measured is recorded with its error
instead of stopping the others.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench import slurm  # noqa: E402
from localcluster.testing import Cluster  # noqa: E402

USER = "shifter-u1"
ONLY: set[str] = set()  # metric keys named on the command line: measure just these


def image_named(env: dict[str, str], needle: str) -> str:
    for ref in env.get("SHIFTER_TEST_IMAGES", "").split():
        if needle in ref:
            return ref if ref.startswith("docker:") else f"docker:{ref}"
    raise RuntimeError(f"no test image matching {needle!r} in SHIFTER_TEST_IMAGES")


def record(metrics: dict, key: str, fn: Callable[[], dict], group: bool = False) -> None:
    """Measure one metric (or, with group, a dict of metrics) without letting a failure hide the others."""
    if ONLY and key not in ONLY:
        return
    print(f"bench: {key} ...", flush=True)
    try:
        result = fn()
    except Exception as err:  # a failed metric must not hide the others
        traceback.print_exc()
        result = {"value": None, "error": f"{type(err).__name__}: {err}"}
        group = False
    if group:
        metrics.update(result)
    else:
        metrics[key] = result
    print(f"bench: {key} = {json.dumps(result)}", flush=True)


def repull_metric(r: dict) -> dict:
    return {"value": round(r["median_s"], 3), "unit": "seconds", "baseline": "none (absolute)",
            "measured": "re-pull of an unchanged tag until READY, median", "runs": r["runs"], "goal": "< 0.3"}


def lookup_metric(r: dict, idle: dict) -> dict:
    """P5 under a pull and an expire (``r``), with the idle gateway's figure (``idle``) beside it."""
    return {"value": round(r["lookups_per_s"]), "unit": "lookups/s", "p99_ms": round(r["p99_ms"], 1),
            "baseline": f"p99 latency {r['p99_ms']:.1f} ms (p50 {r['p50_ms']:.1f} ms); idle gateway: "
                        f"{idle['lookups_per_s']:.0f}/s, p99 {idle['p99_ms']:.1f} ms",
            "measured": f"{r['clients']} concurrent clients for {r['seconds']:.0f} s, fresh munge credential "
                        "per request, while a pull and an expire run", "runs": None,
            "errors": r["errors"], "goal": ">= 4000/s, p99 < 20 ms", "note": r.get("note")}


def main() -> int:
    ONLY.update(sys.argv[1:])
    cluster = Cluster.from_state_dir()
    state = cluster.state_dir
    env = cluster.environ()
    prefix = cluster.prefix
    python = str(prefix / "venv" / "bin" / "python3")
    busybox = image_named(env, "busybox")
    debian = image_named(env, "debian")
    nodes = env.get("SHIFTER_NODES", "").split()
    metrics: dict[str, dict] = {}

    from bench import lookups, pull, runtime

    record(metrics, "P1", lambda: slurm.measure_p1(USER, env, python, busybox))
    record(metrics, "P2/P2x/P2c/P7s/P7u", runtime.measure_all, group=True)
    record(metrics, "P2f", lambda: slurm.measure_p2f(USER, env, python, busybox, debian))
    record(metrics, "P2u", lambda: slurm.measure_p2u(USER, env, python, busybox, debian))
    record(metrics, "P3", lambda: pull.measure_p3(env["SHIFTER_REGISTRY"], "demo/debian", "bookworm",
                                                  str(state / "bench")))
    if "P3" in metrics and "P3f" in metrics["P3"]:
        metrics["P3f"] = metrics["P3"].pop("P3f")
    record(metrics, "P3big", lambda: pull.measure_p3_big(env["SHIFTER_REGISTRY"], str(state / "bench")))
    if "P3big" in metrics and "P3f" in metrics["P3big"]:
        metrics["P3fbig"] = metrics["P3big"].pop("P3f")
    system = cluster.config_value("system")
    record(metrics, "P4", lambda: repull_metric(lookups.measure_p4(env["SHIFTER_GATEWAY"], system, busybox)))
    record(metrics, "P5", lambda: lookup_metric(
        lookups.measure_p5(env["SHIFTER_GATEWAY"], system, busybox, busy_tag=debian),
        lookups.measure_p5(env["SHIFTER_GATEWAY"], system, busybox)))
    record(metrics, "P6", lambda: slurm.measure_p6(USER, env, busybox))
    from bench import sharedstore

    record(metrics, "P5m", lambda: sharedstore.p5m_metric(sharedstore.measure_p5m(
        env["SHIFTER_GATEWAY"], system, busybox, prefix, cluster.settings.imagemanager_json, state / "bench" / "p5m")))
    if len(cluster.gateways) >= 2:
        record(metrics, "P6g", lambda: slurm.measure_p6g(USER, env, busybox, cluster.gateway_pid(1),
                                                         float(cluster.config_value("gatewayTimeout"))))
    else:
        metrics["P6g"] = {"value": None, "error": "the cluster runs one gateway (start it with GATEWAYS=2)"}
    if len(nodes) >= 8:
        record(metrics, "P8", lambda: slurm.measure_p8(USER, env, python, busybox, len(nodes)))
    else:
        metrics["P8"] = {"value": None, "error": f"cluster has {len(nodes)} nodes; P8 needs at least 8"}
    record(metrics, "prolog/epilog", lambda: slurm.prolog_epilog_times(USER, env, debian, state / "log"),
           group=True)

    if cluster.settings.fake_gpus >= 2:
        record(metrics, "P9-gpu/P1-gpu",
               lambda: slurm.measure_gpu(USER, env, python, debian, state / "log"), group=True)
    else:
        metrics["P9-gpu"] = {"value": None, "error": "the cluster has no fake GPUs (start it with FAKE_GPUS=2)"}

    results = {
        "machine": f"{os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "metrics": metrics,
    }
    if ONLY:
        results["metrics"] = {k: v for k, v in metrics.items() if k in ONLY}
        print(json.dumps(results, indent=2))
        return 0
    out = HERE / "results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"bench: wrote {out}")
    failed = [k for k, v in metrics.items() if v.get("value") is None and "error" in v]
    if failed:
        print(f"bench: not measured: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
