"""Building a container root: the mount sequence of reference section 2.5 for one environment.

Used by setupRoot for a job's prepared environment (as root, in the node's mount namespace) and
by the launcher's fresh path (as the user, in its own user and mount namespaces).  The caller
has mounted the image read-only on ``image_dir`` and a tmpfs on ``root``; on any exception it
tears the whole environment down, so a step here only undoes its own half-made mount.

Every bind is nosuid and nodev (except /dev), private or slave as configured; site content wins
over image content; user volumes follow the user rules (a user binds only what the user can
read, onto a directory of the image, the root tmpfs or /tmp, or one the user owns).
"""

from __future__ import annotations

import os
import stat
import sys

from shifter.errors import ShifterError
from shifter.formats import sitefs
from shifter.formats.volumemap import user_target_allowed
from shifter.record import Record
from shifter.runtime import etcfiles, fdpath, filecopy, linux, mounts, pathsafe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from shifter.formats.config import ModuleConfig, UdiRootConfig
    from shifter.formats.volumemap import VolumeMount

FILE_SIZE_LIMIT = 5 * 1024 * 1024
_SITE_DIRS = ("etc", "etc/udiImage", "opt", "opt/udiImage", "opt/udiImage/modules", "var", "var/spool",
              "var/run", "var/tmp", "proc", "sys", "dev")
_HOOK_PATH = "/usr/bin:/usr/sbin:/bin:/sbin"
_SETUP_OWNED_VAR = frozenset({"shifterConfig.json", "hostsfile"})  # an image cannot plant these


class Account(Record):
    """Who the environment is for."""

    __slots__ = ("user", "uid", "gid", "groups")
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]


class RootSpec(Record):
    """Everything a root is built from, besides the site configuration."""

    __slots__ = ("root", "image_dir", "account", "modules", "user_volumes", "hostsfile", "cache_tag",
                 "privileged", "gpu", "writable", "udi_image_fd")
    _defaults = {"modules": [], "user_volumes": [], "hostsfile": None, "cache_tag": "", "privileged": True,
                 "gpu": None, "writable": False, "udi_image_fd": -1}
    root: str
    image_dir: str
    account: Account
    modules: list[ModuleConfig]
    user_volumes: list[VolumeMount]
    hostsfile: str | None
    cache_tag: str
    privileged: bool  # False: built by the user in a user namespace (the launcher's fresh path)
    gpu: object  # shifter.runtime.gpu.Injection, or None: no GPU recipe on this node
    writable: bool  # image_dir is the job's overlay (--writable): its directories are bound read-write
    udi_image_fd: int  # >= 0: an /opt/udiImage already built for these modules, bound read-only instead of copied


def _check_root_only(path: str, what: str) -> None:
    """``path`` and every directory above it (as written and as resolved) are root's alone."""
    from shifter.errors import NodeError

    if not path.startswith("/"):
        raise NodeError(f"{what} {path}: not an absolute path")
    for candidate in dict.fromkeys((os.path.normpath(path), os.path.realpath(path))):
        parts = candidate.split("/")[1:]
        for depth in range(len(parts) + 1):
            prefix = "/" + "/".join(parts[:depth])
            try:
                info = os.lstat(prefix)
            except OSError as exc:
                raise NodeError(f"{what} {path}: {prefix}: {exc.strerror}") from None
            shared = info.st_mode & 0o022 and not (stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX)
            if info.st_uid != 0 or (shared and not stat.S_ISLNK(info.st_mode)):
                raise NodeError(f"{what} {path}: {prefix} may be changed by someone other than root")


def _propagation(config: UdiRootConfig, mount: VolumeMount | None = None) -> int:
    if mount is not None and mount.slave:
        return linux.MS_SLAVE
    if mount is not None and mount.private:
        return linux.MS_PRIVATE
    return linux.MS_SLAVE if config.mount_propagation_style == "slave" else linux.MS_PRIVATE


def run_hook(script: str, cwd: str, what: str) -> None:
    """Run a site or module root hook with /bin/sh, as the original did; non-zero aborts the setup.

    It runs on the host (the host's /bin/sh, never chrooted), and only a script that no one but
    root can change: root never runs what a user could have written.
    """
    import subprocess

    _check_root_only(script, what)

    result = subprocess.run(["/bin/sh", script], cwd=cwd, env={"PATH": _HOOK_PATH},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise ShifterError(f"{what} {script} failed with status {result.returncode}"
                           + (f": {detail[-1]}" if detail else ""))


def _make_path(root: str, relpath: str, as_dir: bool, tmpfs_dev: int) -> str:
    """Create ``relpath`` under ``root`` as a mount point, only where the parent is the root tmpfs.

    Creating a mount point inside an already bound host directory would write on the host.
    """
    target = pathsafe.resolve_in_root(root, relpath, must_exist=False)
    if os.path.lexists(target):
        return target
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        _make_path(root, os.path.dirname(relpath.rstrip("/")) or "/", True, tmpfs_dev)
        parent = os.path.dirname(target)
    if os.lstat(parent).st_dev != tmpfs_dev:
        raise ShifterError(f"cannot create mount point {relpath}: its parent is not on the container tmpfs")
    if as_dir:
        os.mkdir(target, 0o755)
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    return target


def _bind_site_volume(config: UdiRootConfig, spec: RootSpec, mount: VolumeMount, tmpfs_dev: int) -> None:
    """Bind a host path for the site (siteFs, module siteFs); creates the target on the tmpfs."""
    if mount.per_node_cache is not None:
        if not spec.privileged:
            raise ShifterError(f"site volume {mount.target}: perNodeCache needs the prepared environment")
        target_fd = fdpath.open_dir(_make_path(spec.root, mount.target, True, tmpfs_dev))
        try:
            mount_per_node_cache(config, spec, mount, target_fd)
        finally:
            os.close(target_fd)
        return
    try:
        source_is_dir = os.path.isdir(mount.source)
        os.stat(mount.source)
    except OSError as exc:
        raise ShifterError(f"site volume {mount.source}: {exc.strerror}") from None
    target = _make_path(spec.root, mount.target, source_is_dir, tmpfs_dev)
    try:
        linux.bind(mount.source, target, readonly=mount.read_only, recursive=mount.recursive,
                   propagation=_propagation(config, mount))
    except OSError as exc:
        raise ShifterError(f"site volume {mount.source}:{mount.target}: {exc.strerror}") from None


def mount_per_node_cache(config: UdiRootConfig, spec: RootSpec, mount: VolumeMount, target_fd: int) -> None:
    """A sparse xfs file, loop-mounted on ``target_fd`` for the job, unlinked at once.

    Unlinking right after the mount makes the cache anonymous: it disappears with the unmount.
    The file name carries the job's tag so a crash between creating and unlinking it is still
    cleaned up by unsetupRoot.  The filesystem is chowned to the user through its own mount
    descriptor before it is attached (fdpath.mount_new_fs): no path is looked up again.
    """
    import subprocess
    import tempfile

    from shifter.runtime import loopdev

    cache = mount.per_node_cache
    directory = config.per_node_cache_path
    if not directory:
        raise ShifterError("perNodeCache requested but perNodeCachePath is not set in udiRoot.conf")
    limit = getattr(config, "per_node_cache_size_limit", 0) or 0
    if limit and cache.size > limit:
        raise ShifterError(f"perNodeCache size {cache.size} exceeds perNodeCacheSizeLimit {limit}")
    os.makedirs(directory, 0o700, exist_ok=True)
    fd, backing = tempfile.mkstemp(prefix=f"perNodeCache_{spec.cache_tag}_uid{spec.account.uid}_", suffix=".xfs",
                                   dir=directory)
    try:
        os.ftruncate(fd, cache.size)
        os.close(fd)
        fd = -1
        mkfs = config.mkfs_xfs_path or "/sbin/mkfs.xfs"
        result = subprocess.run([mkfs, "-q", "-f", backing], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={"PATH": _HOOK_PATH})
        if result.returncode != 0:
            lines = result.stderr.decode(errors="replace").strip().splitlines()
            raise ShifterError(f"perNodeCache on {mount.target}: mkfs.xfs failed: {lines[0] if lines else ''}")
        device, dev_fd = loopdev.attach(backing, read_only=False)
        try:
            fdpath.mount_new_fs("xfs", device, target_fd, owner=(spec.account.uid, spec.account.gid),
                                propagation=_propagation(config, mount))
        except OSError as exc:
            raise ShifterError(f"perNodeCache on {mount.target}: {exc.strerror}") from None
        finally:
            os.close(dev_fd)
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(backing)


def _write(path: str, text: str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)


def _copy_host_file(source: str, target: str, privileged: bool = True) -> None:
    """A site file into the container's /etc: root-owned (when root builds it), mode 0644."""
    filecopy.copy_file(source, target, mode=0o644, owner=(0, 0) if privileged else None)


def _lookup_passwd(config: UdiRootConfig, name: str) -> list[str] | None:
    """A user's passwd fields: from etcPath/passwd unless the site allows libc (NSS) calls."""
    if not getattr(config, "allow_libc_pwd_calls", True):
        try:
            with open(os.path.join(config.etc_path, "passwd")) as fh:
                return etcfiles.find_passwd_entry(fh.read(), name)
        except OSError:
            return None
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return [entry.pw_name, "x", str(entry.pw_uid), str(entry.pw_gid), entry.pw_gecos, entry.pw_dir, entry.pw_shell]


def _setup_etc(config: UdiRootConfig, spec: RootSpec) -> None:
    etc = os.path.join(spec.root, "etc")
    os.symlink("/proc/mounts", os.path.join(etc, "mtab"))
    for name in ("hosts", "resolv.conf"):
        if os.path.exists(f"/etc/{name}"):
            _copy_host_file(f"/etc/{name}", os.path.join(etc, name), spec.privileged)
    for name in ("passwd", "group", "nsswitch.conf"):
        if os.path.lexists(os.path.join(etc, name)):
            raise ShifterError(f"/etc/{name} already exists in the container before the site's was written")
    account = spec.account
    max_groups = config.max_group_count or 0
    if config.populate_etc_dynamically:
        entries = []
        group_pairs: list[tuple[str, int]] = []
        import grp

        for name in (account.user, *config.users_to_import):
            fields = _lookup_passwd(config, name)
            if fields is None:
                raise ShifterError(f"user {name!r} not found in the passwd database")
            entries.append(fields)
        for gid in account.groups:
            try:
                group_pairs.append((grp.getgrgid(gid).gr_name, gid))
            except KeyError:
                group_pairs.append((str(gid), gid))
        for fields in entries[1:]:
            gid = int(fields[3])
            if all(gid != g for _, g in group_pairs):
                try:
                    group_pairs.append((grp.getgrgid(gid).gr_name, gid))
                except KeyError:
                    pass
        _write(os.path.join(etc, "passwd"), etcfiles.passwd_text(entries))
        group_text = etcfiles.groups_text(group_pairs, account.user)
        _write(os.path.join(etc, "nsswitch.conf"), etcfiles.NSSWITCH_CONF)
        _write(os.path.join(etc, "host.conf"), etcfiles.HOST_CONF)
    else:
        with os.scandir(config.etc_path) as entries_it:
            for entry in entries_it:
                target = os.path.join(etc, entry.name)
                if os.path.lexists(target):
                    raise ShifterError(f"etcPath entry {entry.name} collides with an existing /etc/{entry.name}")
                if entry.is_dir(follow_symlinks=False):
                    filecopy.copy_entry(entry.path, target, keep_owner=spec.privileged)
                elif entry.is_file(follow_symlinks=False):
                    _copy_host_file(entry.path, target, spec.privileged)
        for name in ("passwd", "group", "nsswitch.conf"):
            if not os.path.isfile(os.path.join(etc, name)):
                raise ShifterError(f"etcPath {config.etc_path} has no {name}")
        with open(os.path.join(etc, "group")) as fh:
            group_text = fh.read()
        os.unlink(os.path.join(etc, "group"))
    _write(os.path.join(etc, "group"), etcfiles.filter_group(group_text, account.user, max_groups))
    _write(os.path.join(etc, "shadow"), "", 0o600)


def _make_world_readable(top: str) -> None:
    """``chmod -R a+rX``: the user reads /opt/udiImage inside the container."""
    for dirpath, _dirnames, filenames in os.walk(top):
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o555)
        for name in filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, mode | 0o444 | (0o111 if mode & 0o111 else 0))


def _setup_udi_image(config: UdiRootConfig, spec: RootSpec) -> None:
    opt = os.path.join(spec.root, "opt/udiImage")
    if spec.udi_image_fd >= 0:  # a step's environment: its job's tree (setuproot/build.py shared_udi_image)
        target_fd = fdpath.open_dir(opt)
        try:
            fdpath.bind_fd(spec.udi_image_fd, target_fd, readonly=True, propagation=_propagation(config))
        finally:
            os.close(target_fd)
        return
    if config.opt_udi_image and os.path.isdir(config.opt_udi_image):
        filecopy.copy_contents(config.opt_udi_image, opt, keep_owner=spec.privileged)
    for module in spec.modules:
        if module.copy_path:
            dest = os.path.join(opt, "modules", module.name)
            os.makedirs(dest, 0o755, exist_ok=True)
            filecopy.copy_contents(module.copy_path, dest, keep_owner=spec.privileged)
    _make_world_readable(opt)


def _mount_kernel_filesystems(config: UdiRootConfig, root: str, privileged: bool) -> None:
    """/proc, /sys, /dev, /tmp, /var/tmp.  In a user namespace without its own pid namespace a
    new proc cannot be mounted: the host's is bound instead (same view, same restrictions)."""
    propagation = _propagation(config)
    if privileged:
        linux.mount("proc", os.path.join(root, "proc"), "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    else:
        linux.bind("/proc", os.path.join(root, "proc"), recursive=True, propagation=propagation)
    linux.bind("/sys", os.path.join(root, "sys"), recursive=True, propagation=propagation)
    linux.bind("/dev", os.path.join(root, "dev"), recursive=True, nodev=False, propagation=propagation)
    tmp = os.path.join(root, "tmp")
    os.mkdir(tmp, 0o777)
    os.chmod(tmp, 0o1777)
    # unprivileged, a mount below the host's /tmp is locked to it: only a recursive bind is allowed
    linux.bind("/tmp", tmp, recursive=not privileged, propagation=propagation)
    if os.path.isdir("/var/tmp"):
        linux.bind("/var/tmp", os.path.join(root, "var/tmp"), recursive=not privileged, propagation=propagation)


def _bind_image_dir(config: UdiRootConfig, spec: RootSpec, relpath: str) -> None:
    """Fill ``relpath`` of the root with the image's entries the site has not provided.

    Directories and big files are bound (read-only, from the read-only image, or read-write
    from a --writable job's overlay); small files and symlinks are copied, like the original.
    """
    source_dir = os.path.join(spec.image_dir, relpath)
    target_dir = os.path.join(spec.root, relpath)
    if not os.path.isdir(source_dir) or os.path.islink(source_dir):
        return
    propagation = _propagation(config)
    with os.scandir(source_dir) as it:
        for entry in it:
            dest = os.path.join(target_dir, entry.name)
            if os.path.lexists(dest) or (relpath == "var" and entry.name in _SETUP_OWNED_VAR):
                continue
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), dest)
            elif entry.is_dir(follow_symlinks=False):
                os.mkdir(dest, 0o755)
                linux.bind(entry.path, dest, readonly=not spec.writable, propagation=propagation)
            elif entry.is_file(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                if info.st_size < FILE_SIZE_LIMIT:
                    filecopy.copy_entry(entry.path, dest, keep_owner=spec.privileged)
                else:
                    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
                    linux.bind(entry.path, dest, readonly=not spec.writable, propagation=propagation)


def _copy_image_etc(spec: RootSpec) -> None:
    """Copy (never bind) the image's /etc entries the site has not written: site files win."""
    source_dir = os.path.join(spec.image_dir, "etc")
    target_dir = os.path.join(spec.root, "etc")
    os.makedirs(os.path.join(target_dir, "ssh"), 0o755, exist_ok=True)
    if not os.path.isdir(source_dir) or os.path.islink(source_dir):
        return
    filecopy.copy_contents(source_dir, target_dir, keep_owner=spec.privileged, skip_existing=True)


class _AsUser:
    """Temporarily take the user's effective ids, so path checks see what the user may see."""

    def __init__(self, account: Account) -> None:
        self.account = account

    def __enter__(self) -> None:
        self.saved_groups = os.getgroups()
        os.setgroups(list(self.account.groups))
        os.setegid(self.account.gid)
        os.seteuid(self.account.uid)

    def __exit__(self, *exc: object) -> None:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(self.saved_groups)


def check_local_root(path: str, account: Account) -> str:
    """The directory of a ``local:`` image, if root may build a container from it for ``account``.

    Root reads and binds the tree by path while the job's user may act, so no user may be able
    to swap anything on the way to it: every component (no symlinks) must be root's and not
    writable by group or others, checked on descriptors along an O_NOFOLLOW walk from /.  The
    user must also be able to read it (opened with the user's ids), so a local image never
    shows what the user could not reach on the host.  What lies below and is writable by a user
    (``/tmp`` of ``local:/``) is copied through descriptors (shifter/runtime/filecopy.py).
    """
    if not path.startswith("/"):
        raise ShifterError(f"local image {path}: not an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ShifterError(f"local image {path}: '..' is not allowed")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for index in range(len(parts) + 1):
            info = os.fstat(fd)
            where = "/" + "/".join(parts[:index])
            if info.st_uid != 0 or info.st_mode & 0o022:
                raise ShifterError(f"local image {path}: {where} must be owned by root and writable by root only")
            if index == len(parts):
                break
            try:
                following = os.open(parts[index], os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                    dir_fd=fd)
            except OSError as exc:
                raise ShifterError(f"local image {path}: {where.rstrip('/')}/{parts[index]}: {exc.strerror} "
                                   "(a directory without symlinks is needed)") from None
            os.close(fd)
            fd = following
    finally:
        os.close(fd)
    try:
        with _AsUser(account):
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    except OSError as exc:
        raise ShifterError(f"local image {path}: {exc.strerror} (as {account.user})") from None
    return "/" + "/".join(parts)


class _AsSelf:
    """The fresh path already runs as the user."""

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        pass


def _open_user_target(root_fd: int, mount: VolumeMount, what: str) -> int:
    """An O_PATH descriptor of the user volume's target, resolved in the root by the kernel."""
    try:
        return fdpath.open_in_root(root_fd, mount.target, os.O_PATH | os.O_DIRECTORY)
    except OSError as exc:
        raise ShifterError(f"{what}: target {mount.target} is not a directory in the image "
                           f"({exc.strerror})") from None


def _check_user_target(root_fd: int, target_fd: int, spec: RootSpec, mount: VolumeMount, what: str,
                       allowed_devices: set[int]) -> str:
    """The user rules, applied to where the descriptor really is (a link such as /data -> /etc or
    a component swapped meanwhile is seen here); returns that path inside the root."""
    inside = fdpath.relative_to(root_fd, target_fd)
    if not user_target_allowed(inside):
        raise ShifterError(f"{what}: {mount.target} leads to {inside}, where user volumes are not allowed")
    info = os.fstat(target_fd)
    if info.st_dev not in allowed_devices and info.st_uid != spec.account.uid:
        raise ShifterError(f"{what}: may not mount on {mount.target} (not in the image, /tmp or owned by you)")
    return inside


def _bind_user_volume(config: UdiRootConfig, spec: RootSpec, mount: VolumeMount, allowed_devices: set[int]) -> None:
    """Bind a user volume, enforcing the user rules of reference section 2.6.

    The user can change /tmp (the host's) and directories it owns while this runs, so nothing is
    used by path: source and target are resolved inside the root by the kernel (openat2
    RESOLVE_IN_ROOT), the source with the user's ids (so it must be a directory the user can
    read), the rules are checked on the target descriptor's real path and owner, and the mount is
    made from descriptor to descriptor (shifter/runtime/fdpath.py).
    """
    what = f"volume {mount.source}:{mount.target}"
    root_fd = fdpath.open_dir(spec.root)
    target_fd = -1
    try:
        if "/" not in mount.target.strip("/"):  # a missing top-level target (/input) is made on the root tmpfs
            try:
                os.close(fdpath.make_dirs_in_root(root_fd, mount.target, device=os.fstat(root_fd).st_dev))
            except OSError:
                pass  # the checks below name the problem
        target_fd = _open_user_target(root_fd, mount, what)
        inside = _check_user_target(root_fd, target_fd, spec, mount, what, allowed_devices)
        covered = fdpath.real_path(target_fd)
        if covered in mounts.mounts_under(covered):
            # a user volume replaces what is mounted there (the original's overwrite=1); the
            # descriptor of the covered directory is taken after the unmount, and checked again
            os.close(target_fd)
            target_fd = -1
            mounts.unmount_tree(covered)
            target_fd = _open_user_target(root_fd, mount, what)
            if _check_user_target(root_fd, target_fd, spec, mount, what, allowed_devices) != inside:
                raise ShifterError(f"{what}: {mount.target} changed while it was being mounted")
        if mount.per_node_cache is not None:
            if not spec.privileged:
                raise ShifterError(f"{what}: perNodeCache needs the prepared environment (set up by the prolog)")
            mount_per_node_cache(config, spec, mount, target_fd)
            return
        try:
            with _AsUser(spec.account) if spec.privileged else _AsSelf():
                source_fd = fdpath.open_in_root(root_fd, mount.source, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            with _AsUser(spec.account) if spec.privileged else _AsSelf():
                on_host = os.path.isdir(mount.source)  # as the user: reveals nothing they cannot see
            if on_host and sitefs.hidden_in_container(config.site_fs, mount.source):
                raise ShifterError(f"{what}: {sitefs.hidden_source_message(config.site_fs, mount.source)}") from None
            raise ShifterError(f"{what}: source {mount.source} is not a directory you can read in the "
                               f"container ({exc.strerror})") from None
        try:
            fdpath.bind_fd(source_fd, target_fd, readonly=mount.read_only, propagation=_propagation(config))
        except OSError as exc:
            raise ShifterError(f"{what}: {exc.strerror}") from None
        finally:
            os.close(source_fd)
    finally:
        if target_fd >= 0:
            os.close(target_fd)
        os.close(root_fd)


def build_root(config: UdiRootConfig, spec: RootSpec) -> None:
    """Populate the mounted root tmpfs ``spec.root`` from the image at ``spec.image_dir``."""
    os.umask(0o022)
    root = spec.root
    tmpfs_dev = os.stat(root).st_dev
    allowed_devices = {tmpfs_dev, os.stat(spec.image_dir).st_dev, os.stat("/tmp").st_dev}
    for name in _SITE_DIRS:
        os.mkdir(os.path.join(root, name), 0o755)
    os.mkdir(os.path.join(root, "var/empty"), 0o700)
    if config.site_pre_mount_hook:
        run_hook(config.site_pre_mount_hook, root, "sitePreMountHook")
    for mount in config.site_fs:
        _bind_site_volume(config, spec, mount, tmpfs_dev)
    if config.site_post_mount_hook:
        run_hook(config.site_post_mount_hook, root, "sitePostMountHook")
    for module in spec.modules:
        for mount in module.site_fs:
            _bind_site_volume(config, spec, mount, tmpfs_dev)
    _setup_etc(config, spec)
    _setup_udi_image(config, spec)
    if spec.hostsfile is not None:
        _write(os.path.join(root, "var/hostsfile"), spec.hostsfile)
    for module in spec.modules:
        if module.roothook:
            run_hook(module.roothook, root, f"module {module.name} roothook")
    _mount_kernel_filesystems(config, root, spec.privileged)
    if spec.gpu is not None:  # after /dev, before the image's directories: siteResources is the site's
        from shifter.runtime import gpu

        gpu.inject(spec.gpu, root, tmpfs_dev, _propagation(config), spec.image_dir)
    for relpath in ("", "var", "opt"):
        _bind_image_dir(config, spec, relpath)
    _copy_image_etc(spec)
    if spec.gpu is not None:  # the GSP firmware, persistenced socket, MPS directories: at their own paths
        from shifter.runtime import gpu

        for note in gpu.bind_host_paths(spec.gpu, root, tmpfs_dev, _propagation(config)):
            print(f"setupRoot: GPU: {note}", file=sys.stderr)
    for mount in spec.user_volumes:
        _bind_user_volume(config, spec, mount, allowed_devices)
