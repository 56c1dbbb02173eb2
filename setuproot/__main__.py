"""setupRoot: build a job's container environment on this node (run as root by the prolog).

Accepts the original's argv, ``-U uid -G gid -u user [-s pubkey] -N "host/n ..." [-v volmap]...
[-m modules] [-V] <type> <image>``, plus ``--config PATH`` and ``--job-id ID`` (else
SLURM_JOB_ID).  Every failure undoes what was done and prints one line on stderr.

Exit status (the prolog hook acts on it, see docs/admin-guide.md "Failure policy"):
0 built; 1 the request cannot be served (image missing or private, a volume the user cannot
read, an unknown module, hostile image metadata, an unexpected error while working from the
request...): the job fails, the node stays up; 2 the node is at fault, as named by a NodeError
(no loop device, udiMount or the udiRoot.conf failing, a cleanup that left something behind):
the prolog fails and Slurm drains the node.
"""

from __future__ import annotations

import os
import sys

from setuproot.args import parse_args
from setuproot.build import describe, setup_job
from shifter.cmdline import exit_fast
from shifter.errors import NODE_FAILED, REQUEST_FAILED, NodeError

PROG = "setupRoot"


def main(argv: list[str] | None = None) -> int:
    inherited_jobid = os.environ.get("SLURM_JOB_ID")
    os.environ.clear()
    os.environ["PATH"] = "/usr/bin:/usr/sbin:/bin:/sbin"
    try:
        request = parse_args(sys.argv[1:] if argv is None else argv, inherited_jobid)
        setup_job(request)
    except NodeError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return NODE_FAILED
    except Exception as err:  # noqa: BLE001 - one line, never a traceback; only a NodeError drains
        print(f"{PROG}: {describe(err)}", file=sys.stderr)
        return REQUEST_FAILED
    return 0


if __name__ == "__main__":
    exit_fast(main)
