"""A handle on the running local cluster for tests and benchmarks.

It reads the cluster's ``cluster.env`` (what ``make cluster-env`` prints) and offers the
operations integration tests repeat: run a command as a test user, submit a batch job and
wait for it (including its epilog), read its output, look at a node's mount table, and find
loop devices.  Everything goes through the real tools (sbatch, scontrol, setpriv, nsenter).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cleanup import loop_devices_under as _loop_devices_under
from .procs import PidRegistry
from .settings import DEFAULT_STATE_DIR, Settings

ACTIVE_JOB_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                     "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "REQUEUE_HOLD", "REQUEUE_FED"}


class ClusterNotUp(RuntimeError):
    """The local cluster is not running (no cluster.env in its state dir)."""


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str
    options: str


def read_env_file(path: Path) -> dict[str, str]:
    """The values of ``export KEY=VALUE`` lines, with $PATH expanded from our environment."""
    values = {}
    for line in path.read_text().splitlines():
        if not line.startswith("export "):
            continue
        key, _, raw = line[len("export "):].partition("=")
        words = shlex.split(raw)
        values[key] = os.path.expandvars("".join(words))
    return values


def loop_devices_under(path: Path | str) -> list[str]:
    """Attached loop devices (/dev/loopN) whose backing file is below `path`."""
    return _loop_devices_under(Path(path))


@dataclass
class Cluster:
    """The running local cluster, as described by its cluster.env."""

    env: dict[str, str]
    outputs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def from_state_dir(cls, state_dir: Path | str | None = None) -> Cluster:
        state = Path(state_dir or os.environ.get("SHIFTER_CLUSTER_STATE", DEFAULT_STATE_DIR))
        env_file = state / "cluster.env"
        if not env_file.exists():
            raise ClusterNotUp(f"the local cluster is not up (no {env_file}); run `make cluster-up`")
        return cls(read_env_file(env_file))

    # --- what the cluster is -------------------------------------------------------
    @property
    def nodes(self) -> list[str]:
        return self.env["SHIFTER_NODES"].split()

    @property
    def images(self) -> list[str]:
        return self.env["SHIFTER_TEST_IMAGES"].split()

    def image(self, repo: str) -> str:
        """The registry reference of one test image, by repository (e.g. "demo/busybox")."""
        for ref in self.images:
            if ref.split("/", 1)[1].rsplit(":", 1)[0] == repo:
                return ref
        raise KeyError(f"no test image {repo} in SHIFTER_TEST_IMAGES={self.env['SHIFTER_TEST_IMAGES']}")

    @property
    def state_dir(self) -> Path:
        return Path(self.env["SHIFTER_CLUSTER_STATE"])

    @property
    def prefix(self) -> Path:
        return Path(self.env["SHIFTER_PREFIX"])

    @property
    def gateway(self) -> str:
        """The first gateway's URL: enough for a test that talks to one gateway."""
        return self.env["SHIFTER_GATEWAY"]

    @property
    def gateways(self) -> list[str]:
        """Every gateway's URL, in the order udiRoot.conf's imageGateway lists them."""
        return self.env.get("SHIFTER_GATEWAYS", self.gateway).split()

    @property
    def registry(self) -> str:
        return self.env["SHIFTER_REGISTRY"]

    @property
    def udiroot_conf(self) -> Path:
        return Path(self.env["SHIFTER_UDIROOT_CONF"])

    def environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Our environment plus the cluster's (SLURM_CONF, PATH with the installed tools first...)."""
        return {**os.environ, **self.env, **(extra or {})}

    # --- running things --------------------------------------------------------------
    def run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a command as root on the host with the cluster's environment."""
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.environ())

    def user_environ(self, user: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A clean login-like environment for `user` with the cluster's variables."""
        entry = pwd.getpwnam(user)
        base = {"HOME": entry.pw_dir, "USER": user, "LOGNAME": user, "SHELL": entry.pw_shell,
                "LANG": "C.UTF-8", "PATH": f"{self.prefix / 'bin'}:/usr/local/bin:/usr/bin:/bin"}
        cluster = {k: v for k, v in self.env.items() if k != "PATH"}
        return {**base, **cluster, **(extra or {})}

    def run_as(self, user: str, argv: list[str], env: dict[str, str] | None = None, timeout: float = 120,
               cwd: str | Path | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` as `user` (real uid, gid and groups; no setuid helper), capturing output."""
        entry = pwd.getpwnam(user)
        command = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--",
                   *argv]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, input=input,
                              env=self.user_environ(user, env), cwd=str(cwd or entry.pw_dir))

    def job_dir(self, user: str) -> Path:
        """A directory the user owns for job scripts and outputs (on the shared file system)."""
        entry = pwd.getpwnam(user)
        path = Path(entry.pw_dir) / "shifter-tests"
        path.mkdir(mode=0o700, exist_ok=True)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        return path

    def submit_batch(self, user: str, script_text: str, **sbatch_opts: object) -> str:
        """sbatch `script_text` as `user`; options as keywords (nodes=2 -> --nodes=2). Returns the job id.

        Raises RuntimeError with sbatch's message when the submission is refused.
        """
        directory = self.job_dir(user)
        entry = pwd.getpwnam(user)
        script = directory / f"job-{time.monotonic_ns()}.sh"
        script.write_text(script_text)
        os.chown(script, entry.pw_uid, entry.pw_gid)
        options = [f"--output={directory}/slurm-%j.out"]
        for key, value in sbatch_opts.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                options.append(flag)
            elif value not in (None, False):
                options.append(f"{flag}={value}")
        result = self.run_as(user, ["sbatch", "--parsable", *options, str(script)], cwd=directory)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
        job_id = result.stdout.strip().split(";")[0]
        self.outputs[job_id] = directory / f"slurm-{job_id}.out"
        return job_id

    def job_fields(self, job_id: str) -> dict[str, str]:
        result = self.run(["scontrol", "-o", "show", "job", job_id], timeout=30)
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def wait_job(self, job_id: str, timeout: float = 180) -> str:
        """Wait until the job has ended and its epilog has run on every node; returns its state."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_fields(job_id).get("JobState", "UNKNOWN")
            if state not in ACTIVE_JOB_STATES:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s")
            time.sleep(0.2)

    def job_output(self, job_id: str) -> str:
        path = self.outputs.get(job_id) or Path(self.job_fields(job_id).get("StdOut", ""))
        return path.read_text(errors="replace") if path.is_file() else ""

    def run_batch(self, user: str, script_text: str, timeout: float = 240,
                  **sbatch_opts: object) -> tuple[str, str]:
        """Submit, wait for the job and its epilog: (job id, output). Fails unless it COMPLETED."""
        job_id = self.submit_batch(user, script_text, **sbatch_opts)
        state = self.wait_job(job_id, timeout=timeout)
        output = self.job_output(job_id)
        assert state == "COMPLETED", f"job {job_id} ended {state}:\n{output}"
        return job_id, output

    # --- inside the nodes -----------------------------------------------------------
    def node_pids(self) -> dict[str, int]:
        """The slurmd pid of every node (its namespaces are the node's)."""
        registry = PidRegistry(self.state_dir / "pids")
        pids = {node: registry.pid(f"slurmd-{node}") for node in self.nodes}
        missing = [node for node, pid in pids.items() if pid is None]
        if missing:
            raise RuntimeError(f"slurmd of {' '.join(missing)} is not running")
        return {node: pid for node, pid in pids.items() if pid is not None}

    def node_mounts(self, node: str) -> list[Mount]:
        """The node's mount table (that of its slurmd's mount namespace)."""
        text = Path(f"/proc/{self.node_pids()[node]}/mounts").read_text()
        mounts = []
        for line in text.splitlines():
            source, target, fstype, options = line.split()[:4]
            mounts.append(Mount(source, target.replace("\\040", " "), fstype, options))
        return mounts

    def node_exec(self, node: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command as root in the node's network, mount and UTS namespaces."""
        pid = self.node_pids()[node]
        return self.run(["nsenter", f"--target={pid}", "--net", "--mount", "--uts", "--", *argv],
                        timeout=timeout)

    def node_job_dirs(self, node: str) -> list[str]:
        """Job ids (and ``<job>.<step>`` of step images) with an environment directory under the node's
        udiMount or loopMount."""
        root = f"/proc/{self.node_pids()[node]}/root"
        found: set[str] = set()
        for base in (self.config_value("udiMount"), self.config_value("loopMount")):
            try:
                found.update(name for name in os.listdir(root + base)
                             if name.replace(".", "", 1).isdigit() and not name.startswith("."))
            except FileNotFoundError:
                pass
        return sorted(found)

    def node_state(self, node: str) -> tuple[str, str]:
        """(state, reason) of a node as the controller sees it, e.g. ("DRAIN", "shifter: ...")."""
        fields = self.run(["scontrol", "-o", "show", "node", node], timeout=30).stdout
        state = re.search(r"\bState=(\S+)", fields)
        reason = re.search(r"\bReason=(.*?)(?: \w+=|$)", fields)
        return (state.group(1) if state else "UNKNOWN", reason.group(1).strip() if reason else "")

    def resume_node(self, node: str) -> None:
        self.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], timeout=30)

    # --- the runtime's view -----------------------------------------------------------
    def config_value(self, key: str) -> str:
        """A value of the cluster's udiRoot.conf (e.g. "imagePath")."""
        for line in self.udiroot_conf.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and name.strip() == key:
                return value.strip()
        raise KeyError(f"{key} missing from {self.udiroot_conf}")

    def job_leftovers(self, job_id: str) -> list[str]:
        """Everything of the job still present on any node: mounts, loop devices, directories, processes."""
        found = []
        for node in self.nodes:
            for mount in self.node_mounts(node):
                if re.search(rf"/{job_id}(\.\d+)?(/|$)", mount.target):
                    found.append(f"{node}: mount {mount.target} ({mount.fstype})")
            for name in self.node_job_dirs(node):
                if name.split(".")[0] == job_id:
                    found.append(f"{node}: directory {name} of job {job_id} under udiMount or loopMount")
        found += [f"loop device {dev}" for dev in loop_devices_under(self.config_value("imagePath"))
                  if self._loop_device_job(dev) in (job_id, None)]
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            if f"SLURM_JOB_ID={job_id}\0".encode() in environ:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"process {proc.name}: {cmd.strip()}")
        return found

    def _loop_device_job(self, device: str) -> str | None:
        """The job whose loopMount holds `device` on some node (None when no node mounts it)."""
        loop_mount = self.config_value("loopMount").rstrip("/") + "/"
        for node in self.nodes:
            for mount in self.node_mounts(node):
                if mount.source == device and mount.target.startswith(loop_mount):
                    return mount.target[len(loop_mount):].split("/", 1)[0].split(".")[0]
        return None

    # --- daemons (for tests of failures) ----------------------------------------------
    @property
    def settings(self) -> Settings:
        settings = Settings.load(self.state_dir)
        if settings is None:
            raise ClusterNotUp(f"no cluster.json in {self.state_dir}")
        return settings

    def stop_gateway(self, index: int | None = None) -> None:
        """Stop gateway ``index`` (0-based; every one with None) by its recorded pid
        (start it again with start_gateway)."""
        settings = self.settings
        pids = PidRegistry(self.state_dir / "pids")
        for i in range(settings.gateways) if index is None else [index]:
            pids.stop(settings.gateway_name(i))

    def start_gateway(self, index: int | None = None) -> None:
        """Start gateway ``index`` (every one with None) with the cluster's own code unless it
        runs; returns once it answers."""
        from . import gatewaysvc

        gatewaysvc.start(self.settings, PidRegistry(self.state_dir / "pids"), index)

    def gateway_pid(self, index: int) -> int:
        """The pid of gateway ``index`` (0-based), e.g. to freeze it with SIGSTOP."""
        settings = self.settings
        pid = PidRegistry(self.state_dir / "pids").pid(settings.gateway_name(index))
        if pid is None:
            raise RuntimeError(f"{settings.gateway_name(index)} is not running")
        return pid

    def gateway_access_log(self, index: int) -> Path:
        """Where gateway ``index`` writes its access log (its imagemanager.json's AccessLog)."""
        config = json.loads(self.settings.imagemanager_json_of(index).read_text())
        return Path(config["AccessLog"])

    def crash_node(self, node: str, job_id: str | None = None) -> dict[str, int]:
        """kill -9 the node's slurmd (and, with `job_id`, every process of that job on the node).

        The node's mount table survives, as on a real node: the returned descriptors hold its
        mount, UTS and IPC namespaces for restart_node (which closes them).
        """
        pid = self.node_pids()[node]
        held = {kind: os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY) for kind in ("mnt", "uts", "ipc")}
        victims = self.job_pids_on_node(node, job_id) if job_id is not None else []
        os.kill(pid, 9)
        for victim in victims:
            try:
                os.kill(victim, 9)
            except ProcessLookupError:
                pass
        registry = PidRegistry(self.state_dir / "pids")
        deadline = time.monotonic() + 10
        while registry.pid(f"slurmd-{node}") is not None:  # gone (or a zombie) before anyone restarts it
            if time.monotonic() > deadline:
                raise RuntimeError(f"slurmd of {node} (pid {pid}) survived SIGKILL")
            time.sleep(0.02)
        return held

    def job_pids_on_node(self, node: str, job_id: str) -> list[int]:
        """The job's processes on the node: its slurmstepds, their descendants (the extern step's
        sleep has no SLURM_JOB_ID) and anything else with its SLURM_JOB_ID."""
        net = os.stat(f"/proc/{self.node_pids()[node]}/ns/net").st_ino
        found: set[int] = set()
        parents: dict[int, int] = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if os.stat(proc / "ns" / "net").st_ino != net:
                    continue
                cmdline = (proc / "cmdline").read_bytes()
                environ = (proc / "environ").read_bytes()
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if cmdline.startswith(f"slurmstepd: [{job_id}.".encode()) or f"SLURM_JOB_ID={job_id}\0".encode() in environ:
                found.add(int(proc.name))
        grown = True
        while grown:
            more = {pid for pid, parent in parents.items() if parent in found} - found
            found |= more
            grown = bool(more)
        return sorted(found)

    def restart_node(self, node: str, held: dict[str, int] | None = None, timeout: float = 90) -> None:
        """Start the node's slurmd again with the cluster's code, in its old namespaces when `held`."""
        from . import slurm

        rejoin = {kind: f"/proc/{os.getpid()}/fd/{fd}" for kind, fd in held.items()} if held else None
        started_before = self._slurmd_start_time(node)
        try:
            proc = slurm.start_node(self.settings, PidRegistry(self.state_dir / "pids"), node, rejoin=rejoin)
            if proc is None and held:
                raise RuntimeError(f"slurmd of {node} is still running: it was not restarted in its namespaces")
            deadline = time.monotonic() + timeout
            while (self._slurmd_start_time(node) == started_before  # the new slurmd has registered
                   or self.node_state(node)[0].split("+")[0] not in ("IDLE", "MIXED", "ALLOCATED", "COMPLETING")):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"slurmd of {node} exited with status {proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{node} not back after {timeout:.0f} s: {self.node_state(node)}")
                time.sleep(0.3)
        finally:  # nsenter opens the namespaces through our descriptors: keep them until slurmd runs
            for fd in (held or {}).values():
                os.close(fd)

    def _slurmd_start_time(self, node: str) -> str:
        fields = self.run(["scontrol", "-o", "show", "node", node], timeout=30).stdout
        found = re.search(r"\bSlurmdStartTime=(\S+)", fields)
        return found.group(1) if found else ""
