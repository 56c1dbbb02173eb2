"""The launch plan: what setupRoot decides once so that ``shifter`` needs no interpreter per task.

The installed ``shifter`` is a small C program (``shifter/launch/fastlaunch.c``) in front of the
Python launcher.  For the one case that runs on every task - no options, the job's own image,
volumes and modules, an environment prepared on this node - it reads this plan, checks that it
describes the request, and enters the environment itself; for anything else, or anything it
does not recognise, it execs the Python launcher, which decides as always.  No policy lives in
C: every value here is computed by the Python code the launcher would run.

The file is ``<udiMount>/<jobid>/launch.plan`` (``JobEnv.plan``), written after the reuse marker and removed first
at teardown.  It is a sequence of NUL-terminated records, each a tag character and a payload:

    shifter-launch-plan/1     format version (first record)
    c<dev>:<ino>:<size>:<mtime_ns>
                              the udiRoot.conf setupRoot read; another file or a changed one
                              means the plan no longer describes what the launcher would do
    u<uid>                    the job's user
    i<image id>               the request it serves: SHIFTER_IMAGETYPE must be ``id``,
    v<volume request>         SHIFTER_IMAGE, SHIFTER_VOLUME and SHIFTER_MODULE (or their
    m<module request>         SLURM_SPANK_SHIFTER_ twins; empty means unset) exactly these
    w<workdir>                the image's WORKDIR (may be empty)
    =NAME=VALUE  +NAME=VALUE  ^NAME=VALUE  -NAME  %NAME=IDS
                              the image's and the site's environment changes, in order
                              (shifter/formats/environment.py); ``%`` renumbers the task's GPU
                              indices to their places in IDS (shifter/runtime/gpu.py)

No plan is written when an active module has a userhook: that path stays in Python.
"""

from __future__ import annotations

import os

from shifter.formats.environment import image_operations, site_operations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from shifter.formats.config import UdiRootConfig
    from shifter.formats.meta import ImageMeta

VERSION = "shifter-launch-plan/1"


def config_identity(info: os.stat_result) -> str:
    return f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"


def plan_records(config_info: os.stat_result, uid: int, identifier: str, volumes: str, modules_request: str,
                 meta: ImageMeta, modules: list, config: UdiRootConfig,
                 gpu_ops: list[tuple[str, str, str]] | None = None) -> list[str]:
    """``gpu_ops`` (shifter/runtime/gpu.py) come last; with a GPU recipe the image's device-selection
    variables are dropped, so an image never changes which GPUs a task uses."""
    records = [VERSION, "c" + config_identity(config_info), f"u{uid}", "i" + identifier, "v" + volumes,
               "m" + modules_request, "w" + (meta.workdir or "")]
    ops = image_operations(image_env(meta.env, config)) + site_operations(modules, config) + (gpu_ops or [])
    records += encode_operations(ops)
    return records


def image_env(env: list[str], config: UdiRootConfig) -> list[str]:
    """The image's ENV without the variables only the GPU allocation decides (when GPUs are configured)."""
    if not getattr(config, "gpu_recipe", None):
        return env
    from shifter.formats.gpurecipe import ALLOCATION_VARIABLES

    return [item for item in env if item.partition("=")[0] not in ALLOCATION_VARIABLES]


def encode_operations(ops: list[tuple[str, str, str]]) -> list[str]:
    return [f"-{name}" if kind == "-" else f"{kind}{name}={value}" for kind, name, value in ops]


def decode_operations(data: bytes) -> list[tuple[str, str, str]]:
    """The inverse of :func:`encode_operations` over NUL-terminated records (the Python launcher's view)."""
    ops = []
    for raw in data.split(b"\0"):
        record = raw.decode("utf-8", "surrogateescape")
        if not record or record[0] not in "=+^-%":
            continue
        if record[0] == "-":
            ops.append(("-", record[1:], ""))
        else:
            name, _, value = record[1:].partition("=")
            ops.append((record[0], name, value))
    return ops


def write_plan(path: str, records: list[str]) -> None:
    """Written whole under a temporary name and renamed, so a task never reads half a plan."""
    if any("\0" in record for record in records):
        raise ValueError("a launch plan record contains NUL")
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(b"".join(record.encode("utf-8", "surrogateescape") + b"\0" for record in records))
    os.rename(tmp, path)
