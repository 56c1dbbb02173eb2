"""Unprivileged test users and the site /etc the runtime copies into containers."""

from __future__ import annotations

import pwd
import subprocess
from pathlib import Path

from .render import write_file
from .settings import TEST_USERS, Settings

NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"


def ensure_test_users() -> None:
    for user in TEST_USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--user-group", "--shell", "/bin/bash", user],
                           check=True, capture_output=True)


def write_site_etc(settings: Settings) -> None:
    """etcPath: the host's passwd and group (test users included) and a files-only nsswitch."""
    etc = settings.etc_path
    etc.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_file(etc / "passwd", Path("/etc/passwd").read_text())
    write_file(etc / "group", Path("/etc/group").read_text())
    write_file(etc / "nsswitch.conf", NSSWITCH)
