"""The shifter launcher on the reuse path, as a real unprivileged user (reference sections 2.1, 2.7-2.9)."""

from __future__ import annotations

import os

import pytest

from tests.root.conftest import IMAGE_ID, JOB_IMAGE_REQUEST

JOB = "201"


@pytest.fixture
def prepared(clean_site, users):
    result = clean_site.setup(JOB, users[0], "-N", "n1/1")
    assert result.returncode == 0, result.stderr
    return clean_site


def _status(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_runs_image_command_with_no_privileges(prepared, users):
    site, user = prepared, users[0]
    out = site.shifter(user, "cat", "/etc/os-release", env=site.job_env(JOB))
    assert out.returncode == 0, out.stderr
    assert 'NAME="ShifterTestBox"' in out.stdout
    out = site.shifter(user, "cat", "/proc/self/status", env=site.job_env(JOB))
    status = _status(out.stdout)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap].strip(), 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Uid"].split() == [str(user.uid)] * 4
    assert status["Gid"].split() == [str(user.gid)] * 4
    assert sorted(int(g) for g in status["Groups"].split()) == user.groups


def test_setuid_binary_gains_nothing(prepared, users):
    site, user = prepared, users[0]
    out = site.shifter(user, "/bin/busybox-suid", "id", "-u", env=site.job_env(JOB))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(user.uid)


def test_environment_precedence_and_workdir(prepared, users):
    site, user = prepared, users[0]
    env_file = os.path.join(site.base, "envfile")
    with open(env_file, "w") as fh:
        fh.write("# comment\nFROM_FILE=1\nFROM_IMAGE=file\n")
    os.chmod(env_file, 0o644)
    env = site.job_env(JOB, CALLER="1")
    out = site.shifter(user, f"--env-file={env_file}", "-e", "FROM_CLI=2", "env", env=env)
    values = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert values["CALLER"] == "1" and values["FROM_FILE"] == "1" and values["FROM_CLI"] == "2"
    assert values["FROM_IMAGE"] == "file", "--env-file overrides the image ENV"
    assert values["SHIFTER_IMAGE"] == IMAGE_ID and values["SHIFTER_IMAGEREQUEST"] == JOB_IMAGE_REQUEST
    out = site.shifter(user, "-E", "env", env=env)
    assert "CALLER=1" not in out.stdout and "FROM_IMAGE=yes" in out.stdout
    out = site.shifter(user, "pwd", env=env, cwd="/run")  # /run is not in the image: image WORKDIR
    assert out.stdout.strip() == "/opt/app"
    out = site.shifter(user, "--workdir=/bin", "pwd", env=env)
    assert out.stdout.strip() == "/bin"
    out = site.shifter(user, "--entrypoint", env=env)
    assert out.stdout.strip() == "entry from-cmd"


def test_command_not_found_and_exit_status(prepared, users):
    site, user = prepared, users[0]
    out = site.shifter(user, "no-such-command", env=site.job_env(JOB))
    assert out.returncode == 127
    assert out.stderr.strip() == "shifter: no-such-command: not found in image"
    out = site.shifter(user, "sh", "-c", "exit 7", env=site.job_env(JOB))
    assert out.returncode == 7


def test_original_reference_matches_without_gateway(prepared, users):
    """No imageGateway is configured: a lookup would fail, so a success proves none was made."""
    site, user = prepared, users[0]
    out = site.shifter(user, "--image=docker:test/busybox", "cat", "/etc/imagefile", env=site.job_env(JOB))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "from the image\n"
    out = site.shifter(user, f"--image=id:{IMAGE_ID}", "true", env=site.job_env(JOB))
    assert out.returncode == 0, out.stderr


def test_clear_errors(prepared, users):
    site, user = prepared, users[0]
    env = {k: v for k, v in site.job_env(JOB).items() if not k.startswith("SHIFTER_IMAGE")}
    out = site.shifter(user, "true", env=env)
    assert out.returncode == 1 and out.stderr.startswith("shifter: no image requested"), out.stderr
    out = site.shifter(user, "--bogus", "true", env=site.job_env(JOB))
    assert out.returncode == 1 and "unrecognized option '--bogus'" in out.stderr
    out = site.shifter(user, "-e", "NOVALUE", "true", env=site.job_env(JOB))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    out = site.shifter(user, "-m", "nosuch", "true", env=site.job_env(JOB))
    assert out.returncode == 1 and "unknown shifter module" in out.stderr


def test_other_user_cannot_use_the_environment(prepared, users, fuse_mode):
    """The job's directory is the owner's alone; with /dev/fuse closed no private one can be built."""
    site = prepared
    fuse_mode(0o600)
    out = site.shifter(users[1], "true", env=site.job_env(JOB))
    assert out.returncode == 1
    assert "cannot be built: /dev/fuse" in out.stderr, out.stderr


def test_fresh_path_for_another_request(prepared, users, fuse_mode):
    """A volume the job was not set up with: a private environment via squashfuse, torn down after."""
    site, user = prepared, users[0]
    fuse_mode(0o666)
    env = site.job_env(JOB, SHIFTER_VOLUME="/site1/shared:/data")
    script = "cat /data/hello /etc/os-release; grep -E '^(Cap|NoNewPrivs)' /proc/self/status; exit 5"
    out = site.shifter(user, "sh", "-c", script, env=env)
    assert out.returncode == 5, out.stderr
    assert "hello from the site" in out.stdout and "ShifterTestBox" in out.stdout
    status = _status(out.stdout)
    assert all(int(status[c], 16) == 0 for c in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"))
    assert status["NoNewPrivs"].strip() == "1"
    # nothing of the private environment is visible on the node, the prepared one still works
    from shifter.runtime.mounts import mount_sources

    assert not [m for m in mount_sources() if m[1].startswith("fuse.squashfuse")]
    out = site.shifter(user, "cat", "/etc/imagefile", env=site.job_env(JOB))
    assert out.returncode == 0 and out.stdout == "from the image\n"
    from shifter.launch.fresh import SQUASHFUSE_CANDIDATES

    names = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    names.add(fh.read().split(b"\0")[0].decode(errors="replace"))
            except OSError:
                pass
    assert not any(n.endswith(os.path.basename(c)) for n in names for c in SQUASHFUSE_CANDIDATES)


def test_fresh_path_refuses_private_image_of_another_user(prepared, users, fuse_mode):
    from tests.root.conftest import PRIVATE_ID

    site = prepared
    fuse_mode(0o666)
    out = site.shifter(users[1], f"--image=id:{PRIVATE_ID}", "true", env=site.job_env(JOB))
    assert out.returncode == 1 and "private" in out.stderr, out.stderr


def test_fresh_path_with_a_mount_below_the_hosts_tmp(prepared, users, fuse_mode):
    """A filesystem mounted somewhere below /tmp (a site's, another tool's) is locked to /tmp in the
    user's namespace: the private environment still gets /tmp, with that mount in it."""
    import tempfile

    from shifter.runtime import linux

    site, user = prepared, users[0]
    fuse_mode(0o666)
    below = tempfile.mkdtemp(prefix="shifter-below-tmp-", dir="/tmp")
    os.chmod(below, 0o755)
    linux.mount("tmpfs", below, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755,size=1m")
    try:
        with open(os.path.join(below, "seen"), "w") as fh:
            fh.write("below tmp\n")
        env = site.job_env(JOB, SHIFTER_VOLUME="/site1/shared:/data")
        out = site.shifter(user, "cat", os.path.join(below, "seen"), "/data/hello", env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "below tmp\nhello from the site\n"
    finally:
        linux.umount2(below)
        os.rmdir(below)
