"""The job's pinned user namespace: made by setupRoot (root), entered by every task (the user).

No setuid: root creates, while it is in the prolog anyway, a user namespace owned by the job's
user with the user's uid and gids mapped to themselves, and pins it with a bind mount of its
nsfs file.  A task of that user can then ``setns()`` into it, which gives it the capabilities
it needs to ``chroot`` - and nothing on the host, since the namespace's owner is the user.
"""

from __future__ import annotations

import os

from shifter.errors import ShifterError
from shifter.runtime import linux

TYPE_CHECKING = False
if TYPE_CHECKING:
    from shifter.runtime.container import Account


def _write_proc(pid: int, name: str, text: str) -> None:
    fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class _UnsharedChild:
    """A forked child in a new user namespace, held there while the ``with`` block runs.

    The child (as ``account``, or as root when None) unshares, reports, and waits; the block gets
    its pid to write the maps through /proc/<pid> and to take what it needs of the namespace
    before the child exits.  Used by both namespaces below, which differ only in their maps.
    """

    def __init__(self, account: Account | None, failure: str) -> None:
        self.account, self.failure = account, failure

    def __enter__(self) -> int:
        self.ready_r, ready_w = os.pipe()
        go_r, self.go_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self.ready_r)
            os.close(self.go_w)
            _child(self.account, ready_w, go_r)
        os.close(ready_w)
        os.close(go_r)
        try:
            if os.read(self.ready_r, 1) != b"1":
                raise ShifterError(self.failure)
        except BaseException:
            self.__exit__()
            raise
        return self.pid

    def __exit__(self, *_exc: object) -> None:
        os.close(self.go_w)
        os.close(self.ready_r)
        os.waitpid(self.pid, 0)


def _child(account: Account | None, ready_w: int, go_r: int) -> None:
    """In the forked child: (become the user,) unshare, report, wait for the parent's maps."""
    status = 1
    try:
        if account is not None:
            os.setgroups(list(account.groups))
            os.setresgid(account.gid, account.gid, account.gid)
            os.setresuid(account.uid, account.uid, account.uid)
        linux.unshare(linux.CLONE_NEWUSER)
        os.write(ready_w, b"1")
        os.read(go_r, 1)
        status = 0
    except BaseException:  # noqa: BLE001 - anything here must end in _exit, never unwind the parent's stack
        pass
    os._exit(status)


def gid_map_text(gid: int, groups: tuple[int, ...] | list[int]) -> str:
    """The primary and every supplementary gid mapped to itself, one line each, no overlaps."""
    return "".join(f"{g} {g} 1\n" for g in sorted({gid, *groups}))


def pin_user_namespace(account: Account, path: str) -> None:
    """Create the job's user namespace and bind-mount it onto ``path`` (created, mode 0444)."""
    if account.uid == 0 or account.gid == 0:
        raise ShifterError("refusing to create a user namespace for uid or gid 0")
    with _UnsharedChild(account, f"could not create a user namespace as uid {account.uid}") as pid:
        try:
            _write_proc(pid, "uid_map", f"{account.uid} {account.uid} 1\n")
            _write_proc(pid, "setgroups", "deny")
            _write_proc(pid, "gid_map", gid_map_text(account.gid, account.groups))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o444)
            os.close(fd)
            linux.mount(f"/proc/{pid}/ns/user", path, None, linux.MS_BIND)
        except OSError as exc:
            where = exc.filename or path
            raise ShifterError(f"cannot pin the job's user namespace: {exc.strerror} ({where})") from None


def enter_user_namespace(path: str) -> None:
    """Join the pinned namespace (as its owner this grants the capabilities chroot needs)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.setns(fd, linux.CLONE_NEWUSER, path)
    finally:
        os.close(fd)


def image_owner_namespace(account: Account) -> int:
    """A descriptor of a user namespace mapping uid 0 and gid 0 to the job's user and primary group.

    An idmapped mount of the image through it (shifter/runtime/fdpath.py ``bind_fd``) shows the image's
    root-owned files as the user's, so a ``--writable`` job can change them in its own overlay
    (as with an unpacked image) while its tasks stay the unprivileged user; no other id is mapped.
    The namespace outlives its short-lived creator through the descriptor and the mount.
    """
    if account.uid == 0 or account.gid == 0:
        raise ShifterError("refusing to map the image's owner to uid or gid 0")
    with _UnsharedChild(None, "could not create the user namespace of the image's owner") as pid:
        _write_proc(pid, "uid_map", f"0 {account.uid} 1\n")
        _write_proc(pid, "setgroups", "deny")
        _write_proc(pid, "gid_map", f"0 {account.gid} 1\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
