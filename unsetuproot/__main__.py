"""unsetupRoot: remove a job's environment from this node (run as root by the epilog).

``unsetupRoot [--config PATH] [--job-id ID [--step-id ID]] [--all]``: without --job-id the job in
SLURM_JOB_ID; a job's teardown also removes its steps' environments; --step-id only that step's;
with --all every job and step environment on the node.  Idempotent: after a partial setup, a crash or a
previous run it still exits 0 and leaves nothing behind.  Exit 1 only when something could not
be removed (the message says what).
"""

from __future__ import annotations

import os
import sys

from shifter.cmdline import exit_fast
from shifter.errors import ShifterError
from shifter.formats.config import load_config
from shifter.runtime import teardown
from shifter.runtime.jobenv import JobEnv

PROG = "unsetupRoot"
USAGE = "usage: unsetupRoot [--config PATH] [--memory-cgroup PATH] [--job-id ID [--step-id ID] | --all]"


def job_ids_on_node(udi_mount: str, loop_mount: str) -> list[str]:
    """Every job id that has a directory under udiMount or loopMount."""
    found: set[str] = set()
    for base in (udi_mount, loop_mount):
        try:
            found.update(name for name in os.listdir(base) if name.isascii() and name.isdigit())
        except FileNotFoundError:
            pass
    return sorted(found)


def step_ids_on_node(udi_mount: str, loop_mount: str, job_id: str | None = None) -> list[tuple[str, str]]:
    """(job id, step id) of every step environment (``<jobid>.<stepid>``), of one job or of all."""
    found: set[tuple[str, str]] = set()
    for base in (udi_mount, loop_mount):
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            continue
        for name in names:
            job, sep, step = name.partition(".")
            if sep and job.isascii() and job.isdigit() and step.isascii() and step.isdigit() \
                    and job_id in (None, job):
                found.add((job, step))
    return sorted(found)


def run(argv: list[str], inherited_jobid: str | None) -> None:
    from shifter.cmdline import getopt

    try:
        opts, positional = getopt(argv, "", ["config=", "job-id=", "step-id=", "all", "memory-cgroup="])
    except ShifterError as err:
        raise ShifterError(f"{err}; {USAGE}") from None
    if positional:
        raise ShifterError(f"unexpected argument {positional[0]!r}; {USAGE}")
    options = dict(opts)
    if os.geteuid() != 0:
        raise ShifterError("must run as root")
    from setuproot.args import default_config_path, memory_cgroup_option

    config_path = options["--config"] if "--config" in options else default_config_path()
    config = load_config(config_path)
    memory_cgroup = options.get("--memory-cgroup")
    if memory_cgroup is not None:
        memory_cgroup = memory_cgroup_option(memory_cgroup)
    envs: list[JobEnv] = []
    if "--all" in options:
        envs += [JobEnv(config, job, step) for job, step in step_ids_on_node(config.udi_mount, config.loop_mount)]
        envs += [JobEnv(config, job) for job in job_ids_on_node(config.udi_mount, config.loop_mount)]
    elif "--step-id" in options:
        envs.append(JobEnv(config, options.get("--job-id", inherited_jobid or ""), options["--step-id"]))
    else:
        job = JobEnv(config, options.get("--job-id", inherited_jobid or ""))
        envs += [JobEnv(config, job.jobid, step)
                 for _, step in step_ids_on_node(config.udi_mount, config.loop_mount, job.jobid)]
        envs.append(job)
    errors = []
    for env in envs:
        try:
            teardown.destroy(config, env, memory_cgroup if env.step is None else None)
        except ShifterError as err:
            errors.append(str(err))
    if errors:
        raise ShifterError("; ".join(errors))


def main(argv: list[str] | None = None) -> int:
    inherited_jobid = os.environ.get("SLURM_JOB_ID")
    os.environ.clear()
    os.environ["PATH"] = "/usr/bin:/usr/sbin:/bin:/sbin"
    try:
        run(sys.argv[1:] if argv is None else argv, inherited_jobid)
    except ShifterError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - a bug must still end in one line, not a traceback
        print(f"{PROG}: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    exit_fast(main)
