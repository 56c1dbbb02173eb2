"""The local cluster's two gateways (one SQLite store, one imagePath, both in imageGateway):
with one of them frozen (SIGSTOP: it accepts connections and never answers) or stopped, the
test user pulls a new tag, looks it up, lists images and submits jobs with that tag and with
one pulled earlier; everything works through the other gateway within gatewayTimeout and names
the dead one on one line. The gateway is restored afterwards so later tests see a normal cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from localcluster import images, oci
from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster

USER = "shifter-u1"
TRIES = 12  # the client shuffles the gateways: runs until one asked the dead gateway first


def push_fresh_tag(cluster: Cluster) -> tuple[str, str]:
    """The demo busybox plus one layer with a unique file, pushed under a new tag nobody pulled:
    (reference, path of the unique file inside the image)."""
    marker = uuid.uuid4().hex[:12]
    layout = images.build(images.BUSYBOX_IMAGE)
    manifest = layout.manifest()
    config = json.loads(layout.blob_path(manifest["config"]["digest"]).read_bytes())
    extra = oci.tar_bytes([oci.file(f"srv/demo/fresh-{marker}", f"{marker}\n".encode())])
    config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(extra).hexdigest())
    layers = [*(layout.blob_path(layer["digest"]) for layer in manifest["layers"]), oci.gzip_bytes(extra)]
    oci.push_image(f"http://{cluster.registry}", "demo/fresh", marker, layers, config)
    return f"{cluster.registry}/demo/fresh:{marker}", f"/srv/demo/fresh-{marker}"


def dead_line(cluster: Cluster, dead: int, reason: str) -> str:
    live = cluster.gateways[1 - dead]
    return f"image gateway {cluster.gateways[dead]} did not answer ({reason}); used {live}"


def until_dead_asked_first(cluster: Cluster, argv: list[str], line: str, budget: float) -> tuple[str, float]:
    """Run ``argv`` as the test user until a run met the dead gateway first; every run must
    succeed within ``budget`` seconds and print the line naming it once or not at all.
    Returns (stdout, seconds) of the run that named it."""
    for _ in range(TRIES):
        started = time.monotonic()
        result = cluster.run_as(USER, argv, timeout=budget + 60)
        took = time.monotonic() - started
        assert result.returncode == 0, (argv, result.stderr)
        assert took < budget, (argv, took, result.stderr)
        named = [ln for ln in result.stderr.splitlines() if line in ln]
        others = [ln for ln in result.stderr.splitlines() if "image gateway" in ln and line not in ln]
        assert len(named) <= 1 and not others, (argv, result.stderr)
        if named:
            return result.stdout, took
    raise AssertionError(f"{argv} never asked the dead gateway first in {TRIES} runs")


def check_clients_through_the_other(cluster: Cluster, dead: int, reason: str) -> None:
    timeout = float(cluster.config_value("gatewayTimeout"))
    line = dead_line(cluster, dead, reason)
    fresh, marker_path = push_fresh_tag(cluster)
    pulled = cluster.image("demo/busybox")
    # a tag nobody pulled yet: pulled, looked up and listed through the live gateway
    until_dead_asked_first(cluster, ["shifterimg", "pull", f"docker:{fresh}"], line, timeout + 90)
    out, _ = until_dead_asked_first(cluster, ["shifterimg", "lookup", f"docker:{fresh}"], line, timeout + 10)
    assert len(out.splitlines()[0]) == 64, out
    out, _ = until_dead_asked_first(cluster, ["shifterimg", "images"], line, timeout + 10)
    assert fresh.rsplit(":", 1)[1] in out, out
    # sbatch --image of the new tag and of one pulled before: the submission names the dead
    # gateway (in some run), the prolog's lookups go through the live one, the jobs run
    for image, command, expected in ((fresh, f"cat {marker_path}", fresh.rsplit(":", 1)[1]),
                                     (pulled, "cat /etc/os-release", "Shifter Demo BusyBox")):
        directory = cluster.job_dir(USER)
        job_ids = []
        for _ in range(TRIES):
            started = time.monotonic()
            result = cluster.run_as(USER, ["sbatch", "--parsable", f"--image=docker:{image}", "-N1",
                                           f"--output={directory}/slurm-%j.out", f"--wrap=srun shifter {command}"],
                                    cwd=directory, timeout=timeout + 60)
            took = time.monotonic() - started
            assert result.returncode == 0, result.stderr
            assert took < timeout + 15, (took, result.stderr)
            job_id = result.stdout.strip().split(";")[0]
            cluster.outputs[job_id] = directory / f"slurm-{job_id}.out"
            job_ids.append(job_id)
            named = [ln for ln in result.stderr.splitlines() if line in ln]
            assert len(named) <= 1 and result.stderr.count("image gateway") == len(named), result.stderr
            if named:
                break
        else:
            raise AssertionError(f"sbatch --image={image} never asked the dead gateway first in {TRIES} runs")
        for job_id in job_ids:
            state = cluster.wait_job(job_id, timeout=240)
            output = cluster.job_output(job_id)
            assert state == "COMPLETED" and expected in output, (job_id, state, output)


def assert_both_answer(cluster: Cluster) -> None:
    settings = cluster.settings
    from localcluster import gatewaysvc

    assert [gatewaysvc.status(settings, i) is not None for i in range(settings.gateways)] == [True, True]


@contextmanager
def frozen(cluster: Cluster, index: int) -> Iterator[None]:
    """Gateway ``index`` stopped with SIGSTOP for the block; always continued afterwards."""
    pid = cluster.gateway_pid(index)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_the_cluster_runs_two_gateways_on_one_store(cluster: Cluster) -> None:
    assert len(cluster.gateways) == 2
    assert cluster.config_value("imageGateway").split() == cluster.gateways
    assert_both_answer(cluster)
    settings = cluster.settings
    configs = [json.loads(settings.imagemanager_json_of(i).read_text()) for i in range(2)]
    assert configs[0]["Store"] == configs[1]["Store"]
    assert configs[0]["Platforms"] == configs[1]["Platforms"]
    assert configs[0]["Listen"] != configs[1]["Listen"]


def test_one_gateway_frozen_clients_and_jobs_work_through_the_other(cluster: Cluster) -> None:
    with frozen(cluster, 1):
        check_clients_through_the_other(cluster, 1, "timed out")
    assert_both_answer(cluster)


def test_one_gateway_stopped_clients_and_jobs_work_through_the_other(cluster: Cluster) -> None:
    cluster.stop_gateway(0)
    try:
        check_clients_through_the_other(cluster, 0, "Connection refused")
    finally:
        cluster.start_gateway(0)
    assert_both_answer(cluster)
