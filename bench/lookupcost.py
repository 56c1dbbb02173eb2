"""Where a lookup's CPU goes: each step of the gateway's lookup path timed alone, in-process.

Brings up a munged, a registry and a gateway (as bench.p5local), pulls a small image to
READY, stops the gateway, then times, with the gateway's own configuration and store:
munge decoding, authentication (decode, binding check, identity), the store read, the
manager's lookup, the JSON answer, one hop to the blocking-call pool and back, and the
whole ASGI lookup without HTTP (the app called with a scope). A fresh credential per
call, encoded beforehand (its cost is the client's). Prints microseconds per call
(median of ``--rounds``) and, with ``--profile``, the top of a cProfile of the ASGI path.

    .venv/bin/python -m bench.lookupcost [--checkout DIR] [--calls 2000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent


def _timed(fn: Callable[[int], Any], calls: int) -> float:
    """Microseconds per call of fn(i) over ``calls`` calls."""
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t0) / calls * 1e6


def measure(config_path: str, munge_socket: str, tag: str, calls: int, profile: bool) -> dict[str, Any]:
    """Runs inside the checkout being measured (its gateway package first on sys.path)."""
    from gateway import api
    from gateway.auth import Authenticator, RequestFacts
    from gateway.configfile import load_config
    from gateway.manager import ImageManager
    from gateway.store.backend import open_store
    from shifter.client import munge

    try:
        from gateway.asgi import create_app
    except ImportError:  # before the ASGI entry had a module of its own
        from gateway.api import create_app  # type: ignore[attr-defined,no-redef]

    config = load_config(config_path)
    store = open_store(config.store, config.mongodb_name)
    manager = ImageManager(config, store)
    auth = Authenticator(config)
    system, itype, lookup_tag = "testsys", "docker", tag
    target = f"/api/lookup/{system}/{itype}/{lookup_tag.replace('/', '%2F')}/"
    facts = RequestFacts("GET", target, b"", read_only=True)
    creds = [munge.encode(b"", munge_socket) for _ in range(calls * 4)]
    out: dict[str, Any] = {}
    out["munge_decode_us"] = _timed(lambda i: munge.decode(creds[i], munge_socket), calls)
    out["authenticate_us"] = _timed(lambda i: auth.authenticate(creds[calls + i], system, facts), calls)
    session = auth.authenticate(creds[2 * calls], system, facts)
    out["store_find_ready_us"] = _timed(lambda i: store.find_ready(system, itype, lookup_tag), calls)
    out["manager_lookup_us"] = _timed(lambda i: manager.lookup(session, itype, lookup_tag), calls)
    rec = manager.lookup(session, itype, lookup_tag)
    out["json_answer_us"] = _timed(lambda i: api.dump_json(api.record_json(rec)), calls)

    async def hops() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            await api.offload(int)  # the checkout's own hop to its blocking pool
        return (time.perf_counter() - t0) / calls * 1e6

    out["thread_hop_us"] = asyncio.run(hops())
    app = create_app(config, manager, auth)
    index = [2 * calls + 1]

    async def one() -> int:
        status = [0]
        scope = {"type": "http", "method": "GET", "path": target.replace("%2F", "/"), "raw_path": target.encode(),
                 "query_string": b"", "headers": [(b"authentication", creds[index[0]].encode())],
                 "client": ("127.0.0.1", 1)}
        index[0] += 1

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]

        await app(scope, receive, send)
        return status[0]

    async def asgi(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            assert await one() == 200
        return (time.perf_counter() - t0) / n * 1e6

    half = (calls - 2) // 2
    out["asgi_lookup_us"] = asyncio.run(asgi(half))
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        asyncio.run(asgi(half))
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
        out["profile"] = text.getvalue()
    store.close()
    return out


def _serve_profile(gateway: Any, munge_socket: str, tag: str) -> int:
    """The gateway under ``python -m cProfile`` (its main thread: the event loop), 10 s of P5."""
    import os
    import signal
    import subprocess

    from bench.lookups import _ready_client, measure_p5

    out = gateway.root / "gateway.prof"
    gateway.config_path.write_text(json.dumps(gateway.config, indent=2))
    proc = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "gateway.service",
                             "--config", str(gateway.config_path)], cwd=gateway.repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        gateway.proc = proc
        gateway.wait_up(60)
        _ready_client(gateway.url, "testsys", tag, munge_socket)
        result = measure_p5(gateway.url, "testsys", tag, 10, 32, munge_socket)
        print(json.dumps({k: result[k] for k in ("lookups_per_s", "p50_ms", "p99_ms", "requests")}))
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(60)
        gateway.proc = None
    text = io.StringIO()
    pstats.Stats(str(out), stream=text).sort_stats("tottime").print_stats(30)
    print(text.getvalue())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.lookupcost", description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=_ROOT, help="whose gateway to measure")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--serve-profile", action="store_true",
                        help="instead: cProfile the gateway's event loop thread during 10 s of P5 load")
    parser.add_argument("--inner", nargs=3, metavar=("CONFIG", "SOCKET", "TAG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        rounds = [measure(*args.inner, args.calls, args.profile and r == 0) for r in range(args.rounds)]
        result = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if k != "profile"}
        if args.profile:
            result["profile"] = rounds[0]["profile"]
        print(json.dumps(result))
        return 0
    import subprocess

    sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]
    from fixtures_registry import GatewayProcess, Munged, Registry, gateway_config

    from bench.lookups import _ready_client
    from localcluster import oci

    root = Path(tempfile.mkdtemp(prefix="shifter-lookupcost-"))
    munged = Munged().start()
    registry = Registry(root).start()
    try:
        layer = oci.tar_bytes([oci.file("bin/hello", b"hello\n", 0o755)])
        oci.push_image(registry.url, "test/small", "v1", [oci.gzip_bytes(layer)], oci.image_config([layer]))
        home = root / "gw"
        home.mkdir()
        gateway = GatewayProcess(home, gateway_config(home, registry, munged.socket), repo=args.checkout.resolve())
        if args.serve_profile:
            return _serve_profile(gateway, munged.socket, f"docker:{registry.addr}/test/small:v1")
        gateway.start()
        try:
            _ready_client(gateway.url, "testsys", f"docker:{registry.addr}/test/small:v1", munged.socket)
        finally:
            gateway.stop()
        argv = [sys.executable, str(Path(__file__).resolve()), "--inner", str(gateway.config_path),
                munged.socket, f"{registry.addr}/test/small:v1",
                "--calls", str(args.calls), "--rounds", str(args.rounds)] + (["--profile"] if args.profile else [])
        env = {"PYTHONPATH": str(args.checkout.resolve())}  # its gateway package, not this one
        import os

        proc = subprocess.run(argv, cwd=args.checkout.resolve(), env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=600, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(proc.stdout)
        profile = result.pop("profile", None)
        print(json.dumps(result, indent=2))
        if profile:
            print(profile)
    finally:
        registry.stop()
        munged.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
