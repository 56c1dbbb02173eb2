"""Benchmarks that go through Slurm: P1, P2f, P2u, P6, P8, P9 and the prolog/epilog times.

Every number is a ratio against a baseline measured in the same run,
interleaved with it, because these machines are shared and noisy.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

# The start of both timer scripts: run one command, output discarded, and return its seconds
# (the script ends, naming the command, if it fails).
_TIMED_RUN = r'''
import json, subprocess, sys, time
def timed(argv, failed):
    t = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        sys.exit("%s: %s: %s" % (failed, " ".join(argv), p.stderr.strip()))
    return time.perf_counter() - t
'''

# Runs inside the allocation as the test user: times N srun steps of each kind, interleaved.
# argv: nodes, runs, then the baseline's and the measured step's srun arguments as JSON lists.
STEP_TIMER = _TIMED_RUN + r'''
nodes, runs = int(sys.argv[1]), int(sys.argv[2])
srun = ["srun", "-N%d" % nodes, "--ntasks-per-node=1"]
base_step, meas_step = srun + json.loads(sys.argv[3]), srun + json.loads(sys.argv[4])
def step(argv):
    return timed(argv, "step failed")
base, meas = [], []
step(base_step); step(meas_step)
for _ in range(runs):
    base.append(step(base_step))
    meas.append(step(meas_step))
print(json.dumps({"base": base, "meas": meas}))
'''


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000.0


def _run_as(user: str, argv: list[str], env: dict[str, str], timeout: float = 900) -> str:
    proc = subprocess.run(["runuser", "-u", user, "--", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False, cwd="/tmp")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _timer_script(text: str) -> str:
    """``text`` as a world-readable script in /tmp, for the test user to run inside an allocation."""
    fd, path = tempfile.mkstemp(prefix="shifter-bench-", suffix=".py", dir="/tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


PLAIN_STEP = ["/bin/true"]
SHIFTER_STEP = ["shifter", "/bin/true"]


def steps_in_allocation(user: str, env: dict[str, str], python: str, image: str, nodes: int, runs: int,
                        base: list[str] = PLAIN_STEP, meas: list[str] = SHIFTER_STEP,
                        alloc: list[str] | None = None) -> dict:
    """Median times of two kinds of srun step (``base`` and ``meas``: srun's arguments after -N and
    --ntasks-per-node), interleaved inside one --image allocation (``alloc``: more salloc options)."""
    script = _timer_script(STEP_TIMER)
    try:
        out = _run_as(user, ["salloc", f"-N{nodes}", "--exclusive", f"--image={image}", "--quiet", *(alloc or []),
                             python, "-I", script, str(nodes), str(runs), json.dumps(base), json.dumps(meas)], env)
    finally:
        os.unlink(script)
    data = json.loads(out.strip().splitlines()[-1])
    return {"base_ms": _median_ms(data["base"]), "meas_ms": _median_ms(data["meas"]), "runs": runs}


def measure_p1(user: str, env: dict[str, str], python: str, image: str, runs: int = 20) -> dict:
    r = steps_in_allocation(user, env, python, image, 2, runs)
    return {
        "value": round(r["meas_ms"] / r["base_ms"], 3), "unit": "ratio",
        "baseline": f"srun -N2 /bin/true, {r['base_ms']:.0f} ms median",
        "measured": f"srun -N2 shifter /bin/true, {r['meas_ms']:.0f} ms median",
        "runs": runs, "goal": "<= 1.10",
    }


_STEP_HOOK = re.compile(r"shifter: step \d+\.\d+ (setup|teardown) took ([\d.]+) ms")


def _log_offsets(log_dir: Path) -> dict[Path, int]:
    return {log: log.stat().st_size for log in log_dir.glob("slurmd-*.log")}


def _step_hook_times(log_dir: Path, offsets: dict[Path, int]) -> dict[str, list[float]]:
    """The step hooks' own times (slurmd's log lines ``shifter: step J.S setup took X ms``) logged since
    ``offsets``: what setupRoot's and unsetupRoot's work cost on each node, without the hook's start."""
    times: dict[str, list[float]] = {"setup": [], "teardown": []}
    for log in log_dir.glob("slurmd-*.log"):
        with open(log, "rb") as fh:
            fh.seek(offsets.get(log, 0))
            for match in _STEP_HOOK.finditer(fh.read().decode(errors="replace")):
                times[match.group(1)].append(float(match.group(2)))
    return times


def measure_p2f(user: str, env: dict[str, str], python: str, job_image: str, other_image: str,
                runs: int = 10) -> dict:
    """A step with another image than the job's (built by slurmstepd, entered like the job's) against
    a step on the job's image, both on 2 nodes in one allocation; with the step hooks' own times per node."""
    log_dir = Path(env.get("SHIFTER_CLUSTER_STATE", "/var/lib/shifter-cluster")) / "log"
    offsets = _log_offsets(log_dir)
    r = steps_in_allocation(user, env, python, job_image, 2, runs, base=SHIFTER_STEP,
                            meas=[f"--image={other_image}", *SHIFTER_STEP])
    hooks = _step_hook_times(log_dir, offsets)
    return {
        "value": round(r["meas_ms"] / r["base_ms"], 3), "unit": "ratio",
        "baseline": f"srun -N2 shifter /bin/true on the job's image, {r['base_ms']:.0f} ms median",
        "measured": f"srun -N2 --image={other_image} shifter /bin/true (a step image), {r['meas_ms']:.0f} ms median",
        "runs": runs, "goal": "<= 1.5",
        "step_hooks_ms": {kind: round(statistics.median(v), 1) if v else None for kind, v in hooks.items()},
        "load1": round(os.getloadavg()[0], 2),
    }


def measure_p8(user: str, env: dict[str, str], python: str, image: str, max_nodes: int, runs: int = 10) -> dict:
    """What shifter adds as a step grows: its ratio to plain srun at ``max_nodes`` over that at 2 nodes."""
    small = steps_in_allocation(user, env, python, image, 2, runs)
    large = steps_in_allocation(user, env, python, image, max_nodes, runs)
    small_ratio, large_ratio = small["meas_ms"] / small["base_ms"], large["meas_ms"] / large["base_ms"]
    return {
        "value": round(large_ratio / small_ratio, 3), "unit": "ratio of ratios",
        "baseline": f"srun -N2: shifter {small['meas_ms']:.0f} ms / plain {small['base_ms']:.0f} ms "
                    f"= {small_ratio:.3f}",
        "measured": f"srun -N{max_nodes}: shifter {large['meas_ms']:.0f} ms / plain {large['base_ms']:.0f} ms "
                    f"= {large_ratio:.3f}",
        "runs": runs, "goal": "<= 1.05",
    }


# Runs as one task inside the allocation: the launcher on the reuse path and on the fresh path,
# interleaved, timed from inside the task so that srun's own cost is not part of either.
LAUNCH_TIMER = _TIMED_RUN + r'''
runs, other, python_launcher = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def launch(argv):
    return timed(argv, "failed")
commands = {"reuse": ["shifter", "/bin/true"], "fresh": ["shifter", "--image=" + other, "/bin/true"],
            "python_reuse": [python_launcher, "/bin/true"]}
times = {name: [] for name in commands}
for name, argv in commands.items():
    launch(argv)
for _ in range(runs):
    for name, argv in commands.items():
        times[name].append(launch(argv))
print(json.dumps(times))
'''


def measure_p2u(user: str, env: dict[str, str], python: str, job_image: str, other_image: str,
                runs: int = 10) -> dict:
    """``shifter --image=X`` typed inside a task (the FUSE path) against the Python launcher's reuse path,
    timed inside one task; reported without a goal (bin/shifter's own reuse path is given beside it)."""
    python_launcher = os.path.join(env.get("SHIFTER_PREFIX", "/opt/shifter-slurm"), "libexec/shifter/shifter")
    script = _timer_script(LAUNCH_TIMER)
    fuse_mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)  # the fresh path mounts with squashfuse as the user (see the admin guide)
    try:
        out = _run_as(user, ["salloc", "-N1", "--exclusive", f"--image={job_image}", "--quiet",
                             "srun", "-N1", "-n1", python, "-I", script, str(runs), other_image, python_launcher],
                      env)
    finally:
        os.chmod("/dev/fuse", fuse_mode)
        os.unlink(script)
    data = json.loads(out.strip().splitlines()[-1])
    reuse_ms, fresh_ms, python_ms = (_median_ms(data[k]) for k in ("reuse", "fresh", "python_reuse"))
    return {
        "value": round(fresh_ms / python_ms, 2), "unit": "ratio",
        "baseline": f"the Python launcher's reuse path (libexec/shifter/shifter), {python_ms:.1f} ms median",
        "measured": f"shifter --image={other_image} /bin/true inside a task (FUSE), {fresh_ms:.1f} ms median",
        "runs": runs, "goal": "report",
        "note": f"bin/shifter's reuse path takes {reuse_ms:.1f} ms",
    }


def measure_p6(user: str, env: dict[str, str], image: str, runs: int = 10) -> dict:
    """Submission time of sbatch with and without --image (held jobs, cancelled afterwards)."""
    base: list[float] = []
    meas: list[float] = []
    jobs: list[str] = []

    def submit(extra: list[str]) -> float:
        t = time.perf_counter()
        out = _run_as(user, ["sbatch", "--parsable", "--hold", "-N1", *extra, "--wrap=true"], env)
        elapsed = time.perf_counter() - t
        jobs.append(out.strip().split(";")[0])
        return elapsed

    try:
        submit([])
        submit([f"--image={image}"])
        for _ in range(runs):
            base.append(submit([]))
            meas.append(submit([f"--image={image}"]))
    finally:
        if jobs:
            subprocess.run(["scancel", *jobs], env=env, check=False)
    diff = _median_ms(meas) - _median_ms(base)
    return {
        "value": round(diff / 1000.0, 3), "unit": "seconds",
        "baseline": f"sbatch without --image, {_median_ms(base):.0f} ms median",
        "measured": f"sbatch --image={image}, {_median_ms(meas):.0f} ms median",
        "runs": runs, "goal": "<= 0.2",
    }


def measure_p6g(user: str, env: dict[str, str], image: str, freeze_pid: int, gateway_timeout: float,
                runs: int = 10) -> dict:
    """Submission time of ``sbatch --image`` with both gateways up and with one frozen (SIGSTOP:
    it accepts connections and never answers), interleaved; held jobs, cancelled afterwards.
    The client shuffles the gateways, so about half the frozen runs wait gatewayTimeout first."""
    import signal

    up: list[float] = []
    frozen: list[float] = []
    jobs: list[str] = []

    def submit() -> float:
        t = time.perf_counter()
        out = _run_as(user, ["sbatch", "--parsable", "--hold", "-N1", f"--image={image}", "--wrap=true"], env)
        elapsed = time.perf_counter() - t
        jobs.append(out.strip().split(";")[0])
        return elapsed

    try:
        submit()
        for _ in range(runs):
            up.append(submit())
            os.kill(freeze_pid, signal.SIGSTOP)
            try:
                frozen.append(submit())
            finally:
                os.kill(freeze_pid, signal.SIGCONT)
    finally:
        if jobs:
            subprocess.run(["scancel", *jobs], env=env, check=False)
    waited = sum(1 for t in frozen if t >= gateway_timeout)
    return {
        # the mean, not the median: which gateway a submission asks first is a coin toss, so the
        # median flips between ~50 ms and gatewayTimeout from run to run
        "value": round(statistics.mean(frozen), 3), "unit": "seconds (mean)",
        "baseline": f"both gateways up: {_median_ms(up):.0f} ms median, {max(up) * 1000:.0f} ms max",
        "measured": f"sbatch --image={image} with one of two gateways frozen: median "
                    f"{_median_ms(frozen):.0f} ms, mean {statistics.mean(frozen) * 1000:.0f} ms, max "
                    f"{max(frozen) * 1000:.0f} ms; {waited} of {runs} runs asked the frozen one first and "
                    f"waited gatewayTimeout ({gateway_timeout:g} s)",
        "runs": runs, "goal": "report (no goal)",
    }


HOOK_TIME = re.compile(r"shifter: (prolog|epilog) job (\d+) took ([0-9.]+) ms")


def _hook_times(user: str, env: dict[str, str], image: str, log_dir: Path, runs: int,
                extra: list[str] | None = None) -> dict[str, list[float]]:
    """Per-node prolog and epilog wall times of ``runs`` 2-node jobs, read from slurmd's logs."""
    job_ids = []
    for _ in range(runs):
        out = _run_as(user, ["sbatch", "--parsable", "--wait", "-N2", "--exclusive", "--output=/dev/null",
                             f"--image={image}", *(extra or []), "--wrap=true"], env)
        job_ids.append(out.strip().split(";")[0])
    times: dict[str, list[float]] = {"prolog": [], "epilog": []}
    deadline = time.time() + 30
    while time.time() < deadline:
        times = {"prolog": [], "epilog": []}
        for log in log_dir.glob("slurmd-*.log"):
            for match in HOOK_TIME.finditer(log.read_text(errors="replace")):
                if match.group(2) in job_ids:
                    times[match.group(1)].append(float(match.group(3)))
        if len(times["epilog"]) >= 2 * runs:
            break
        time.sleep(1)
    return times


def prolog_epilog_times(user: str, env: dict[str, str], image: str, log_dir: Path, runs: int = 3) -> dict:
    """Per-node prolog and epilog wall times for a 2-node job, read from slurmd's logs."""
    times = _hook_times(user, env, image, log_dir, runs)
    return {
        f"{kind}_ms": {"value": round(statistics.median(v), 1) if v else None, "unit": "ms",
               "measured": f"{kind} per node, {image}, median of {len(v)}", "runs": len(v), "goal": None}
        for kind, v in times.items()
    }


def measure_gpu(user: str, env: dict[str, str], python: str, image: str, log_dir: Path, rounds: int = 5) -> dict:
    """P9 and P1 with GPUs (a cluster with FAKE_GPUS=2): the prolog per node with GPU injection
    (--gpus-per-node=2) against the same job without GPUs, interleaved; P1 with --gpus-per-node=1."""
    plain: list[float] = []
    gpus: list[float] = []
    for _ in range(rounds):
        plain += _hook_times(user, env, image, log_dir, 1)["prolog"]
        gpus += _hook_times(user, env, image, log_dir, 1, ["--gpus-per-node=2"])["prolog"]
    base, meas = statistics.median(plain), statistics.median(gpus)
    p1 = steps_in_allocation(user, env, python, image, 2, 20, alloc=["--gpus-per-node=1"])
    return {
        "P9-gpu": {"value": round(meas - base, 1), "unit": "ms",
                   "baseline": f"prolog per node without GPUs, {base:.1f} ms median of {len(plain)}",
                   "measured": f"prolog per node with --gpus-per-node=2 (fake GPUs), {meas:.1f} ms median of "
                               f"{len(gpus)}", "runs": len(gpus), "goal": "<= +15 ms"},
        "P1-gpu": {"value": round(p1["meas_ms"] / p1["base_ms"], 3), "unit": "ratio",
                   "baseline": f"srun -N2 /bin/true with --gpus-per-node=1, {p1['base_ms']:.0f} ms median",
                   "measured": f"srun -N2 shifter /bin/true, {p1['meas_ms']:.0f} ms median",
                   "runs": 20, "goal": "<= 1.10"},
    }
