"""A step image's GPUs: the job's allocation on this node, read from ``scontrol show job -d``."""

from __future__ import annotations

import pytest

from shifter.errors import ShifterError
from spank_plugin.stephooks import job_gpus_on_node

SHOW_JOB = """JobId=42 JobName=x
   NumNodes=3 NumCPUs=3 NumTasks=3 CPUs/Task=1 ReqB:S:C:T=0:0:*:*
   JOB_GRES=gpu:4
     Nodes=n[1-2] CPU_IDs=0 Mem=0 GRES=gpu:1(IDX:1)
     Nodes=gpu07 CPU_IDs=0-1 Mem=0 GRES=gpu:tesla:2(IDX:0,2),gpu:a100:1(IDX:5-6),mps:100(0/100,0/100)
     Nodes=n9 CPU_IDs=0 Mem=0 GRES=
   MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0
"""


def test_each_node_gets_its_own_line() -> None:
    assert job_gpus_on_node(SHOW_JOB, "n1") == "1"
    assert job_gpus_on_node(SHOW_JOB, "n2") == "1"
    assert job_gpus_on_node(SHOW_JOB, "gpu07") == "0,2,5,6"  # every typed gpu entry, not the mps one


def test_a_node_without_gpus_or_outside_the_job_gets_none() -> None:
    assert job_gpus_on_node(SHOW_JOB, "n9") == ""
    assert job_gpus_on_node(SHOW_JOB, "n3") == ""
    assert job_gpus_on_node("JobId=43 JobName=y\n     Nodes=n1 CPU_IDs=0 Mem=0 GRES=\n", "n1") == ""


def test_a_bad_index_list_is_refused() -> None:
    with pytest.raises(ShifterError, match="invalid GPU range"):
        job_gpus_on_node("     Nodes=n1 CPU_IDs=0 Mem=0 GRES=gpu:1(IDX:3-1)\n", "n1")
