"""GPU discovery on recorded ``ldconfig -p`` and ``/proc/driver/nvidia/version`` contents.

The loader-cache listing and the version files are in tests/data/gpu; the files behind the
listing (real files and links, as on that node) are recreated under a temporary driver root,
so link resolution and version matching run on a real tree.
"""

from __future__ import annotations

import os

import pytest

from shifter.errors import NodeError, ShifterError
from shifter.formats import gpurecipe
from shifter.formats.environment import apply_operations, renumber_devices
from shifter.runtime import gpu, gpudiscovery

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "data", "gpu")


def _read(name: str) -> str:
    with open(os.path.join(DATA, name)) as fh:
        return fh.read()


@pytest.fixture
def recipe() -> gpurecipe.Recipe:
    return gpurecipe.load_recipe("nvidia")


@pytest.fixture
def driver_root(tmp_path) -> str:
    for line in _read("tree.txt").splitlines():
        if not line or line.startswith("#"):
            continue
        path, _, target = line.partition(" -> ")
        full = str(tmp_path) + path
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if target:
            os.symlink(target, full)
        else:
            with open(full, "w") as fh:
                fh.write("ELF stand-in\n")
    return str(tmp_path)


def test_recipe_is_data_with_the_documented_sets(recipe):
    assert recipe.name == "nvidia" and gpurecipe.recipe_names() == ["amd", "nvidia"]
    assert "/dev/nvidia-uvm-tools" in recipe.control_devices and recipe.gpu_major == 195
    assert "libcuda.so" in recipe.libraries["compute"] and "libnvidia-ml.so" in recipe.libraries["utility"]
    assert "nvidia-smi" in recipe.binaries["utility"]
    assert set(recipe.environment) == {"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"}


@pytest.mark.parametrize("name", ["rocm", "../nvidia", "NVIDIA", ""])
def test_unknown_recipe_is_one_clear_error(name):
    with pytest.raises(ShifterError, match="unknown GPU recipe .*known: amd, nvidia"):
        gpurecipe.load_recipe(name)


@pytest.mark.parametrize("name, version", [("version-proprietary.txt", "535.104.05"),
                                           ("version-open.txt", "550.54.15"),
                                           ("version-aarch64.txt", "560.35.03")])
def test_driver_version_from_recorded_files(recipe, name, version):
    assert gpurecipe.driver_version(_read(name), recipe) == version


def test_driver_version_absent(recipe):
    assert gpurecipe.driver_version("NVRM version: something else\n", recipe) is None


def test_loader_cache_parsing_keeps_word_sizes_apart():
    entries = gpurecipe.parse_loader_cache(_read("ldconfig-p.txt"))
    cuda = [(e.bits, e.path) for e in entries if e.name == "libcuda.so.1"]
    assert cuda == [(64, "/lib/x86_64-linux-gnu/libcuda.so.1"), (32, "/lib/i386-linux-gnu/libcuda.so.1")]
    assert not any(e.path.startswith("/libx32/") for e in entries)  # x32 is neither
    assert any(e.name == "libc.so.6" and e.bits == 64 for e in entries)  # "OS ABI:" does not hide an entry
    assert len(entries) == 20


def test_libraries_matched_to_the_driver_version(recipe, driver_root):
    entries = gpurecipe.parse_loader_cache(_read("ldconfig-p.txt"))
    libs, stale = gpudiscovery.select_libraries(entries, recipe, "535.104.05", driver_root)
    got = {(lib.bits, lib.file): (lib.links, lib.capability) for lib in libs}
    assert got == {
        (64, "libcuda.so.535.104.05"): (["libcuda.so.1"], "compute"),
        (64, "libcudadebugger.so.535.104.05"): (["libcudadebugger.so.1"], "compute"),
        (64, "libnvidia-allocator.so.535.104.05"): (["libnvidia-allocator.so.1"], "compute"),
        (64, "libnvidia-ml.so.535.104.05"): (["libnvidia-ml.so.1"], "utility"),
        (64, "libnvidia-nvvm.so.535.104.05"): (["libnvidia-nvvm.so.4"], "compute"),
        (64, "libnvidia-opencl.so.535.104.05"): (["libnvidia-opencl.so.1"], "compute"),
        (64, "libnvidia-pkcs11-openssl3.so.535.104.05"): ([], "compute"),
        (64, "libnvidia-ptxjitcompiler.so.535.104.05"): (["libnvidia-ptxjitcompiler.so.1"], "compute"),
        (32, "libcuda.so.535.104.05"): (["libcuda.so.1"], "compute"),
        (32, "libnvidia-ml.so.535.104.05"): (["libnvidia-ml.so.1"], "utility"),
        (32, "libnvidia-ptxjitcompiler.so.535.104.05"): (["libnvidia-ptxjitcompiler.so.1"], "compute"),
    }
    # an older driver's libnvidia-cfg is left out and reported; graphics, video and CUDA runtime are not the recipe's
    assert stale == [driver_root + "/lib/x86_64-linux-gnu/libnvidia-cfg.so.470.199.02"]
    for lib in libs:
        assert lib.host.startswith(driver_root + "/") and os.path.basename(lib.host) == lib.file
    assert not any("glcore" in lib.file or "encode" in lib.file or "cudart" in lib.file for lib in libs)


def test_capabilities_limit_the_libraries(recipe, driver_root):
    entries = gpurecipe.parse_loader_cache(_read("ldconfig-p.txt"))
    libs, _ = gpudiscovery.select_libraries(entries, recipe, "535.104.05", driver_root, capabilities=["utility"])
    assert sorted(lib.file for lib in libs) == ["libnvidia-ml.so.535.104.05"] * 2


def test_another_driver_version_matches_nothing(recipe, driver_root):
    entries = gpurecipe.parse_loader_cache(_read("ldconfig-p.txt"))
    libs, stale = gpudiscovery.select_libraries(entries, recipe, "550.54.15", driver_root)
    assert libs == [] and len(stale) == 12


def test_absolute_link_resolves_inside_the_driver_root(recipe, tmp_path):
    lib = tmp_path / "usr/lib64"
    lib.mkdir(parents=True)
    (lib / "libcuda.so.535.104.05").write_text("x")
    os.symlink("/usr/lib64/libcuda.so.535.104.05", lib / "libcuda.so.1")  # absolute: the driver root's /
    entries = [gpurecipe.CacheEntry(name="libcuda.so.1", bits=64, path="/usr/lib64/libcuda.so.1")]
    libs, _ = gpudiscovery.select_libraries(entries, recipe, "535.104.05", str(tmp_path))
    assert [lib.host for lib in libs] == [str(tmp_path) + "/usr/lib64/libcuda.so.535.104.05"]


def test_binaries_found_in_the_driver_root(recipe, tmp_path):
    bindir = tmp_path / "usr/bin"
    bindir.mkdir(parents=True)
    for name, mode in (("nvidia-smi", 0o755), ("nvidia-debugdump", 0o644)):
        (bindir / name).write_text("#!/bin/sh\n")
        os.chmod(bindir / name, mode)
    assert gpudiscovery.find_binaries(recipe, str(tmp_path)) == [("nvidia-smi", str(bindir / "nvidia-smi"))]


def test_discover_says_exactly_what_is_missing(recipe, tmp_path):
    found = gpudiscovery.discover(recipe, str(tmp_path))
    assert found.version is None and found.libraries == []
    assert any(p.endswith("/proc/driver/nvidia/version: No such file or directory (is the nvidia kernel driver "
                          "loaded?)") for p in found.problems)


def test_discover_with_a_loader_cache_lacking_libcuda(recipe, tmp_path):
    (tmp_path / "proc/driver/nvidia").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia/version").write_text(_read("version-proprietary.txt"))
    (tmp_path / "etc").mkdir()
    found = gpudiscovery.discover(recipe, str(tmp_path))
    assert found.version == "535.104.05"
    assert any("ld.so.cache" in p for p in found.problems)  # no cache at all: ldconfig says so


@pytest.mark.parametrize("text, ids", [("0", [0]), ("0,2", [0, 2]), ("3,1,1", [1, 3]), ("0-3", [0, 1, 2, 3]),
                                       ("", []), ("1-2,5", [1, 2, 5])])
def test_gpu_ids(text, ids):
    assert gpurecipe.parse_gpu_ids(text) == ids


@pytest.mark.parametrize("text", ["a", "0,x", "-1", "3-1", "0-", "٣", "0-99999"])
def test_bad_gpu_ids(text):
    with pytest.raises(ShifterError, match="invalid GPU"):
        gpurecipe.parse_gpu_ids(text)


def _discovery(recipe, gpus: dict[int, str], problems: list[str] | None = None) -> gpudiscovery.Discovery:
    lib64 = gpudiscovery.Library(bits=64, host="/x/libcuda.so.1.2", file="libcuda.so.1.2",
                                 links=["libcuda.so.1"], capability="compute")
    lib32 = gpudiscovery.Library(bits=32, host="/y/libcuda.so.1.2", file="libcuda.so.1.2", links=[],
                                 capability="compute")
    return gpudiscovery.Discovery(recipe=recipe, version="1.2", libraries=[lib64, lib32],
                                  binaries=[("nvidia-smi", "/b")], gpus=gpus,
                                  control=["/dev/nvidiactl", "/dev/nvidia-uvm"], capability_dirs=["/dev/nvidia-caps"],
                                  stale=[], problems=problems or [])


def test_environment_and_hidden_devices_follow_the_allocation(recipe):
    node = {0: "/dev/nvidia0", 1: "/dev/nvidia1", 2: "/dev/nvidia2"}
    inj = gpu.plan_injection(_discovery(recipe, node), [0, 2], True, "/opt/shifter/site-resources/", "/h", "/d")
    assert gpu.environment_operations(inj) == [
        ("=", "NVIDIA_VISIBLE_DEVICES", "0,2"), ("=", "NVIDIA_DRIVER_CAPABILITIES", "compute,utility"),
        ("%", "CUDA_VISIBLE_DEVICES", "0,2"), ("%", "GPU_DEVICE_ORDINAL", "0,2"),
        ("^", "LD_LIBRARY_PATH", "/opt/shifter/site-resources/lib64:/opt/shifter/site-resources/lib32"),
        ("^", "PATH", "/opt/shifter/site-resources/bin")]
    assert gpu.hidden_devices(inj) == (["/dev/nvidia1"], [])
    devices_only = gpu.plan_injection(_discovery(recipe, node), [1], False, "/sr", "/h", "/d")
    assert gpu.environment_operations(devices_only) == [
        ("=", "NVIDIA_VISIBLE_DEVICES", "1"), ("%", "CUDA_VISIBLE_DEVICES", "1"), ("%", "GPU_DEVICE_ORDINAL", "1")]
    none = gpu.plan_injection(_discovery(recipe, node), [], True, "/sr", "/h", "/d")
    assert gpu.environment_operations(none) == []
    assert gpu.hidden_devices(none) == (["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidiactl",
                                         "/dev/nvidia-uvm"], ["/dev/nvidia-caps"])


def test_an_allocation_the_node_cannot_serve_is_the_nodes_fault(recipe):
    with pytest.raises(NodeError, match=r"allocated GPU\(s\) 3 have no device node"):
        gpu.plan_injection(_discovery(recipe, {0: "/dev/nvidia0"}), [0, 3], True, "/sr", "/h", "/d")
    with pytest.raises(NodeError, match="without a usable nvidia driver: no libcuda"):
        gpu.plan_injection(_discovery(recipe, {0: "/dev/nvidia0"}, ["no libcuda"]), [0], True, "/sr", "/h", "/d")
    # without GPUs the job needs nothing of the driver
    gpu.plan_injection(_discovery(recipe, {}, ["no libcuda"]), [], True, "/sr", "/h", "/d")


def test_amd_is_one_more_recipe_file():
    """Render nodes renderD128... are GPUs 0...; /dev/kfd is shared; ROCm's user-space is the image's."""
    amd = gpurecipe.load_recipe("amd")
    assert (amd.gpu_dir, amd.gpu_major, amd.gpu_index_base, amd.control_devices) == ("/dev/dri", 226, 128, ["/dev/kfd"])
    assert amd.version_file is None and amd.libraries == {} and amd.binaries == {}
    node = {0: "/dev/dri/renderD128", 1: "/dev/dri/renderD129"}
    found = gpudiscovery.Discovery(recipe=amd, version=None, libraries=[], binaries=[], gpus=node, control=["/dev/kfd"],
                          capability_dirs=[], stale=[], problems=[])
    one = gpu.plan_injection(found, [1], True, "/sr", "/h", "/d")
    assert gpu.hidden_devices(one) == (["/dev/dri/renderD128"], [])
    assert gpu.environment_operations(one) == [("%", "ROCR_VISIBLE_DEVICES", "1"), ("%", "GPU_DEVICE_ORDINAL", "1")]
    none = gpu.plan_injection(found, [], True, "/sr", "/h", "/d")
    assert gpu.hidden_devices(none) == (["/dev/dri/renderD128", "/dev/dri/renderD129", "/dev/kfd"], [])


def test_cuda_visible_devices_renumbered_only_when_slurm_used_node_indices(recipe):
    """Without ConstrainDevices a bare-metal task opens every GPU of the node and Slurm gives node
    indices; in the container only the job's GPUs open, so CUDA numbers them 0..n-1."""
    node = {0: "/dev/nvidia0", 1: "/dev/nvidia1", 2: "/dev/nvidia2", 3: "/dev/nvidia3"}

    def renumbering(gpus, local_ids=False):
        inj = gpu.plan_injection(_discovery(recipe, node), gpus, False, "/sr", "/h", "/d", local_ids=local_ids)
        return [op for op in gpu.environment_operations(inj) if op[0] == "%"]

    assert renumbering([1, 3]) == [("%", "CUDA_VISIBLE_DEVICES", "1,3"), ("%", "GPU_DEVICE_ORDINAL", "1,3")]
    assert renumbering([0, 1]) == []  # the job holds GPUs 0..n-1: the same numbers either way
    assert renumbering([1, 3], local_ids=True) == []  # the device cgroup already numbers them from 0
    assert renumbering([]) == []
    env = {"CUDA_VISIBLE_DEVICES": "3", "GPU_DEVICE_ORDINAL": "1,3"}
    apply_operations(env, renumbering([1, 3]))
    assert env == {"CUDA_VISIBLE_DEVICES": "1", "GPU_DEVICE_ORDINAL": "0,1"}
    unset: dict[str, str] = {}
    apply_operations(unset, renumbering([1, 3]))
    assert unset == {}


@pytest.mark.parametrize(("value", "ids", "expected"), [
    ("3", "1,3", "1"), ("1,3", "1,3", "0,1"), ("3,1", "1,3", "1,0"), ("03", "3", "0"),
    ("2", "1,3", ""),  # not the job's: dropped, never widened
    ("GPU-8e1d4c2a,3", "1,3", "GPU-8e1d4c2a,1"), ("MIG-0f3c", "1", "MIG-0f3c"), ("1,,3", "1,3", "0,1"), ("", "1", ""),
])
def test_renumber_devices(value, ids, expected):
    assert renumber_devices(value, ids) == expected


def _slurm_conf(tmp_path, task_plugin: str | None, constrain: str | None) -> str:
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\n" + (f"taskplugin = {task_plugin}  # comment\n" if task_plugin else ""))
    if constrain is not None:
        (tmp_path / "cgroup.conf").write_text(f"# ConstrainDevices=yes\nConstrainDevices={constrain}\n")
    return str(conf)


@pytest.mark.parametrize(("task_plugin", "constrain", "local"), [
    ("task/affinity,task/cgroup", "yes", True), ("task/cgroup", "Yes", True), ("cgroup", "yes", True),
    ("task/cgroup", "no", False), ("task/cgroup", None, False),  # cgroup.conf's default is no
    ("task/affinity", "yes", False), (None, "yes", False), ("task/none", "yes", False),
])
def test_slurm_numbers_gpus_locally_only_with_task_cgroup_and_constrain_devices(tmp_path, task_plugin, constrain,
                                                                                local):
    assert gpudiscovery.slurm_numbers_gpus_locally(_slurm_conf(tmp_path, task_plugin, constrain)) is local


def test_unreadable_slurm_conf_is_one_clear_error(tmp_path):
    with pytest.raises(ShifterError, match=r"slurm.conf: No such file"):
        gpudiscovery.slurm_numbers_gpus_locally(str(tmp_path / "slurm.conf"))


def _socket(path: str) -> None:
    import socket

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)


def test_host_paths_of_the_running_driver_under_the_driver_root(recipe, tmp_path):
    """GSP firmware of the running version only, the persistenced socket (a socket, not a file),
    MPS directories: each where the driver root has it, at the same path in the container."""
    root = str(tmp_path)
    os.makedirs(f"{root}/lib/firmware/nvidia/535.104.05")
    os.makedirs(f"{root}/lib/firmware/nvidia/470.82.01")
    _socket(f"{root}/run/nvidia-persistenced/socket")
    os.makedirs(f"{root}/var/log/nvidia-mps")
    found = gpudiscovery.find_host_paths(recipe, "535.104.05", root)
    assert [(item.host, item.path, item.kind, item.writable) for item in found] == [
        (f"{root}/lib/firmware/nvidia/535.104.05", "/lib/firmware/nvidia/535.104.05", "directory", False),
        (f"{root}/run/nvidia-persistenced/socket", "/run/nvidia-persistenced/socket", "socket", False),
        (f"{root}/var/log/nvidia-mps", "/var/log/nvidia-mps", "directory", True)]
    assert gpudiscovery.find_host_paths(recipe, "550.54.14", root)[0].path == "/run/nvidia-persistenced/socket"


def test_host_paths_absent_or_of_another_kind_are_skipped(recipe, tmp_path):
    root = str(tmp_path)
    os.makedirs(f"{root}/run/nvidia-persistenced")
    with open(f"{root}/run/nvidia-persistenced/socket", "w"):  # a stale regular file is no socket
        pass
    with open(f"{root}/lib-firmware-missing", "w"):
        pass
    assert gpudiscovery.find_host_paths(recipe, "535.104.05", root) == []


def test_mps_directories_the_site_sets_in_site_env(recipe, tmp_path):
    pipe = tmp_path / "mps-pipe"
    pipe.mkdir()
    site = gpurecipe.site_env_values([f"CUDA_MPS_PIPE_DIRECTORY={pipe}", "CUDA_MPS_LOG_DIRECTORY=relative/ignored",
                                "OTHER=x"])
    found = gpudiscovery.find_host_paths(recipe, "535.104.05", str(tmp_path / "driver"), site)
    assert [(item.host, item.path, item.writable) for item in found] == [(str(pipe), str(pipe), True)]


@pytest.mark.parametrize("entry", [{"path": "run/x", "kind": "socket"}, {"path": "/a/../b", "kind": "directory"},
                                   {"path": "/a", "kind": "file"}, {"kind": "socket"}])
def test_bad_host_path_entries_are_one_clear_error(entry):
    with pytest.raises(ShifterError, match="recipe nvidia: bad host_paths entry"):
        gpurecipe._host_path_entry("nvidia", entry)
