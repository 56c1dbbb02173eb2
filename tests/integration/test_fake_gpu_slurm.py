"""GPU jobs on the real cluster with fake GPUs (no GPU here): Slurm GRES, the prolog, every task.

The cluster started with ``FAKE_GPUS=2`` gives each node ``Gres=gpu:2`` whose gres.conf
``File=/dev/nvidia[0-1]`` are fake NVIDIA device nodes (major 195) in the node's own /dev, and a
fake driver tree as gpuDriverRoot (localcluster/fakegpu.py): versioned shared objects, a loader
cache, and an ``nvidia-smi`` that prints the device nodes it sees and the libnvidia-ml it loaded.
Slurm, the SPANK plugin, setupRoot and the launcher are the real ones.  Tasks run a build of
bin/shifter with no Python launcher behind it, so each one shows it took the prepared path.

    make install udiimage
    FAKE_GPUS=2 DEBIAN_IMAGE=1 scripts/with-cluster.sh .venv/bin/python -m pytest -q \\
        tests/integration/test_fake_gpu_slurm.py
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster.fakegpu import VERSION
from localcluster.testing import Cluster
from tests.integration.test_slurm_scenarios import USER, batch_script

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
SITE_RESOURCES = "/opt/shifter/site-resources"
ENV_LINE = ("echo \"task $SLURM_PROCID on $(hostname): NV=$NVIDIA_VISIBLE_DEVICES CVD=$CUDA_VISIBLE_DEVICES "
            "CAP=$NVIDIA_DRIVER_CAPABILITIES LD=$LD_LIBRARY_PATH\"")


@pytest.fixture(scope="module")
def gpu_cluster(cluster: Cluster) -> Cluster:
    if cluster.settings.fake_gpus < 2:
        pytest.skip("the cluster has no fake GPUs: start it with FAKE_GPUS=2 (see this file's docstring)")
    return cluster


@pytest.fixture(scope="module")
def c_only(gpu_cluster: Cluster) -> Iterator[str]:
    """bin/shifter without a Python launcher: a task succeeds only on the prepared path."""
    path = gpu_cluster.job_dir(USER) / "shifter-c-only-gpu"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", f'-DSHIFTER_CONFIG_FILE="{gpu_cluster.udiroot_conf}"',
                    '-DSHIFTER_PYTHON_LAUNCHER="/nonexistent/shifter-python"',
                    str(REPO / "shifter/launch/fastlaunch.c"),
                    "-o", str(path)], check=True)
    os.chmod(path, 0o755)
    yield str(path)
    path.unlink()


def _where(label: str) -> str:
    """A task's line naming the device node its CUDA_VISIBLE_DEVICES selects, found the way CUDA
    numbers GPUs: among the GPU nodes the process can open (covered ones are empty files), in order.
    A stand-in for CUDA itself, which cannot run here."""
    return (f"srun {{}} /bin/sh -c 'n=0; dev=none; for d in /dev/nvidia[0-9]*; do [ -c \"$d\" ] || continue; "
            f"[ \"$n\" = \"$CUDA_VISIBLE_DEVICES\" ] && dev=$d; n=$((n+1)); done; "
            f"echo \"{label} $SLURM_PROCID CVD=$CUDA_VISIBLE_DEVICES dev=$dev\"'\n")


def _devices(output: str, label: str) -> dict[str, tuple[str, str]]:
    """task -> (CUDA_VISIBLE_DEVICES, device node it selects) from the lines of :func:`_where`."""
    return {task: (cvd, dev) for task, cvd, dev in
            re.findall(rf"^{label} (\d+) CVD=(\S*) dev=(\S+)$", output, re.MULTILINE)}


def _image(cluster: Cluster) -> str:
    try:
        return cluster.image("demo/debian")  # glibc, for the fake nvidia-smi
    except KeyError:
        pytest.skip("needs demo/debian (DEBIAN_IMAGE=1)")


def _run(cluster: Cluster, body: str, *options: str) -> str:
    job_id, output = cluster.run_batch(USER, batch_script(body, f"--image=docker:{_image(cluster)}", *options),
                                       timeout=300)
    assert cluster.job_leftovers(job_id) == [], f"job {job_id} left things behind"
    return output


def _smi(output: str, node: str) -> list[str]:
    """The fake nvidia-smi's lines of one node (tasks print them prefixed with their node)."""
    return [line.split(": ", 1)[1] for line in output.splitlines() if line.startswith(f"{node}: ")]


def test_fake_gpu_job_with_one_gpu(gpu_cluster: Cluster, c_only: str) -> None:
    body = (f"echo \"batch: SLURM_JOB_GPUS=$SLURM_JOB_GPUS\"\n"
            f"srun {c_only} /bin/sh -c 'nvidia-smi | sed \"s/^/$(hostname): /\"'\n"
            f"srun {c_only} /bin/sh -c '{ENV_LINE}'\n"
            "srun /bin/sh -c 'echo \"bare $SLURM_PROCID CVD=$CUDA_VISIBLE_DEVICES\"'\n")
    output = _run(gpu_cluster, body, "--gpus=1", "--nodes=1")
    gpu = re.search(r"^batch: SLURM_JOB_GPUS=(\d)$", output, re.MULTILINE)
    assert gpu, output
    index, other = int(gpu.group(1)), 1 - int(gpu.group(1))
    node = re.search(r"^task 0 on (n\d):", output, re.MULTILINE).group(1)
    assert _smi(output, node) == [
        f"driver {VERSION} from {SITE_RESOURCES}/lib64/libnvidia-ml.so.1",
        *sorted([f"/dev/nvidia{index} char 195:{index}", f"/dev/nvidia{other} hidden Permission denied"]),
        "/dev/nvidia2 absent", "/dev/nvidia3 absent", "/dev/nvidiactl char 195:255", "/dev/nvidia-uvm char 509:0"]
    # Slurm's node index outside (no ConstrainDevices here); the job's only GPU is CUDA's 0 inside
    assert f"bare 0 CVD={index}" in output.splitlines(), output
    assert (f"task 0 on {node}: NV={index} CVD=0 CAP=compute,utility LD={SITE_RESOURCES}/lib64"
            in output.splitlines()), output


def test_fake_gpu_two_gpus_per_node_on_two_nodes(gpu_cluster: Cluster, c_only: str) -> None:
    body = f"srun {c_only} /bin/sh -c 'nvidia-smi | sed \"s/^/$(hostname): /\"'\n"
    output = _run(gpu_cluster, body, "--gpus-per-node=2", "--nodes=2", "--ntasks-per-node=1")
    for node in ("n1", "n2"):
        assert _smi(output, node)[1:3] == ["/dev/nvidia0 char 195:0", "/dev/nvidia1 char 195:1"], output


def test_fake_gpu_per_task_gpus_keep_slurms_numbering(gpu_cluster: Cluster, c_only: str) -> None:
    body = (f"srun {c_only} /bin/sh -c '{ENV_LINE}'\n"
            "srun /bin/sh -c 'echo \"bare $SLURM_PROCID CVD=$CUDA_VISIBLE_DEVICES\"'\n"
            + _where("in").format(c_only) + _where("out").format(""))
    output = _run(gpu_cluster, body, "--gpus-per-task=1", "--ntasks=2", "--nodes=1")
    inside = dict(re.findall(r"^task (\d) on n\d: NV=0,1 CVD=(\S*) CAP=compute,utility", output, re.MULTILINE))
    bare = dict(re.findall(r"^bare (\d) CVD=(\S*)$", output, re.MULTILINE))
    assert len(inside) == 2 and inside == bare, output
    # each task its own GPU, the same one in the container as on bare metal
    assert _devices(output, "in") == _devices(output, "out"), output
    assert sorted(dev for _, dev in _devices(output, "in").values()) == ["/dev/nvidia0", "/dev/nvidia1"], output


def test_fake_gpu_second_gpu_of_a_node_keeps_its_meaning(gpu_cluster: Cluster, c_only: str) -> None:
    """The job holds only GPU 1 (another job holds GPU 0).  Slurm (task/none here, no ConstrainDevices)
    gives the task CUDA_VISIBLE_DEVICES=1, a node index; in the container GPU 0 is covered, so CUDA's
    device 0 is GPU 1 and the value is renumbered to 0 (the prepared path does it)."""
    holder = gpu_cluster.submit_batch(USER, batch_script("sleep 300", "--gpus=1", "--nodes=1", "--nodelist=n1"))
    try:
        for _ in range(300):
            if gpu_cluster.job_fields(holder).get("JobState") == "RUNNING":
                break
            time.sleep(0.2)
        body = ("echo \"batch: SLURM_JOB_GPUS=$SLURM_JOB_GPUS\"\n"
                + _where("in").format(c_only) + _where("out").format(""))
        output = _run(gpu_cluster, body, "--gpus=1", "--nodes=1", "--nodelist=n1")
    finally:
        gpu_cluster.run(["scancel", holder])
        gpu_cluster.wait_job(holder)
    assert "batch: SLURM_JOB_GPUS=1" in output.splitlines(), output
    assert _devices(output, "out") == {"0": ("1", "/dev/nvidia1")}, output
    assert _devices(output, "in") == {"0": ("0", "/dev/nvidia1")}, output


def test_fake_gpu_job_without_gpus_gets_nothing(gpu_cluster: Cluster, c_only: str) -> None:
    body = (f"srun {c_only} /bin/sh -c 'stat -c \"%n %F\" /dev/nvidia0 /dev/nvidia1 /dev/nvidiactl; "
            f"ls {SITE_RESOURCES} 2>&1 | head -1; {ENV_LINE}'\n")
    output = _run(gpu_cluster, body, "--nodes=1")
    lines = output.splitlines()
    for path in ("/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl"):
        assert f"{path} regular empty file" in lines, output
    assert any("No such file or directory" in line for line in lines), output
    assert re.search(r"^task 0 on n\d: NV= CVD= CAP= LD=$", output, re.MULTILINE), output


def _step_image_job(cluster: Cluster, body: str, *options: str) -> str:
    """A job whose image is busybox running ``body``, whose steps ask for demo/debian (glibc, for nvidia-smi)."""
    job_id, output = cluster.run_batch(USER, batch_script(body, f"--image=docker:{cluster.image('demo/busybox')}",
                                                          *options), timeout=300)
    assert cluster.job_leftovers(job_id) == [], f"job {job_id} left things behind"
    return output


def test_fake_gpu_step_image_sees_its_gpu_on_each_node(gpu_cluster: Cluster) -> None:
    """A step image is built in slurmstepd, not by the prolog: it must still get the node's GPU and driver.

    Another job holds GPU 0 of n2, so the job's GPU is 0 on n1 and 1 on n2: each node's
    environment must follow its own allocation, not the batch node's (which srun's environment,
    all SPANK shows in slurmstepd, carries to every node)."""
    other = f"docker:{_image(gpu_cluster)}"
    holder = gpu_cluster.submit_batch(USER, batch_script("sleep 300", "--gpus=1", "--nodes=1", "--nodelist=n2"))
    try:
        for _ in range(300):
            if gpu_cluster.job_fields(holder).get("JobState") == "RUNNING":
                break
            time.sleep(0.2)
        body = ("scontrol show job -d $SLURM_JOB_ID | grep GRES=\n"  # on failure: what the hook parsed
                "srun -N2 --ntasks-per-node=1 /bin/sh -c 'echo \"alloc $(hostname) $SLURM_STEP_GPUS\"'\n"
                f"srun -N2 --ntasks-per-node=1 --image={other} shifter /bin/sh -c "
                "'nvidia-smi | sed \"s/^/$(hostname): /\"'\n")
        output = _step_image_job(gpu_cluster, body, "--gpus-per-node=1", "--nodes=2", "--ntasks-per-node=1")
    finally:
        gpu_cluster.run(["scancel", holder])
        gpu_cluster.wait_job(holder)
    alloc = dict(re.findall(r"^alloc (n\d) (\d)$", output, re.MULTILINE))
    assert alloc == {"n1": "0", "n2": "1"}, output
    for node, index in alloc.items():
        other_gpu = 1 - int(index)
        assert _smi(output, node)[:3] == [
            f"driver {VERSION} from {SITE_RESOURCES}/lib64/libnvidia-ml.so.1",
            *sorted([f"/dev/nvidia{index} char 195:{index}", f"/dev/nvidia{other_gpu} hidden Permission denied"])
        ], output


def test_fake_gpu_step_image_of_a_job_without_gpus_gets_none(gpu_cluster: Cluster) -> None:
    other = f"docker:{_image(gpu_cluster)}"
    body = (f"srun -N1 --image={other} shifter /bin/sh -c 'stat -c \"%n %F\" /dev/nvidia0 /dev/nvidia1; "
            f"ls {SITE_RESOURCES} 2>&1 | head -1; command -v nvidia-smi || echo no-smi'\n")
    output = _step_image_job(gpu_cluster, body, "--nodes=1")
    lines = output.splitlines()
    for path in ("/dev/nvidia0", "/dev/nvidia1"):
        assert f"{path} regular empty file" in lines, output
    assert any("No such file or directory" in line for line in lines) and "no-smi" in lines, output
