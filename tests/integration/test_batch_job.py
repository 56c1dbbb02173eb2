"""End to end: `sbatch --image` on the two-node local cluster, as a real user.

The job runs `srun shifter cat /etc/os-release`; its output must be the
image's os-release from each node (not the host's), and after the job no
mount, loop device or process of the job may remain on either node.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from localcluster.testing import Cluster, loop_devices_under

pytestmark = pytest.mark.cluster

USER = "shifter-u1"
IMAGE_OS_NAME = 'NAME="Shifter Demo BusyBox"'


def demo_script(image: str, command: str = "srun shifter cat /etc/os-release") -> str:
    return f"#!/bin/bash\n#SBATCH --image=docker:{image}\n#SBATCH -N 2\n{command}\n"


def job_leftovers(cluster: Cluster, job_id: str) -> list[str]:
    """Everything of the job still present on any node: mounts, loop devices, processes."""
    found = []
    for node in cluster.nodes:
        for mount in cluster.node_mounts(node):
            if re.search(rf"/{job_id}(/|$)", mount.target):
                found.append(f"{node}: mount {mount.target} ({mount.fstype})")
    image_dir = _image_path(cluster)
    found += [f"loop device {dev}" for dev in loop_devices_under(image_dir)]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}\0".encode() in environ:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"process {proc.name}: {cmd.strip()}")
    return found


def _image_path(cluster: Cluster) -> str:
    for line in cluster.udiroot_conf.read_text().splitlines():
        if line.startswith("imagePath="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("imagePath missing from the cluster's udiRoot.conf")


def run_demo_job(cluster: Cluster) -> tuple[str, str]:
    image = cluster.image("demo/busybox")
    job_id = cluster.submit_batch(USER, demo_script(image))
    state = cluster.wait_job(job_id, timeout=240)
    output = cluster.job_output(job_id)
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{output}"
    return job_id, output


def test_demo_job_runs_in_the_image_on_both_nodes(cluster: Cluster) -> None:
    job_id, output = run_demo_job(cluster)
    assert output.count(IMAGE_OS_NAME) == 2, output
    host_name = next((line for line in Path("/etc/os-release").read_text().splitlines()
                      if line.startswith("NAME=")), None)
    assert host_name and host_name not in output, output
    assert job_leftovers(cluster, job_id) == []


def test_second_job_on_the_same_nodes_works(cluster: Cluster) -> None:
    first, _ = run_demo_job(cluster)
    second, output = run_demo_job(cluster)
    assert output.count(IMAGE_OS_NAME) == 2, output
    assert job_leftovers(cluster, first) == [] and job_leftovers(cluster, second) == []


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
