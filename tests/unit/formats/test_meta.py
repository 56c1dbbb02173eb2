""".meta files: the original gateway's byte format in both directions, ACLs, malformed input."""

import os

import pytest

from shifter.errors import ShifterError
from shifter.formats.meta import ImageMeta, format_meta, parse_argv, parse_meta, read_meta, write_meta

# What the original gateway (converters.writemeta, Python 3) writes for a private image.
ORIGINAL_META = (
    "FORMAT: squashfs\n"
    "ENTRY: ['/docker-entrypoint.sh']\n"
    "CMD: ['/bin/sh', '-c', 'echo hi']\n"
    "WORKDIR: /root\n"
    "USERACL: 1000,1001\n"
    "GROUPACL: 1002\n"
    "ENV: PATH=/usr/local/sbin:/usr/bin\n"
    "ENV: FOO=bar\n"
    "USER: alice\n"
)


def test_reads_the_original_format():
    meta = parse_meta(ORIGINAL_META)
    assert meta == ImageMeta(
        format="squashfs",
        entrypoint=["/docker-entrypoint.sh"],
        cmd=["/bin/sh", "-c", "echo hi"],
        workdir="/root",
        env=["PATH=/usr/local/sbin:/usr/bin", "FOO=bar"],
        user_acl=[1000, 1001],
        group_acl=[1002],
        user="alice",
    )


def test_writes_the_original_format_byte_for_byte():
    assert format_meta(parse_meta(ORIGINAL_META)) == ORIGINAL_META


def test_line_order_and_omitted_fields():
    meta = ImageMeta(env=["A=1"], workdir="/w", cmd=["c"], entrypoint=["e"], user="u")
    assert format_meta(meta) == (
        "FORMAT: squashfs\nENTRY: ['e']\nCMD: ['c']\nWORKDIR: /w\nENV: A=1\nUSER: u\n"
    )
    assert format_meta(ImageMeta()) == "FORMAT: squashfs\n"


def test_python2_unicode_lists_and_bare_strings():
    meta = parse_meta("FORMAT: squashfs\nENTRY: [u'/bin/sh', u'-c']\nCMD: /bin/bash -l\n")
    assert meta.entrypoint == ["/bin/sh", "-c"]
    assert meta.cmd == ["/bin/bash -l"]


def test_key_before_first_colon_and_values_with_colons():
    meta = parse_meta("ENV: A=b:c\nENV:B=x\n  WORKDIR  :  /a:b  \n")
    assert meta.env == ["A=b:c", "B=x"]
    assert meta.workdir == "/a:b"


def test_comments_unknown_keys_and_lines_without_colon_ignored():
    meta = parse_meta("# FORMAT: bogus\nVOLUME: /data\nLABEL: x=y\nno colon here\nFORMAT: xfs\n")
    assert meta == ImageMeta(format="xfs")


def test_value_ending_in_backslash_is_literal():
    meta = parse_meta("ENV: A=c:\\\nENV: B=2\n")
    assert meta.env == ["A=c:\\", "B=2"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("['a', 'b']", ["a", "b"]),
        ("[u'a', u'b']", ["a", "b"]),
        ('["it\'s", "x"]', ["it's", "x"]),
        ("['a\\nb', 'c\\'d']", ["a\nb", "c'd"]),
        ("['a',]", ["a"]),
        ("[]", None),
        ("", None),
        ("/bin/sh -c x", ["/bin/sh -c x"]),
        ("[not a list", ["[not a list"]),
        ("[1, 2]", ["[1, 2]"]),
        ("['a'] + ['b']", ["['a'] + ['b']"]),
    ],
)
def test_entry_and_cmd_parsing(value, expected):
    assert parse_argv(value) == expected


def test_round_trip_with_awkward_values():
    entry = ["it's", 'say "hi"', "back\\slash", "ünï"]
    meta = ImageMeta(entrypoint=entry, cmd=[], env=["X=a b"], workdir="/")
    again = parse_meta(format_meta(meta))
    assert again.entrypoint == meta.entrypoint
    assert again.cmd is None  # an empty list means none, like the gateway's missing CMD
    assert again.env == ["X=a b"]


def test_acl_rule():
    public = ImageMeta()
    assert public.allows(1000, 1000, [])
    private = ImageMeta(user_acl=[1000], group_acl=[2000])
    assert private.allows(1000, 5, [])
    assert private.allows(7, 2000, [])
    assert private.allows(7, 8, [9, 2000])
    assert not private.allows(7, 8, [9])
    group_only = ImageMeta(group_acl=[2000])
    assert not group_only.allows(1000, 1000, [])


def test_empty_acl_means_no_acl():
    meta = parse_meta("USERACL: \nGROUPACL:\n")
    assert meta.user_acl == [] and meta.group_acl == []
    assert meta.allows(1, 1, [])


def test_acl_limit_of_1000_ids():
    ok = parse_meta("USERACL: " + ",".join(str(i) for i in range(1000)) + "\n")
    assert len(ok.user_acl) == 1000
    with pytest.raises(ShifterError, match="USERACL lists 1001 ids, more than the limit of 1000"):
        parse_meta("USERACL: " + ",".join(str(i) for i in range(1001)) + "\n")


# --- malformed input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("USERACL: 1000,abc\n", "USERACL: 'abc' is not a numeric id"),
        ("GROUPACL: 10,,20\n", "GROUPACL: '' is not a numeric id"),
        ("USERACL: -1\n", "USERACL: '-1' is not a numeric id"),
        ("GROUPACL: 1.5\n", "GROUPACL: '1.5' is not a numeric id"),
        ("USERACL: 99999999999\n", "USERACL: id 99999999999 is out of range"),
        ("FORMAT: ext3\n", "unsupported image FORMAT 'ext3'"),
        ("FORMAT: \n", "unsupported image FORMAT ''"),
    ],
)
def test_malformed_meta(text, fragment):
    with pytest.raises(ShifterError) as err:
        parse_meta(text)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "meta",
    [
        ImageMeta(env=["A=1\nUSERACL: 0"]),
        ImageMeta(workdir="/a\nENV: X=1"),
        ImageMeta(entrypoint=None, user="bob\r"),
        ImageMeta(format="tar"),
    ],
)
def test_writer_refuses_values_that_would_forge_lines(meta):
    with pytest.raises(ShifterError):
        format_meta(meta)


# --- files --------------------------------------------------------------------------------------


def test_write_meta_is_atomic_and_readable(tmp_path):
    path = tmp_path / "abc.meta"
    path.write_text("FORMAT: squashfs\nENV: OLD=1\n")
    meta = parse_meta(ORIGINAL_META)
    write_meta(str(path), meta)
    assert path.read_text() == ORIGINAL_META
    assert read_meta(str(path)) == meta
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc.meta"]


def test_write_meta_failure_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "abc.meta"
    with pytest.raises(ShifterError):
        write_meta(str(path), ImageMeta(env=["bad\nline"]))
    (tmp_path / "sub").mkdir()
    with pytest.raises(IsADirectoryError):
        write_meta(str(tmp_path / "sub"), ImageMeta())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_read_meta_errors_name_the_file(tmp_path):
    missing = tmp_path / "none.meta"
    with pytest.raises(ShifterError, match=f"image metadata {missing} not found"):
        read_meta(str(missing))
    bad = tmp_path / "bad.meta"
    bad.write_bytes(b"ENV: \xff\n")
    with pytest.raises(ShifterError, match="is not UTF-8"):
        read_meta(str(bad))
    acl = tmp_path / "acl.meta"
    acl.write_text("USERACL: x\n")
    with pytest.raises(ShifterError, match=f"image metadata {acl}: USERACL"):
        read_meta(str(acl))


# --- one line separator: "\n" ------------------------------------------------------------------

# every character str.splitlines() breaks on besides "\n", and other controls
_SPLITLINES_BREAKS = ["\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("separator", [*_SPLITLINES_BREAKS, "\0", "\x1b", "\x7f", "\x9b"])
def test_reader_refuses_a_forged_line_and_names_the_key(separator):
    text = f"FORMAT: squashfs\nENV: A=1{separator}USERACL: 4242\n"
    with pytest.raises(ShifterError, match=r"^ENV value .* contains the control character"):
        parse_meta(text)


@pytest.mark.parametrize("separator", [*_SPLITLINES_BREAKS, "\0", "\x1b"])
def test_writer_refuses_every_character_the_reader_refuses(separator):
    for meta, key in ((ImageMeta(env=[f"A=1{separator}USERACL: 4242"]), "ENV"),
                      (ImageMeta(workdir=f"/w{separator}"), "WORKDIR"), (ImageMeta(user=f"u{separator}x"), "USER")):
        with pytest.raises(ShifterError, match=f"^{key} value"):
            format_meta(meta)


def test_tab_and_unicode_text_stay_allowed():
    meta = ImageMeta(env=["A=a\tb", "B=ünï ✓", "C=\u00a0nbsp"], workdir="/wörk", cmd=["\x1c"])
    again = parse_meta(format_meta(meta))
    assert again.env == meta.env and again.workdir == "/wörk"
    assert again.cmd == ["\x1c"]  # inside a list it is written escaped, never as a raw separator
    assert again.user_acl == [] and "\x1c" not in format_meta(meta)


def test_reader_refuses_control_characters_outside_known_keys():
    for text in ("# comment\x1c\nFORMAT: squashfs\n", "NOCOLON\x00\n", "X-UNKNOWN: a\x85b\n"):
        with pytest.raises(ShifterError, match="control character"):
            parse_meta(text)


def test_reader_refuses_an_env_entry_no_process_can_receive_and_an_oversized_file(tmp_path):
    with pytest.raises(ShifterError, match="longer than a process can receive"):
        parse_meta("ENV: A=" + "x" * (128 * 1024) + "\n")
    assert parse_meta("ENV: A=" + "x" * 1000 + "\n").env == ["A=" + "x" * 1000]
    big = tmp_path / "big.meta"
    big.write_bytes(b"# " + b"x" * (8 * 1024 * 1024) + b"\n")
    with pytest.raises(ShifterError, match="larger than"):
        read_meta(str(big))


def test_gateway_refuses_a_hostile_image_config_before_download_and_publishes_nothing(tmp_path):
    from gateway.pipeline import image_meta
    from gateway.publish import PublishTarget, publish_files

    hostile = {"config": {"Env": ["PATH=/bin", "A=1\x1cUSERACL: 4242"]}}
    with pytest.raises(ShifterError, match=r"^image config: ENV value .* control character '\\x1c'"):
        image_meta(hostile)
    assert image_meta({"config": {"Env": ["A=1\tb"], "WorkingDir": "/w"}}).env == ["A=1\tb"]
    squashfs = tmp_path / "built.squashfs"
    squashfs.write_bytes(b"hsqs")
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(ShifterError, match="^WORKDIR value"):
        publish_files(str(squashfs), "a" * 64, ImageMeta(workdir="/w\u2028ENV: X=1"), PublishTarget(str(images)))
    assert list(images.iterdir()) == []
