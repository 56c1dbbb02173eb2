"""The launcher hands a script that names shifter as its interpreter to the shell as /dev/fd/N.

The kernel runs ``#!/path/shifter /bin/sh`` scripts as ``shifter /bin/sh <script>``; Slurm's
batch script lives in slurmd's spool directory, which the container cannot see, so the launcher
opens it before the chroot.  End to end (a real sbatch job) in
tests/integration/test_slurm_scenarios.py::test_3_*.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shifter.launch import execute


@pytest.mark.parametrize("line, expected", [
    (b"#!/opt/shifter-slurm/bin/shifter /bin/sh\n", True),
    (b"#! /usr/local/bin/shifter --image=docker:x /bin/bash\n", True),
    (b"#!/usr/bin/env -S shifter /bin/sh\n", True),
    (b"#!/usr/bin/env -S VAR=1 shifter /bin/sh\n", True),
    (b"#!/bin/sh\nshifter true\n", False),
    (b"#!/usr/bin/env python3\n", False),
    (b"#!/opt/notshifter /bin/sh\n", False),
    (b"echo no shebang\n", False),
    (b"", False),
])
def test_names_shifter(line: bytes, expected: bool) -> None:
    assert execute._names_shifter(line) is expected


def _script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "slurm_script"
    path.write_text(text)
    return path


def test_shebang_script_is_passed_by_descriptor(tmp_path: Path) -> None:
    script = _script(tmp_path, "#!/opt/shifter-slurm/bin/shifter /bin/sh\necho hi\n")
    argv = execute._script_by_descriptor(["/bin/sh", str(script), "arg"])
    assert argv[0] == "/bin/sh" and argv[2:] == ["arg"]
    assert argv[1].startswith("/dev/fd/")
    fd = int(argv[1][len("/dev/fd/"):])
    try:
        assert os.get_inheritable(fd)
        assert Path(argv[1]).read_text() == script.read_text()  # from the start, whatever was read
        # visible at its own path (no chroot here): the path is used again and the descriptor closed
        assert execute._prefer_visible_script(argv) == ["/bin/sh", str(script), "arg"]
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def test_descriptor_kept_when_the_path_is_a_different_file(tmp_path: Path) -> None:
    script = _script(tmp_path, "#!/usr/bin/env -S shifter /bin/sh\necho hi\n")
    argv = execute._script_by_descriptor(["/bin/sh", str(script)])
    fd = int(argv[1][len("/dev/fd/"):])
    try:
        script.unlink()
        script.write_text("another file at the same path\n")  # as if the container had its own
        assert execute._prefer_visible_script(argv) == argv
    finally:
        os.close(fd)


@pytest.mark.parametrize("argv", [["/bin/true"], ["/bin/sh", "-c", "echo"], ["cat", "/nonexistent/file"]])
def test_other_commands_are_left_alone(argv: list[str]) -> None:
    assert execute._script_by_descriptor(list(argv)) == argv


def test_plain_script_is_left_alone(tmp_path: Path) -> None:
    script = _script(tmp_path, "#!/bin/sh\necho hi\n")
    assert execute._script_by_descriptor(["/bin/sh", str(script)]) == ["/bin/sh", str(script)]
