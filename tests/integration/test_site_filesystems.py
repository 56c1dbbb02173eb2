"""The user guide's journeys with the site file systems, and the cluster's recovery from a crash.

The local cluster maps /home and /scratch at their host paths, as a site does, so a user's
home and scratch directories are where the documentation says; a directory that is on the
host but not in the container is explained at submission.  `python -m localcluster up` after
one slurmd died restarts only that node, and a job on another node keeps running.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster

USER = "shifter-u1"
REPO = Path(__file__).resolve().parents[2]


def _script(body: str) -> str:
    return f"#!/bin/bash\n{body}\n"


def _as_user_mkdir(cluster: Cluster, path: Path) -> None:
    made = cluster.run_as(USER, ["mkdir", "-p", str(path)])
    assert made.returncode == 0, made.stderr


def test_volume_from_home_reads_what_the_user_wrote(cluster: Cluster) -> None:
    home = Path(pwd.getpwnam(USER).pw_dir)
    data = home / f"exp1-{uuid.uuid4().hex[:8]}" / "data"
    _as_user_mkdir(cluster, data)
    try:
        wrote = cluster.run_as(USER, ["tee", str(data / "input.txt")], input="from my home\n")
        assert wrote.returncode == 0, wrote.stderr
        _, output = cluster.run_batch(USER, _script("srun shifter cat /input/input.txt"), nodes=2,
                                      image=f"docker:{cluster.image('demo/busybox')}", volume=f"{data}:/input")
        assert output.splitlines().count("from my home") == 2, output
    finally:
        shutil.rmtree(data.parent)


def test_volume_on_scratch_writes_a_file_the_host_sees(cluster: Cluster) -> None:
    out = Path("/scratch") / USER / f"out-{uuid.uuid4().hex[:8]}"
    _as_user_mkdir(cluster, out)
    try:
        cluster.run_batch(USER, _script("srun -N1 shifter sh -c 'echo result > /output/result.txt'"), nodes=1,
                          image=f"docker:{cluster.image('demo/busybox')}", volume=f"{out}:/output")
        written = out / "result.txt"
        assert written.read_text() == "result\n"
        assert written.stat().st_uid == pwd.getpwnam(USER).pw_uid, "written as the user, not root"
    finally:
        shutil.rmtree(out)


def test_current_directory_is_kept_when_the_container_has_it(cluster: Cluster) -> None:
    """From $HOME (a site file system) pwd is $HOME; from a host directory the image lacks it is
    the image's WORKDIR (docs/user-guide.md)."""
    home = pwd.getpwnam(USER).pw_dir
    missing = cluster.prefix  # on every node, not in the image nor in a site file system
    body = f"cd {home} && srun -N1 shifter pwd\ncd {missing} && srun -N1 shifter pwd"
    _, output = cluster.run_batch(USER, _script(body), nodes=1, image=f"docker:{cluster.image('demo/busybox')}")
    assert output.splitlines() == [home, "/srv/demo"], output


def test_host_directory_outside_the_site_filesystems_is_refused_at_submission(cluster: Cluster) -> None:
    hidden = cluster.state_dir / f"hidden-{uuid.uuid4().hex[:8]}"
    hidden.mkdir(mode=0o755)
    entry = pwd.getpwnam(USER)
    os.chown(hidden, entry.pw_uid, entry.pw_gid)
    try:
        result = cluster.run_as(USER, ["sbatch", f"--image=docker:{cluster.image('demo/busybox')}",
                                       f"--volume={hidden}:/input", "--wrap=srun shifter true"])
        assert result.returncode != 0, result.stdout
        assert f"source {hidden} exists on the host but is not visible in the container" in result.stderr
        assert "/home, /scratch" in result.stderr and "Traceback" not in result.stderr, result.stderr
    finally:
        hidden.rmdir()


def test_host_directory_outside_the_site_filesystems_is_explained_by_setuproot(cluster: Cluster) -> None:
    """Not the user's (so the image might have it): submission lets it through, the prolog explains."""
    job_id = cluster.submit_batch(USER, _script("srun shifter true"), nodelist="n1",
                                  image=f"docker:{cluster.image('demo/busybox')}", volume=f"{cluster.prefix}:/input")
    state = cluster.wait_job(job_id, timeout=120)
    output = cluster.job_output(job_id)
    assert state == "FAILED", f"{state}:\n{output}"
    assert f"source {cluster.prefix} exists on the host but is not visible in the container" in output, output
    assert "Traceback" not in output
    assert cluster.node_state("n1")[0].split("+")[0] in ("IDLE", "MIXED"), cluster.node_state("n1")


def _up(cluster: Cluster) -> subprocess.CompletedProcess[str]:
    settings = cluster.settings
    argv = [sys.executable, "-m", "localcluster", "up", "--state-dir", str(settings.state_dir),
            "--prefix", str(settings.prefix), "--sysconfdir", str(settings.sysconfdir),
            "--nodes", str(settings.nodes), "--gateway-port", str(settings.gateway_port),
            "--gateways", str(settings.gateways)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO, env=cluster.environ())


def test_cluster_up_after_a_slurmd_crash_restarts_only_that_node(cluster: Cluster) -> None:
    survivor = cluster.submit_batch(USER, _script("srun shifter sleep 300"), nodelist="n2",
                                    image=f"docker:{cluster.image('demo/busybox')}")
    try:
        deadline = time.monotonic() + 60
        while cluster.job_fields(survivor).get("JobState") != "RUNNING":
            assert time.monotonic() < deadline, cluster.job_fields(survivor)
            time.sleep(0.3)
        controller = cluster.run(["pgrep", "-x", "slurmctld"]).stdout.split()
        n2_slurmd = cluster.node_pids()["n2"]
        for fd in cluster.crash_node("n1").values():
            os.close(fd)  # nothing of n1 is left: its namespaces go, as on a rebooted node
        result = _up(cluster)
        assert result.returncode == 0, result.stderr
        assert "slurmd of n1 died: restarting it" in result.stderr, result.stderr
        assert "taking the previous cluster down" not in result.stderr, result.stderr
        assert cluster.job_fields(survivor).get("JobState") == "RUNNING", cluster.job_fields(survivor)
        assert cluster.run(["pgrep", "-x", "slurmctld"]).stdout.split() == controller, "slurmctld kept"
        assert cluster.node_pids()["n2"] == n2_slurmd, "the other node's slurmd kept"
        _, output = cluster.run_batch(USER, _script("srun shifter cat /etc/os-release"), nodelist="n1",
                                      image=f"docker:{cluster.image('demo/busybox')}")
        assert 'NAME="Shifter Demo BusyBox"' in output, output
    finally:
        cluster.run(["scancel", survivor])
        cluster.wait_job(survivor, timeout=120)
    assert cluster.job_leftovers(survivor) == []
