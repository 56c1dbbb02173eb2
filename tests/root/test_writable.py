"""--writable: a per-job overlay over the image, with real overlay, tmpfs and idmapped mounts."""

from __future__ import annotations

import os

from tests.root.conftest import IMAGE_ID


def _mount_options() -> dict[str, list[str]]:
    options = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            options[fields[4]] = fields[5].split(",") + fields[fields.index("-") + 3].split(",")
    return options


def test_writes_are_shared_by_launches_of_the_job_and_gone_after_it(clean_site, users):
    site, user = clean_site, users[0]
    assert site.setup("201", user, "--writable").returncode == 0
    env = site.job_env("201")
    first = site.shifter(user, "sh", "-c", "echo tool > /bin/newtool && echo changed > /opt/app/marker "
                         "&& mkdir /var/lib/app/db && echo row > /var/lib/app/db/t && id -u", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(user.uid), "the task stays the unprivileged user"
    second = site.shifter(user, "sh", "-c", "cat /bin/newtool /opt/app/marker /var/lib/app/db/t", env=env)
    assert (second.returncode, second.stdout) == (0, "tool\nchanged\nrow\n"), second.stderr
    # the image itself is untouched: another job, without --writable, sees it read-only and unchanged
    assert site.setup("202", user).returncode == 0
    other = site.shifter(user, "sh", "-c", "cat /opt/app/marker; ls /bin/newtool; touch /bin/x; echo rc=$?",
                         env=site.job_env("202"))
    assert other.stdout.startswith("app\n") and other.stdout.endswith("rc=1\n"), other.stdout + other.stderr
    assert "No such file" in other.stderr and "Read-only file system" in other.stderr, other.stderr
    assert os.path.exists(os.path.join(site.udi_mount, "201", "writable"))
    assert not os.path.exists(os.path.join(site.udi_mount, "202", "writable"))
    assert site.unsetup("--job-id", "201").returncode == 0
    assert not [p for p in site.mounts() if "/201" in p], site.mounts()
    assert not os.path.exists(os.path.join(site.loop_mount, "201"))
    # the same job id set up again starts from the image
    assert site.setup("201", user, "--writable").returncode == 0
    again = site.shifter(user, "sh", "-c", "cat /opt/app/marker; ls /bin/newtool", env=env)
    assert again.stdout == "app\n" and "No such file" in again.stderr, again.stdout + again.stderr


def test_size_limit_is_enforced(clean_site, users):
    site, user = clean_site, users[0]
    site.write_config("writableLayerSize=2M\n")
    assert site.setup("203", user, "--writable").returncode == 0
    out = site.shifter(user, "sh", "-c", "busybox dd if=/dev/zero of=/opt/app/big bs=1M count=4 2>&1; echo rc=$?",
                       env=site.job_env("203"))
    assert "No space left on device" in out.stdout and "rc=1" in out.stdout, out.stdout + out.stderr
    with open("/proc/self/mountinfo") as fh:
        sizes = [line for line in fh if line.split()[4] == os.path.join(site.loop_mount, "203", "rw")]
    assert len(sizes) == 1 and "size=2048k" in sizes[0], sizes


def test_nosuid_nodev_and_setuid_binaries_stay_inert(clean_site, users):
    site, user = clean_site, users[0]
    assert site.setup("204", user, "--writable").returncode == 0
    env = site.job_env("204")
    script = ("/bin/busybox-suid id -u; touch /bin/busybox-suid; /bin/busybox-suid id -u; "
              "busybox cp /bin/busybox /bin/busybox-mine && busybox chmod 4755 /bin/busybox-mine && "
              "/bin/busybox-mine id -u")
    out = site.shifter(user, "sh", "-c", script, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(user.uid)] * 3, out.stdout
    upper = os.path.join(site.loop_mount, "204", "rw", "upper", "bin")
    for name in ("busybox-suid", "busybox-mine"):  # copied up / created: in the upper layer, never root's
        info = os.stat(os.path.join(upper, name))
        assert info.st_uid == user.uid, (name, info.st_uid)
    options = _mount_options()
    root = os.path.join(site.udi_mount, "204", "root")
    for point in (os.path.join(root, "bin"), os.path.join(root, "opt/app"),
                  os.path.join(site.loop_mount, "204", "merged"), os.path.join(site.loop_mount, "204", "rw")):
        assert {"nosuid", "nodev"} <= set(options[point]), (point, options[point])
    assert "rw" in options[os.path.join(root, "bin")]
    assert "ro" in options[root], "the root tmpfs itself stays read-only: /etc is the site's"
    assert "idmapped" in options[os.path.join(site.loop_mount, "204", "lower")]


def test_refusals_leave_nothing(clean_site, users):
    site, user = clean_site, users[0]
    site.write_config("writableLayerSize=0\n")
    result = site.setup("205", user, "--writable")
    assert result.returncode == 1 and "writableLayerSize=0" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    site.write_config("allowLocalChroot=1\n")
    result = site.setup("205", user, "--writable", image="/", image_type="local")
    assert result.returncode == 1 and "--writable needs an image from the gateway" in result.stderr, result.stderr
    site.write_config()
    assert site.setup("205", user, "--writable", image=IMAGE_ID).returncode == 0
    assert site.unsetup("--job-id", "205").returncode == 0
    site.wait_no_loops()
    assert site.leftovers() == {}, site.leftovers()


def test_shifter_writable_insists_on_the_jobs_writable_layer(clean_site, users):
    site, user = clean_site, users[0]
    assert site.setup("206", user, "--writable").returncode == 0
    assert site.setup("207", user).returncode == 0
    ok = site.shifter(user, "--writable", "sh", "-c", "echo w > /opt/app/w && cat /opt/app/w", env=site.job_env("206"))
    assert (ok.returncode, ok.stdout) == (0, "w\n"), ok.stderr
    refused = site.shifter(user, "--writable", "true", env=site.job_env("207"))
    assert refused.returncode == 1 and "job 207's environment is read-only" in refused.stderr, refused.stderr
    other = site.shifter(user, "--writable", "--volume=/site1/shared:/data", "true", env=site.job_env("206"))
    assert other.returncode == 1 and "--writable needs the job's own environment" in other.stderr, other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
