"""Time and resource bounds of a pull: one deadline shared by all its steps, and the
limits under which external tools (igzip/pigz, tar2sqfs, the examiner, unsquashfs
on an import) work on untrusted data.

Why both: a trickling registry or a tool stuck on a hostile layer would otherwise keep a
pull in flight forever while its heartbeat keeps the record alive and later pulls join it.
The deadline ends the pull with a reason naming the step; the limits make a tool that
spins, balloons or writes without end die on its own, even where nothing waits on it.
Limits are set by ``prlimit`` (util-linux) in front of the tool rather than a
``preexec_fn``, which is unsafe in the gateway's threaded process.
"""

from __future__ import annotations

import math
import time

from shifter.errors import ShifterError

TOOL_MEMORY = 8 << 30   # address space of tar2sqfs (it keeps the image's directory tree)
PIGZ_MEMORY = 1 << 30   # address space of a gzip inflater
UNSQUASHFS_MEMORY = 1 << 30  # address space of unsquashfs listing an imported file


class Deadline:
    """The moment by which a pull must be done (``PullDeadline`` seconds after it started)."""

    def __init__(self, seconds: float, started: float | None = None) -> None:
        self.seconds = seconds
        self.at = (time.monotonic() if started is None else started) + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def error(self, step: str) -> ShifterError:
        return ShifterError(f"pull deadline of {self.seconds:g} s (PullDeadline) passed while {step}")

    def check(self, step: str) -> None:
        if self.expired():
            raise self.error(step)


def limited(argv: list[str], *, cpu: float | None = None, memory: int | None = None,
            fsize: int | None = None) -> list[str]:
    """``argv`` run with RLIMIT_CPU (seconds), RLIMIT_AS and RLIMIT_FSIZE (bytes) set."""
    limits = []
    if cpu is not None:
        soft = max(1, math.ceil(cpu))
        limits.append(f"--cpu={soft}:{soft + 5}")  # SIGXCPU first: a status that says why
    if memory is not None:
        limits.append(f"--as={memory}")
    if fsize is not None:
        limits.append(f"--fsize={max(1, fsize)}")
    return ["prlimit", *limits, "--", *argv] if limits else list(argv)
