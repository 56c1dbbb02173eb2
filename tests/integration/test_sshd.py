"""Scenario 7: the in-container sshd (plugstack ``enable_sshd=1``, ``extern_cgroup=1``) across nodes.

A two-node job: from inside the container on n1, ``ssh n2`` (port 1204, the job's key, no
password) lands in n2's container; ``/var/hostsfile`` lists each node once per CPU; the sshd
runs as the user, as a descendant of the job's extern step (Slurm lists it in ``scontrol
listpids``), is killed by Slurm when the job ends (before the epilog runs), and is gone after;
the plugstack's ``extern_setup=`` script ran in the extern step of both nodes.

The cluster's udiRoot.conf binds no home directories, so the job copies its key
(``~/.udiRoot/id_rsa.key``, made at submission) to a private /tmp directory and passes
``-i``; at a site that binds /home, ``ssh <node>`` alone finds it (docs/admin-guide.md).
"""

from __future__ import annotations

import datetime
import pwd
import re
import threading
import time
from pathlib import Path

import pytest

from localcluster.jobprocs import alive, ancestors, plugstack_args, sshd_listeners, sshd_log_lines, wait_port_free
from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster

USER = "shifter-u1"
IMAGE_OS_NAME = 'NAME="Shifter Demo BusyBox"'
REMOTE = ("echo host=$(hostname); head -1 /etc/os-release; test -f /var/shifterConfig.json && echo marker=yes; "
          "echo hostsfile-begin; cat /var/hostsfile; echo hostsfile-end")


@pytest.fixture(scope="module")
def sshd_cluster(cluster: Cluster) -> Cluster:
    args = plugstack_args(cluster)
    if args.get("enable_sshd") != "1" or args.get("extern_cgroup") != "1":
        pytest.skip("the cluster's plugstack.conf has no enable_sshd=1 extern_cgroup=1 (run `make udiimage`, "
                    "then `make cluster-up`)")
    return cluster


def sshd_job_script(image: str, remote: str, ready: Path, done: Path) -> str:
    """Two nodes, two CPUs each (--exclusive documents the intent; the test partition forces sharing)."""
    return f"""#!/bin/bash
#SBATCH -N 2
#SBATCH --ntasks-per-node=2
#SBATCH --exclusive
#SBATCH --image=docker:{image}
K=$(mktemp -d /tmp/shifter-ssh-test.XXXXXX)
cp ~/.udiRoot/id_rsa.key "$K"/
srun -N1 -n1 -w n1 shifter /opt/udiImage/bin/ssh -o BatchMode=yes -i "$K/id_rsa.key" n2 '{remote}'
echo ssh-rc=$?
rm -rf "$K"
touch {ready}
for i in $(seq 240); do [ -e {done} ] && break; sleep 0.5; done
"""


def wait_for_file(cluster: Cluster, job_id: str, path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = cluster.job_fields(job_id).get("JobState", "")
        if state not in ("PENDING", "CONFIGURING", "RUNNING"):
            pytest.fail(f"job {job_id} is {state} before it got ready:\n{cluster.job_output(job_id)}")
        assert time.monotonic() < deadline, f"job {job_id} not ready after {timeout} s"
        time.sleep(0.2)


def epilog_start(cluster: Cluster, node: str, job_id: str) -> datetime.datetime:
    """When the node's epilog started unsetupRoot: its log line's time minus the time it took."""
    log = (cluster.state_dir / "log" / f"slurmd-{node}.log").read_text(errors="replace")
    match = re.search(rf"^\[([0-9T:.-]+)\] shifter: epilog job {job_id} took ([0-9.]+) ms", log, re.M)
    assert match, f"no epilog line for job {job_id} in slurmd-{node}.log"
    logged = datetime.datetime.fromisoformat(match.group(1))
    return logged - datetime.timedelta(milliseconds=float(match.group(2)))


class DeathWatch(threading.Thread):
    """Note (local wall-clock time, as slurmd logs) when each watched pid disappears."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = set(pids)
        self.died: dict[int, datetime.datetime] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while self.pids - set(self.died) and not self.stop.is_set():
            for pid in self.pids - set(self.died):
                if not alive(pid):
                    self.died[pid] = datetime.datetime.now()
            time.sleep(0.002)


def test_ssh_from_node1_container_reaches_node2_container(sshd_cluster: Cluster) -> None:
    cluster = sshd_cluster
    uid = pwd.getpwnam(USER).pw_uid
    directory = cluster.job_dir(USER)
    ready, done = directory / f"ready-{time.monotonic_ns()}", directory / f"done-{time.monotonic_ns()}"
    before = set(cluster.job_leftovers("0"))  # loop devices other tests left attached are not this job's
    wait_port_free(cluster)
    job_id = cluster.submit_batch(USER, sshd_job_script(cluster.image("demo/busybox"), REMOTE, ready, done))
    watch = None
    try:
        wait_for_file(cluster, job_id, ready)
        listeners = {}
        for node in cluster.nodes:
            mine = sshd_listeners(cluster, node, job_id)
            assert len(mine) == 1, \
                f"{node}: expected one sshd in job {job_id}'s container, not {mine}: {sshd_log_lines(cluster, job_id)}"
            assert mine[0].uid == uid, f"{node}: the sshd runs as uid {mine[0].uid}, not {USER}'s"
            sshd = mine[0]
            chain = [p.cmdline for p in ancestors(sshd.pid)]
            # slurmstepd's title reads "slurmstepd: [<job>.e d" in /proc (it rewrites argv in place)
            assert any(c.startswith(f"slurmstepd: [{job_id}.e") for c in chain), \
                f"{node}: sshd {sshd.pid} is not in the extern step: {chain}"
            listed = cluster.node_exec(node, ["scontrol", "listpids", job_id, node])
            assert re.search(rf"^{sshd.pid}\s+{job_id}\s+extern\b", listed.stdout, re.M), listed.stdout
            listeners[node] = sshd.pid
        watch = DeathWatch(list(listeners.values()))
        watch.start()
    finally:
        done.touch()
    state = cluster.wait_job(job_id, timeout=180)
    output = cluster.job_output(job_id)
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{output}"
    assert "ssh-rc=0" in output and "host=n2" in output and "marker=yes" in output, output
    assert IMAGE_OS_NAME in output, output
    hostsfile = output.split("hostsfile-begin\n", 1)[1].split("hostsfile-end", 1)[0].split()
    assert hostsfile == ["n1", "n1", "n2", "n2"], output
    watch.join(timeout=30)
    assert not any(alive(pid) for pid in listeners.values()), f"an sshd survived job {job_id}"
    assert not [p for node in cluster.nodes for p in sshd_listeners(cluster, node, job_id)]
    for node, pid in listeners.items():
        assert watch.died[pid] <= epilog_start(cluster, node, job_id), \
            f"{node}: sshd {pid} lived until the epilog; Slurm's extern step did not kill it"
    assert_no_leftovers(cluster, job_id, before)
    if plugstack_args(cluster).get("extern_setup"):  # the cluster's script logs each run (features.py)
        log = (cluster.state_dir / "log" / "extern-setup.log").read_text()
        for node in cluster.nodes:
            assert f"job={job_id} uid={uid} user={USER} node={node} root=" in log, log[-2000:]


def assert_no_leftovers(cluster: Cluster, job_id: str, before: set[str], timeout: float = 10) -> None:
    """Nothing of the job on any node (the kernel frees autoclear loop devices asynchronously)."""
    deadline = time.monotonic() + timeout
    while (found := set(cluster.job_leftovers(job_id)) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert found == set()


def test_key_pair_is_made_at_submission(sshd_cluster: Cluster) -> None:
    """enable_sshd=1: ~/.udiRoot/id_rsa.key exists (0600, the user's) after an --image submission."""
    cluster = sshd_cluster
    job_id = cluster.submit_batch(USER, f"#!/bin/bash\n#SBATCH --image=docker:{cluster.image('demo/busybox')}\ntrue\n")
    cluster.wait_job(job_id)
    key = Path(pwd.getpwnam(USER).pw_dir) / ".udiRoot" / "id_rsa.key"
    info = key.stat()
    assert info.st_uid == pwd.getpwnam(USER).pw_uid and info.st_mode & 0o077 == 0
    assert (key.parent / "id_rsa.key.pub").read_text().startswith("ssh-")
