"""Environment precedence (reference section 2.9) with the original's putenv/append/prepend/unset rules."""

import pytest

from shifter.errors import ShifterError
from shifter.formats.config import parse_config
from shifter.formats.environment import build_environment, parse_env_file
from shifter.formats.modules import select_modules

BASE = """\
udiMount=/var/udiMount
loopMount=/var/udiLoopMount
imagePath=/images
udiRootPath=/opt/shifter
etcPath=/etc/shifter/etc_files
rootfsType=tmpfs
"""


def config(extra: str = ""):
    return parse_config(BASE + extra, source="udiRoot.conf")


def build(base=None, image_env=(), env_file=(), cli_env=(), cfg=None, modules=(), request=None,
          image_id=None):
    return build_environment(
        dict(base or {}), request, image_id, list(image_env), list(env_file), list(cli_env),
        list(modules), cfg or config(),
    )


def test_original_setupenv_vector():
    cfg = config(
        "siteEnv=SHIFTER_RUNTIME=1 NEW_VAR=abcd\nsiteEnvAppend=PATH=/opt/udiImage/bin\n"
        "siteEnvPrepend=PATH=/sbin\nsiteEnvUnset=NEW_VAR\n"
    )
    env = build({"PATH": "/incorrect"}, image_env=["PATH=/usr/bin"], cfg=cfg)
    assert env == {"PATH": "/sbin:/usr/bin:/opt/udiImage/bin", "SHIFTER_RUNTIME": "1"}


def test_original_append_prepend_unset_vectors():
    base = {"FAKE_ENV_VAR_FOR_TEST": "4:5", "PATH": "/bin"}
    var = "FAKE_ENV_VAR_FOR_TEST"
    assert build(base, cfg=config(f"siteEnvAppend={var}=3\n"))[var] == "4:5:3"
    assert build(base, cfg=config(f"siteEnvPrepend={var}=3\n"))[var] == "3:4:5"
    unset = build(base, cfg=config("siteEnvUnset=FAKE_ENV_VAR_FOR_TEST\n"))
    assert unset == {"PATH": "/bin"}
    assert build({}, cfg=config("siteEnv=FAKE_ENV_VAR_FOR_TEST=3\n")) == {"FAKE_ENV_VAR_FOR_TEST": "3"}


def test_append_or_prepend_to_missing_or_empty_sets():
    cfg = config("siteEnvAppend=A=/a\nsiteEnvPrepend=B=/b\n")
    assert build({"B": ""}, cfg=cfg) == {"A": "/a", "B": "/b"}


def test_full_precedence_order():
    cfg = config(
        "module_m1_siteEnv=X=module1 M=1\nmodule_m1_siteEnvAppend=P=m1\n"
        "module_m2_siteEnv=X=module2\nmodule_m2_siteEnvPrepend=P=m2\nmodule_m2_siteEnvUnset=M\n"
        "siteEnv=S=site\nsiteEnvAppend=P=site\n"
    )
    modules = select_modules(cfg, "m1,m2")
    env = build(
        {"X": "caller", "CALLER": "1", "SHIFTER_IMAGE": "old"},
        image_env=["X=image", "IMG=1", "F=image"],
        env_file=["X=file", "F=file", "C=file"],
        cli_env=["X=cli", "C=cli"],
        cfg=cfg, modules=modules, request="docker:ubuntu:latest", image_id="f" * 64,
    )
    assert env == {
        "X": "module2",  # modules override the user
        "CALLER": "1",
        "SHIFTER_IMAGE": "f" * 64,
        "SHIFTER_IMAGEREQUEST": "docker:ubuntu:latest",
        "IMG": "1",
        "F": "file",
        "C": "cli",
        "P": "m2:m1:site",
        "S": "site",
    }


def test_image_entries_with_empty_value_or_no_equals_are_ignored():
    env = build({"KEEP": "1"}, image_env=["BROKEN", "EMPTY=", "=x", "OK=1", "KEEP=", "NUL=a\0b"])
    assert env == {"KEEP": "1", "OK": "1"}


def test_clearenv_is_an_empty_base_and_base_is_not_modified():
    base = {"HOME": "/home/u"}
    env = build_environment(base, None, None, ["A=1"], [], [], [], config())
    assert env == {"HOME": "/home/u", "A": "1"} and base == {"HOME": "/home/u"}
    assert build({}, image_env=["A=1"]) == {"A": "1"}


@pytest.mark.parametrize(
    ("env_file", "cli_env", "fragment"),
    [
        ([], ["NOEQUALS"], "from --env: 'NOEQUALS'"),
        ([], ["EMPTY="], "from --env: 'EMPTY='"),
        ([], ["=value"], "from --env: '=value'"),
        (["X="], [], "from --env-file: 'X='"),
        (["=y"], [], "from --env-file: '=y'"),
        (["A=x\0y"], [], "from --env-file: 'A=x\\x00y'"),
    ],
)
def test_malformed_user_entries(env_file, cli_env, fragment):
    with pytest.raises(ShifterError, match="improperly formatted environment variable") as err:
        build(env_file=env_file, cli_env=cli_env)
    assert fragment in str(err.value)


def test_parse_env_file():
    text = '# comment\n\nA=1\nB="quoted value"\n   \nC=x=y\n#D=2\n'
    assert parse_env_file(text) == ["A=1", 'B="quoted value"', "C=x=y"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("A=1\nNOEQUALS\n", "--env-file line 2: 'NOEQUALS' is not NAME=value"),
        ("export A\n", "line 1: 'export A'"),
        (" # indented comment\n", "line 1: ' # indented comment'"),
        ("A=1\r\nB\r\n", "line 2: 'B'"),
        ("\n\n\njunk", "line 4: 'junk'"),
    ],
)
def test_malformed_env_files(text, fragment):
    with pytest.raises(ShifterError) as err:
        parse_env_file(text)
    assert fragment in str(err.value)
