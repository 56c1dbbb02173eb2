"""Command selection (the original's calculate_args matrix)."""

import pytest

from shifter.errors import ShifterError
from shifter.formats.command import select_command

ENTRY = ["/docker-entrypoint.sh", "--flag"]
CMD = ["nginx", "-g", "daemon off;"]


@pytest.mark.parametrize(
    ("args", "entrypoint", "entry", "cmd", "shell", "expected"),
    [
        # arguments and no --entrypoint: the arguments (image ENTRYPOINT and CMD ignored)
        (["ls", "-l"], None, ENTRY, CMD, "/bin/bash", ["ls", "-l"]),
        (["ls"], False, None, None, None, ["ls"]),
        # --entrypoint: image ENTRYPOINT + arguments
        (["a", "b"], True, ENTRY, CMD, None, [*ENTRY, "a", "b"]),
        # --entrypoint without arguments: image ENTRYPOINT + image CMD
        ([], True, ENTRY, CMD, None, [*ENTRY, *CMD]),
        ([], True, ENTRY, None, None, ENTRY),
        # --entrypoint=cmd: cmd + arguments, image CMD ignored
        (["x"], "/bin/echo", ENTRY, CMD, None, ["/bin/echo", "x"]),
        ([], "/bin/echo", ENTRY, CMD, None, ["/bin/echo"]),
        ([], "/bin/echo", None, None, None, ["/bin/echo"]),
        # nothing at all: $SHELL, else /bin/sh; the image CMD alone is never used
        ([], None, ENTRY, CMD, "/bin/bash", ["/bin/bash"]),
        ([], None, None, CMD, None, ["/bin/sh"]),
        ([], None, None, None, "", ["/bin/sh"]),
    ],
)
def test_calculate_args_matrix(args, entrypoint, entry, cmd, shell, expected):
    assert select_command(args, entrypoint, entry, cmd, shell) == expected


def test_result_is_a_new_list():
    args = ["ls"]
    result = select_command(args, None, None, None, None)
    result.append("x")
    assert args == ["ls"]


@pytest.mark.parametrize("entry", [None, []])
def test_entrypoint_flag_without_image_entrypoint(entry):
    with pytest.raises(ShifterError, match="--entrypoint: the image defines no ENTRYPOINT"):
        select_command(["a"], True, entry, CMD, None)


def test_empty_entrypoint_value():
    with pytest.raises(ShifterError, match="--entrypoint=: empty command"):
        select_command([], "", ENTRY, CMD, None)
