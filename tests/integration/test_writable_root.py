"""sbatch --writable on the local cluster: one writable layer per job and node, gone with the job."""

from __future__ import annotations

import pytest

from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster

USER = "shifter-u1"


def test_writes_are_shared_on_a_node_not_across_nodes_and_gone_after_the_job(cluster: Cluster) -> None:
    first, second = cluster.nodes[:2]
    image = f"docker:{cluster.image('demo/busybox')}"
    body = (
        "#!/bin/bash\n"
        f"srun -N1 -n2 -w {first} shifter sh -c 'echo task$SLURM_PROCID > /bin/stamp-$SLURM_PROCID && echo wrote'\n"
        f"srun -N1 -n1 -w {first} shifter --writable sh -c 'cat /bin/stamp-0 /bin/stamp-1'\n"
        f"srun -N1 -n1 -w {second} shifter sh -c 'ls /bin/stamp-0 2>/dev/null || echo absent-on-{second}'\n"
    )
    job_id, output = cluster.run_batch(USER, body, nodes=2, ntasks_per_node=2, image=image, writable=True)
    assert output.splitlines() == ["wrote", "wrote", "task0", "task1", f"absent-on-{second}"], output
    assert cluster.job_leftovers(job_id) == []
    # the next job on that node starts from the image; without --writable the image stays read-only
    check = (f"#!/bin/bash\nsrun -N1 -w {first} shifter sh -c "
             "'ls /bin/stamp-0 2>/dev/null || echo gone; touch /bin/x 2>/dev/null || echo read-only'\n")
    _, output = cluster.run_batch(USER, check, nodes=1, nodelist=first, image=image)
    assert output.splitlines() == ["gone", "read-only"], output


def test_writable_without_an_image_is_refused_at_submission(cluster: Cluster) -> None:
    with pytest.raises(RuntimeError, match="--writable needs --image"):
        cluster.submit_batch(USER, "#!/bin/bash\ntrue\n", nodes=1, writable=True)
