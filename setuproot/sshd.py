"""The optional per-job sshd (reference section 2.11): as the job's user, inside the container.

Host keys are generated per job, ``AllowUsers`` names the job's user, the given public key is
the only one authorised, and the daemon (from the udiImage) is started
chrooted into the job's root as the user with no capabilities and no_new_privs, on port 1204.
unsetupRoot finds it as a process rooted in the job's environment (and in the job's memory
cgroup when one is configured) and kills it.  The udiImage (built by ``python -m shifter.packtool
udiimage``) provides the binaries and the sshd_config template: every ``HostKey`` it lists is
generated on the host, by the host's ssh-keygen (root runs nothing from the container), and a
``PidFile`` under /opt/udiImage gets a directory the user can write.
"""

from __future__ import annotations

import os
import stat

from shifter.errors import ShifterError
from shifter.runtime import jobcgroup, linux

TYPE_CHECKING = False
if TYPE_CHECKING:
    from shifter.runtime.container import Account

UDI = "/opt/udiImage"
HOST_KEY = UDI + "/etc/ssh_host_ecdsa_key"
KNOWN_HOSTS = UDI + "/etc/ssh_known_hosts"
_KEY_PREFIXES = ("ssh-", "ecdsa-", "sk-")


def check_pubkey(text: str) -> str:
    key = text.strip()
    if not key or "\n" in key or "\r" in key or not key.startswith(_KEY_PREFIXES) or len(key.split()) < 2:
        raise ShifterError("the ssh public key (-s) must be one 'ssh-...' / 'ecdsa-...' line")
    return key


def _run_as_user_chrooted(root: str, argv: list[str], account: Account, cgroup: str | None = None,
                          stderr_fd: int | None = None) -> int:
    """fork, (join the cgroup,) chroot into the root, drop to the user with no privileges, exec; the status.

    Never as root: the image's /etc/ld.so.preload and libraries would run with root's powers.
    """
    pid = os.fork()
    if pid == 0:
        try:
            if cgroup:
                jobcgroup.add_self(cgroup)
            os.chroot(root)
            os.chdir("/")
            devnull = os.open("/dev/null", os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            if stderr_fd is not None:
                os.dup2(stderr_fd, 2)
            linux.drop_bounding_set()
            os.setgroups(list(account.groups))
            os.setresgid(account.gid, account.gid, account.gid)
            os.setresuid(account.uid, account.uid, account.uid)
            linux.set_no_new_privs()
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _settings(lines: list[str], keyword: str) -> list[str]:
    """The values of every ``keyword value`` line of an sshd_config (keywords are case-insensitive)."""
    found = []
    for line in lines:
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].lower() == keyword.lower():
            found.append(parts[1].strip())
    return found


def _shell_exists(root: str, shell: str) -> bool:
    from shifter.runtime.pathsafe import resolve_in_root

    try:
        return shell.startswith("/") and os.path.isfile(resolve_in_root(root, shell))
    except OSError:
        return False


def ensure_login_shell(root: str, user: str) -> None:
    """Give the user the image's /bin/sh when the container's passwd names a shell it lacks.

    sshd refuses a user whose login shell does not exist ("not allowed because shell ...
    does not exist"), and the site's passwd names the host's shell (often /bin/bash), which
    small images such as busybox do not have.  Only the container's own copy is changed.
    """
    from shifter.runtime.etcfiles import find_passwd_entry

    path = os.path.join(root, "etc/passwd")
    try:
        with open(path) as fh:
            text = fh.read()
    except FileNotFoundError:
        return
    fields = find_passwd_entry(text, user)
    if fields is None or _shell_exists(root, fields[6]) or not _shell_exists(root, "/bin/sh"):
        return
    old_line = ":".join(fields)
    fields[6] = "/bin/sh"
    lines = [":".join(fields) if line == old_line else line for line in text.splitlines()]
    info = os.lstat(path)
    tmp = path + ".shifter-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, info.st_mode & 0o777)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.chown(tmp, info.st_uid, info.st_gid)
    os.replace(tmp, path)


def _open_dir_in_root(root: str, relpath: str) -> int:
    """A descriptor of ``root/relpath``, a real directory: no component may be a symlink."""
    from shifter.runtime import fdpath

    root_fd = fdpath.open_dir(root)
    try:
        return fdpath.open_no_symlinks(root_fd, relpath.lstrip("/"), os.O_PATH | os.O_DIRECTORY)
    except OSError as exc:
        raise ShifterError(f"{relpath} in the container: {exc.strerror}") from None
    finally:
        os.close(root_fd)


def _write_new(dir_fd: int, name: str, data: bytes, mode: int, owner: tuple[int, int]) -> None:
    """Create ``name`` below ``dir_fd`` (never through anything already there) with ``data``."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def _install_host_key(root: str, account: Account) -> None:
    """The job's host key for the daemon (readable by the user it runs as) and for every client.

    The key is the job's on every node (setuproot/hostkey.py), so one known_hosts line, for
    any host name, tells each node's clients that the sshd they reach is the job's.
    """
    from setuproot import hostkey

    jobid = os.path.basename(os.path.dirname(root.rstrip("/")))  # the root is <udiMount>/<jobid>/root
    private = hostkey.private_key_pem(jobid, account.uid)
    known = f"* {hostkey.public_key_line(private)} shifter job {jobid}\n".encode()
    etc_fd = _open_dir_in_root(root, UDI + "/etc")
    try:
        _write_new(etc_fd, os.path.basename(HOST_KEY), private, 0o600, (account.uid, account.gid))
        _write_new(etc_fd, os.path.basename(KNOWN_HOSTS), known, 0o644, (0, 0))
    finally:
        os.close(etc_fd)
    from shifter.packing.relocate import ssh_config_text

    ssh_fd = _open_dir_in_root(root, "etc/ssh")
    try:  # the image's own client files stay; the bound client reads /etc/ssh
        for name, data in (("ssh_known_hosts", known), ("ssh_config", ssh_config_text().encode())):
            if not _exists(ssh_fd, name):
                _write_new(ssh_fd, name, data, 0o644, (0, 0))
    finally:
        os.close(ssh_fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _with_one_host_key(lines: list[str]) -> list[str]:
    """The sshd_config with the job's key as its only HostKey: a client trusts no other."""
    out, placed = [], False
    for line in lines:
        if line.split(None, 1)[:1] and line.split(None, 1)[0].lower() == "hostkey":
            if not placed:
                out.append(f"HostKey {HOST_KEY}")
                placed = True
            continue
        out.append(line)
    return out if placed else [f"HostKey {HOST_KEY}", *out]


def prepare(root: str, account: Account, pubkey: str) -> None:
    """Keys, sshd_config, the authorised key and the ssh client in the container (before ro remount)."""
    udi = root + UDI
    ensure_login_shell(root, account.user)
    for needed in ("sbin/sshd", "etc/sshd_config"):
        if not os.path.exists(os.path.join(udi, needed)):
            raise ShifterError(f"an sshd was requested but the udiImage has no {needed} "
                               "(build it with `python -m shifter.packtool udiimage <optUdiImage>`)")
    config = os.path.join(udi, "etc/sshd_config")
    with open(config) as fh:
        lines = [f"AllowUsers {account.user}" if line.strip() == "AllowUsers ToBeReplaced" else line
                 for line in fh.read().splitlines()]
    lines = _with_one_host_key(lines)
    _install_host_key(root, account)
    for pid_file in _settings(lines, "PidFile"):
        if pid_file != "none" and pid_file.startswith(UDI + "/"):
            run_dir = root + os.path.dirname(pid_file)
            os.makedirs(run_dir, 0o755, exist_ok=True)
            os.chown(run_dir, account.uid, account.gid)
    os.unlink(config)
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o404)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.chown(config, account.uid, 0)
    keys = os.path.join(udi, "etc/user_auth_keys")
    fd = os.open(keys, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    with os.fdopen(fd, "w") as fh:
        fh.write(check_pubkey(pubkey) + "\n")
    os.chown(keys, account.uid, 0)
    _bind_ssh_client(root)


def _bind_ssh_client(root: str) -> None:
    """Put the udiImage's ssh over the image's own client (it knows the job's port and key).

    The image decides what ``/usr/bin`` and ``/bin`` are, and an absolute symlink there
    (``/bin -> /usr/bin``) would, resolved on the host, put the bind over the *host's* file.  So
    each client is resolved inside the root (openat2 RESOLVE_IN_ROOT, the final name not
    followed), must be a regular file there, and the bind goes onto that descriptor; the new
    mount is found again the same way and checked to be the udiImage's file before it is made
    read-only.
    """
    from shifter.runtime import fdpath

    root_fd = fdpath.open_dir(root)
    try:
        try:
            source_fd = fdpath.open_no_symlinks(root_fd, UDI.lstrip("/") + "/bin/ssh", os.O_PATH)
        except FileNotFoundError:
            return  # a udiImage without a client: the image's own stays
        try:
            source = os.fstat(source_fd)
            for client in ("usr/bin/ssh", "bin/ssh"):
                _bind_one_client(root_fd, client, source_fd, source)
        finally:
            os.close(source_fd)
    finally:
        os.close(root_fd)


def _bind_one_client(root_fd: int, client: str, source_fd: int, source: os.stat_result) -> None:
    from shifter.runtime import fdpath

    try:
        target_fd = fdpath.open_in_root(root_fd, client, os.O_PATH | os.O_NOFOLLOW)
    except OSError:
        return  # the image has no such client
    try:
        info = os.fstat(target_fd)
        if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) == (source.st_dev, source.st_ino):
            return  # a symlink (the other name reaches the file) or already bound
        linux.mount(fdpath.proc_path(source_fd), fdpath.proc_path(target_fd), None, linux.MS_BIND)
    finally:
        os.close(target_fd)
    bound_fd = fdpath.open_in_root(root_fd, client, os.O_PATH | os.O_NOFOLLOW)
    try:
        bound = os.fstat(bound_fd)
        if (bound.st_dev, bound.st_ino) != (source.st_dev, source.st_ino):
            raise ShifterError(f"the container's /{client} changed while the ssh client was bound over it")
        linux.restrict(fdpath.proc_path(bound_fd), readonly=True)
    finally:
        os.close(bound_fd)


class PortInUse(ShifterError):
    """The sshd's port is held by something that is not a job's sshd: the request fails."""


class AnotherJobsSshd(ShifterError):
    """The sshd's port is held by the sshd of another job sharing the node."""


def start_unless_port_taken(root: str, account: Account, cgroup: str | None, jobid: str) -> bool:
    """Start the job's sshd; when another job's sshd holds the port, say so and go on without one.

    Only one sshd can listen on port 1204 of a node, and jobs may share nodes: the job that
    comes second still runs, without an sshd on this node (its ssh clients, checking the job's
    own host key, refuse the other job's daemon).  The line goes to slurmd's log through the
    hook.  Anything else on the port (any user may bind a port above 1023) fails the request:
    PortInUse.

    Checking the port, starting the daemon and waiting for it to listen happen under a lock
    on the node (flock of the udiMount directory; the root is ``<udiMount>/<jobid>/root``), so two
    jobs starting at once cannot both see the port free.
    """
    import fcntl
    import sys

    fd = os.open(_udi_mount(root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        start(root, account, cgroup)
    except AnotherJobsSshd as err:
        print(f"shifter: job {jobid}: no sshd on this node: {err}", file=sys.stderr)
        return False
    finally:
        os.close(fd)
    return True


def _udi_mount(root: str) -> str:
    return os.path.dirname(os.path.dirname(root.rstrip("/")))


def check_port(root: str) -> None:
    """Fail (PortInUse) unless the job's sshd port is free or held by another job's sshd."""
    port, _ = _port_and_pid_file(root)
    inodes = listeners(port)
    if not inodes:
        return
    holders = _sockets_held([int(name) for name in os.listdir("/proc") if name.isdigit()])
    if all(inode in holders and _is_a_job_sshd(holders[inode], _udi_mount(root)) for inode in inodes):
        raise AnotherJobsSshd(f"port {port} is in use (another job's sshd on a shared node)")
    raise PortInUse(f"port {port} is taken on this node by a program that is not a job's sshd")


def refuse_squatter(root: str) -> None:
    """check_port for a daemon the extern step starts later: only a squatter fails the prolog."""
    try:
        check_port(root)
    except AnotherJobsSshd:
        pass  # the extern step says so when it finds the port still taken


def _is_a_job_sshd(pid: int, udi_mount: str) -> bool:
    """Is ``pid`` the udiImage's sshd chrooted into some job's root (``<udiMount>/<jobid>/root``)?"""
    try:
        root = os.readlink(f"/proc/{pid}/root")
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    parent, name = os.path.split(root)
    return (name == "root" and os.path.dirname(parent) == udi_mount.rstrip("/")
            and os.path.basename(parent).isdigit() and exe == root + UDI + "/sbin/sshd")


def _port_and_pid_file(root: str) -> tuple[int, str | None]:
    """The sshd_config's Port (1204 in the udiImage's) and its PidFile, as a host path."""
    with open(root + UDI + "/etc/sshd_config") as fh:
        lines = fh.read().splitlines()
    ports = _settings(lines, "Port")
    pid_files = [p for p in _settings(lines, "PidFile") if p.startswith(UDI + "/")]
    pid_file = root + pid_files[0] if pid_files else None
    try:
        if pid_file is not None and os.statvfs(os.path.dirname(pid_file)).f_flag & os.ST_RDONLY:
            pid_file = None  # started by the extern step, in the read-only root: the daemon cannot write it
    except OSError:
        pid_file = None
    return (int(ports[0]) if ports and ports[0].isdigit() else 22), pid_file


def listeners(port: int) -> set[int]:
    """Socket inodes listening on TCP ``port`` in this network namespace (/proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(fields[9]))
    return found


def _sockets_held(pids: list[int]) -> dict[int, int]:
    """socket inode -> pid, for the sockets the given processes hold open."""
    held = {}
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if link.startswith("socket:[") and link.endswith("]"):
                held[int(link[8:-1])] = pid
    return held


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def start(root: str, account: Account, cgroup: str | None, timeout: float = 5.0, settle: float = 0.3) -> None:
    """Start the daemon as the user and wait until every listener on its port is its own.

    OpenSSH detaches *before* it binds, and an sshd that binds only some of its addresses (the
    others taken) carries on: neither its exit status nor "something listens" tells whether the
    port is the job's.  So the port must be free first (check_port), and afterwards each listening socket on
    it must be held by a process chrooted into this job's root (socket inode from /proc/net/tcp*
    against /proc/<pid>/fd); a foreign one fails the request and stops the daemon.  OpenSSH
    writes its PidFile once every address is bound: only then is the check final (without a
    PidFile, after ``settle`` seconds).
    """
    import time

    from shifter.runtime.teardown import processes_rooted_in

    check_port(root)
    port, pid_file = _port_and_pid_file(root)
    read_end, write_end = os.pipe()
    try:
        status = _run_as_user_chrooted(root, [f"{UDI}/sbin/sshd", "-f", f"{UDI}/etc/sshd_config", "-e"], account,
                                       cgroup, write_end)
    finally:
        os.close(write_end)
    os.set_blocking(read_end, False)  # the daemon has let go of it by now; never wait for it
    with os.fdopen(read_end, "rb") as fh:
        try:
            errors = (fh.read(4096) or b"").decode(errors="replace").strip().splitlines()
        except BlockingIOError:
            errors = []
    if status != 0:
        raise ShifterError(f"the job's sshd did not start (status {status})" + (f": {errors[-1]}" if errors else ""))
    deadline = time.monotonic() + timeout
    settled_at = None
    while True:
        inodes = listeners(port)
        ours = _sockets_held(processes_rooted_in(root))
        foreign = inodes - ours.keys()
        if foreign:
            _kill({ours[inode] for inode in inodes & ours.keys()})
            raise PortInUse(f"port {port} was taken on this node while the job's sshd started "
                            "(another user's program listens there)")
        now = time.monotonic()
        if inodes and pid_file is not None and os.path.lexists(pid_file):
            return
        if inodes and settled_at is None and pid_file is None:
            settled_at = now + settle  # its other addresses are bound right after the first
        if settled_at is not None and now >= settled_at:
            return
        if now > deadline:
            raise ShifterError(f"the job's sshd is not listening on port {port} after {timeout:.0f} s")
        time.sleep(0.002)
