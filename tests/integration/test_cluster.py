"""The local cluster itself: real nodes in their own namespaces, the registry and its images.

Every other integration test stands on these properties, so they are checked directly:
each node is a separate slurmd with its own address, hostname and mount table; jobs run on
all of them and two jobs can share a node; the registry serves the test images with the
layers, whiteouts and config the later tests rely on; the gateway answers.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from localcluster.testing import Cluster

pytestmark = pytest.mark.cluster


def _get(url: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return reply.read()


def _manifest(cluster: Cluster, repo: str, tag: str) -> dict:
    accept = ("application/vnd.oci.image.manifest.v1+json, "
              "application/vnd.docker.distribution.manifest.v2+json")
    return json.loads(_get(f"http://{cluster.registry}/v2/{repo}/manifests/{tag}", accept))


def _blob(cluster: Cluster, repo: str, digest: str) -> bytes:
    return _get(f"http://{cluster.registry}/v2/{repo}/blobs/{digest}")


def _layer_members(cluster: Cluster, repo: str, digest: str) -> dict[str, tarfile.TarInfo]:
    data = gzip.decompress(_blob(cluster, repo, digest))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {member.name: member for member in tar.getmembers()}


def test_srun_reaches_every_node_and_each_has_its_own_hostname(cluster: Cluster) -> None:
    result = cluster.run(["srun", f"-N{len(cluster.nodes)}", "hostname"])
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted(cluster.nodes)


def test_each_node_has_its_own_network_address(cluster: Cluster) -> None:
    result = cluster.run(["srun", f"-N{len(cluster.nodes)}", "--label",
                          "ip", "-4", "-o", "addr", "show", "dev", "eth0"])
    assert result.returncode == 0, result.stderr
    addresses = {}
    for line in result.stdout.splitlines():
        label, _, rest = line.partition(":")
        addresses[int(label)] = rest.split()[3].split("/")[0]
    assert len(addresses) == len(cluster.nodes)
    assert len(set(addresses.values())) == len(cluster.nodes), addresses
    assert all(addr.startswith("10.254.0.") for addr in addresses.values())


@pytest.mark.parametrize(("mpi", "rank_variable"), [("pmix", "PMIX_RANK"), ("pmi2", "PMI_RANK")])
def test_mpi_process_managers_work_across_nodes(cluster: Cluster, mpi: str, rank_variable: str) -> None:
    """PMIx needs a per-node TmpFS (its client dirs would collide in a shared /tmp)."""
    result = cluster.run(["srun", f"--mpi={mpi}", "-N2", "-n4", "--label", "printenv", rank_variable])
    assert result.returncode == 0, result.stderr
    ranks = sorted(line.split(":", 1)[1].strip() for line in result.stdout.splitlines())
    assert ranks == ["0", "1", "2", "3"]


def test_each_node_has_its_own_mount_table(cluster: Cluster) -> None:
    first, second = cluster.nodes[:2]
    with tempfile.TemporaryDirectory(prefix="shifter-mount-probe-") as probe:
        mounted = cluster.node_exec(first, ["mount", "-t", "tmpfs", "-o", "size=1m", "probe", probe])
        assert mounted.returncode == 0, mounted.stderr
        try:
            assert any(m.target == probe for m in cluster.node_mounts(first))
            assert not any(m.target == probe for m in cluster.node_mounts(second))
            assert probe not in Path("/proc/self/mounts").read_text()
        finally:
            unmounted = cluster.node_exec(first, ["umount", probe])
        assert unmounted.returncode == 0, unmounted.stderr
        assert not any(m.target == probe for m in cluster.node_mounts(first))


def test_each_node_has_private_runtime_state_dirs(cluster: Cluster) -> None:
    """udiMount and loopMount are a tmpfs of each node's own, invisible on the host."""
    config = cluster.udiroot_conf.read_text()
    for key in ("udiMount", "loopMount"):
        path = next(line.split("=", 1)[1] for line in config.splitlines() if line.startswith(f"{key}="))
        devices = set()
        for node in cluster.nodes:
            matching = [m for m in cluster.node_mounts(node) if m.target == path]
            assert len(matching) == 1 and matching[0].fstype == "tmpfs", (node, key, matching)
            devices.add(os.stat(f"/proc/{cluster.node_pids()[node]}/root{path}").st_dev)
        assert len(devices) == len(cluster.nodes), f"{key} is shared between nodes"


def test_udiroot_conf_is_root_owned_and_not_writable_by_others(cluster: Cluster) -> None:
    info = cluster.udiroot_conf.stat()
    assert info.st_uid == 0
    assert stat.S_IMODE(info.st_mode) & 0o022 == 0
    assert "imageGateway=" + " ".join(cluster.gateways) in cluster.udiroot_conf.read_text().splitlines()


def test_test_user_runs_a_batch_job_on_two_nodes(cluster: Cluster, test_users: tuple[str, ...]) -> None:
    user = test_users[0]
    job = cluster.submit_batch(user, "#!/bin/sh\nsrun hostname\nid -un\n", nodes=2)
    assert cluster.wait_job(job) == "COMPLETED"
    lines = cluster.job_output(job).split()
    assert sorted(lines[:2]) == sorted(cluster.nodes[:2]) and lines[2] == user


def test_two_jobs_share_one_node(cluster: Cluster, test_users: tuple[str, ...]) -> None:
    node = cluster.nodes[0]
    jobs = [cluster.submit_batch(user, "#!/bin/sh\nsleep 4\n", nodes=1, nodelist=node,
                                 ntasks=1, cpus_per_task=2, oversubscribe=True)
            for user in test_users]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [cluster.job_fields(job).get("JobState") for job in jobs]
        if states == ["RUNNING", "RUNNING"]:
            break
        time.sleep(0.2)
    assert states == ["RUNNING", "RUNNING"], states
    assert [cluster.wait_job(job) for job in jobs] == ["COMPLETED", "COMPLETED"]


def test_registry_serves_the_busybox_image(cluster: Cluster) -> None:
    manifest = _manifest(cluster, "demo/busybox", "latest")
    config = json.loads(_blob(cluster, "demo/busybox", manifest["config"]["digest"]))["config"]
    assert "DEMO_VAR=from-image" in config["Env"]
    assert config["Entrypoint"] and config["Cmd"] and config["WorkingDir"] == "/srv/demo"
    members = _layer_members(cluster, "demo/busybox", manifest["layers"][0]["digest"])
    os_release = members["etc/os-release"]
    assert os_release.isreg()
    assert members["bin/sh"].issym() and members["bin/busybox"].size > 100_000


def test_multilayer_image_has_whiteouts(cluster: Cluster) -> None:
    manifest = _manifest(cluster, "demo/multilayer", "latest")
    assert len(manifest["layers"]) >= 3
    top = _layer_members(cluster, "demo/multilayer", manifest["layers"][-1]["digest"])
    middle = _layer_members(cluster, "demo/multilayer", manifest["layers"][-2]["digest"])
    assert "data/remove-me.txt" in middle and "data/.wh.remove-me.txt" in top
    assert "opt/replaced/old.txt" in middle and "opt/replaced/.wh..wh..opq" in top
    assert "opt/replaced/new.txt" in top
    busybox = _manifest(cluster, "demo/busybox", "latest")
    assert manifest["layers"][0]["digest"] == busybox["layers"][0]["digest"], "base layer is shared"


def test_environment_names_the_cluster(cluster: Cluster) -> None:
    for key in ("SLURM_CONF", "PATH", "SHIFTER_GATEWAY", "SHIFTER_REGISTRY", "SHIFTER_UDIROOT_CONF",
                "SHIFTER_NODES", "SHIFTER_TEST_IMAGES"):
        assert cluster.env.get(key), key
    assert cluster.env["PATH"].split(":")[0] == str(cluster.prefix / "bin")
    assert f"{cluster.registry}/demo/busybox:latest" in cluster.images


def test_every_gateway_answers_on_the_test_network(cluster: Cluster) -> None:
    assert len(cluster.gateways) == 2 and cluster.gateways[0] == cluster.gateway, cluster.gateways
    for url in cluster.gateways:
        reply = json.loads(_get(f"{url}/api/status"))
        assert reply
        result = cluster.node_exec(cluster.nodes[-1], ["curl", "-sf", f"{url}/api/status"])
        assert result.returncode == 0, (url, result.stderr)


def test_installed_layout_is_isolated_and_world_readable(cluster: Cluster) -> None:
    """make install: -IS wrappers on the hot paths, buildinfo baked in, nothing private."""
    prefix = cluster.prefix
    for wrapper in ("libexec/shifter/shifter", "sbin/setupRoot", "sbin/unsetupRoot", "libexec/shifter/spank-hook"):
        first_line = (prefix / wrapper).read_text().splitlines()[0]
        assert first_line == f"#!{prefix}/venv/bin/python3 -IS", (wrapper, first_line)
    launcher = (prefix / "bin/shifter").read_bytes()
    assert launcher.startswith(b"\x7fELF"), "bin/shifter is the compiled front, not a script"
    for compiled_in in (f"{prefix}/libexec/shifter/shifter", str(cluster.udiroot_conf)):
        assert compiled_in.encode() + b"\0" in launcher, compiled_in
    site_packages = next((prefix / "venv/lib").glob("python3*/site-packages"))
    code = (f"import sys; sys.path.append({str(site_packages)!r}); "
            "from shifter import buildinfo; print(buildinfo.PREFIX, buildinfo.CONFIG_FILE)")
    probe = cluster.run_as("shifter-u1", [str(prefix / "venv/bin/python3"), "-IS", "-c", code])
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(prefix), str(cluster.udiroot_conf)]
    for path in [prefix, *prefix.rglob("*")]:
        if path.is_symlink():
            continue
        info = path.lstat()
        assert info.st_uid == 0 and info.st_mode & 0o004 and not info.st_mode & 0o022, path
