"""srun --image=X shifter inside a job: the step's environment is built by slurmstepd, without FUSE.

/dev/fuse stays 0600 here (as on these machines), so the launcher's FUSE path cannot serve these
steps: only the environment slurmstepd builds (kernel squashfs, once per node and step) can.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster

USER = "shifter-u1"
PROBE = ("echo {label}-$(test -e /etc/layer3 && echo layer3 || echo plain)-$SLURMD_NODENAME-"
         "$(readlink /proc/self/ns/user)")


def _fuse_closed() -> None:
    assert os.stat("/dev/fuse").st_mode & 0o777 == 0o600, "this test needs /dev/fuse closed to users"


def test_step_image_on_two_nodes_while_the_job_image_runs(cluster: Cluster) -> None:
    _fuse_closed()
    job_image, other = cluster.image("demo/busybox"), cluster.image("demo/multilayer")
    udi = cluster.config_value("udiMount")
    body = "\n".join([
        "#!/bin/bash",
        f"srun --overlap -N2 -n2 shifter sh -c 'sleep 2; {PROBE.format(label='job')}' &",
        "sleep 0.5",
        f"srun --overlap -N2 -n4 --image=docker:{other} shifter sh -c '{PROBE.format(label='step')}'",
        "wait",
        f"srun --overlap -N2 -n2 bash -c 'echo dirs-$SLURMD_NODENAME: $(ls {udi})'",
    ])
    job_id, output = cluster.run_batch(USER, body, nodes=2, ntasks_per_node=2, image=f"docker:{job_image}")
    lines = output.splitlines()
    steps = sorted(line.rsplit("-", 1)[0] for line in lines if line.startswith("step-"))
    assert steps == ["step-layer3-n1", "step-layer3-n1", "step-layer3-n2", "step-layer3-n2"], output
    for node in ("n1", "n2"):
        namespaces = {line.rsplit("-", 1)[1] for line in lines if line.startswith(f"step-layer3-{node}")}
        assert len(namespaces) == 1, f"the tasks of the step on {node} share one environment: {output}"
    assert sorted(line.rsplit("-", 1)[0] for line in lines if line.startswith("job-")) == \
        ["job-plain-n1", "job-plain-n2"], output
    for node in ("n1", "n2"):  # the step's environment went with the step; the job's stays
        dirs = re.search(rf"^dirs-{node}: (.*)$", output, re.MULTILINE)
        assert dirs and dirs.group(1).split() == [job_id], output
    assert cluster.job_leftovers(job_id) == []


def test_fifty_step_images_in_a_row_leave_nothing(cluster: Cluster) -> None:
    _fuse_closed()
    job_image, other = cluster.image("demo/busybox"), cluster.image("demo/multilayer")
    body = ("#!/bin/bash\nfor i in $(seq 50); do\n"
            f"  srun -N2 --ntasks-per-node=1 --image=docker:{other} shifter true || echo failed-$i\ndone\n"
            "echo done\n")
    job_id, output = cluster.run_batch(USER, body, nodes=2, image=f"docker:{job_image}", timeout=600)
    assert "failed-" not in output and output.splitlines()[-1] == "done", output
    assert cluster.job_leftovers(job_id) == []


def test_scancel_of_a_step_removes_its_environment(cluster: Cluster) -> None:
    _fuse_closed()
    job_image, other = cluster.image("demo/busybox"), cluster.image("demo/multilayer")
    udi = cluster.config_value("udiMount")
    body = "\n".join([
        "#!/bin/bash",
        f"srun -N1 --image=docker:{other} shifter sleep 300",
        # the step's slurmstepd removes its environment after srun has returned
        f"for i in $(seq 100); do [ -e {udi}/$SLURM_JOB_ID.0 ] || break; sleep 0.1; done",
        f"echo after-cancel: $(ls {udi})",
    ])
    job_id = cluster.submit_batch(USER, body, nodes=1, nodelist="n1", image=f"docker:{job_image}")
    deadline = time.monotonic() + 120
    while f"{job_id}.0" not in cluster.node_job_dirs("n1"):
        assert time.monotonic() < deadline, f"step {job_id}.0 never got an environment"
        time.sleep(0.2)
    cancel = cluster.run_as(USER, ["scancel", f"{job_id}.0"])
    assert cancel.returncode == 0, cancel.stderr
    cluster.wait_job(job_id)
    output = cluster.job_output(job_id)
    assert re.search(rf"^after-cancel: {job_id}$", output, re.MULTILINE), output
    assert cluster.job_leftovers(job_id) == []



def test_steps_of_the_jobs_own_request_run_no_step_hook(cluster: Cluster) -> None:
    """The shim tells a step of the job's own image from another image without starting Python,
    under sbatch and under salloc (whose steps do not inherit the job's SLURM_SPANK_ variables)."""
    image = f"docker:{cluster.image('demo/busybox')}"
    job_id, output = cluster.run_batch(USER, "#!/bin/bash\nsrun shifter true && srun shifter echo ok\n",
                                       nodes=1, nodelist="n1", image=image)
    assert output.strip() == "ok", output
    salloc = cluster.run_as(USER, ["salloc", "-N1", "-w", "n1", f"--image={image}", "bash", "-c",
                                   "srun shifter true && srun shifter echo ok; echo job=$SLURM_JOB_ID"],
                            timeout=120)
    assert "ok" in salloc.stdout, salloc.stdout + salloc.stderr
    salloc_job = salloc.stdout.strip().split("job=")[-1]
    log = (cluster.state_dir / "log" / "slurmd-n1.log").read_text(errors="replace")
    for job in (job_id, salloc_job):
        assert not re.search(rf"step {job}\.\d+ asks for the job's own environment|\[{job}\.\d+\].*step-setup",
                             log), f"job {job}: a step hook ran for the job's own image"


def test_step_with_its_own_volume(cluster: Cluster) -> None:
    """srun --volume=... in a job of the same image: a step environment with the volume, no FUSE."""
    _fuse_closed()
    import shutil
    import uuid
    from pathlib import Path

    data = Path("/scratch") / USER / f"step-{uuid.uuid4().hex[:8]}"
    made = cluster.run_as(USER, ["mkdir", "-p", str(data)])
    assert made.returncode == 0, made.stderr
    try:
        wrote = cluster.run_as(USER, ["tee", str(data / "f")], input="from scratch\n")
        assert wrote.returncode == 0, wrote.stderr
        body = (f"#!/bin/bash\nsrun -N2 -n2 --volume={data}:/data shifter cat /data/f\n"
                "srun -N2 -n2 shifter sh -c 'test -e /data/f && echo leaked || echo job-has-no-volume'\n")
        job_id, output = cluster.run_batch(USER, body, nodes=2, image=f"docker:{cluster.image('demo/busybox')}")
        lines = [line for line in output.splitlines() if not line.startswith("srun: ")]  # srun's busy-node notes
        assert lines == ["from scratch"] * 2 + ["job-has-no-volume"] * 2, output
        assert cluster.job_leftovers(job_id) == []
    finally:
        shutil.rmtree(data)
