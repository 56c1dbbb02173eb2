"""Scenario 8: with ``memory_cgroup=/sys/fs/cgroup/memory`` the job's sshd and what it starts are
in ``shifter/uid_<uid>/job_<jobid>``, and that directory is gone after the job.

Each node of the local cluster has its own memory cgroup bound over /sys/fs/cgroup/memory in its
mount namespace (localcluster/features.py), so on the host the path reads
``/shifter/node-<node>/shifter/uid_<uid>/job_<jobid>``; inside the node it is the plugstack's.
A process started over ssh and left running in the background (``ssh n2 'sleep 300 &'``) is
found there too, and killed at the end of the job.
"""

from __future__ import annotations

import pwd
import time
from pathlib import Path

import pytest

from localcluster.jobprocs import (
    alive,
    memory_cgroup,
    node_processes,
    plugstack_args,
    rooted_in_job,
    sshd_listeners,
    sshd_log_lines,
    wait_port_free,
)
from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster

USER = "shifter-u1"
NODE_VIEW = Path("/sys/fs/cgroup/memory")  # memory_cgroup= as each node sees it


@pytest.fixture(scope="module")
def cgroup_cluster(cluster: Cluster) -> Cluster:
    args = plugstack_args(cluster)
    if args.get("enable_sshd") != "1" or args.get("memory_cgroup") != str(NODE_VIEW):
        pytest.skip(f"the cluster's plugstack.conf has no enable_sshd=1 memory_cgroup={NODE_VIEW}")
    return cluster


def job_script(image: str, marker: str, ready: Path, done: Path) -> str:
    return f"""#!/bin/bash
#SBATCH -N 2
#SBATCH --exclusive
#SBATCH --image=docker:{image}
K=$(mktemp -d /tmp/shifter-cgroup-test.XXXXXX)
cp ~/.udiRoot/id_rsa.key "$K"/
srun -N1 -n1 -w n1 shifter /opt/udiImage/bin/ssh -o BatchMode=yes -i "$K/id_rsa.key" n2 \\
    'sleep {marker} </dev/null >/dev/null 2>&1 &'
echo ssh-rc=$?
rm -rf "$K"
touch {ready}
for i in $(seq 240); do [ -e {done} ] && break; sleep 0.5; done
"""


def test_sshd_and_its_children_are_in_the_job_memory_cgroup(cgroup_cluster: Cluster) -> None:
    cluster = cgroup_cluster
    uid = pwd.getpwnam(USER).pw_uid
    directory = cluster.job_dir(USER)
    ready, done = directory / f"ready-{time.monotonic_ns()}", directory / f"done-{time.monotonic_ns()}"
    marker = str(300 + time.monotonic_ns() % 600)  # `sleep <marker>`: this test's own background process
    wait_port_free(cluster)  # another job's sshd on a node would leave this job without one
    job_id = cluster.submit_batch(USER, job_script(cluster.image("demo/busybox"), marker, ready, done))
    relative = f"shifter/uid_{uid}/job_{job_id}"
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert cluster.job_fields(job_id).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"), \
                cluster.job_output(job_id)
            assert time.monotonic() < deadline, f"job {job_id} not ready"
            time.sleep(0.2)
        assert "ssh-rc=0" in cluster.job_output(job_id), cluster.job_output(job_id)
        checked = []
        for node in cluster.nodes:
            sshd = sshd_listeners(cluster, node, job_id)
            assert sshd, f"{node}: no sshd in job {job_id}'s container: {sshd_log_lines(cluster, job_id)}"
            for proc in sshd:
                assert (memory_cgroup(proc.pid) or "").endswith(f"/{relative}"), (node, memory_cgroup(proc.pid))
            exists = cluster.node_exec(node, ["test", "-d", str(NODE_VIEW / relative)])
            assert exists.returncode == 0, f"{node}: no {NODE_VIEW / relative}"
            checked += [p.pid for p in sshd]
        sleepers = [p for p in node_processes(cluster, "n2")
                    if p.cmdline == f"sleep {marker}" and rooted_in_job(p.pid, job_id)]
        assert len(sleepers) == 1, "the process started over ssh is not running on n2"
        assert sleepers[0].uid == uid
        assert (memory_cgroup(sleepers[0].pid) or "").endswith(f"/{relative}"), memory_cgroup(sleepers[0].pid)
        checked.append(sleepers[0].pid)
    finally:
        done.touch()
    state = cluster.wait_job(job_id, timeout=180)
    assert state == "COMPLETED", cluster.job_output(job_id)
    assert not [pid for pid in checked if alive(pid)], "a process of the job's cgroup survived the job"
    for node in cluster.nodes:
        gone = cluster.node_exec(node, ["test", "-e", str(NODE_VIEW / relative)])
        assert gone.returncode == 1, f"{node}: {NODE_VIEW / relative} is still there"
