"""Each conversion in a process of its own: ``pipeline.build_image`` off the API's interpreter.

Download, flatten and the feed of tar2sqfs are CPU-heavy Python; run as threads of the
API process they held its GIL and every lookup waited for them. Here each build runs in
a fresh interpreter (``python -m gateway.buildproc``, started with fork+exec by
subprocess, never a bare fork() of the threaded gateway) that inherits the worker
thread's lower CPU priority (gateway.context.PULL_NICENESS) and drops to SCHED_IDLE. The tools' prlimits and
the pull deadline are the pipeline's own, in the child; the parent adds:

* a watchdog: a child still running ``KILL_GRACE_SECONDS`` after the pull deadline is
  killed (a build stuck where the pipeline cannot check its deadline);
* stop: ``Builds.stop`` kills every child (its process group: the tools too); the pull is
  left in flight for recovery, as a gateway stop always did. A child also dies with the
  gateway (PR_SET_PDEATHSIG), so a killed gateway leaves no conversion running;
* a child that dies otherwise (OOM killer, a signal) fails its pull with
  ``the conversion process was killed by SIGKILL``; its squashfs goes with the job's
  scratch directory and its partial blob downloads are removed when nobody has them open.

Protocol: the parent writes one JSON document (the PullSpec and the ResolvedImage,
registry credentials included: a pipe, never argv or the environment) to the child's
stdin; the child writes JSON lines to its stdout: ``{"progress": [phase, info]}``, then
one ``{"built": path, "private": bool}`` or ``{"error": message}``. Its stderr (logging,
tracebacks) goes to a file in the job's scratch directory and into the gateway's log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import IO, Any

from gateway import pipeline
from shifter.errors import ShifterError
from shifter.runtime.linux import die_with_parent

log = logging.getLogger("gateway.buildproc")

KILL_GRACE_SECONDS = 30.0  # past the pull deadline before the watchdog kills a child
PROGRESS_SECONDS = 0.2  # a child reports counters within one phase at most this often
MAX_LINE = 1 << 20  # a protocol line longer than this is a broken child
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pipeline.__file__)))


class Cancelled(Exception):
    """The gateway is stopping: the build was ended, the pull is left for recovery."""


class Builds:
    """The conversion processes of this gateway, so that ``stop`` can end every one of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._stopping = False

    def stop(self) -> None:
        """Kill every running conversion (and its tools); later builds are refused."""
        with self._lock:
            self._stopping = True
            procs = list(self._procs)
        for proc in procs:
            _kill_group(proc)

    def build(self, spec: pipeline.PullSpec, resolved: pipeline.ResolvedImage,
              progress: Callable[[str, dict], None]) -> pipeline.BuiltImage:
        """``pipeline.build_image(spec, resolved, progress)`` in a child process."""
        os.makedirs(spec.expand_dir, exist_ok=True)
        errlog = os.path.join(spec.expand_dir, ".build.log")
        job = json.dumps({"spec": dataclasses.asdict(spec), "resolved": dataclasses.asdict(resolved)}).encode()
        with open(errlog, "wb") as err, self._lock:
            if self._stopping:
                raise Cancelled()
            proc = subprocess.Popen(
                [sys.executable, *_isolation(), "-m", "gateway.buildproc", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, close_fds=True,
                cwd="/", start_new_session=True, env=_child_env(),
            )
            self._procs.add(proc)
        watchdog = threading.Timer(spec.deadline.remaining() + KILL_GRACE_SECONDS, _kill_group, (proc,))
        watchdog.daemon = True
        watchdog.start()
        result: dict[str, Any] = {}
        try:
            assert proc.stdin is not None and proc.stdout is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(job)
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            result = _read_replies(proc.stdout, progress)
            proc.stdout.close()
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:  # the parent gave up on it (its progress could not be written)
                _kill_group(proc)
                proc.wait()
            with self._lock:
                self._procs.discard(proc)
                stopping = self._stopping
            _forward_log(errlog)
            if "built" not in result or proc.returncode != 0:
                _remove_partials(spec, resolved)
        if "built" in result and proc.returncode == 0:
            return _built(spec, resolved, result)
        if stopping:
            raise Cancelled()
        if "error" in result:
            raise ShifterError(str(result["error"]))
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            if spec.deadline.expired():
                raise spec.deadline.error(f"converting (the conversion process did not stop: {name})")
            raise ShifterError(f"the conversion process was killed by {name}; try again")
        raise ShifterError(f"the conversion process exited with status {proc.returncode}: {_last_line(errlog)}")


def _isolation() -> list[str]:
    """``-I`` when the gateway itself runs isolated (the installed ``shifter-gateway``): the child
    then ignores PYTHON* variables and the user's site too, and finds the package where the
    gateway's interpreter does."""
    return ["-I"] if sys.flags.isolated else []


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group (its own session: the child and the tools it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _read_replies(stdout: IO[bytes], progress: Callable[[str, dict], None]) -> dict[str, Any]:
    """Pass progress lines on; the last line that is a result is the answer ({} if none came)."""
    result: dict[str, Any] = {}
    while line := stdout.readline(MAX_LINE):
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if not isinstance(msg, dict):
            continue
        if isinstance(msg.get("progress"), list) and len(msg["progress"]) == 2:
            phase, info = msg["progress"]
            if isinstance(phase, str) and isinstance(info, dict):
                progress(phase, info)
        elif "built" in msg or "error" in msg:
            result = msg
    return result


def _built(spec: pipeline.PullSpec, resolved: pipeline.ResolvedImage, result: dict[str, Any]) -> pipeline.BuiltImage:
    """The child's squashfs, if it is a file of the job's scratch directory (never a path it merely names)."""
    path = str(result["built"])
    scratch = os.path.realpath(spec.expand_dir)
    if os.path.dirname(os.path.realpath(path)) != scratch or not os.path.isfile(path) or os.path.islink(path):
        raise ShifterError("the conversion process named no squashfs of its scratch directory")
    if result.get("private") is True:  # a blob needed the credentials
        resolved.private = True
    return pipeline.BuiltImage(path, pipeline.image_meta(resolved.config))


def _remove_partials(spec: pipeline.PullSpec, resolved: pipeline.ResolvedImage) -> None:
    """Partial downloads of this image's layers that no process has open: a dead child's leftovers.

    A write lease is granted only while no other descriptor of the file is open, so a
    download still running (another pull of a shared layer) keeps its file.
    """
    directory = os.path.join(spec.cache_dir, "blobs", "sha256")
    for layer in resolved.layers:
        digest = str(layer.get("digest", "")) if isinstance(layer, dict) else ""
        hexdigest = digest.removeprefix("sha256:")
        if len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
            continue
        for path in glob.glob(os.path.join(glob.escape(directory), f".{hexdigest}.partial-*")):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EBUSY, errno.EINVAL):
                    log.warning("partial download %s kept: %s", path, err.strerror)
                os.close(fd)
                continue
            with contextlib.suppress(OSError):
                os.unlink(path)
                log.warning("removed the partial download %s of a conversion process that died",
                            os.path.basename(path))
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            os.close(fd)


def _forward_log(path: str) -> None:
    """The child's stderr into the gateway's log (bounded)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(64 << 10).decode("utf-8", "replace")
    except OSError:
        return
    for line in text.splitlines()[-50:]:
        if line.strip():
            log.warning("conversion: %s", line)


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            lines = fh.read(64 << 10).decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return "no output"
    return lines[-1][:300] if lines else "no output"


# -- the child --------------------------------------------------------------------------------


def _spec(doc: dict[str, Any]) -> pipeline.PullSpec:
    doc = dict(doc)
    doc["location"] = pipeline.Location(**doc["location"])
    doc["platform"] = tuple(doc["platform"])
    if doc.get("credentials") is not None:
        doc["credentials"] = tuple(doc["credentials"])
    return pipeline.PullSpec(**doc)


def _run_when_idle() -> None:
    """Take only CPU time that nothing else on the host wants: the conversion and all its tools.

    The thread that started us already gave us a higher nice value; ``SCHED_IDLE`` goes further
    (10 nice levels still left a pull about a tenth of a busy core, which showed as lookup
    latency: P5's p99 under a pull, docs/performance.md).  Safe here and not in the gateway's own
    threads: this process shares no lock with the lookups.
    """
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def main() -> int:
    die_with_parent(int(sys.argv[1]), signal.SIGKILL)  # a killed gateway leaves no conversion
    _run_when_idle()
    # the protocol gets its own descriptor; fd 1 becomes stderr, so no tool can write into it
    replies = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    last = {"time": 0.0, "phase": ""}

    def send(doc: dict[str, Any]) -> None:
        replies.write(json.dumps(doc, separators=(",", ":")) + "\n")

    def report(phase: str, info: dict) -> None:
        now = time.monotonic()
        if phase == last["phase"] and now - float(last["time"]) < PROGRESS_SECONDS:
            return
        last["time"], last["phase"] = now, phase
        send({"progress": [phase, {k: v for k, v in info.items() if isinstance(v, int | float | str)}]})

    try:
        job = json.loads(sys.stdin.buffer.read())
        resolved = pipeline.ResolvedImage(**job["resolved"])
        built = pipeline.build_image(_spec(job["spec"]), resolved, report)
        send({"built": built.squashfs_path, "private": bool(resolved.private)})
    except ShifterError as err:
        send({"error": str(err)})
    except Exception as err:
        traceback.print_exc()
        send({"error": f"internal error: {type(err).__name__}: {err}"})
    replies.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
