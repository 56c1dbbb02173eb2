"""The node runtime's pure helpers: option parsing, image selection, mount-table parsing, path
resolution inside a root, /etc generation, user-namespace maps, job ids (no root needed)."""

from __future__ import annotations

import os

import pytest

from shifter import cmdline
from shifter.errors import ShifterError
from shifter.launch.launcher import parse_options, resolve_request
from shifter.runtime import etcfiles, mounts, pathsafe, userns
from shifter.runtime.jobenv import check_jobid

ID = "e" * 64


# -- command lines ----------------------------------------------------------------------------

def test_getopt_like_getopt_long():
    opts, rest = cmdline.getopt(["-U", "5", "-G6", "-v", "a", "--config=/c", "--job-id", "7", "id", "x"],
                                "v:U:G:", ["config=", "job-id="])
    assert opts == [("-U", "5"), ("-G", "6"), ("-v", "a"), ("--config", "/c"), ("--job-id", "7")]
    assert rest == ["id", "x"]
    opts, rest = cmdline.getopt(["id", "-V", "x"], "V", [], permute=True)
    assert opts == [("-V", None)] and rest == ["id", "x"]


@pytest.mark.parametrize("argv, message", [
    (["-x"], "invalid option -- 'x'"),
    (["--nope"], "unrecognized option '--nope'"),
    (["-U"], "requires a value"),
    (["--config"], "requires a value"),
    (["--all=1"], "takes no value"),
])
def test_getopt_errors(argv, message):
    with pytest.raises(ShifterError, match=message):
        cmdline.getopt(argv, "U:", ["config=", "all"])


def test_launcher_options_stop_at_first_non_option():
    opts = parse_options(["--image=docker:a", "-V", "/a:/b", "--volume=/c:/d", "-e", "X=1", "-E", "-w",
                          "--entrypoint", "cmd", "-v", "--x"])
    assert opts.image == "docker:a" and opts.volumes == ["/a:/b", "/c:/d"] and opts.envs == ["X=1"]
    assert opts.clearenv is True and opts.workdir is True and opts.entrypoint is True
    assert opts.command == ["cmd", "-v", "--x"]
    opts = parse_options(["-w/tmp", "--entrypoint=/bin/x", "--", "-v"])
    assert opts.workdir == "/tmp" and opts.entrypoint == "/bin/x" and opts.command == ["-v"]
    assert parse_options([]).command == []


# -- image selection --------------------------------------------------------------------------

JOB_ENV = {"SHIFTER_IMAGETYPE": "id", "SHIFTER_IMAGE": ID, "SHIFTER_IMAGEREQUEST": "docker:ubuntu:22.04"}


def test_job_image_needs_no_lookup():
    request = resolve_request(parse_options(["true"]), JOB_ENV, "docker")
    assert request.identifier == ID and request.ref_text == "docker:ubuntu:22.04"


def test_original_reference_resolves_to_job_id_locally():
    for text in ("docker:ubuntu:22.04", "ubuntu:22.04"):
        request = resolve_request(parse_options([f"--image={text}", "true"]), JOB_ENV, "docker")
        assert request.identifier == ID
    other = resolve_request(parse_options(["--image=ubuntu:24.04", "true"]), JOB_ENV, "docker")
    assert other.identifier is None and other.tag == "ubuntu:24.04"


def test_spank_variables_and_precedence():
    env = {"SLURM_SPANK_SHIFTER_IMAGETYPE": "id", "SLURM_SPANK_SHIFTER_IMAGE": ID,
           "SLURM_SPANK_SHIFTER_VOLUME": "/a:/b", "SHIFTER_VOLUME": "/c:/d"}
    request = resolve_request(parse_options(["true"]), env, "docker")
    assert request.identifier == ID and request.volumes == "/c:/d"
    request = resolve_request(parse_options(["-V", "/e:/f", "true"]), env, "docker")
    assert request.volumes == "/e:/f", "the first --volume replaces the environment's"
    with pytest.raises(ShifterError, match="no image requested"):
        resolve_request(parse_options(["true"]), {"SHIFTER_IMAGE": ID}, "docker")


# -- mount table ------------------------------------------------------------------------------

def test_mountinfo_unescape_and_subtrees(tmp_path):
    assert mounts.unescape(r"/a\040b\011c\134d") == "/a b\tc\\d"
    table = tmp_path / "mountinfo"
    table.write_text(
        "1 0 0:1 / / rw - ext4 /dev/x rw\n"
        "2 1 0:2 / /x/udiMount rw - tmpfs tmpfs rw\n"
        "3 2 0:3 / /x/udiMount/1/root rw - tmpfs tmpfs rw\n"
        "4 3 0:4 / /x/udiMount/1/root/with\\040space rw - tmpfs tmpfs rw\n"
        "5 1 0:5 / /x/udiMount2 rw - tmpfs tmpfs rw\n")
    assert mounts.mounts_under("/x/udiMount", str(table)) == [
        "/x/udiMount", "/x/udiMount/1/root", "/x/udiMount/1/root/with space"]
    assert mounts.mounts_under("/x/udiMount/", str(table))[0] == "/x/udiMount"
    assert mounts.outermost(["/a/b", "/a", "/a/b/c", "/ab", "/c/d"]) == ["/a", "/ab", "/c/d"]
    assert mounts.mount_sources(str(table))[1] == ("/x/udiMount", "tmpfs", "tmpfs")


# -- paths inside a root ----------------------------------------------------------------------

def test_resolve_in_root_never_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("/usr/lib")
    (root / "escape").symlink_to("/etc")
    (root / "up").symlink_to("../../../../..")
    assert pathsafe.resolve_in_root(str(root), "/lib") == f"{root}/usr/lib"
    assert pathsafe.resolve_in_root(str(root), "/up/usr") == f"{root}/usr"
    with pytest.raises(FileNotFoundError):
        pathsafe.resolve_in_root(str(root), "/escape/passwd")
    assert pathsafe.resolve_in_root(str(root), "/escape/x", must_exist=False) == f"{root}/etc/x"
    (root / "loop").symlink_to("loop")
    with pytest.raises(OSError, match="too many symlinks"):
        pathsafe.resolve_in_root(str(root), "/loop")
    fd = pathsafe.open_inside(str(root), f"{root}/usr", os.O_PATH)
    os.close(fd)
    with pytest.raises(OSError):
        pathsafe.open_inside(str(root), "/etc", os.O_PATH)


# -- /etc and maps ----------------------------------------------------------------------------

def test_filter_group_limits_memberships_and_drops_gid_0():
    text = "root:x:0:alice\na:x:10:alice,bob\nb:x:11:bob\nalice:x:12:\nc:x:13:alice\n"
    assert etcfiles.filter_group(text, "alice", 2) == "a:x:10:alice\nb:x:11:\nalice:x:12:alice\nc:x:13:\n"
    assert etcfiles.filter_group(text, "alice", 0).count(":alice\n") == 3, "0 means unlimited, as documented"
    with pytest.raises(ShifterError, match="bad gid"):
        etcfiles.filter_group("x:x:abc:\n", "alice", 1)


def test_passwd_lookup_and_gid_map():
    assert etcfiles.find_passwd_entry("a:x:1:2:g:/h:/bin/sh\n", "a") == ["a", "x", "1", "2", "g", "/h", "/bin/sh"]
    assert etcfiles.find_passwd_entry("a:x:1:2:g:/h:/bin/sh\n", "b") is None
    assert userns.gid_map_text(100, (200, 100, 50)) == "50 50 1\n100 100 1\n200 200 1\n"


@pytest.mark.parametrize("text", ["", "12a", "../1", "1/2", "١٢", "1" * 21, None])
def test_bad_job_ids(text):
    with pytest.raises(ShifterError):
        check_jobid(text)


def test_good_job_id():
    assert check_jobid("123") == "123"
