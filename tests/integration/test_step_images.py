"""srun --image=X shifter inside a job: the step's environment is built by slurmstepd, without FUSE.

/dev/fuse stays 0600 here (as on these machines), so the launcher's FUSE path cannot serve these
steps: only the environment slurmstepd builds (kernel squashfs, once per node and step) can.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest

from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster

USER = "shifter-u1"
OTHER_USER = "shifter-u2"
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


def _step_identifier(cluster: Cluster, node: str, job_step: str) -> str:
    """The image id in a step environment's marker, read as root from the node's mount namespace."""
    import json

    udi = cluster.config_value("udiMount")
    marker = Path(f"/proc/{cluster.node_pids()[node]}/root{udi}/{job_step}/root/var/shifterConfig.json")
    return json.loads(marker.read_text())["identifier"]


def test_a_step_environment_is_its_users_and_its_requests_only(cluster: Cluster) -> None:
    """Another user cannot enter a running step's environment, and neither can a step of the same job
    whose request differs (the job's image; the step's image with other modules or another volume)."""
    _fuse_closed()
    job_image, other = cluster.image("demo/busybox"), cluster.image("demo/multilayer")
    sync = Path("/scratch") / USER / f"steps-{uuid.uuid4().hex[:8]}"
    made = cluster.run_as(USER, ["mkdir", "-p", str(sync)])
    assert made.returncode == 0, made.stderr
    probe = "test -e /etc/layer3 && echo {label}-layer3 || echo {label}-plain"
    claim = ("srun --overlap -N1 -n1 {opts} bash -c 'SLURM_STEP_ID=0 shifter sh -c \"" + probe + "\"; "
             "echo {label}-rc=$?; shifter sh -c \"test -e /data/claims && echo {label}-own-data || "
             "echo {label}-own-nodata\"'")
    body = "\n".join([
        "#!/bin/bash",
        f"srun -N1 -n1 --image=docker:{other} shifter sh -c '{probe.format(label='step0')}; "
        f"for i in $(seq 600); do [ -e {sync}/go ] && break; sleep 0.1; done' &",
        f"for i in $(seq 600); do [ -e {sync}/claims ] && break; sleep 0.1; done",
        claim.format(opts="", label="jobimage"),
        claim.format(opts=f"--image=docker:{other} --module=altmpi", label="othermodule"),
        claim.format(opts=f"--image=docker:{other} --volume={sync}:/data", label="othervolume"),
        f"touch {sync}/go",
        "wait",
    ])
    try:
        job_id = cluster.submit_batch(USER, body, nodes=1, nodelist="n1", image=f"docker:{job_image}")
        deadline = time.monotonic() + 120
        while True:
            try:
                identifier = _step_identifier(cluster, "n1", f"{job_id}.0")
                break
            except (OSError, RuntimeError):
                assert time.monotonic() < deadline, f"step {job_id}.0 never got an environment"
                time.sleep(0.2)
        env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SHIFTER_IMAGETYPE": "id",
               "SHIFTER_IMAGE": identifier}
        udi = cluster.config_value("udiMount")

        def enter_as(user: str, label: str):
            return cluster.node_exec("n1", [
                "runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in env.items()),
                str(cluster.prefix / "bin" / "shifter"), "sh", "-c", probe.format(label=label)])

        owner = enter_as(USER, "owner")  # the same command as the step's user: it enters
        assert (owner.returncode, owner.stdout) == (0, "owner-layer3\n"), owner.stdout + owner.stderr
        intruder = enter_as(OTHER_USER, "intruder")
        assert intruder.returncode != 0 and "layer3" not in intruder.stdout, intruder.stdout + intruder.stderr
        assert "no prepared environment matches" in intruder.stderr, intruder.stderr
        listing = cluster.node_exec("n1", ["runuser", "-u", OTHER_USER, "--", "ls", f"{udi}/{job_id}.0/root"])
        assert listing.returncode != 0 and "Permission denied" in listing.stderr, listing.stdout + listing.stderr
        (sync / "claims").touch()
        state = cluster.wait_job(job_id)
        output = cluster.job_output(job_id)
        assert state == "COMPLETED", output
        assert "step0-layer3" in output, output
        for label in ("jobimage", "othermodule", "othervolume"):  # none of them entered step 0's environment
            assert f"{label}-layer3" not in output, output
        # the job's image is the job's environment; the other requests have no environment to enter
        assert "jobimage-plain" in output and "jobimage-rc=0" in output, output
        for label in ("othermodule", "othervolume"):
            assert re.search(rf"^{label}-rc=[1-9]", output, re.MULTILINE), output
        # each claimant's own step environment still serves it (the volume only where it was asked)
        assert "othermodule-own-nodata" in output and "othervolume-own-data" in output, output
        assert cluster.job_leftovers(job_id) == []
    finally:
        shutil.rmtree(sync, ignore_errors=True)


def test_step_images_with_modules(cluster: Cluster) -> None:
    """Steps whose modules differ from the job's get them (environment, roothook, userhook); a step of
    another image with the job's modules gets the job's /opt/udiImage."""
    _fuse_closed()
    job_image, other = cluster.image("demo/busybox"), cluster.image("demo/multilayer")
    env_probe = ("echo {label}-$(test -e /etc/layer3 && echo layer3 || echo plain)"
                 "-site=${{SHIFTER_SITE_MODULE:-unset}}-alt=${{SHIFTER_ALTMPI:-unset}}")
    body = "\n".join([
        "#!/bin/bash",
        f"srun -N2 -n2 --image=docker:{other} shifter sh -c '{env_probe.format(label='image')}'",
        f"srun -N2 -n2 --module=altmpi shifter sh -c '{env_probe.format(label='module')}'",
        f"srun -N1 -n1 --image=docker:{other} --module=hooks shifter cat /opt/udiImage/modules/hooks/roothook.out",
    ])
    job_id, output = cluster.run_batch(USER, body, nodes=2, ntasks_per_node=1, image=f"docker:{job_image}")
    lines = output.splitlines()
    assert [line for line in lines if line.startswith("image-")] == ["image-layer3-site=1-alt=unset"] * 2, output
    assert [line for line in lines if line.startswith("module-")] == ["module-plain-site=unset-alt=1"] * 2, output
    udi = cluster.config_value("udiMount")
    hook = [line for line in lines if line.startswith("roothook ran")]
    assert hook == [f"roothook ran as uid 0 in {udi}/{job_id}.2/root"], output
    assert "userhook ran as uid" in output, output
    assert cluster.job_leftovers(job_id) == []


def test_the_sruns_of_a_job_ask_the_gateway_once_per_tag(cluster: Cluster) -> None:
    """srun --image=<tag> resolves the tag at the first srun of the job; the others use the answer kept in
    the user's ~/.udiRoot/step-images.<jobid>."""
    import pwd

    from tests.integration.test_slurm_scenarios import gateway_lookups  # flushes the gateways' access logs

    other = cluster.image("demo/multilayer")

    def lookups() -> int:
        return gateway_lookups(cluster, other)

    before = lookups()
    body = "#!/bin/bash\n" + "".join(f"srun -N1 -n1 --image=docker:{other} shifter true && echo ok-{i}\n"
                                      for i in range(3))
    job_id, output = cluster.run_batch(USER, body, nodes=1, image=f"docker:{cluster.image('demo/busybox')}")
    assert [line for line in output.splitlines() if line.startswith("ok-")] == ["ok-0", "ok-1", "ok-2"], output
    assert lookups() - before == 1, "one gateway lookup for three sruns of the same tag"
    kept = Path(pwd.getpwnam(USER).pw_dir) / ".udiRoot" / f"step-images.{job_id}"
    info = kept.stat()
    assert info.st_uid == pwd.getpwnam(USER).pw_uid and info.st_mode & 0o777 == 0o600
    assert other in kept.read_text()
    assert cluster.job_leftovers(job_id) == []
