"""Publish a converted image into a system's imageDir, atomically, locally or over ssh.

Each file is written to ``<imageDir>/.<name>.partial-h<host>p<pid>-XXXXXX``, synced and
renamed, so a reader never sees half an image, and a restarted gateway knows which
partial files a dead process of its host left (:func:`remove_leftovers`, and
:func:`remove_remote_leftovers` over ssh); the ``.meta``
goes last because the runtime treats ``<id>.meta`` as "the image is there". An existing
``<id>.<format>`` is never replaced (an id names one content). Public images are 0644,
private ones (the .meta carries ACLs) 0600: only the root runtime reads them, and
:func:`republish_meta` changes both files' modes when the image's privacy changes.
Remote transfer runs ``ssh``/``scp`` from argument lists; the one remote command string
that ssh necessarily builds is made of ``shlex.quote``d, validated parts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from shifter.errors import ShifterError
from shifter.formats.meta import ImageMeta, format_meta

_ID_RE = re.compile(r"[0-9a-f]{64}")
_HOST_RE = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,253}")
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_REMOTE_PATH_RE = re.compile(r"/[A-Za-z0-9_./+-]*")
_SSH_TIMEOUT = 120
_PARTIAL_RE = re.compile(r"\.([0-9a-f]{64})\.[a-z0-9]+\.partial-h([0-9a-f]{8})p([0-9]+)-.*")
_FOREIGN_PARTIAL_SECONDS = 3600.0  # another host's partial file this old belongs to nobody


def host_key() -> str:
    """Short, fixed-width name of this host for partial file names."""
    return hashlib.sha256(os.uname().nodename.encode()).hexdigest()[:8]


def _partial_prefix(name: str) -> str:
    return f".{name}.partial-h{host_key()}p{os.getpid()}-"


@dataclass
class PublishTarget:
    """Where a system's images live: a local directory, or ``host:image_dir`` over ssh."""

    image_dir: str
    host: str | None = None
    user: str | None = None
    ssh_key: str | None = None
    ssh_options: list[str] = field(default_factory=list)
    scp_options: list[str] = field(default_factory=list)
    image_format: str = "squashfs"

    @property
    def remote(self) -> bool:
        return self.host is not None


def _check_id(image_id: str) -> None:
    if not _ID_RE.fullmatch(image_id):
        raise ShifterError(f"invalid image id {image_id[:80]!r}")


def _mode(meta: ImageMeta) -> int:
    return 0o600 if (meta.user_acl or meta.group_acl) else 0o644


# -- local ----------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(src: BinaryIO, out: BinaryIO) -> None:
    """In-kernel copy (copy_file_range), falling back to read/write where unsupported."""
    remaining = os.fstat(src.fileno()).st_size
    try:
        while remaining > 0:
            done = os.copy_file_range(src.fileno(), out.fileno(), remaining)
            if done == 0:
                break
            remaining -= done
    except OSError:
        src.seek(0)
        out.seek(0)
        out.truncate()
        shutil.copyfileobj(src, out, 1 << 20)


def _same_filesystem(source: str, image_dir: str) -> bool:
    return os.stat(source).st_dev == os.stat(image_dir).st_dev


def _link_write(image_dir: str, final: str, mode: int, source: str) -> None:
    """Publish a finished file of the same filesystem without copying it: synced, then
    hard-linked under its final name (which never replaces; a link is made whole or not at
    all, so no reader sees half an image, and no partial file is left by a crash).

    The converted image is a scratch file of ExpandDirectory that nothing writes once the
    conversion ended; publishing it by copy cost a second write of every byte (1.3 s for
    the 527 MB squashfs of the 1 GB bench image, docs/performance.md)."""
    with open(source, "rb") as src:
        os.fchmod(src.fileno(), mode)
        os.fsync(src.fileno())
    try:
        os.link(source, final)
    except FileExistsError:
        os.chmod(final, mode)
    _fsync_dir(image_dir)


def _local_write(
    image_dir: str, name: str, mode: int, source: str | None, data: bytes | None, replace: bool = True
) -> None:
    """Write ``name`` atomically; with ``replace`` False an existing file is kept (its mode set)."""
    final = os.path.join(image_dir, name)
    if not replace and os.path.isfile(final):
        os.chmod(final, mode)
        return
    if not replace and source is not None and _same_filesystem(source, image_dir):
        _link_write(image_dir, final, mode, source)
        return
    fd, partial = tempfile.mkstemp(prefix=_partial_prefix(name), dir=image_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            if source is not None:
                with open(source, "rb") as src:
                    _copy(src, out)
            else:
                assert data is not None
                out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        if replace:
            os.rename(partial, final)
        else:
            try:
                os.link(partial, final)  # never replaces: a concurrent writer's file stays
            except FileExistsError:
                os.chmod(final, mode)
            os.unlink(partial)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    _fsync_dir(image_dir)


# -- remote ---------------------------------------------------------------------------


def _destination(target: PublishTarget) -> str:
    host = target.host or ""
    if not _HOST_RE.fullmatch(host) or host.startswith("-"):
        raise ShifterError(f"invalid remote host {host!r}")
    if target.user is None:
        return host
    if not _USER_RE.fullmatch(target.user):
        raise ShifterError(f"invalid remote user {target.user!r}")
    return f"{target.user}@{host}"


def _key(target: PublishTarget) -> list[str]:
    return ["-i", target.ssh_key] if target.ssh_key else []


def _run(argv: list[str], what: str) -> str:
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=_SSH_TIMEOUT
                              if argv[0] == "ssh" else None)
    except OSError as err:
        raise ShifterError(f"{what}: cannot run {argv[0]}: {err.strerror}") from None
    except subprocess.TimeoutExpired:
        raise ShifterError(f"{what}: {argv[0]} timed out") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = lines[-1] if lines else f"exit status {done.returncode}"
        raise ShifterError(f"{what} failed: {argv[0]}: {detail}")
    return done.stdout.decode("utf-8", "replace")


def _quoted(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def _ssh(target: PublishTarget, command: str, what: str) -> str:
    """Run ``command`` (built only from ``_quoted`` parts) on the target host."""
    return _run(["ssh", *_key(target), *target.ssh_options, _destination(target), command], what)


def _remote_write(target: PublishTarget, name: str, mode: int, source: str) -> None:
    image_dir = target.image_dir.rstrip("/") or "/"
    prefix = f"{image_dir}/{_partial_prefix(name)}"
    partial = _ssh(target, _quoted(["mktemp", f"{prefix}XXXXXX"]), f"transfer of {name}").strip()
    if not partial.startswith(prefix) or not _REMOTE_PATH_RE.fullmatch(partial):
        raise ShifterError(f"transfer of {name}: unexpected temporary name from the remote mktemp")
    try:
        _run(["scp", "-q", *_key(target), *target.scp_options, "--", source,
              f"{_destination(target)}:{partial}"], f"transfer of {name}")
        final = f"{image_dir}/{name}"
        steps = [["chmod", f"{mode:o}", partial], ["sync", partial], ["mv", "-f", partial, final]]
        _ssh(target, " && ".join(_quoted(step) for step in steps), f"transfer of {name}")
    except BaseException:
        with contextlib.suppress(ShifterError):
            _ssh(target, _quoted(["rm", "-f", partial]), f"clean-up of {name}")
        raise


def _check_remote_dir(target: PublishTarget) -> None:
    if not _REMOTE_PATH_RE.fullmatch(target.image_dir) or "/../" in target.image_dir + "/":
        raise ShifterError(f"invalid remote imageDir {target.image_dir!r}")


# -- the entry points -----------------------------------------------------------------


def publish_files(squashfs_path: str, image_id: str, meta: ImageMeta, target: PublishTarget) -> None:
    """Publish ``<id>.<format>`` then ``<id>.meta``, each atomically."""
    _check_id(image_id)
    mode = _mode(meta)
    image_name = f"{image_id}.{target.image_format}"
    meta_name = f"{image_id}.meta"
    meta_data = format_meta(meta).encode("utf-8")
    if not target.remote:
        if not os.path.isdir(target.image_dir):
            raise ShifterError(f"imageDir {target.image_dir} does not exist")
        try:
            _local_write(target.image_dir, image_name, mode, squashfs_path, None, replace=False)
            _local_write(target.image_dir, meta_name, mode, None, meta_data)
        except OSError as err:
            raise ShifterError(f"cannot publish into {target.image_dir}: {err.strerror}") from None
        return
    _check_remote_dir(target)
    _remote_write(target, image_name, mode, squashfs_path)
    with tempfile.NamedTemporaryFile(prefix=f".{meta_name}.", dir=os.path.dirname(squashfs_path)) as tmp:
        tmp.write(meta_data)
        tmp.flush()
        _remote_write(target, meta_name, mode, tmp.name)


def republish_meta(image_id: str, meta: ImageMeta, target: PublishTarget) -> None:
    """A published image's access changed: new ``.meta``, and both files' modes follow it."""
    _check_id(image_id)
    mode = _mode(meta)
    image_name = f"{image_id}.{target.image_format}"
    meta_name = f"{image_id}.meta"
    data = format_meta(meta).encode("utf-8")
    if not target.remote:
        try:
            # the image first: a stricter mode never waits on the .meta that announces it
            os.chmod(os.path.join(target.image_dir, image_name), mode)
            _local_write(target.image_dir, meta_name, mode, None, data)
        except OSError as err:
            raise ShifterError(f"cannot update {meta_name} in {target.image_dir}: {err.strerror}") from None
        return
    _check_remote_dir(target)
    base = target.image_dir.rstrip("/")
    _ssh(target, _quoted(["chmod", f"{mode:o}", f"{base}/{image_name}"]), f"update of {image_name}")
    with tempfile.TemporaryDirectory(prefix=".meta-") as scratch:
        path = os.path.join(scratch, meta_name)
        with open(path, "wb") as tmp:
            tmp.write(data)
        _remote_write(target, meta_name, mode, path)


def remove_leftovers(image_dir: str, alive: Callable[[int], bool]) -> list[str]:
    """Remove partial files of dead writers: this host's by pid, other hosts' once an hour old."""
    removed = []
    try:
        names = os.listdir(image_dir)
    except OSError:
        return removed
    mine = host_key()
    for name in names:
        match = _PARTIAL_RE.fullmatch(name)
        if match is None:
            continue
        path = os.path.join(image_dir, name)
        try:
            if match.group(2) == mine:
                if alive(int(match.group(3))):
                    continue
            elif time.time() - os.lstat(path).st_mtime < _FOREIGN_PARTIAL_SECONDS:
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append(name)
    return removed


def remove_remote_leftovers(target: PublishTarget, alive: Callable[[int], bool]) -> list[str]:
    """:func:`remove_leftovers` for a remote imageDir: only this host's dead writers' files
    (the pid in the name is the gateway's, on this host, so it is checked here)."""
    _check_remote_dir(target)
    base = target.image_dir.rstrip("/") or "/"
    listing = _ssh(target, _quoted(["find", base, "-maxdepth", "1", "-type", "f", "-name",
                                    f".*.partial-h{host_key()}p*"]), "listing of partial files")
    dead = []
    for line in listing.splitlines():
        name = line.rsplit("/", 1)[-1]
        match = _PARTIAL_RE.fullmatch(name)
        if match is not None and _REMOTE_PATH_RE.fullmatch(f"{base}/{name}") and not alive(int(match.group(3))):
            dead.append(name)
    if dead:
        _ssh(target, _quoted(["rm", "-f", "--", *(f"{base}/{n}" for n in dead)]), "removal of partial files")
    return dead


def remove_files(image_id: str, target: PublishTarget) -> None:
    """Remove ``<id>.meta`` first (the image stops being "there"), then the image file."""
    _check_id(image_id)
    names = [f"{image_id}.meta", f"{image_id}.{target.image_format}"]
    if target.remote:
        _check_remote_dir(target)
        base = target.image_dir.rstrip("/")
        _ssh(target, _quoted(["rm", "-f", *(f"{base}/{n}" for n in names)]), f"removal of {image_id}")
        return
    for name in names:
        try:
            os.unlink(os.path.join(target.image_dir, name))
        except FileNotFoundError:
            pass
        except OSError as err:
            raise ShifterError(f"cannot remove {name} from {target.image_dir}: {err.strerror}") from None
