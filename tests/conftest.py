"""Fixtures shared by every test: the local cluster (real Slurm, munge, registry, gateway).

``cluster`` is a `localcluster.testing.Cluster` for the running local cluster.  Under
``make test`` the cluster is already up; run by hand as root without it, the fixture brings
it up for the session and takes it down afterwards.  Not root, every test that needs the
cluster is skipped with the reason.

Its helpers (see localcluster/testing.py): ``cluster.run_as(user, argv, env=, timeout=)``,
``cluster.submit_batch(user, script, **sbatch_opts) -> job id``, ``cluster.wait_job(id)``
(waits for the epilog too), ``cluster.job_output(id)``, ``cluster.node_pids()``,
``cluster.node_mounts(node)``, ``cluster.node_exec(node, argv)``, and the module function
``loop_devices_under(path)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster.settings import TEST_USERS
from localcluster.testing import Cluster, ClusterNotUp, loop_devices_under

REPO = Path(__file__).resolve().parent.parent

__all__ = ["loop_devices_under"]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The running local cluster; brought up (and down at the end) when root and not up yet."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the local cluster runs munged, slurmctld, slurmd in namespaces")
    started_here = False
    try:
        handle = Cluster.from_state_dir()
    except ClusterNotUp:
        result = subprocess.run([sys.executable, "-m", "localcluster", "up"], cwd=REPO,
                                capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            pytest.fail(f"could not bring the local cluster up:\n{result.stderr[-3000:]}")
        started_here = True
        handle = Cluster.from_state_dir()
    yield handle
    if started_here:
        subprocess.run([sys.executable, "-m", "localcluster", "down"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def test_users() -> tuple[str, ...]:
    """The unprivileged users the cluster created (shifter-u1, shifter-u2)."""
    return TEST_USERS


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB-wire server for the session (a one-node replica set, as ``secantusd-py`` presents
    itself), or ``SHIFTER_TEST_MONGODB_URI`` when set.  Each user takes its own database name."""
    yield from _mongo_server(tmp_path_factory, standalone=False)


@pytest.fixture(scope="session")
def mongo_standalone_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same server presenting itself as a standalone ``mongod`` (no replica set)."""
    yield from _mongo_server(tmp_path_factory, standalone=True)


def _mongo_server(tmp_path_factory: pytest.TempPathFactory, standalone: bool) -> Iterator[str]:
    from fixtures_mongo import SecantusServer, external_uri

    uri = external_uri()
    if uri:
        yield uri
        return
    server = SecantusServer(tmp_path_factory.mktemp("mongo-standalone" if standalone else "mongo"), standalone)
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()
