"""The plugin features the local cluster turns on: sshd, memory cgroup, extern step, CCM.

Every feature is on for every job, as at a site that enables them: the in-container sshd
costs about 15 ms per node and job (docs/admin-guide.md, "The in-container sshd"), the rest
less.  They need two things only the cluster can arrange:

- a memory cgroup per node.  All slurmd of this host share one kernel, so one
  ``/sys/fs/cgroup/memory``; the ``shifter/uid_<uid>/job_<jobid>`` directory of a job would
  be the same for both of its nodes, and the first node's epilog would kill the other node's
  sshd.  Each node therefore gets ``<shifter cgroup>/node-<name>``, bound over
  ``/sys/fs/cgroup/memory`` in the node's own mount namespace, so the plugstack line is the one a
  site writes (``memory_cgroup=/sys/fs/cgroup/memory``).  Only done when the cluster created
  the ``shifter`` cgroup directory itself (cleanup.py removes it at ``down``).
- the ``extern_setup=`` script: it appends one line per job and node to
  ``<state>/log/extern-setup.log``, which the tests read.
- a node whose mounts are shared, as systemd makes them: n2's mount namespace is made
  ``rshared`` and a peer namespace (a stand-in for a PrivateTmp service) runs beside its slurmd,
  its pid in ``<state>/peer-n2.pid``; n1 stays private.
"""

from __future__ import annotations

from pathlib import Path

from .cleanup import MEMORY_CGROUP, cgroup_marker
from .render import write_file
from .settings import Settings

MEMORY_HIERARCHY = Path("/sys/fs/cgroup/memory")

_EXTERN_SETUP = """#!/bin/sh
# plugstack.conf extern_setup= of the local test cluster: run as root in each job's extern step.
echo "job=$SLURM_JOB_ID uid=$SLURM_JOB_UID user=$SLURM_JOB_USER node=$(hostname) root=$SHIFTER_ROOT" \\
    >> {log}
"""


SHARED_ROOT_NODE = "n2"


def peer_pidfile(settings: Settings, node: str) -> Path:
    return settings.state_dir / f"peer-{node}.pid"


def udi_image(settings: Settings) -> Path:
    return settings.prefix / "libexec" / "shifter" / "opt" / "udiImage"


def node_memory_cgroup(settings: Settings, node: str) -> Path | None:
    """The node's own memory cgroup (host path), when the cluster owns the shifter cgroup dir."""
    if not cgroup_marker(settings).exists():
        return None
    return MEMORY_CGROUP / f"node-{node}"


def extern_setup_script(settings: Settings) -> Path:
    return settings.state_dir / "extern-setup.sh"


def extern_setup_log(settings: Settings) -> Path:
    return settings.log_dir / "extern-setup.log"


def plugstack_args(settings: Settings) -> list[str]:
    """The plugin arguments of the cluster's plugstack.conf (writes the extern_setup script)."""
    script = extern_setup_script(settings)
    write_file(script, _EXTERN_SETUP.format(log=extern_setup_log(settings)), mode=0o755)
    args = ["extern_cgroup=1", f"extern_setup={script}", "enable_ccm=1"]
    if (udi_image(settings) / "sbin" / "sshd").exists():  # `make udiimage`; without it no job could start
        args.insert(0, "enable_sshd=1")
    if cgroup_marker(settings).exists():
        args.append(f"memory_cgroup={MEMORY_HIERARCHY}")
    return args
