"""imagemanager.json validation: the original's documented examples load; every mistake names its key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.configfile import load_config, parse_config, parse_duration
from shifter.errors import ShifterError

# The two sample configurations from the original's installation guide.
LOCAL_MODE = {
    "DefaultImageLocation": "registry-1.docker.io",
    "DefaultImageFormat": "squashfs",
    "PullUpdateTimeout": 300,
    "ImageExpirationTimeout": "90:00:00:00",
    "MongoDBURI": "mongodb://localhost/",
    "MongoDB": "Shifter",
    "CacheDirectory": "/images/cache/",
    "ExpandDirectory": "/images/expand/",
    "Locations": {"registry-1.docker.io": {"remotetype": "dockerv2", "authentication": "http"}},
    "Platforms": {
        "mycluster": {
            "mungeSocketPath": "/var/run/munge/munge.socket.2",
            "accesstype": "local",
            "admins": ["root"],
            "local": {"imageDir": "/images"},
        }
    },
}
REMOTE_MODE = {
    **LOCAL_MODE,
    "Platforms": {
        "mycluster": {
            "mungeSocketPath": "/var/run/munge/munge.socket.2",
            "accesstype": "remote",
            "admins": ["root"],
            "host": ["mycluster01"],
            "ssh": {"username": "shifter", "key": "/home/shifter/.ssh/ssh.key", "imageDir": "/images"},
        }
    },
}


def cfg(**changes: Any) -> str:
    doc = json.loads(json.dumps(LOCAL_MODE))
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return json.dumps(doc)


def error_of(text: str) -> str:
    with pytest.raises(ShifterError) as info:
        parse_config(text, "im.json")
    return str(info.value)


def test_original_local_example_loads_with_its_values() -> None:
    c = parse_config(json.dumps(LOCAL_MODE))
    p = c.platforms["mycluster"]
    assert p.accesstype == "local" and p.image_dir == "/images" and p.admins == ("root",)
    assert p.munge_socket == "/var/run/munge/munge.socket.2"
    assert c.pull_update_timeout == 300.0  # the original ignored this key (PullUpdateTime typo)
    assert c.expiration_timeout == 90 * 86400
    assert c.locations["registry-1.docker.io"].url == "https://registry-1.docker.io"
    assert c.store == "sqlite:///images/cache/gateway.db"  # SQLite by default, even with MongoDBURI set
    assert c.authentication == "munge"
    assert c.import_users is None and not c.import_allowed("root")


def test_original_remote_example_loads() -> None:
    c = parse_config(json.dumps(REMOTE_MODE))
    p = c.platforms["mycluster"]
    assert p.accesstype == "remote" and p.hosts == ("mycluster01",)
    assert p.ssh is not None and p.ssh.username == "shifter" and p.image_dir == "/images"


def test_extension_keys() -> None:
    c = parse_config(
        cfg(
            Listen=["10.254.0.1:5555", "127.0.0.1:5555"],
            AccessLog="/var/log/gw.log",
            Store="sqlite:///var/lib/shifter/gateway.db",
            ImagePlatform="linux/arm64/v8",
        )
    )
    assert c.listen == (("10.254.0.1", 5555), ("127.0.0.1", 5555))
    assert c.access_log == "/var/log/gw.log"
    assert c.store == "sqlite:///var/lib/shifter/gateway.db"
    assert c.image_platform == ("linux", "arm64", "v8")
    assert parse_config(cfg(Store="mongodb")).store == "mongodb://localhost/"
    assert parse_config(cfg()).pull_deadline == 3600
    assert parse_config(cfg(PullDeadline=90.5)).pull_deadline == 90.5
    assert parse_config(cfg()).max_image_paths == 4_000_000
    assert parse_config(cfg(MaxImagePaths=2000)).max_image_paths == 2000


@pytest.mark.parametrize(
    "key,hint",
    [
        ("PullUpdateTime", "PullUpdateTimeout"),
        ("ConvertOptions", "ConverterOptions"),
        ("WorkerThread", "WorkerThreads"),
        ("Colour", None),
    ],
)
def test_unknown_or_misspelt_top_key_is_named(key: str, hint: str | None) -> None:
    message = error_of(cfg(**{key: 1}))
    assert f"unknown key {key}" in message
    if hint:
        assert f"did you mean {hint!r}" in message


def test_unknown_nested_keys_are_named_with_their_path() -> None:
    doc = json.loads(cfg())
    doc["Platforms"]["mycluster"]["mungeSocket"] = "/x"
    assert "unknown key Platforms.mycluster.mungeSocket" in error_of(json.dumps(doc))
    doc = json.loads(cfg())
    doc["Locations"]["registry-1.docker.io"]["authmethod"] = "basic"
    assert "Locations.registry-1.docker.io.authmethod" in error_of(json.dumps(doc))
    doc = json.loads(json.dumps(REMOTE_MODE))
    doc["Platforms"]["mycluster"]["ssh"]["user"] = "x"
    assert "Platforms.mycluster.ssh.user" in error_of(json.dumps(doc))


@pytest.mark.parametrize(
    "key,value,expect",
    [
        ("WorkerThreads", "4", "WorkerThreads must be an integer"),
        ("WorkerThreads", True, "WorkerThreads must be an integer"),
        ("WorkerThreads", 0, "WorkerThreads must be between"),
        ("APIProcesses", 0, "APIProcesses must be between 1 and 64, got 0"),
        ("APIProcesses", 65, "APIProcesses must be between 1 and 64, got 65"),
        ("APIProcesses", -2, "APIProcesses must be between 1 and 64, got -2"),
        ("APIProcesses", "2", "APIProcesses must be an integer, got a string"),
        ("APIProcesses", 2.0, "APIProcesses must be an integer, got a number"),
        ("APIProcesses", True, "APIProcesses must be an integer, got true/false"),
        ("PullUpdateTimeout", "300", "PullUpdateTimeout must be"),
        ("Metrics", "yes", "Metrics must be true/false"),
        ("ImageExpirationTimeout", "90 days", "ImageExpirationTimeout must be"),
        ("DefaultImageFormat", "qcow2", 'DefaultImageFormat must be "squashfs"'),
        ("DefaultImageFormat", "ext4", 'DefaultImageFormat must be "squashfs" (the only format this gateway'
         " builds), got 'ext4'"),
        ("DefaultImageFormat", "cramfs", 'DefaultImageFormat must be "squashfs"'),
        ("PullDeadline", 0, "PullDeadline must be between 0 and 604800 seconds"),
        ("PullDeadline", -5, "PullDeadline must be between"),
        ("PullDeadline", 10**9, "PullDeadline must be between"),
        ("PullDeadline", "60", "PullDeadline must be"),
        ("PullDeadline", True, "PullDeadline must be"),
        ("MaxImagePaths", 999, "MaxImagePaths must be between 1000 and 100000000"),
        ("MaxImagePaths", 10**9, "MaxImagePaths must be between"),
        ("MaxImagePaths", 5.5, "MaxImagePaths must be"),
        ("Authentication", "none", "Authentication must be"),
        ("ImportUsers", "everyone", "ImportUsers must be"),
        ("ImportUsers", [1, 2], "ImportUsers must be a list of strings"),
        ("ConverterOptions", {"squashfs": 3}, "ConverterOptions.squashfs"),
        ("ConverterOptions", {"tgz": "-x"}, "ConverterOptions.tgz"),
        ("ConverterOptions", {"squashfs": ["--bogus"]}, "unsupported option '--bogus'"),
        ("Listen", ["localhost"], "Listen has a bad address"),
        ("Listen", ["127.0.0.1:99999"], "Listen has a bad address"),
        ("Store", "postgres://x", "Store must be"),
        ("CacheDirectory", "relative/dir", "CacheDirectory must be an absolute path"),
        ("Platforms", {}, "Platforms must name at least one system"),
        ("Platforms", [], "Platforms must be an object"),
        ("ImagePlatform", "amd64", "ImagePlatform must be"),
        ("LogLevel", "loud", "LogLevel must be one of"),
    ],
)
def test_wrong_values_are_named(key: str, value: Any, expect: str) -> None:
    assert expect in error_of(cfg(**{key: value}))


@pytest.mark.parametrize("key", ["CacheDirectory", "ExpandDirectory", "Platforms"])
def test_missing_required_key_is_named(key: str) -> None:
    assert f"missing required key {key}" in error_of(cfg(**{key: None}))


def test_platform_rules() -> None:
    doc = json.loads(cfg())
    doc["Platforms"]["mycluster"]["accesstype"] = "nfs"
    assert "accesstype must be" in error_of(json.dumps(doc))
    doc = json.loads(cfg())
    del doc["Platforms"]["mycluster"]["local"]
    assert "Platforms.mycluster.local" in error_of(json.dumps(doc))
    doc = json.loads(json.dumps(REMOTE_MODE))
    del doc["Platforms"]["mycluster"]["host"]
    assert "needs keys host and ssh" in error_of(json.dumps(doc))
    doc = json.loads(cfg())
    doc["Platforms"]["mycluster"]["admins"] = "root"
    assert "Platforms.mycluster.admins must be a list" in error_of(json.dumps(doc))
    doc = json.loads(cfg())
    doc["Locations"]["registry-1.docker.io"]["remotetype"] = "dockerhub"
    assert "remotetype" in error_of(json.dumps(doc))


def test_mock_authentication_is_never_the_default() -> None:
    assert parse_config(cfg()).authentication == "munge"
    assert parse_config(cfg(Authentication="mock")).authentication == "mock"


def test_import_users_forms() -> None:
    assert parse_config(cfg(ImportUsers="all")).import_allowed("anyone")
    assert not parse_config(cfg(ImportUsers="None")).import_allowed("root")
    c = parse_config(cfg(ImportUsers=["alice"]))
    assert c.import_allowed("alice") and not c.import_allowed("bob")


def test_converter_options_string_or_list() -> None:
    assert parse_config(cfg(ConverterOptions={"squashfs": "-comp xz"})).converter_options == {
        "squashfs": ("-comp", "xz")
    }
    assert parse_config(cfg(ConverterOptions={"squashfs": ["-b", "1M"]})).converter_options == {
        "squashfs": ("-b", "1M")
    }


def test_durations() -> None:
    assert parse_duration("1:02:03:04", "k", "s") == 86400 + 2 * 3600 + 3 * 60 + 4
    assert parse_duration("10:00", "k", "s") == 600  # fields count from the right: M:S
    assert parse_duration(42, "k", "s") == 42
    for bad in ("", "1:2:3:4:5", "a:b", "-1"):
        with pytest.raises(ShifterError, match="k must be"):
            parse_duration(bad, "k", "s")


def test_bad_json_and_unreadable_file(tmp_path: Path) -> None:
    assert "not valid JSON" in error_of("{")
    assert "the document must be an object" in error_of("[]")
    with pytest.raises(ShifterError, match="cannot read gateway config"):
        load_config(str(tmp_path / "absent.json"))
    path = tmp_path / "im.json"
    path.write_text(cfg(Bogus=1))
    with pytest.raises(ShifterError, match=f"{path}: unknown key Bogus"):
        load_config(str(path))


def test_examiner_and_its_timeout() -> None:
    conf = parse_config(cfg(examiner="/usr/local/sbin/scan", ExaminerTimeout=30), "im.json")
    assert conf.examiner == "/usr/local/sbin/scan" and conf.examiner_timeout == 30
    assert parse_config(cfg(), "im.json").examiner is None
    assert parse_config(cfg(examiner=""), "im.json").examiner is None  # the original's "not set"
    assert parse_config(cfg(), "im.json").examiner_timeout == 600
    assert "ExaminerTimeout" in error_of(cfg(ExaminerTimeout=0))
    assert "ExaminerTimeout" in error_of(cfg(ExaminerTimeout="10"))


def test_api_processes_default_and_range() -> None:
    assert parse_config(cfg()).api_processes == 1
    assert parse_config(cfg(APIProcesses=2)).api_processes == 2
    assert parse_config(cfg(APIProcesses=64)).api_processes == 64
