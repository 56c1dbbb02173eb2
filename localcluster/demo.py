"""`make demo`: submit the README's job as a test user and check it ran in the image on 2 nodes.

The job prints the image's /etc/os-release and a file the user wrote in their home (bound
at /input) once per node; the demo fails unless both copies are the image's
(NAME="Shifter Demo BusyBox"), not the host's, and the greeting came through twice.
"""

from __future__ import annotations

import argparse
import pwd
import sys
from pathlib import Path

from .images import BUSYBOX_IMAGE, DEMO_OS_RELEASE
from .settings import TEST_USERS
from .testing import Cluster, ClusterNotUp

JOB = """#!/bin/bash
#SBATCH --image=docker:{image}
#SBATCH --volume={data}:/input:ro
#SBATCH -N 2
srun shifter cat /etc/os-release /input/greeting
"""
GREETING = "hello from your home directory\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster.demo", description=__doc__)
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--user", default=TEST_USERS[0])
    args = parser.parse_args(argv)
    try:
        cluster = Cluster.from_state_dir(args.state_dir)
    except ClusterNotUp as err:
        print(f"demo: {err}", file=sys.stderr)
        return 1
    data = Path(pwd.getpwnam(args.user).pw_dir) / "shifter-demo"
    wrote = cluster.run_as(args.user, ["mkdir", "-p", str(data)])  # as the user: root writes nothing there
    if wrote.returncode == 0:
        wrote = cluster.run_as(args.user, ["tee", str(data / "greeting")], input=GREETING)
    if wrote.returncode != 0:
        print(f"demo: cannot write {data}/greeting as {args.user}: {wrote.stderr.strip()}", file=sys.stderr)
        return 1
    script = JOB.format(image=BUSYBOX_IMAGE.reference, data=data)
    print(f"demo: submitting as {args.user}:\n{script}")
    try:
        job = cluster.submit_batch(args.user, script)
    except RuntimeError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 1
    state = cluster.wait_job(job, timeout=300)
    output = cluster.job_output(job)
    print(f"demo: job {job} {state}; its output:\n{output}")
    name_line = DEMO_OS_RELEASE.splitlines()[0]
    copies = output.splitlines().count(name_line)
    greetings = output.splitlines().count(GREETING.strip())
    if state != "COMPLETED" or copies != 2 or greetings != 2:
        print(f"demo: FAILED: expected the image's os-release ({name_line}) and the greeting from your home "
              f"from each of 2 nodes, found them {copies} and {greetings} time(s); job state {state}",
              file=sys.stderr)
        return 1
    print("demo: OK: the job ran in the image on both nodes and read your home directory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
