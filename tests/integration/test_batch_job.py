"""End to end: `sbatch --image` on the two-node local cluster, as a real user.

The job runs `srun shifter cat /etc/os-release`; its output must be the
image's os-release from each node (not the host's), and after the job no
mount, loop device or process of the job may remain on either node.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster

USER = "shifter-u1"
IMAGE_OS_NAME = 'NAME="Shifter Demo BusyBox"'


def demo_script(image: str, command: str = "srun shifter cat /etc/os-release") -> str:
    return f"#!/bin/bash\n#SBATCH --image=docker:{image}\n#SBATCH -N 2\n{command}\n"


def run_demo_job(cluster: Cluster) -> tuple[str, str]:
    return cluster.run_batch(USER, demo_script(cluster.image("demo/busybox")))


def test_demo_job_runs_in_the_image_on_both_nodes(cluster: Cluster) -> None:
    job_id, output = run_demo_job(cluster)
    assert output.count(IMAGE_OS_NAME) == 2, output
    host_name = next((line for line in Path("/etc/os-release").read_text().splitlines()
                      if line.startswith("NAME=")), None)
    assert host_name and host_name not in output, output
    assert cluster.job_leftovers(job_id) == []


def test_second_job_on_the_same_nodes_works(cluster: Cluster) -> None:
    first, _ = run_demo_job(cluster)
    second, output = run_demo_job(cluster)
    assert output.count(IMAGE_OS_NAME) == 2, output
    assert cluster.job_leftovers(first) == [] and cluster.job_leftovers(second) == []


def test_job_environment_exposes_the_resolved_image(cluster: Cluster) -> None:
    image = cluster.image("demo/busybox")
    job_id = cluster.submit_batch(USER, demo_script(image, "env | grep '^SLURM_SPANK_SHIFTER_' | sort"))
    assert cluster.wait_job(job_id) == "COMPLETED"
    env = dict(line.split("=", 1) for line in cluster.job_output(job_id).splitlines() if "=" in line)
    assert env.get("SLURM_SPANK_SHIFTER_IMAGETYPE") == "id", env
    assert re.fullmatch(r"[0-9a-f]{64}", env.get("SLURM_SPANK_SHIFTER_IMAGE", "")), env
    assert env.get("SLURM_SPANK_SHIFTER_IMAGEREQUEST") == f"docker:{image}", env


def test_unknown_image_fails_the_submission(cluster: Cluster) -> None:
    registry = cluster.registry
    with pytest.raises(RuntimeError) as err:
        cluster.submit_batch(USER, demo_script(f"{registry}/demo/does-not-exist:latest"))
    message = str(err.value)
    assert "does-not-exist" in message and "Traceback" not in message, message


def test_malformed_image_reference_fails_the_submission(cluster: Cluster) -> None:
    with pytest.raises(RuntimeError) as err:
        cluster.submit_batch(USER, demo_script("demo/bad$name"))
    message = str(err.value)
    assert "bad$name" in message and "Traceback" not in message, message
