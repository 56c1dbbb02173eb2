"""Scenario 12: site modules on the real cluster (the documentation's MPICH ABI approach).

The cluster's udiRoot.conf (templates/udiRoot.conf.j2, localcluster/sitemodules.py) has:

- ``mpich``: copyPath = the host's libmpich.so.12 packed with its dependencies by
  ``shifter.packing.relocate.build_module`` (what ``packtool module`` runs), siteEnvPrepend
  ``LD_LIBRARY_PATH=/opt/udiImage/modules/mpich/lib64``;
- ``siteinfo`` (the default module): ``SHIFTER_SITE_MODULE=1``;
- ``hooks``: a roothook writing /opt/udiImage/modules/hooks/roothook.out, a userhook
  printing to stderr;
- ``altmpi``: conflicts with ``mpich``.
"""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from localcluster.mpiring import PMI, mpich_reference, ranks, sections, step, step_exit, two_by_two_problems
from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster

USER = "shifter-u1"
MODULE_LIB_DIR = "/opt/udiImage/modules/mpich/lib64"


def run_job(cluster: Cluster, script: str) -> str:
    return cluster.run_batch(USER, script, timeout=300)[1]


def busybox_job(cluster: Cluster, module: str | None, command: str, nodes: int = 1) -> str:
    module_line = f"#SBATCH --module={module}\n" if module is not None else ""
    return (f"#!/bin/bash\n#SBATCH --image=docker:{cluster.image('demo/busybox')}\n{module_line}"
            f"#SBATCH --nodes={nodes}\n{command}\n")


def refused(cluster: Cluster, script: str) -> str:
    """sbatch's error for a submission that must be refused (no job id: nothing is queued)."""
    with pytest.raises(RuntimeError) as failure:
        job_id = cluster.submit_batch(USER, script)
        cluster.run(["scancel", job_id])
    return str(failure.value)


def test_mpich_module_replaces_the_image_library(cluster: Cluster) -> None:
    image = mpich_reference(cluster)
    if image is None:
        pytest.skip("demo/mpich is built with the Debian image only (DEBIAN_IMAGE=1; `make test` sets it)")
    script = (
        f"#!/bin/bash\n#SBATCH --image=docker:{image}\n#SBATCH --module=mpich\n"
        "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n#SBATCH --time=4\n"
        + step("ring", f"srun --mpi={PMI} shifter /opt/mpi_ring")
        + step("env", "srun --nodes=1 --ntasks=1 shifter /bin/sh -c 'echo \"LD_LIBRARY_PATH=$LD_LIBRARY_PATH\"'")
    )
    output = run_job(cluster, script)
    parts = sections(output)
    assert step_exit(parts["ring"]) == 0, output
    found = ranks(parts["ring"])
    assert two_by_two_problems(found, cluster.nodes[:2]) == [], output
    # /proc/self/maps of every rank: the injected library, not the image's own
    assert {fields["libmpi"] for fields in found.values()} == {f"{MODULE_LIB_DIR}/libmpich.so.12"}, output
    assert f"LD_LIBRARY_PATH={MODULE_LIB_DIR}" in parts["env"], output


def test_default_module_is_active_unless_none(cluster: Cluster) -> None:
    command = "srun shifter /bin/sh -c 'echo \"site module: ${SHIFTER_SITE_MODULE:-absent}\"'"
    default = run_job(cluster, busybox_job(cluster, None, command))
    assert "site module: 1" in default, default
    none = run_job(cluster, busybox_job(cluster, "none", command))
    assert "site module: absent" in none, none


def test_unknown_module_is_refused_at_submission(cluster: Cluster) -> None:
    message = refused(cluster, busybox_job(cluster, "nosuchmodule", "srun shifter true"))
    assert "nosuchmodule" in message and "Traceback" not in message, message
    assert len([line for line in message.splitlines() if line.strip()]) == 1, message


def test_conflicting_modules_are_refused_naming_both(cluster: Cluster) -> None:
    message = refused(cluster, busybox_job(cluster, "mpich,altmpi", "srun shifter true"))
    assert "mpich" in message and "altmpi" in message and "conflict" in message, message
    assert len([line for line in message.splitlines() if line.strip()]) == 1, message


def test_module_roothook_and_userhook_run(cluster: Cluster) -> None:
    uid = pwd.getpwnam(USER).pw_uid
    output = run_job(cluster, busybox_job(cluster, "hooks", "srun shifter cat /opt/udiImage/modules/hooks/roothook.out",
                                          nodes=2))
    lines = [line for line in output.splitlines() if line.startswith("roothook ran")]
    assert len(lines) == 2, output
    udi_mount = next(line.split("=", 1)[1] for line in cluster.udiroot_conf.read_text().splitlines()
                     if line.startswith("udiMount="))
    for line in lines:  # as root, with the job's container root on the node as working directory
        assert line.startswith("roothook ran as uid 0 in "), output
        assert Path(line.rsplit(" ", 1)[1]).parent.parent == Path(udi_mount), output
    assert output.count(f"userhook ran as uid {uid}") == 2, output
