"""Issue 5's user scenarios, end to end on the local cluster, as real users would run them.

Each test drives real sbatch/salloc/srun as ``shifter-u1`` (and ``shifter-u2`` where a second
user matters) and checks what the user sees: the job's output, its state, files on the host,
what is left on the nodes.  Scenario numbers are the issue's.  The failure-policy tests check
that a bad request fails only the job while a broken node is drained with a readable reason.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster

USER = "shifter-u1"
OTHER_USER = "shifter-u2"
BUSYBOX_NAME = 'NAME="Shifter Demo BusyBox"'


def batch_script(body: str, *sbatch_lines: str, shebang: str = "#!/bin/bash") -> str:
    return "\n".join([shebang, *(f"#SBATCH {line}" for line in sbatch_lines), body, ""])


def site_dir(cluster: Cluster, name: str) -> tuple[Path, str]:
    """A fresh directory on the site file system: (host path, path inside containers)."""
    host, _, inside = cluster.config_value("siteFs").split(";")[0].partition(":")
    unique = f"{name}-{uuid.uuid4().hex[:8]}"
    path = Path(host) / unique
    path.mkdir(mode=0o755)
    return path, f"{inside.rstrip('/')}/{unique}"


def chown_user(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def wait_until(what: str, condition, timeout: float = 60, interval: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def node_is_up(cluster: Cluster, node: str) -> bool:
    state, _ = cluster.node_state(node)
    return "DRAIN" not in state and "DOWN" not in state


@contextmanager
def fuse_for_users() -> Iterator[None]:
    """/dev/fuse usable by users (0600 on these machines) for the launcher's fresh path; restored after."""
    original = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", original)


# ------------------------------------------------------------------ 1. tasks on 2 nodes


def test_1_every_task_of_a_two_node_job_runs_in_the_image(cluster: Cluster) -> None:
    image = cluster.image("demo/busybox")
    body = "srun shifter sh -c 'echo \"task $SLURM_PROCID on $(hostname): $(grep ^NAME= /etc/os-release)\"'"
    job_id, output = cluster.run_batch(USER, batch_script(body, f"--image=docker:{image}", "--nodes=2",
                                                           "--ntasks-per-node=2"))
    tasks = re.findall(r"^task (\d+) on (\S+): (.*)$", output, re.MULTILINE)
    assert sorted(int(rank) for rank, _, _ in tasks) == [0, 1, 2, 3], output
    assert Counter(node for _, node, _ in tasks) == {"n1": 2, "n2": 2}, output
    assert {name for _, _, name in tasks} == {BUSYBOX_NAME}, output
    assert cluster.job_leftovers(job_id) == []


# ------------------------------------------------------------------ 2. volumes


def test_2_volumes_read_only_input_and_writable_output(cluster: Cluster) -> None:
    image = cluster.image("demo/busybox")
    base, inside = site_dir(cluster, "scenario2")
    try:
        chown_user(base, USER)
        (base / "input").mkdir()
        (base / "input" / "data.txt").write_text("input for the job\n")
        (base / "output").mkdir()
        for path in (base / "input", base / "input" / "data.txt", base / "output"):
            chown_user(path, USER)
        body = ("srun shifter sh -c 'cat /input/data.txt; touch /input/new 2>&1 || echo input-not-writable; "
                "echo \"written by task $SLURM_PROCID\" > /output/result-$SLURM_PROCID.txt && echo output-written'")
        job_id, output = cluster.run_batch(USER, batch_script(
            body, f"--image=docker:{image}", f"--volume={inside}/input:/input:ro",
            f"--volume={inside}/output:/output", "--nodes=2", "--ntasks-per-node=1"))
        assert output.count("input for the job") == 2, output
        assert output.count("Read-only file system") == 2 and output.count("input-not-writable") == 2, output
        assert output.count("output-written") == 2, output
        assert not (base / "input" / "new").exists()
        user = pwd.getpwnam(USER)
        results = sorted((base / "output").iterdir())
        assert [p.name for p in results] == ["result-0.txt", "result-1.txt"], results
        for path in results:
            info = path.stat()
            assert (info.st_uid, info.st_gid) == (user.pw_uid, user.pw_gid), path
        assert (base / "output" / "result-1.txt").read_text() == "written by task 1\n"
        assert cluster.job_leftovers(job_id) == []
    finally:
        shutil.rmtree(base)


# ------------------------------------------------------------------ 3. shifter as the script's interpreter


@pytest.mark.parametrize("style", ["installed-path", "env-S"])
def test_3_batch_script_with_shifter_as_interpreter_runs_inside_the_image(cluster: Cluster, style: str) -> None:
    image = cluster.image("demo/busybox")
    shebang = (f"#!{cluster.prefix}/bin/shifter /bin/sh" if style == "installed-path"
               else "#!/usr/bin/env -S shifter /bin/sh")
    spool = cluster.state_dir / "slurmd"
    body = "\n".join([
        "grep ^NAME= /etc/os-release",
        "echo \"image variable: $DEMO_VAR\"",
        f"if [ -e {spool} ]; then echo host-visible; else echo host-hidden; fi",
        "echo \"uid $(id -u) nnp $(grep ^NoNewPrivs /proc/self/status | tr -d '\\t ')\"",
    ])
    job_id, output = cluster.run_batch(USER, batch_script(body, f"--image=docker:{image}", shebang=shebang))
    assert BUSYBOX_NAME in output, output
    assert "image variable: from-image" in output, output
    assert "host-hidden" in output and "host-visible" not in output, output
    assert f"uid {pwd.getpwnam(USER).pw_uid} nnp NoNewPrivs:1" in output, output
    assert cluster.job_leftovers(job_id) == []


# ------------------------------------------------------------------ 4. salloc + several steps


def gateway_lookups(cluster: Cluster, image: str) -> int:
    """Lookups of `image` in every gateway's access log (each one's AccessLog in its imagemanager.json)."""
    # A gateway flushes its access log after a request that comes more than a second after the
    # last flush (once it has answered): send each one with a unique path and wait for it in the log.
    time.sleep(1.1)
    total = 0
    for index, url in enumerate(cluster.gateways):
        log = cluster.gateway_access_log(index)
        marker = f"/api/flush-{uuid.uuid4().hex}"
        try:
            urllib.request.urlopen(f"{url}{marker}", timeout=10).close()
        except urllib.error.HTTPError:
            pass  # 404 is expected: only the log line matters
        wait_until(f"the access log of {url} to be flushed",
                   lambda log=log, marker=marker: log.exists() and marker in log.read_text(errors="replace"),
                   timeout=10, interval=0.05)
        text = log.read_text(errors="replace")
        total += sum(1 for line in text.splitlines() if "/api/lookup/" in line and image in line)
    return total


def test_4_salloc_steps_reuse_the_environment_without_the_gateway(cluster: Cluster) -> None:
    image = cluster.image("demo/multilayer")
    before = gateway_lookups(cluster, image)
    steps = ("for i in 1 2 3; do srun -N2 --ntasks-per-node=1 shifter sh -c "
             "'echo \"step-'$i' $(hostname) $(readlink /proc/self/ns/user) mounts=$(wc -l < /proc/self/mountinfo)\"'; "
             "done")
    result = cluster.run_as(USER, ["salloc", "-N2", f"--image=docker:{image}", "bash", "-c", steps], timeout=180)
    assert result.returncode == 0, result.stderr
    after = gateway_lookups(cluster, image)
    assert after - before == 1, f"{after - before} gateway lookups: only the submission may ask the gateway"
    seen = re.findall(r"^step-(\d) (n\d) (user:\[\d+\]) mounts=(\d+)$", result.stdout, re.MULTILINE)
    assert len(seen) == 6, result.stdout
    for node in ("n1", "n2"):
        mine = [s for s in seen if s[1] == node]
        assert sorted(step for step, *_ in mine) == ["1", "2", "3"], result.stdout
        assert len({ns for _, _, ns, _ in mine}) == 1, f"{node}: steps used different user namespaces {mine}"
        assert len({count for *_, count in mine}) == 1, f"{node}: the container's mounts changed {mine}"


# ------------------------------------------------------------------ 5. another image for one step


def test_5_step_with_another_image_leaves_the_job_image_alone(cluster: Cluster) -> None:
    job_image, other = cluster.image("demo/busybox"), cluster.image("demo/multilayer")
    probe = "echo \"{label}: $(readlink /proc/self/ns/user) $(test -e /etc/layer3 && echo layer3 || echo no-layer3)" \
            " LAYERS=$LAYERS\""
    body = "\n".join([
        f"srun shifter sh -c '{probe.format(label='job-image')}'",
        f"srun --image=docker:{other} shifter sh -c '{probe.format(label='other-image')}'",
        f"srun shifter sh -c '{probe.format(label='job-image-again')}'",
    ])
    with fuse_for_users():
        job_id, output = cluster.run_batch(USER, batch_script(body, f"--image=docker:{job_image}", "--nodes=1"))
    found = dict(re.findall(r"^([a-z-]+): (.*)$", output, re.MULTILINE))
    assert found.get("other-image", "").endswith("layer3 LAYERS=3"), output
    assert "no-layer3" not in found["other-image"], output
    first, again = found.get("job-image", ""), found.get("job-image-again", "")
    assert first.endswith("no-layer3 LAYERS="), output
    assert first == again, f"the job's environment changed after the other image's step:\n{output}"
    assert found["other-image"].split()[0] != first.split()[0], output
    assert cluster.job_leftovers(job_id) == []


# ------------------------------------------------------------------ 6. two jobs on one node


def test_6_two_jobs_of_two_users_share_a_node_each_in_its_own_image(cluster: Cluster) -> None:
    sync, _ = site_dir(cluster, "scenario6")
    sync.chmod(0o1777)
    try:
        jobs = {}
        for me, other, user, repo in (("a", "b", USER, "demo/busybox"), ("b", "a", OTHER_USER, "demo/multilayer")):
            probe = ("srun shifter sh -c 'echo \"{step}: $(grep ^NAME= /etc/os-release) "
                     "$(test -e /etc/layer3 && echo layer3 || echo no-layer3) on $(hostname)\"'")
            body = "\n".join([
                probe.format(step="first"),
                f"touch {sync}/{me}.ready",
                f"for i in $(seq 600); do [ -e {sync}/{other}.ready ] && break; sleep 0.1; done",
                f"[ -e {sync}/{other}.ready ] && echo saw-{other}-running",
                probe.format(step="second"),
                f"touch {sync}/{me}.done",
                f"for i in $(seq 600); do [ -e {sync}/{other}.done ] && break; sleep 0.1; done",
            ])
            script = batch_script(body, f"--image=docker:{cluster.image(repo)}", "--nodelist=n1", "--ntasks=1",
                                  "--oversubscribe")
            jobs[me] = (cluster.submit_batch(user, script), repo)
        for me, (job_id, repo) in jobs.items():
            state = cluster.wait_job(job_id, timeout=240)
            output = cluster.job_output(job_id)
            assert state == "COMPLETED", f"job {job_id} ended {state}:\n{output}"
            other = "b" if me == "a" else "a"
            assert f"saw-{other}-running" in output, output
            expected = "no-layer3" if repo == "demo/busybox" else "layer3"
            for step in ("first", "second"):
                line = re.search(rf"^{step}: (.*)$", output, re.MULTILINE)
                assert line and line.group(1) == f"{BUSYBOX_NAME} {expected} on n1", output
            assert cluster.job_leftovers(job_id) == []
    finally:
        shutil.rmtree(sync)


# ------------------------------------------------------------------ 10. refused at submission


def refused_submission(cluster: Cluster, *options: str) -> str:
    """sbatch with `options` must fail with exactly one stderr line and queue nothing; the line."""
    name = f"refused-{uuid.uuid4().hex[:10]}"
    result = cluster.run_as(USER, ["sbatch", f"--job-name={name}", *options, "--wrap=true"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr and result.stdout.strip() == "", result
    queued = cluster.run(["squeue", "-h", "-n", name, "-o", "%i"])
    assert queued.returncode == 0 and queued.stdout.strip() == "", f"queued anyway: {queued.stdout}"
    return lines[0]


@pytest.mark.parametrize("case", ["missing-image", "malformed-reference", "volume-on-etc", "unknown-module",
                                  "ccm-with-image"])
def test_10_bad_requests_fail_at_submission_with_one_line(cluster: Cluster, case: str) -> None:
    image = cluster.image("demo/busybox")
    options, expected = {
        "missing-image": ([f"--image=docker:{cluster.registry}/demo/no-such-image:latest"], "no-such-image"),
        "malformed-reference": (["--image=docker:demo/Bad Name!"], "Bad Name!"),
        "volume-on-etc": ([f"--image=docker:{image}", "--volume=/sitefs:/etc"], "/etc"),
        "unknown-module": ([f"--image=docker:{image}", "--module=no-such-module"], "no-such-module"),
        "ccm-with-image": ([f"--image=docker:{image}", "--ccm"], "--ccm"),
    }[case]
    line = refused_submission(cluster, *options)
    assert expected in line, line


def test_10_every_gateway_down_fails_the_submission_naming_each(cluster: Cluster) -> None:
    image = cluster.image("demo/busybox")
    cluster.stop_gateway()  # all of them (one down: test_cluster_gateways.py)
    try:
        line = refused_submission(cluster, f"--image=docker:{image}")
    finally:
        cluster.start_gateway()
    assert "gateway" in line and all(url in line for url in cluster.config_value("imageGateway").split()), line
    cluster.run_batch(USER, batch_script("srun shifter true", f"--image=docker:{image}"))


# ------------------------------------------------------------------ 11. cancelled prologs, crashed nodes


def test_11_scancel_during_the_prolog_leaves_nothing_and_drains_nothing(cluster: Cluster) -> None:
    image = cluster.image("demo/busybox")
    script = batch_script("srun shifter sleep 30", f"--image=docker:{image}", "--nodes=2")
    job_ids = []
    for attempt in range(6):
        job_id = cluster.submit_batch(USER, script)
        time.sleep(0.03 * attempt)  # sweep the cancel across submission, prolog and start
        assert cluster.run_as(USER, ["scancel", job_id]).returncode == 0
        job_ids.append(job_id)
    for job_id in job_ids:
        assert cluster.wait_job(job_id, timeout=120) == "CANCELLED"
    for job_id in job_ids:
        assert cluster.job_leftovers(job_id) == [], job_id
    for node in cluster.nodes:
        assert node_is_up(cluster, node), cluster.node_state(node)
    _, output = cluster.run_batch(USER, batch_script("srun shifter grep ^NAME= /etc/os-release",
                                                      f"--image=docker:{image}", "--nodes=2"))
    assert output.count(BUSYBOX_NAME) == 2, output


def test_11_node_recovers_from_a_crash_that_left_a_job_environment(cluster: Cluster) -> None:
    image = cluster.image("demo/busybox")
    dead = cluster.submit_batch(USER, batch_script("srun shifter sh -c 'echo started; sleep 300'",
                                                   f"--image=docker:{image}", "--nodelist=n1"))
    try:
        wait_until("the job's step to start", lambda: "started" in cluster.job_output(dead), timeout=120)
        assert dead in cluster.node_job_dirs("n1")
        held = cluster.crash_node("n1", dead)
        try:
            cluster.restart_node("n1", held)
        except Exception:
            cluster.restart_node("n1")  # never leave the node down for everyone else
            raise
        # the node's mount table survived the crash: the dead job's environment is still there
        assert any(f"/{dead}/" in m.target for m in cluster.node_mounts("n1")), "no stale environment to clean"
        _, output = cluster.run_batch(USER, batch_script("srun shifter grep ^NAME= /etc/os-release",
                                                          f"--image=docker:{image}", "--nodelist=n1"))
        assert BUSYBOX_NAME in output, output
        # Slurm may list the dead job as running for minutes: its environment is removed only once
        # the job is over for Slurm (then by its epilog, or by the next prolog if the epilog never
        # comes), never while Slurm still runs it; cancelling it is what its user would do
        assert cluster.run_as(USER, ["scancel", dead]).returncode == 0
        cluster.wait_job(dead, timeout=120)
        try:
            wait_until("the dead job's environment to be removed", lambda: cluster.job_leftovers(dead) == [],
                       timeout=60)
        except AssertionError as err:
            raise AssertionError(f"{err}: {cluster.job_leftovers(dead)}, job {cluster.job_fields(dead)}") from None
    finally:
        cluster.run(["scancel", dead])
        if cluster.node_state("n1")[0].startswith(("DOWN", "DRAIN")):
            cluster.resume_node("n1")


def test_11_prolog_removes_the_environment_of_a_job_that_no_longer_runs(cluster: Cluster) -> None:
    image = cluster.image("demo/busybox")
    image_id = cluster.run_as(USER, ["shifterimg", "lookup", f"docker:{image}"]).stdout.split()[0]
    user = pwd.getpwnam(USER)
    ghost = str(90_000_000 + uuid.uuid4().int % 9_000_000)  # above any id this cluster hands out
    setup = [str(cluster.prefix / "sbin" / "setupRoot"), "--config", str(cluster.udiroot_conf), "--job-id", ghost,
             "-U", str(user.pw_uid), "-G", str(user.pw_gid), "-u", USER, "id", image_id]
    made = cluster.node_exec("n1", setup)
    assert made.returncode == 0, made.stderr
    try:
        assert ghost in cluster.node_job_dirs("n1")
        time.sleep(6)  # older than the prolog's grace period for environments being built
        _, output = cluster.run_batch(USER, batch_script("srun shifter grep ^NAME= /etc/os-release",
                                                          f"--image=docker:{image}", "--nodelist=n1"))
        assert BUSYBOX_NAME in output, output
        assert ghost not in cluster.node_job_dirs("n1")
        assert cluster.job_leftovers(ghost) == []
    finally:
        cluster.node_exec("n1", [str(cluster.prefix / "sbin" / "unsetupRoot"), "--config",
                                 str(cluster.udiroot_conf), "--job-id", ghost])


# ------------------------------------------------------------------ failure policy


@pytest.mark.parametrize("case", ["unreadable-volume", "image-gone", "cache-too-big"])
def test_request_failure_at_prolog_fails_the_job_not_the_node(cluster: Cluster, case: str) -> None:
    image = cluster.image("demo/busybox")
    base, inside = site_dir(cluster, "policy")
    try:
        base.chmod(0o700)  # root's: the user cannot read it
        options = {
            "unreadable-volume": [f"--image=docker:{image}", f"--volume={inside}:/data"],
            "image-gone": ["--image=id:" + "0" * 64],  # an id whose image is not (or no longer) there
            # this drained the node (EFBIG): the size is valid syntax, but over perNodeCacheSizeLimit
            "cache-too-big": [f"--image=docker:{image}", "--volume=/x:/data:perNodeCache=size=1e"],
        }[case]
        job_id = cluster.submit_batch(USER, batch_script("srun shifter true", *options, "--nodelist=n1"))
        state = cluster.wait_job(job_id, timeout=120)
        output = cluster.job_output(job_id)
        assert state == "FAILED", f"{state}:\n{output}"
        lines = [line for line in output.splitlines() if line.startswith("shifter:")]
        assert lines and lines[0].startswith("shifter: the job's container could not be set up on n1: "), output
        expected = {"unreadable-volume": inside, "image-gone": "0" * 64, "cache-too-big": "perNodeCacheSizeLimit"}
        assert expected[case] in lines[0], output
        assert "Traceback" not in output
        assert node_is_up(cluster, "n1"), cluster.node_state("n1")
        assert cluster.job_leftovers(job_id) == []
    finally:
        shutil.rmtree(base)


def test_node_failure_at_prolog_drains_the_node_with_a_reason(cluster: Cluster) -> None:
    image = cluster.image("demo/busybox")
    udi_mount = cluster.config_value("udiMount")
    busy = lambda: cluster.run(["squeue", "-h", "-w", "n2", "-o", "%i"]).stdout.strip() != ""  # noqa: E731
    try:
        wait_until("n2 to be free of other jobs", lambda: not busy(), timeout=120)
    except AssertionError:
        pass  # others keep it busy: go on, their prologs fail the same way for a second
    # a node-local fault: the job directories' file system turns read-only on n2 only
    assert cluster.node_exec("n2", ["mount", "-t", "tmpfs", "-o", "ro,mode=0755", "tmpfs", udi_mount]).returncode == 0
    try:
        result = cluster.run_as(USER, ["srun", "--nodelist=n2", f"--image=docker:{image}", "shifter", "true"],
                                timeout=120)
        assert result.returncode != 0, result
        state, reason = cluster.node_state("n2")
        assert "DRAIN" in state, (state, reason)
        assert reason.startswith("shifter: ") and "Read-only file system" in reason, reason
        assert "Traceback" not in result.stderr
    finally:
        cluster.node_exec("n2", ["umount", udi_mount])
        cluster.resume_node("n2")
    wait_until("n2 to be back", lambda: node_is_up(cluster, "n2"), timeout=30)
