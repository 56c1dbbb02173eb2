"""Where a job's environment lives on a node (docs/internals.md, "Per-job environment on a node").

Every job gets its own directory tree, so two jobs sharing a node both get the fast path and a
dead job's leftovers never block the next one.  The job id becomes a path component, so it is
validated strictly: digits only.
"""

from __future__ import annotations

from shifter.errors import ShifterError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from shifter.formats.config import UdiRootConfig

_MAX_JOBID_DIGITS = 20
ERROR_FILE = "setup.error"
PLAN_FILE = "launch.plan"


def check_jobid(text: str | None) -> str:
    """Return ``text`` if it is a usable job id (ASCII digits only), else raise ShifterError."""
    if not text:
        raise ShifterError("no job id: pass --job-id or set SLURM_JOB_ID")
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_JOBID_DIGITS:
        raise ShifterError(f"invalid job id {text!r}: digits only")
    return text


class JobEnv:
    """The paths of one job's environment on this node, or of one step's (``step``).

    A step that asks for another image, volumes or modules than its job gets an environment of
    its own, built by the SPANK plugin in slurmstepd: ``<udiMount>/<jobid>.<stepid>``, beside the
    job's and removed with it.
    """

    __slots__ = ("jobid", "step", "dir", "root", "userns", "marker", "meta", "loop_mount", "error", "plan",
                 "writable", "gpu_env", "gpu_hide")

    def __init__(self, config: UdiRootConfig, jobid: str | None, step: str | None = None) -> None:
        self.jobid = check_jobid(jobid)
        self.step = None if step is None else check_jobid(step)
        name = self.jobid if self.step is None else f"{self.jobid}.{self.step}"
        self.dir = f"{config.udi_mount.rstrip('/')}/{name}"
        self.root = f"{self.dir}/root"
        self.userns = f"{self.dir}/userns"
        self.marker = f"{self.root}/var/shifterConfig.json"
        self.meta = f"{self.dir}/image.meta"
        self.loop_mount = f"{config.loop_mount.rstrip('/')}/{name}"
        # why the prolog could not build the environment (the user's request was at fault);
        # written by the prolog hook, read by the launcher, removed with the directory
        self.error = f"{self.dir}/{ERROR_FILE}"
        # what the interpreter-free launcher needs to enter this environment (shifter/formats/launchplan.py)
        self.plan = f"{self.dir}/{PLAN_FILE}"
        # present when the root has a writable layer (--writable); the launcher's --writable checks it
        self.writable = f"{self.dir}/writable"
        # the job's GPU environment (shifter/runtime/gpu.py), for the Python launcher; what covers hidden devices
        self.gpu_env = f"{self.dir}/gpu.env"
        self.gpu_hide = f"{self.dir}/gpu-hidden"

    def __repr__(self) -> str:
        return f"JobEnv({self.dir!r})"
