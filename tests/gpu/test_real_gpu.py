"""Real-GPU check, without Slurm: setupRoot and `shifter` on a node with an NVIDIA GPU.

A tiny image with no driver (glibc and a CUDA driver-API program, tests/gpu/cudacheck.c) runs
inside the job's environment as an unprivileged user: cuInit, the device's name, a kernel
JIT-compiled from PTX and its result checked, then `nvidia-smi` from the injected driver tools.
The program's time inside and outside the container is compared.  Skipped where there is no
NVIDIA GPU, no root or no C compiler.

    sudo .venv/bin/python -m pytest -s tests/gpu        # prints the numbers; GPU_CHECK_JSON=FILE saves them
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time

import pytest

from shifter.formats.meta import ImageMeta, write_meta
from tests.root.conftest import REPO

HERE = os.path.join(REPO, "tests", "gpu")
IMAGE_ID = "8" * 64
SITE_RESOURCES = "/opt/shifter/site-resources"
RUNS = 5


def _skip_reason() -> str | None:
    if not os.path.exists("/proc/driver/nvidia/version") or not os.path.exists("/dev/nvidiactl"):
        return "no NVIDIA GPU on this machine (/proc/driver/nvidia/version or /dev/nvidiactl missing)"
    if os.geteuid() != 0:
        return "needs root (setupRoot)"
    if not shutil.which("gcc"):
        return "needs gcc to build the CUDA driver-API program"
    if not shutil.which("mksquashfs"):
        return "needs mksquashfs to build the image"
    return None


pytestmark = [pytest.mark.root, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def _needed_libraries(programs: list[str]) -> list[str]:
    """The host libraries ``programs`` load (from ldd), except the driver's own: those are injected."""
    found: list[str] = []
    for program in programs:
        out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            words = line.split()
            path = words[2] if len(words) > 2 and words[1] == "=>" else words[0]
            name = os.path.basename(path)
            if path.startswith("/") and not name.startswith(("libcuda", "libnvidia")) and path not in found:
                found.append(path)
    return found


def _build_image(work: str, images: str, program: str) -> None:
    tree = os.path.join(work, "tree-gpu-check")
    os.makedirs(os.path.join(tree, "usr/bin"))
    os.makedirs(os.path.join(tree, "etc"))
    shutil.copy(program, os.path.join(tree, "usr/bin/cudacheck"))
    from shifter.formats import gpurecipe
    from shifter.runtime import gpudiscovery

    smi = shutil.which("nvidia-smi")
    driver = gpudiscovery.discover(gpurecipe.load_recipe("nvidia"))
    # what the program, nvidia-smi and the driver's own libraries load (libm, libdl, librt...), not the driver
    users_of_libc = [program] + ([smi] if smi else []) + [lib.host for lib in driver.libraries if lib.bits == 64]
    for lib in _needed_libraries(users_of_libc):
        target = tree + lib
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(os.path.realpath(lib), target)
    subprocess.run(["mksquashfs", tree, os.path.join(images, f"{IMAGE_ID}.squashfs"), "-noappend", "-quiet",
                    "-all-root"], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    write_meta(os.path.join(images, f"{IMAGE_ID}.meta"),
               ImageMeta(format="squashfs", env=["PATH=/usr/bin:/bin", "NVIDIA_VISIBLE_DEVICES=all"]))


def _timed(argv: list[str], user, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.monotonic()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, user=user.uid,
                         group=user.gid, extra_groups=user.groups, cwd="/")
    return (time.monotonic() - start) * 1e3, out


def _lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_real_gpu_in_and_out_of_the_container(clean_gpu_site, users):
    site, user = clean_gpu_site, users[0]
    program = os.path.join(site.base, "cudacheck")
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", os.path.join(HERE, "cudacheck.c"), "-o", program, "-ldl"],
                   check=True)
    os.chmod(program, 0o755)
    host_env = {"PATH": "/usr/bin:/bin"}
    host_times, host_out = [], None
    for _ in range(RUNS):  # first, on the host: also creates /dev/nvidia-uvm if the driver has not yet
        elapsed, host_out = _timed([program], user, host_env)
        assert host_out.returncode == 0, host_out.stdout + host_out.stderr
        host_times.append(elapsed)

    from shifter.formats import gpurecipe
    from shifter.runtime import gpudiscovery

    gpus = sorted(gpudiscovery.node_gpus(gpurecipe.load_recipe("nvidia")))
    _build_image(site.base, site.images, program)
    site.write_config(f"siteResources={SITE_RESOURCES}\ngpuRecipe=nvidia\n")
    setup_start = time.monotonic()
    result = site.setup("901", user, "--gpus", str(gpus[0]), image=IMAGE_ID)
    setup_ms = (time.monotonic() - setup_start) * 1e3
    assert result.returncode == 0, result.stderr
    env = site.job_env("901", SHIFTER_IMAGE=IMAGE_ID)
    shifter = os.path.join(site.bin, "shifter")
    in_times, in_out = [], None
    for _ in range(RUNS):
        elapsed, in_out = _timed([shifter, "cudacheck"], user, env)
        assert in_out.returncode == 0, in_out.stdout + in_out.stderr
        in_times.append(elapsed)
    _, smi = _timed([shifter, "nvidia-smi", "-L"], user, env)
    _, smi_full = _timed([shifter, "nvidia-smi"], user, env)
    _, visible = _timed([shifter, "/usr/bin/cudacheck"], user, {**env, "CUDA_VISIBLE_DEVICES": "0"})
    assert site.unsetup("--job-id", "901").returncode == 0

    assert _lines(in_out.stdout, "device ") == _lines(host_out.stdout, "device ")
    assert _lines(in_out.stdout, "driver ") == _lines(host_out.stdout, "driver ")
    assert _lines(in_out.stdout, "kernel ok") and _lines(in_out.stdout, "devices 1")  # only the allocated GPU
    assert smi.returncode == 0 and smi.stdout.startswith("GPU 0:"), smi.stdout + smi.stderr
    assert len(smi.stdout.splitlines()) == 1
    assert smi_full.returncode == 0, smi_full.stdout + smi_full.stderr
    assert visible.returncode == 0, visible.stdout
    summary = {
        "device": _lines(host_out.stdout, "device ")[0][7:], "gpus_on_node": len(gpus),
        "setupRoot_ms": round(setup_ms, 1),
        "host_ms_median": round(statistics.median(host_times), 1),
        "container_ms_median": round(statistics.median(in_times), 1),
        "host_inner": _lines(host_out.stdout, "times ")[0], "container_inner": _lines(in_out.stdout, "times ")[0],
        "nvidia_smi_L": smi.stdout.strip(),
    }
    summary["ratio"] = round(summary["container_ms_median"] / summary["host_ms_median"], 3)
    print("\nreal GPU check:", json.dumps(summary, indent=1))
    if os.environ.get("GPU_CHECK_JSON"):
        with open(os.environ["GPU_CHECK_JSON"], "w") as fh:
            json.dump(summary, fh, indent=1)
