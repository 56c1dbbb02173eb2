"""Scenario 9: a real MPI program across 2 nodes x 2 tasks, started by Slurm through PMI.

The image demo/mpich:latest (localcluster/mpich.py) holds Debian's MPICH 4.0 (UCX) and
/opt/mpi_ring (tests/data/mpi_ring.c).  Each rank prints one line: the token ring, a direct
exchange with every other rank, and an exchange with the rank sharing its node.  Debian's
MPICH speaks the PMI-1/PMI-2 wire protocol, so the job uses ``srun --mpi=pmi2`` (with
``--mpi=pmix`` each rank would start as a singleton of size 1: the checks would catch that).

Shared memory between the ranks of one node is proven, not assumed: a step restricted to
UCX's shared-memory transports (``UCX_TLS=self,sm``) works with both ranks on one node, and
the same restriction fails across two nodes (each node of the local cluster has its own IPC
namespace and /dev/shm, like a real machine).

Debian's MPICH 4.0.2 over UCX 1.13's TCP transport can deadlock in MPI_Finalize (a rank
flushing a connection while its peer already waits in the PMI barrier, openucx/ucx#8738):
mpi_ring bounds its MPI_Finalize and says so on stderr; every check is printed before it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from localcluster.mpiring import PMI, mpich_reference, ranks, sections, step, step_exit, two_by_two_problems
from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster

USER = "shifter-u1"
IMAGE_LIBMPI = "/usr/lib/x86_64-linux-gnu/libmpich.so.12"


def mpich_image(cluster: Cluster) -> str:
    reference = mpich_reference(cluster)
    if reference is None:
        pytest.skip("demo/mpich is built with the Debian image only (DEBIAN_IMAGE=1; `make test` sets it)")
    return reference


def run_job(cluster: Cluster, script: str) -> str:
    return cluster.run_batch(USER, script, timeout=300)[1]


def test_slurm_offers_the_pmi_plugin(cluster: Cluster) -> None:
    result = cluster.run(["srun", "--mpi=list"])
    assert PMI in (result.stdout + result.stderr).split(), result.stdout + result.stderr


def test_mpi_ring_across_two_nodes_with_two_tasks_each(cluster: Cluster) -> None:
    script = (
        f"#!/bin/bash\n#SBATCH --image=docker:{mpich_image(cluster)}\n"
        "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n#SBATCH --time=4\n"
        + step("ring", f"srun --mpi={PMI} shifter /opt/mpi_ring")
        + step("shared memory, one node",
               f"UCX_TLS=self,sm srun --nodes=1 --ntasks=2 --mpi={PMI} shifter /opt/mpi_ring")
        + step("shared memory, two nodes",
               f"UCX_TLS=self,sm srun --nodes=2 --ntasks=2 --mpi={PMI} shifter /opt/mpi_ring")
    )
    output = run_job(cluster, script)
    parts = sections(output)

    assert step_exit(parts["ring"]) == 0, output
    ring = ranks(parts["ring"])
    assert two_by_two_problems(ring, cluster.nodes[:2]) == [], output
    # the image's own MPICH (no module asked for); the program exists only in the image
    assert all(fields["libmpi"].startswith(IMAGE_LIBMPI) for fields in ring.values()), output
    assert not Path("/opt/mpi_ring").exists()

    assert step_exit(parts["shared memory, one node"]) == 0, output
    local = ranks(parts["shared memory, one node"])
    assert sorted(local) == [0, 1], output
    assert all((f["ring"], f["all_pairs"], f["local_exchange"]) == ("ok", "ok", "ok") for f in local.values()), output

    # the control: shared memory alone cannot reach another node, so the step above used it
    assert step_exit(parts["shared memory, two nodes"]) not in (0, None), output
    assert ranks(parts["shared memory, two nodes"]) == {}, output
    assert "unreachable" in parts["shared memory, two nodes"].lower(), output
