"""bin/shifter, the interpreter-free front: same result as the Python launcher, used only when the plan fits.

Every invocation below runs twice as the unprivileged user - through bin/shifter and through the
Python launcher directly - and must give the same output, status and errors.  A second build of
bin/shifter whose Python launcher does not exist shows which requests it serves itself: those
succeed, everything else fails to reach the missing launcher.
"""

from __future__ import annotations

import os

import pytest

from tests.root.conftest import IMAGE_ID

JOB = "301"
NO_PYTHON = "/nonexistent/shifter-python"
SITE_ENV = ("siteEnv=SITE_SET=1\nsiteEnvAppend=PATH=/site/bin\nsiteEnvPrepend=LD_LIBRARY_PATH=/site/lib\n"
            "siteEnvUnset=CALLER_SECRET\nmodule_tools_siteEnv=TOOLS=1\nmodule_tools_siteEnvPrepend=PATH=/tools/bin\n"
            "defaultModules=tools\n")


@pytest.fixture
def prepared(clean_site, users):
    clean_site.write_config(SITE_ENV)
    result = clean_site.setup(JOB, users[0], "-N", "n1/1", "-v", "/site1/shared:/data:ro")
    assert result.returncode == 0, result.stderr
    return clean_site


@pytest.fixture
def c_only(site):
    """bin/shifter built with no Python launcher behind it."""
    path = os.path.join(site.bin, "shifter-c-only")
    site.build_launcher(path, NO_PYTHON)
    yield "shifter-c-only"
    os.unlink(path)


def _job_env(site, **extra: str) -> dict[str, str]:
    return site.job_env(JOB, SHIFTER_VOLUME="/site1/shared:/data:ro", CALLER="1", CALLER_SECRET="x",
                        LD_LIBRARY_PATH="/caller/lib", **extra)


def _both(site, user, *args: str, env: dict[str, str], cwd: str = "/", lines=lambda text: text.splitlines()):
    """Run through bin/shifter and the Python launcher; ``lines`` picks what must be equal."""
    fast = site.shifter(user, *args, env=env, cwd=cwd)
    slow = site.shifter(user, *args, env=env, cwd=cwd, launcher="shifter-python")
    assert (fast.returncode, fast.stderr) == (slow.returncode, slow.stderr), args
    assert lines(fast.stdout) == lines(slow.stdout), args
    return fast


def _status(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@pytest.mark.parametrize("extra", [{}, {"SHIFTER_IMAGEREQUEST": ""}, {"PATH": ""}])
def test_same_environment_as_the_python_launcher(prepared, users, extra):
    site, user = prepared, users[0]
    out = _both(site, user, "env", env=_job_env(site, **extra), lines=lambda text: sorted(text.splitlines()))
    values = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert values["SITE_SET"] == "1" and values["TOOLS"] == "1" and values["CALLER"] == "1"
    assert "CALLER_SECRET" not in values
    assert values["LD_LIBRARY_PATH"] == "/site/lib:/caller/lib"
    assert values["PATH"] == "/tools/bin:/usr/bin:/bin:/site/bin", "image PATH, then the module's, then the site's"
    assert values["SHIFTER_IMAGE"] == IMAGE_ID
    if "SHIFTER_IMAGEREQUEST" in extra:
        assert values["SHIFTER_IMAGEREQUEST"] == f"id:{IMAGE_ID}"


def test_same_process_state_as_the_python_launcher(prepared, users):
    site, user = prepared, users[0]
    credentials = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
                   "Seccomp", "SigBlk", "SigIgn")
    out = _both(site, user, "cat", "/proc/self/status", env=_job_env(site),
                lines=lambda text: [line for line in text.splitlines() if line.split(":")[0] in credentials])
    status = _status(out.stdout)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"].strip() == "1"
    sigpipe, sigxfsz = 1 << (13 - 1), 1 << (25 - 1)
    assert int(status["SigIgn"], 16) & (sigpipe | sigxfsz) == 0, "the interpreter's ignored signals stay behind"
    assert status["Uid"].split() == [str(user.uid)] * 4
    assert sorted(int(g) for g in status["Groups"].split()) == user.groups
    fast = site.shifter(user, "ls", "-l", "/proc/self/ns/user", env=_job_env(site))
    slow = site.shifter(user, "ls", "-l", "/proc/self/ns/user", env=_job_env(site), launcher="shifter-python")
    namespace = fast.stdout.rsplit(" -> ", 1)[-1]
    assert namespace.startswith("user:[") and namespace == slow.stdout.rsplit(" -> ", 1)[-1], "one for all tasks"
    out = _both(site, user, "sh", "-c", "yes | head -n 1", env=_job_env(site))
    assert (out.returncode, out.stdout, out.stderr) == (0, "y\n", "")


@pytest.mark.parametrize("cwd, expected", [("/", "/"), ("/usr/bin", "/usr/bin"), ("/run", "/opt/app")])
def test_same_working_directory(prepared, users, cwd, expected):
    out = _both(prepared, users[0], "pwd", env=_job_env(prepared), cwd=cwd)
    assert out.stdout.strip() == expected


@pytest.mark.parametrize("argv, status, message", [
    (["no-such-command"], 127, "shifter: no-such-command: not found in image"),
    (["/etc/imagefile"], 126, "shifter: /etc/imagefile: permission denied"),
    (["sh", "-c", "exit 7"], 7, ""),
    (["cat", "/data/hello"], 0, ""),
])
def test_same_exit_status_and_errors(prepared, users, argv, status, message):
    out = _both(prepared, users[0], *argv, env=_job_env(prepared))
    assert out.returncode == status and out.stderr.strip() == message


def test_serves_the_common_case_without_python(prepared, users, c_only):
    out = prepared.shifter(users[0], "cat", "/data/hello", env=_job_env(prepared), launcher=c_only)
    assert (out.returncode, out.stdout) == (0, "hello from the site\n"), out.stderr


@pytest.mark.parametrize("change", ["option", "other volume", "other module", "other image", "script", "no job",
                                    "other user", "changed config"])
def test_hands_everything_else_to_python(prepared, users, c_only, change):
    """Each of these must reach the (missing) Python launcher before anything is changed."""
    site, user, args, env = prepared, users[0], ["true"], _job_env(prepared)
    if change == "option":
        args = ["-E", "true"]
    elif change == "other volume":
        env["SHIFTER_VOLUME"] = "/site1/shared:/data"
    elif change == "other module":
        env["SHIFTER_MODULE"] = "none"
    elif change == "other image":
        env["SHIFTER_IMAGE"] = "d" * 64
    elif change == "script":
        script = os.path.join(site.base, "job.sh")
        with open(script, "w") as fh:
            fh.write(f"#!{site.bin}/shifter /bin/sh\ntrue\n")
        os.chmod(script, 0o755)
        args = ["sh", script]
    elif change == "no job":
        del env["SLURM_JOB_ID"]
    elif change == "other user":
        user = users[1]
    elif change == "changed config":
        site.write_config(SITE_ENV + "siteEnv=LATER=1\n")
    out = site.shifter(user, *args, env=env, launcher=c_only)
    assert out.returncode == 127, (out.stdout, out.stderr)
    assert out.stderr.strip() == f"shifter: cannot run {NO_PYTHON}: No such file or directory"


def test_no_plan_for_a_module_with_a_userhook(clean_site, users):
    hook = os.path.join(clean_site.site_dir, "hook.sh")
    with open(hook, "w") as fh:
        fh.write("exit 0\n")
    clean_site.write_config("module_hooked_userhook=/site1/hook.sh\ndefaultModules=hooked\n")
    result = clean_site.setup(JOB, users[0], "-N", "n1/1")
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(os.path.join(clean_site.udi_mount, JOB, "launch.plan"))
    out = clean_site.shifter(users[0], "true", env=clean_site.job_env(JOB))
    assert out.returncode == 0, out.stderr


def test_plan_is_removed_with_the_environment(prepared, users):
    plan = os.path.join(prepared.udi_mount, JOB, "launch.plan")
    assert os.stat(plan).st_uid == 0
    result = prepared.unsetup("--job-id", JOB)
    assert result.returncode == 0, result.stderr
    assert not os.path.lexists(plan)


def _corrupt(plan: str, how: str, user) -> None:
    with open(plan, "rb") as fh:
        data = fh.read()
    records = data.split(b"\0")[:-1]
    if how == "symlink":
        os.rename(plan, plan + ".real")
        os.symlink(plan + ".real", plan)
        return
    if how == "owned by the user":
        os.chown(plan, user.uid, user.gid)
        return
    data = {
        "empty": b"",
        "truncated": data[:-3],
        "other version": data.replace(b"shifter-launch-plan/1", b"shifter-launch-plan/2"),
        "no workdir": b"\0".join(r for r in records if not r.startswith(b"w")) + b"\0",
        "operation without a value": data + b"=BROKEN\0",
        "unset without a name": data + b"-\0",
        "unknown operation": data + b"?X=1\0",
        "empty record": data + b"\0",
    }[how]
    with open(plan, "wb") as fh:
        fh.write(data)


@pytest.mark.parametrize("how", ["symlink", "owned by the user", "empty", "truncated", "other version", "no workdir",
                                 "operation without a value", "unset without a name", "unknown operation",
                                 "empty record"])
def test_a_damaged_plan_is_never_used(prepared, users, c_only, how):
    plan = os.path.join(prepared.udi_mount, JOB, "launch.plan")
    _corrupt(plan, how, users[0])
    out = prepared.shifter(users[0], "true", env=_job_env(prepared), launcher=c_only)
    assert out.returncode == 127, (out.stdout, out.stderr)
    assert out.stderr.strip() == f"shifter: cannot run {NO_PYTHON}: No such file or directory"
    out = prepared.shifter(users[0], "cat", "/etc/imagefile", env=_job_env(prepared))
    assert (out.returncode, out.stdout) == (0, "from the image\n"), "the Python launcher still serves the job"
