"""The launcher's fresh path: a private environment for a request the job's does not serve.

Without setuid: the user creates a user and a mount namespace (uid and gid mapped to
themselves), mounts the image with squashfuse (the kernel's loop mount when the caller is
root), builds the root with the same site rules as setupRoot on a private tmpfs, and runs the
command in it.  The launcher stays as the parent: when the command exits it unmounts the image
(which ends the squashfuse daemon) and exits with the command's status; the namespace, and every
mount in it, disappears with its last process.

In the user namespace only the user's primary gid is mapped (mapping more needs root, i.e. a
setuid helper): supplementary groups still apply to file access but show as "nogroup".
"""

from __future__ import annotations

import errno
import os
import signal
import sys

from shifter.errors import ShifterError
from shifter.runtime import container, linux

SQUASHFUSE_CANDIDATES = ("/usr/bin/squashfuse_ll", "/usr/bin/squashfuse", "/usr/local/bin/squashfuse_ll",
                         "/usr/local/bin/squashfuse")
_SCRATCH_CANDIDATES = ("/mnt", "/media", "/srv", "/opt")


def find_squashfuse() -> str | None:
    for path in SQUASHFUSE_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return None


def unprivileged_blocker() -> str | None:
    """Why an unprivileged fresh environment cannot be built here, or None."""
    if find_squashfuse() is None:
        return "squashfuse is not installed (looked for " + ", ".join(SQUASHFUSE_CANDIDATES) + ")"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is missing or not usable by you (an admin can chmod 0666 /dev/fuse)"
    return None


def _write_proc_self(name: str, text: str) -> None:
    fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _enter_namespaces(privileged: bool) -> None:
    try:
        if privileged:
            linux.unshare(linux.CLONE_NEWNS)
        else:
            uid, gid = os.getuid(), os.getgid()
            linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS)
            _write_proc_self("uid_map", f"{uid} {uid} 1\n")
            _write_proc_self("setgroups", "deny")
            _write_proc_self("gid_map", f"{gid} {gid} 1\n")
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOSPC, errno.EINVAL, errno.EACCES):
            raise ShifterError("cannot create a user namespace (disabled here: check "
                               "/proc/sys/user/max_user_namespaces and kernel.unprivileged_userns_clone)") from None
        raise ShifterError(f"cannot create namespaces: {exc.strerror}") from None
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)


def _scratch_dir(config) -> str:
    """An existing directory to cover with a private tmpfs (only this namespace sees it)."""
    for path in (config.udi_mount, config.loop_mount, *_SCRATCH_CANDIDATES):
        if path and os.path.isdir(path) and not os.path.islink(path):
            return path
    raise ShifterError("no directory to mount the private environment on "
                       f"(none of {config.udi_mount}, {', '.join(_SCRATCH_CANDIDATES)} exists)")


def _mount_image(image_file: str, target: str, privileged: bool) -> None:
    if privileged:
        from shifter.runtime import loopdev

        try:
            device, dev_fd = loopdev.attach(image_file)
        except OSError as exc:
            raise ShifterError(f"cannot attach a loop device for {image_file}: {exc.strerror}") from None
        try:
            linux.mount(device, target, "squashfs", linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV)
        finally:
            os.close(dev_fd)
        return
    # The mount itself is made here, where the user namespace's capabilities are (an exec'd
    # squashfuse would lose them, its uid not being 0 in the namespace); squashfuse then serves
    # the already mounted /dev/fuse descriptor it is given as /dev/fd/N (libfuse >= 3.3).
    squashfuse = find_squashfuse()
    # squashfuse daemonizes: as a subreaper the launcher inherits the daemon and reaps it at the end
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    fuse_fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        options = f"fd={fuse_fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}"
        try:
            linux.mount("squashfuse", target, "fuse.squashfuse",
                        linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV, options)
        except OSError as exc:
            raise ShifterError(f"cannot mount a fuse filesystem: {exc.strerror}") from None
        pid = os.fork()
        if pid == 0:
            try:
                devnull = os.open("/dev/null", os.O_RDWR)
                os.dup2(devnull, 0)
                os.dup2(devnull, 1)
                os.set_inheritable(fuse_fd, True)
                os.execv(squashfuse, [squashfuse, image_file, f"/dev/fd/{fuse_fd}"])
            finally:
                os._exit(127)
    finally:
        os.close(fuse_fd)
    _, status = os.waitpid(pid, 0)  # squashfuse daemonizes once it serves the mount
    if os.waitstatus_to_exitcode(status) != 0:
        linux.umount2(target)
        raise ShifterError(f"squashfuse could not serve {image_file} (status {os.waitstatus_to_exitcode(status)})")


def _children() -> list[int]:
    """Pids whose parent is this process (the adopted squashfuse daemon)."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                found.append(int(name))
    return found


def _reap_helpers(timeout: float = 2.0) -> None:
    """Wait for the squashfuse daemon (our adopted child) to exit after its unmount; kill it if late."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            continue
        if time.monotonic() > deadline:
            for child in _children():
                os.kill(child, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.002)


def _relay_signals(child: int) -> None:
    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)


def run_fresh(config, opts, environ: dict[str, str], request, modules: list) -> None:
    """Build a private environment for ``request``, run the command in it, tear down, exit."""
    from shifter.formats.meta import read_meta
    from shifter.formats.volumemap import parse_volume_map
    from shifter.launch import execute

    privileged = os.geteuid() == 0
    if request.image_type == "local":
        raise ShifterError("image type local is only available in an environment prepared by the prolog")
    if not privileged:
        blocker = unprivileged_blocker()
        if blocker:
            raise ShifterError(f"no prepared environment matches this request and a private one cannot be "
                               f"built: {blocker}")
    identifier = request.identifier
    base = os.path.join(config.image_path, identifier)
    try:
        meta = read_meta(base + ".meta")
    except FileNotFoundError:
        raise ShifterError(f"image {request.ref_text} not found on this system ({identifier})") from None
    except PermissionError:
        raise ShifterError(f"image {request.ref_text} is not readable by you") from None
    uid, gid, groups = os.getuid(), os.getgid(), tuple(os.getgroups())
    if not meta.allows(uid, gid, groups):
        raise ShifterError(f"image {request.ref_text} is private and not shared with you")
    if meta.format != "squashfs":
        raise ShifterError(f"image {identifier}: format {meta.format} is not supported")
    image_file = base + ".squashfs"
    if not os.access(image_file, os.R_OK):
        raise ShifterError(f"image file {image_file} is missing or not readable by you")
    user_volumes = parse_volume_map(request.volumes, site=False) if request.volumes else []
    argv, env, cwd = execute.prepare_exec(opts, environ, request, meta, config, modules)

    _enter_namespaces(privileged)
    scratch = _scratch_dir(config)
    linux.mount("tmpfs", scratch, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0700")
    image_dir, root = os.path.join(scratch, "image"), os.path.join(scratch, "root")
    os.mkdir(image_dir, 0o700)
    os.mkdir(root, 0o755)
    _mount_image(image_file, image_dir, privileged)
    child = -1
    try:
        linux.mount("tmpfs", root, config.rootfs_type if privileged else "tmpfs",
                    linux.MS_NOSUID | linux.MS_NODEV, "mode=0755")
        import pwd

        account = container.Account(user=pwd.getpwuid(uid).pw_name, uid=uid, gid=gid, groups=groups)
        container.build_root(config, container.RootSpec(root=root, image_dir=image_dir, account=account,
                                                        modules=modules, user_volumes=user_volumes,
                                                        privileged=privileged))
        child = os.fork()
        if child == 0:
            try:
                os.chroot(root)
                execute.exec_in_root(argv, env, cwd, opts, meta, modules)
            except ShifterError as err:
                print(f"shifter: {err}", file=sys.stderr)
            finally:
                os._exit(1)
        _relay_signals(child)
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
    finally:
        if child != 0:
            try:
                linux.umount2(root)
                linux.umount2(image_dir)  # ends the squashfuse daemon
            except OSError:
                pass
            _reap_helpers()
    code = os.waitstatus_to_exitcode(status)
    sys.stdout.flush()
    os._exit(128 - code if code < 0 else code)
