"""The site file systems the cluster maps at their host paths: /home and /scratch.

A real site binds its shared file systems at the same path inside every container
(``siteFs=/home:/home;/scratch:/scratch``), so a user's ``$HOME`` and ``/scratch/$USER`` are
where they expect them.  The cluster creates on the host only what is missing (the scratch
root, a test user's scratch and home directory) and records each path it made, so that
`down` removes exactly those and never a directory that was there before.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
from pathlib import Path

from .settings import TEST_USERS, Settings

HOME_ROOT = Path("/home")
SCRATCH_ROOT = Path("/scratch")


def site_fs(settings: Settings) -> str:
    """udiRoot.conf's siteFs: /sitefs first (tests take the first entry), then home and scratch."""
    return f"{settings.site_fs_dir}:/sitefs;{HOME_ROOT}:{HOME_ROOT};{SCRATCH_ROOT}:{SCRATCH_ROOT}"


def _record(settings: Settings) -> Path:
    return settings.state_dir / "made-on-host"


def recorded(settings: Settings) -> list[Path]:
    """Host directories the cluster created (oldest first); the record outlives `down`."""
    try:
        return [Path(line) for line in _record(settings).read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def _make(settings: Settings, path: Path, mode: int, owner: tuple[int, int]) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    os.chown(path, *owner)
    os.chmod(path, mode)
    made = [p for p in recorded(settings) if p != path] + [path]
    _record(settings).write_text("".join(f"{p}\n" for p in made))


def ensure(settings: Settings) -> None:
    """Every test user gets a home and a private /scratch/<user> (created only when missing)."""
    _make(settings, SCRATCH_ROOT, 0o755, (0, 0))
    for user in TEST_USERS:
        entry = pwd.getpwnam(user)
        owner = (entry.pw_uid, entry.pw_gid)
        _make(settings, Path(entry.pw_dir), 0o755, owner)
        _make(settings, SCRATCH_ROOT / user, 0o700, owner)


def remove(settings: Settings) -> None:
    """Remove what `ensure` made, newest first; a path that is no longer a real directory stays."""
    for path in reversed(recorded(settings)):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(info.st_mode):
            continue  # replaced by a link or a file: not ours to follow
        if path == SCRATCH_ROOT:
            with contextlib.suppress(OSError):  # what others put there since keeps it (and is reported)
                path.rmdir()
        else:
            shutil.rmtree(path)  # a user's directory: fd-based, links inside are removed, never followed


def leftovers(settings: Settings) -> list[str]:
    return [f"host directory {path} (made by the cluster)" for path in recorded(settings)
            if os.path.lexists(path)]
