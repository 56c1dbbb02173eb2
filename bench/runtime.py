"""Node-runtime benchmarks: P2 (launcher on the reuse path, alone and 16 at once) and P7
(setupRoot and unsetupRoot), each against the floor of any Python launcher measured in the same
run: the same interpreter running ``-I -S -c pass``; and P2x, the reuse path against the
physical floor: a bare exec of ``/bin/true`` spawned the same way.

Commands are started with ``posix_spawn`` and timed wall-clock to their exit; baseline and
measured runs are interleaved so that load from elsewhere on the machine hits both alike, and
each figure is the median.  Run as root, ``python bench/runtime.py`` builds a throwaway site
(the root tests' fixtures: a busybox squashfs, siteFs, two user volumes), prints the results as
JSON and removes everything it made.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


class RunAs:
    """Credentials for the measured processes (the launcher must run as the job's user)."""

    def __init__(self, uid: int, gid: int, groups: list[int]) -> None:
        self.uid, self.gid, self.groups = uid, gid, groups


def _spawn(argv: list[str], env: dict[str, str], run_as: RunAs | None) -> int:
    if run_as is None:
        return os.posix_spawn(argv[0], argv, env)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups(run_as.groups)
            os.setresgid(run_as.gid, run_as.gid, run_as.gid)
            os.setresuid(run_as.uid, run_as.uid, run_as.uid)
            devnull = os.open("/dev/null", os.O_RDWR)
            os.dup2(devnull, 1)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    return pid


def _wait(pid: int, argv: list[str]) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {os.waitstatus_to_exitcode(status)}")


def _time_batch(argv: list[str], env: dict[str, str], run_as: RunAs | None, concurrency: int = 1) -> float:
    start = time.perf_counter()
    pids = [_spawn(argv, env, run_as) for _ in range(concurrency)]
    for pid in pids:
        _wait(pid, argv)
    return time.perf_counter() - start


def _result(baseline: list[float], measured: list[float], runs: int) -> dict[str, float]:
    base, meas = statistics.median(baseline), statistics.median(measured)
    return {"value": round(meas / base, 3), "baseline": round(base * 1e3, 3), "measured": round(meas * 1e3, 3),
            "unit": "ratio (times in ms)", "runs": runs}


def measure_p2(launcher: str, interpreter: str, env: dict[str, str], runs: int = 50,
               run_as: RunAs | None = None, concurrency: int = 1) -> dict[str, float]:
    """``launcher /bin/true`` on the reuse path (``env`` names the prepared job) vs ``interpreter -I -S -c pass``."""
    return _against([launcher, "/bin/true"], [interpreter, "-I", "-S", "-c", "pass"], env, runs, run_as, concurrency)


def measure_p2x(launcher: str, env: dict[str, str], runs: int = 50, run_as: RunAs | None = None) -> dict[str, float]:
    """``launcher /bin/true`` on the reuse path vs a bare exec of ``/bin/true`` spawned the same way: the
    physical floor, so that what is left is the launcher's own work."""
    return _against([launcher, "/bin/true"], ["/bin/true"], env, runs, run_as)


def _against(command: list[str], floor: list[str], env: dict[str, str], runs: int, run_as: RunAs | None,
             concurrency: int = 1) -> dict[str, float]:
    """``command`` against ``floor``, interleaved run by run; medians."""
    _time_batch(command, env, run_as)  # warm caches, and fail early if the path is broken
    baseline, measured = [], []
    for _ in range(runs):
        baseline.append(_time_batch(floor, env, run_as, concurrency))
        measured.append(_time_batch(command, env, run_as, concurrency))
    return _result(baseline, measured, runs)


def measure_p2c(launcher: str, interpreter: str, env: dict[str, str], runs: int = 50, concurrency: int = 16,
                run_as: RunAs | None = None) -> dict[str, float]:
    """P2 with ``concurrency`` launches at once (time until the last exits), against as many floors at once."""
    result = measure_p2(launcher, interpreter, env, runs, run_as, concurrency)
    result["concurrency"] = concurrency
    return result


def measure_p7(setup_argv: list[str], unsetup_argv: list[str], interpreter: str, runs: int = 20,
               env: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """setupRoot then unsetupRoot, ``runs`` times, each against the interpreter floor (as root)."""
    env = env if env is not None else {"PATH": "/usr/bin:/usr/sbin:/bin:/sbin"}
    floor = [interpreter, "-I", "-S", "-c", "pass"]
    base, setup, unsetup = [], [], []
    _time_batch(setup_argv, env, None)
    _time_batch(unsetup_argv, env, None)
    for _ in range(runs):
        base.append(_time_batch(floor, env, None))
        setup.append(_time_batch(setup_argv, env, None))
        unsetup.append(_time_batch(unsetup_argv, env, None))
    return {"setupRoot": _result(base, setup, runs), "unsetupRoot": _result(base, unsetup, runs)}


def _metric(result: dict[str, float], what: str, goal: str, floor: str = "python -I -S -c pass") -> dict:
    """One entry of bench/results.json in the shape BENCHMARKS.md describes."""
    return {"value": result["value"], "unit": "ratio",
            "baseline": f"{floor}, {result['baseline']:.1f} ms median",
            "measured": f"{what}, {result['measured']:.1f} ms median", "runs": result["runs"], "goal": goal}


def measure_all(only_p7: bool = False) -> dict[str, dict]:
    """P2, P2x, P2c, P7s and P7u on a throwaway site (the root tests' fixtures), as root; ``only_p7``: P7s
    and P7u alone (a quicker look at setupRoot's own cost)."""
    from tests.root.conftest import PYTHON, Account, Site, Users

    if os.geteuid() != 0:
        raise RuntimeError("the runtime benchmarks need root (they mount images and create test users)")
    users = Users()
    users.ensure()
    site = Site(f"/run/shifter-bench-{os.getpid()}")
    try:
        site.make()
        user = Account("shifter-rt1")
        volumes = ["-v", "/site1/shared:/data", "-v", "/site1/shared:/opt/app:ro"]
        result = site.setup("901", user, *volumes)
        if result.returncode != 0:
            raise RuntimeError(f"setupRoot failed: {result.stderr.strip()}")
        env = site.job_env("901", SHIFTER_VOLUME="/site1/shared:/data;/site1/shared:/opt/app:ro")
        run_as = RunAs(user.uid, user.gid, user.groups)
        launcher = os.path.join(site.bin, "shifter")
        if not only_p7:
            p2 = measure_p2(launcher, PYTHON, env, 50, run_as)
            p2c = measure_p2c(launcher, PYTHON, env, 20, 16, run_as)
            p2x = measure_p2x(launcher, env, 50, run_as)
        site.unsetup("--job-id", "901")
        setup_argv = [os.path.join(site.bin, "setupRoot"), "--config", site.conf, "--job-id", "902",
                      "-U", str(user.uid), "-G", str(user.gid), "-u", user.name, *volumes, "id", "b" * 64]
        unsetup_argv = [os.path.join(site.bin, "unsetupRoot"), "--config", site.conf, "--job-id", "902"]
        p7 = measure_p7(setup_argv, unsetup_argv, PYTHON, 20)
    finally:
        site.destroy()
        users.remove()
    p7_metrics = {
        "P7s": _metric(p7["setupRoot"], "setupRoot, busybox image, siteFs + 2 volumes", "<= 3"),
        "P7u": _metric(p7["unsetupRoot"], "unsetupRoot of the same", "<= 2"),
    }
    if only_p7:
        return p7_metrics
    return {
        "P2": _metric(p2, "shifter /bin/true on the reuse path", "<= 1.5"),
        "P2x": _metric(p2x, "shifter /bin/true on the reuse path", "<= 2.0", floor="a bare exec of /bin/true"),
        "P2c": _metric(p2c, "16 concurrent shifter /bin/true, batch wall time", "<= 1.5",
                       floor="16 concurrent python -I -S -c pass"),
        **p7_metrics,
    }


def main() -> None:
    """Print P2, P2x, P2c and P7 for a throwaway site as JSON (``P7`` as argument: P7s and P7u only)."""
    import json

    print(json.dumps(measure_all(only_p7=sys.argv[1:] == ["P7"]), indent=2))


if __name__ == "__main__":
    main()
