"""The prolog/epilog hook's argv for the optional features, and the sshd's login-shell fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from setuproot.args import parse_args
from setuproot.sshd import ensure_login_shell
from shifter.errors import ShifterError
from spank_plugin.hooks import check_sshd_on_node, job_request, parse_plugstack_args, setuproot_argv, submit

PROLOG_ENV = {"SLURM_JOB_ID": "42", "SLURM_JOB_UID": "1002", "SLURM_JOB_GID": "1003", "SLURM_JOB_USER": "alice",
              "SLURM_NODELIST": "n[1-2]", "SLURM_JOB_CPUS_PER_NODE": "2(x2)",
              "SPANK_SHIFTER_IMAGE": "a" * 64, "SPANK_SHIFTER_IMAGETYPE": "id",
              "SPANK_SHIFTER_SSH_PUBKEY": "ssh-ed25519 AAAAC3Nza key"}


def argv_for(plugstack: list[str], env: dict[str, str]) -> list[str]:
    conf, _ = parse_plugstack_args(plugstack)
    return setuproot_argv(conf, job_request({}, env, conf))


def test_node_list_comes_from_the_prolog_environment_slurm_nodelist() -> None:
    argv = argv_for([], PROLOG_ENV)
    assert argv[argv.index("-N") + 1] == "n1/2 n2/2"


def test_memory_cgroup_sshd_and_deferral_reach_setuproot() -> None:
    argv = argv_for(["enable_sshd=1", "memory_cgroup=/sys/fs/cgroup/memory", "extern_cgroup=1"], PROLOG_ENV)
    assert argv[argv.index("--memory-cgroup") + 1] == "/sys/fs/cgroup/memory"
    assert argv[argv.index("-s") + 1] == PROLOG_ENV["SPANK_SHIFTER_SSH_PUBKEY"]
    assert "--defer-sshd" in argv
    request = parse_args(argv[1:], None)
    assert request.memory_cgroup == "/sys/fs/cgroup/memory" and request.defer_sshd and request.pubkey


def test_without_the_features_setuproot_gets_none_of_them() -> None:
    argv = argv_for([], PROLOG_ENV)
    assert "--memory-cgroup" not in argv and "-s" not in argv and "--defer-sshd" not in argv
    assert not parse_args(argv[1:], None).defer_sshd


def test_sshd_started_by_the_prolog_without_extern_cgroup() -> None:
    argv = argv_for(["enable_sshd=1", "memory_cgroup=/sys/fs/cgroup/memory"], PROLOG_ENV)
    assert "-s" in argv and "--defer-sshd" not in argv


def test_sshd_without_any_containment_is_a_configuration_error() -> None:
    """Nothing would track what users start through the sshd: refused, with what to set."""
    with pytest.raises(ShifterError, match="enable_sshd=1 needs extern_cgroup=1 .* or memory_cgroup="):
        parse_plugstack_args(["enable_sshd=1"])
    assert parse_plugstack_args(["enable_sshd=1", "extern_cgroup=1"])[0].enable_sshd


def test_prolog_sshd_on_cgroup_v2_needs_the_extern_step(tmp_path) -> None:
    """On the unified hierarchy a prolog-started sshd would leave Slurm's job cgroup (a v2 directory is
    recognised by its cgroup.controllers file; a plain directory stands in for it here)."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    conf, _ = parse_plugstack_args(["enable_sshd=1", f"memory_cgroup={tmp_path}"])
    with pytest.raises(ShifterError, match="cgroup v2.* needs extern_cgroup=1"):
        check_sshd_on_node(conf)
    check_sshd_on_node(parse_plugstack_args(["enable_sshd=1", "extern_cgroup=1", f"memory_cgroup={tmp_path}"])[0])
    (tmp_path / "cgroup.controllers").unlink()  # cgroup v1: the memory hierarchy is one of its own
    check_sshd_on_node(conf)


def test_ccm_job_gets_the_local_root_image() -> None:
    env = {k: v for k, v in PROLOG_ENV.items() if not k.startswith("SPANK_SHIFTER_IMAGE")}
    env["SPANK_SHIFTER_CCM"] = "1"
    assert argv_for(["enable_ccm=1"], env)[-2:] == ["local", "/"]
    with pytest.raises(ShifterError, match="names no image"):  # enable_ccm=0: never the host's root
        argv_for([], env)


def test_writable_reaches_setuproot_only_when_the_job_asked() -> None:
    argv = argv_for([], {**PROLOG_ENV, "SPANK_SHIFTER_WRITABLE": "1"})
    assert "--writable" in argv and parse_args(argv[1:], None).writable
    for value in ("0", "", "yes"):
        argv = argv_for([], {**PROLOG_ENV, "SPANK_SHIFTER_WRITABLE": value})
        assert "--writable" not in argv and not parse_args(argv[1:], None).writable


def _submit(opts: dict[str, str], monkeypatch, tmp_path: Path, **env: str) -> list[tuple[str, str]]:
    conf_file = tmp_path / "udiRoot.conf"
    conf_file.write_text("udiMount=/u\nloopMount=/l\nimagePath=/i\nudiRootPath=/r\netcPath=/e\nrootfsType=tmpfs\n")
    for name in ("SLURM_JOB_ID", "SHIFTER_WRITABLE", "SLURM_SPANK_SHIFTER_WRITABLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SHIFTER_UDIROOT_CONF", str(conf_file))
    conf, _ = parse_plugstack_args([])
    return submit(conf, opts)


def test_submit_publishes_writable_and_refuses_it_where_it_cannot_apply(monkeypatch, tmp_path: Path) -> None:
    image = "id:" + "a" * 64
    assert ("SHIFTER_WRITABLE", "1") in _submit({"image": image, "writable": "1"}, monkeypatch, tmp_path)
    assert all(k != "SHIFTER_WRITABLE" for k, _ in _submit({"image": image}, monkeypatch, tmp_path))
    with pytest.raises(ShifterError, match="--writable needs --image"):
        _submit({"writable": "1"}, monkeypatch, tmp_path)
    with pytest.raises(ShifterError, match="give it to sbatch or salloc"):  # a step of a read-only job
        _submit({"image": image, "writable": "1"}, monkeypatch, tmp_path, SLURM_JOB_ID="7")
    # a step of a --writable job gets the option again from Slurm: accepted
    assert _submit({"image": image, "writable": "1"}, monkeypatch, tmp_path, SLURM_JOB_ID="7",
                   SLURM_SPANK_SHIFTER_WRITABLE="1")


def test_an_image_that_looks_like_an_option_stays_a_positional_argument() -> None:
    argv = argv_for([], PROLOG_ENV)
    assert argv[-3:] == ["--", "id", "a" * 64]
    request = parse_args(argv[1:], None)
    assert (request.image_type, request.image, request.config_path) == ("id", "a" * 64, "/etc/shifter/udiRoot.conf")
    for image_type, image in (("id", "--config=/tmp/x"), ("--config=/tmp/x", "a" * 64), ("id", "-V"),
                              ("docker", "x\ny"), ("id", "")):
        env = {**PROLOG_ENV, "SPANK_SHIFTER_IMAGETYPE": image_type, "SPANK_SHIFTER_IMAGE": image}
        with pytest.raises(ShifterError):
            argv_for([], env)


def test_setuproot_never_reads_an_option_after_the_double_dash() -> None:
    request = parse_args(["-U", "5", "-G", "5", "-u", "alice", "--", "id", "--config=/tmp/x"], None)
    assert request.image == "--config=/tmp/x" and request.config_path is None


def _root_with(tmp_path: Path, passwd: str, files: list[str]) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(passwd)
    for name in files:
        path = tmp_path / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    return tmp_path


def test_missing_login_shell_becomes_bin_sh(tmp_path: Path) -> None:
    root = _root_with(tmp_path, "root:x:0:0::/root:/bin/bash\nalice:x:1002:1003::/home/alice:/bin/bash\n",
                      ["/bin/sh"])
    ensure_login_shell(str(root), "alice")
    assert (root / "etc/passwd").read_text() == ("root:x:0:0::/root:/bin/bash\n"
                                                 "alice:x:1002:1003::/home/alice:/bin/sh\n")
    assert oct((root / "etc/passwd").stat().st_mode & 0o777) == oct(0o644 & ~_umask())


def test_existing_login_shell_is_kept(tmp_path: Path) -> None:
    text = "alice:x:1002:1003::/home/alice:/bin/bash\n"
    root = _root_with(tmp_path, text, ["/bin/sh", "/usr/bin/bash"])
    os.symlink("/usr/bin/bash", root / "bin/bash")  # absolute link: resolved inside the root
    ensure_login_shell(str(root), "alice")
    assert (root / "etc/passwd").read_text() == text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_extern_sshd_stays_in_the_step_cgroup_on_a_fake_cgroup_v2_tree(tmp_path) -> None:
    """A directory with cgroup.controllers stands in for a v2 hierarchy (this machine has v1 only)."""
    from spank_plugin.stephooks import sshd_cgroup

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu memory pids\n")
    v1 = tmp_path / "v1"
    v1.mkdir()
    assert sshd_cgroup(str(v2), 1000, "7") is None
    assert sshd_cgroup(str(v1), 1000, "7") == f"{v1}/shifter/uid_1000/job_7"
    assert sshd_cgroup(None, 1000, "7") is None


def test_the_jobs_gpus_from_the_prolog_environment_reach_setuproot(tmp_path) -> None:
    """Slurm 22.05 gives the prolog SLURM_JOB_GPUS and SLURM_CONF (slurm.conf(5), "Prolog and Epilog")."""
    (tmp_path / "slurm.conf").write_text("TaskPlugin=task/none\n")
    env = {**PROLOG_ENV, "SLURM_JOB_GPUS": "0,2", "SLURM_CONF": str(tmp_path / "slurm.conf")}
    argv = argv_for([], env)
    assert argv[argv.index("--gpus") + 1] == "0,2" and argv.index("--gpus") < argv.index("--")
    assert "--gpus-local" not in argv
    assert parse_args(argv[1:], None).gpus == "0,2" and not parse_args(argv[1:], None).gpus_local
    without = argv_for([], PROLOG_ENV)
    assert "--gpus" not in without and parse_args(without[1:], None).gpus == ""
    # task/cgroup with ConstrainDevices=yes: tasks get job-relative indices, nothing to renumber
    (tmp_path / "slurm.conf").write_text("TaskPlugin=task/affinity,task/cgroup\n")
    (tmp_path / "cgroup.conf").write_text("ConstrainDevices=yes\n")
    local = argv_for([], env)
    assert "--gpus-local" in local and parse_args(local[1:], None).gpus_local


def test_a_gpu_job_with_an_unreadable_slurm_conf_is_one_clear_error(tmp_path) -> None:
    env = {**PROLOG_ENV, "SLURM_JOB_GPUS": "0", "SLURM_CONF": str(tmp_path / "missing.conf")}
    with pytest.raises(ShifterError, match="missing.conf: No such file or directory"):
        argv_for([], env)


def test_an_srun_in_a_job_reuses_the_image_id_its_job_resolved_only_from_the_users_own_file(
        monkeypatch, tmp_path: Path) -> None:
    """No gateway is configured here: whatever is not answered from ~/.udiRoot/step-images.<job> fails."""
    from shifter.formats.imageref import parse_image_ref

    home = tmp_path / "home"
    (home / ".udiRoot").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    ref = parse_image_ref("docker:demo/app:1", "docker")
    cache = home / ".udiRoot" / "step-images.7"
    cache.write_text(f" {ref.type}:{ref.tag} {'b' * 64}\n docker:other {'c' * 64}\n")
    cache.chmod(0o600)
    out = dict(_submit({"image": "docker:demo/app:1"}, monkeypatch, tmp_path, SLURM_JOB_ID="7"))
    assert (out["SHIFTER_IMAGE"], out["SHIFTER_IMAGETYPE"]) == ("b" * 64, "id")
    assert out["SHIFTER_IMAGEREQUEST"] == f"{ref.type}:{ref.tag}"
    with pytest.raises(ShifterError):  # another job's file is not this job's
        _submit({"image": "docker:demo/app:1"}, monkeypatch, tmp_path, SLURM_JOB_ID="8")
    with pytest.raises(ShifterError):  # outside a job the gateway is always asked
        _submit({"image": "docker:demo/app:1"}, monkeypatch, tmp_path)
    cache.chmod(0o620)  # a file someone else may write is not trusted
    with pytest.raises(ShifterError):
        _submit({"image": "docker:demo/app:1"}, monkeypatch, tmp_path, SLURM_JOB_ID="7")
    cache.chmod(0o600)
    cache.rename(home / "elsewhere")
    cache.symlink_to(home / "elsewhere")  # nor one reached through a symlink
    with pytest.raises(ShifterError):
        _submit({"image": "docker:demo/app:1"}, monkeypatch, tmp_path, SLURM_JOB_ID="7")
