"""On a node whose mounts are shared (systemd's default), a job's mounts reach no other namespace.

The local cluster makes n2 ``rshared`` and runs a peer mount namespace beside its slurmd, as a
PrivateTmp service would be (localcluster/features.py).  Before setupRoot made udiMount and
loopMount private binds of themselves, every job mount was copied into that peer, and the
copies kept the job's loop device after the epilog.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from localcluster.features import SHARED_ROOT_NODE, peer_pidfile
from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster

USER = "shifter-u1"


def _propagation(mountinfo: str, target: str) -> list[str]:
    for line in mountinfo.splitlines():
        fields = line.split()
        if fields[4] == target:
            return fields[6:fields.index("-")]
    return []


def test_job_mounts_never_reach_a_peer_namespace_on_a_shared_node(cluster: Cluster) -> None:
    node = SHARED_ROOT_NODE
    peer = int(peer_pidfile(cluster.settings, node).read_text())
    slurmd = cluster.node_pids()[node]
    assert any(f.startswith("shared:") for f in _propagation(Path(f"/proc/{slurmd}/mountinfo").read_text(), "/"))
    udi_mount, loop_mount = cluster.config_value("udiMount"), cluster.config_value("loopMount")
    image = cluster.image("demo/busybox")
    script = f"#!/bin/bash\n#SBATCH --image=docker:{image}\n#SBATCH --nodelist={node}\nsrun shifter sleep 6\n"
    job_id = cluster.submit_batch(USER, script)
    deadline = time.monotonic() + 90
    while job_id not in cluster.node_job_dirs(node):
        assert time.monotonic() < deadline, "the job's environment never appeared"
        time.sleep(0.2)
    time.sleep(1)  # the prolog has finished mounting by the time the step runs
    node_table = Path(f"/proc/{slurmd}/mountinfo").read_text()
    assert f"{udi_mount}/{job_id}/root " in node_table, "the job's root is not mounted on its node"
    peer_table = Path(f"/proc/{peer}/mountinfo").read_text()
    leaked = [line for line in peer_table.splitlines()
              if f"{udi_mount}/{job_id}" in line or f"{loop_mount}/{job_id}" in line]
    assert leaked == [], leaked
    assert cluster.wait_job(job_id, timeout=120) == "COMPLETED", cluster.job_output(job_id)
    deadline = time.monotonic() + 10
    while cluster.job_leftovers(job_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.job_leftovers(job_id) == []
