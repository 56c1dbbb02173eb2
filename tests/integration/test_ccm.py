"""CCM: ``salloc --ccm`` (plugstack ``enable_ccm=1 enable_sshd=1``, udiRoot.conf ``allowLocalChroot=1``).

The allocation's tasks run chrooted into a container made from the host's / (the prolog ran
setupRoot with ``local /``; the plugin's ``task_init_privileged`` chroots each task), with the
job's sshd running in it, and nothing is left after the allocation ends.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from localcluster.jobprocs import plugstack_args, sshd_listeners, sshd_log_lines, wait_port_free
from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster

USER = "shifter-u1"
TASK = ("test -f /var/shifterConfig.json && echo marker-$(hostname); "
        "test -x /usr/sbin/slurmd && echo host-tree-$(hostname); "
        "echo cwd=$(pwd)")


@pytest.fixture(scope="module")
def ccm_cluster(cluster: Cluster) -> Cluster:
    args = plugstack_args(cluster)
    if args.get("enable_ccm") != "1" or args.get("enable_sshd") != "1":
        pytest.skip("the cluster's plugstack.conf has no enable_ccm=1 enable_sshd=1")
    return cluster


def test_salloc_ccm_tasks_run_in_a_container_of_the_host_root(ccm_cluster: Cluster) -> None:
    cluster = ccm_cluster
    directory = cluster.job_dir(USER)
    ready, done = directory / f"ccm-ready-{time.monotonic_ns()}", directory / f"ccm-done-{time.monotonic_ns()}"
    script = (f"srun -N2 --ntasks-per-node=1 sh -c '{TASK}'; echo srun-rc=$?; "
              f"echo $SLURM_JOB_ID > {ready}; "
              f"for i in $(seq 240); do [ -e {done} ] && break; sleep 0.5; done")
    argv = ["setpriv", "--reuid", USER, "--regid", USER, "--init-groups", "--",
            "salloc", "--ccm", "-N2", "--exclusive", "bash", "-c", script]
    wait_port_free(cluster)  # another job's sshd on a node would leave this job without one
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cluster.user_environ(USER), cwd=directory)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the --ccm allocation did not get ready"
            time.sleep(0.2)
        job_id = ready.read_text().strip()
        for node in cluster.nodes:
            assert sshd_listeners(cluster, node, job_id), \
                f"{node}: no sshd in the --ccm container: {sshd_log_lines(cluster, job_id)}"
    finally:
        done.touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    for node in cluster.nodes:
        assert f"marker-{node}" in out, out + err
        assert f"host-tree-{node}" in out, out + err
    assert out.count(f"cwd={directory}") == 2, out
    assert "srun-rc=0" in out, out + err
    cluster.wait_job(job_id)
    assert not [p for node in cluster.nodes for p in sshd_listeners(cluster, node, job_id)]
    assert job_id not in cluster.node_job_dirs("n1") and job_id not in cluster.node_job_dirs("n2")


def test_ccm_with_image_is_refused_at_submission(ccm_cluster: Cluster) -> None:
    result = ccm_cluster.run_as(USER, ["sbatch", "--ccm", f"--image=docker:{ccm_cluster.image('demo/busybox')}",
                                       "--wrap", "true"])
    assert result.returncode != 0
    assert "--ccm cannot be combined with --image" in result.stderr, result.stderr


def test_long_options_register_shifter_ccm(ccm_cluster: Cluster, tmp_path: Path) -> None:
    """With ``long_options`` the plugin registers --shifter.ccm (the original never did).

    ``srun --help`` loads the plugstack in srun itself, so a copy of slurm.conf that names a
    plugstack with ``long_options`` is enough: no daemon is restarted.
    """
    cluster = ccm_cluster
    slurm_conf = Path(cluster.env["SLURM_CONF"])
    plugstack = tmp_path / "plugstack.conf"
    lines = (cluster.state_dir / "slurm" / "plugstack.conf").read_text().splitlines()
    plugstack.write_text("".join(line + (" long_options" if "shifter_spank.so" in line else "") + "\n"
                                 for line in lines))
    conf = tmp_path / "slurm.conf"
    conf.write_text("".join(f"PlugStackConfig={plugstack}\n" if line.startswith("PlugStackConfig=") else line + "\n"
                            for line in slurm_conf.read_text().splitlines()))
    result = subprocess.run(["srun", "--help"], capture_output=True, text=True, timeout=60,
                            env=cluster.environ({"SLURM_CONF": str(conf)}))
    assert "--shifter.ccm" in result.stdout and "--shifter.image=" in result.stdout, result.stdout + result.stderr
    assert "\n      --ccm" not in result.stdout and "\n      --image=" not in result.stdout
