"""bin/shifter on the real cluster: what the real prolog plans is what real tasks ask for.

The plan is written by setupRoot from the prolog's SPANK_SHIFTER_* values and checked against the
SHIFTER_*/SLURM_SPANK_SHIFTER_* values srun gives each task, so only a real job shows that they
agree.  A build of bin/shifter with no Python launcher behind it (compiled here with the cluster's
udiRoot.conf) can succeed only by serving the task itself.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster.testing import Cluster
from tests.integration.test_slurm_scenarios import USER, batch_script, chown_user, site_dir

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
NO_PYTHON = "/nonexistent/shifter-python"


@pytest.fixture(scope="module")
def c_only(cluster: Cluster) -> Iterator[str]:
    path = cluster.job_dir(USER) / "shifter-c-only"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", f'-DSHIFTER_CONFIG_FILE="{cluster.udiroot_conf}"',
                    f'-DSHIFTER_PYTHON_LAUNCHER="{NO_PYTHON}"', str(REPO / "shifter/launch/fastlaunch.c"), "-o",
                    str(path)],
                   check=True)
    os.chmod(path, 0o755)
    yield str(path)
    path.unlink()


def test_every_task_of_a_job_with_volumes_is_served_without_python(cluster: Cluster, c_only: str) -> None:
    image = cluster.image("demo/busybox")
    base, inside = site_dir(cluster, "fastlaunch")
    (base / "input.txt").write_text("from the host\n")
    chown_user(base, USER)
    body = (f"srun {c_only} sh -c 'echo \"task $SLURM_PROCID on $(hostname): $SHIFTER_SITE_MODULE "
            f"$(cat /input/input.txt)\"'\n"
            f"{c_only} true && echo batch step served\n")
    job_id, output = cluster.run_batch(USER, batch_script(body, f"--image=docker:{image}", "--nodes=2",
                                                           "--ntasks-per-node=2", f"--volume={inside}:/input:ro"))
    tasks = re.findall(r"^task (\d+) on (n\d): 1 from the host$", output, re.MULTILINE)
    assert sorted(int(rank) for rank, _ in tasks) == [0, 1, 2, 3], output
    assert {node for _, node in tasks} == {"n1", "n2"}, output
    assert "batch step served" in output, output
    assert NO_PYTHON not in output


def test_a_job_with_modules_chosen_at_submission(cluster: Cluster, c_only: str) -> None:
    image = cluster.image("demo/busybox")
    body = f"srun {c_only} sh -c 'echo altmpi=$SHIFTER_ALTMPI siteinfo=${{SHIFTER_SITE_MODULE:-unset}}'\n"
    _, output = cluster.run_batch(USER, batch_script(body, f"--image=docker:{image}", "--module=altmpi"))
    assert "altmpi=1 siteinfo=unset" in output, output


def test_a_step_asking_for_something_else_is_left_to_python(cluster: Cluster, c_only: str) -> None:
    image = cluster.image("demo/busybox")
    body = f"srun {c_only} --workdir=/ true; echo status=$?\nsrun shifter --workdir=/ true && echo python served\n"
    _, output = cluster.run_batch(USER, batch_script(body, f"--image=docker:{image}"))
    assert f"shifter: cannot run {NO_PYTHON}: No such file or directory" in output, output
    assert "status=127" in output and "python served" in output, output
