"""The prolog's work: check the request, then build the job's environment or undo everything.

Failures are classified where they happen (docs/admin-guide.md "Failure policy"): what the
request, the user or the image brought is a RequestError, raised by the checks that run
before anything is made; a NodeError names a resource of the node itself (the config,
udiMount, loopMount, loop devices, the job's tmpfs, the namespace pin, the cgroup).  Anything
else, an unexpected error included, is taken as the request's: a user never drains a node.
"""

from __future__ import annotations

import os
import stat

from setuproot.args import SetupRequest, default_config_path
from shifter.errors import NodeError, RequestError, ShifterError
from shifter.formats import launchplan
from shifter.formats.config import UdiRootConfig, load_config
from shifter.formats.meta import ImageMeta, read_meta
from shifter.formats.reuse import marker_text
from shifter.runtime import container, fdpath, filecopy, jobdir, linux, loopdev, teardown, userns
from shifter.runtime.jobenv import JobEnv

_MAX_GROUPS = 512


def describe(err: BaseException) -> str:
    """One line for any exception: what setupRoot prints and the prolog records."""
    if isinstance(err, ShifterError):
        return str(err)
    if isinstance(err, OSError):
        return f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    return f"internal error: {type(err).__name__}: {err}"


class request_checks:
    """Whatever fails while the request's own data is checked is the request's failure.

    A class, not a ``contextlib`` generator: importing contextlib (collections, functools)
    cost setupRoot 2-3 ms of its start.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None or isinstance(exc, (RequestError, NodeError)) or not isinstance(exc, Exception):
            return False
        # user data must not reach the drain path by surprise
        raise RequestError(describe(exc)) from None


class node_step:
    """An operation on the node's own resources: its OSError means the node is at fault."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, OSError):
            raise NodeError(f"{self.what}: {describe(exc)}") from None
        return False


def resolve_account(request: SetupRequest) -> container.Account:
    """The job's user, refusing root (the original's rule) and a user whose uid does not match."""
    import pwd

    if request.user == "root" or request.uid == 0 or request.gid == 0:
        raise ShifterError("refusing to set up an environment for root (uid or gid 0)")
    try:
        entry = pwd.getpwnam(request.user)
    except KeyError:
        raise ShifterError(f"user {request.user!r} does not exist") from None
    if entry.pw_uid != request.uid:
        raise ShifterError(f"user {request.user!r} has uid {entry.pw_uid}, not {request.uid}")
    groups = [request.gid if g == 0 else g for g in os.getgrouplist(request.user, request.gid)]
    if len(groups) > _MAX_GROUPS:
        raise ShifterError(f"user {request.user!r} is in more than {_MAX_GROUPS} groups")
    unique = tuple(dict.fromkeys(groups))
    return container.Account(user=request.user, uid=request.uid, gid=request.gid, groups=unique)


def select_modules(config: UdiRootConfig, requested: str | None) -> list:
    """The active modules: -m replaces defaultModules, ``none`` disables all."""
    try:
        from shifter.formats.modules import select_modules as select
    except ImportError:  # TEMPORARY until shifter.formats.modules lands
        names = config.default_modules if requested is None else [n for n in requested.split(",") if n]
        if names == ["none"]:
            return []
        for name in names:
            if name not in config.modules:
                raise ShifterError(f"unknown shifter module {name!r}") from None
        return [config.modules[n] for n in names]
    return select(config, requested)


def resolve_image(config: UdiRootConfig, request: SetupRequest) -> tuple[str, str]:
    """(image id, image file) for the request; only ids (and local dirs when allowed) reach a node."""
    from shifter.formats.imageref import parse_image_ref

    ref = parse_image_ref(f"{request.image_type}:{request.image}", config.default_image_type)
    if ref.type == "local":
        if not config.allow_local_chroot:
            raise ShifterError("image type local is not allowed (allowLocalChroot=0)")
        return ref.tag, ref.tag
    if ref.type == "id":
        identifier = ref.tag
    else:
        from shifter.client.gatewayclient import GatewayClient

        client = GatewayClient(
            config.image_gateways, config.system or "", config.gateway_timeout, gateway_user=config.image_gateway_user
        )
        identifier = client.lookup(ref)["id"]
    if not identifier or not all(c.isalnum() or c in "._-" for c in identifier) or identifier[0] == ".":
        raise ShifterError(f"invalid image id {identifier!r}")
    return identifier, os.path.join(config.image_path, identifier)


def load_image_meta(identifier: str, base: str, account: container.Account) -> ImageMeta:
    try:
        meta = read_meta(base + ".meta")
    except FileNotFoundError:
        raise ShifterError(f"image {identifier} not found ({base}.meta does not exist)") from None
    if meta.format != "squashfs":
        raise ShifterError(f"image {identifier}: format {meta.format} is not supported (squashfs only)")
    if not meta.allows(account.uid, account.gid, account.groups):
        raise ShifterError(f"user {account.user} may not use image {identifier} (private image)")
    return meta


def _make_dir(path: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    os.mkdir(path, mode)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _propagation_fields(path: str) -> list[str] | None:
    """The optional fields (``shared:N``, ``master:N``...) of the topmost mount on ``path``, or None."""
    from shifter.runtime.mounts import unescape

    found = None
    with open("/proc/self/mountinfo", encoding="latin-1") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 5 and unescape(fields[4]) == path:
                found = fields[6:fields.index("-")]
    return found


def _isolate_base(path: str) -> None:
    """Make ``path`` a private mount of its own before anything is mounted beneath it.

    Under a shared parent (systemd's default) every job mount would be copied into the peers
    (PrivateTmp services' namespaces): those copies keep loop devices busy forever and outlive
    the job.  A private bind of the directory onto itself stops that, once per boot.  Concurrent
    prologs serialise on a lock of the directory.  Should mounts of jobs already sit below an
    unbound ``path`` (an upgrade with jobs running), binding over them would hide them from their
    teardown, so this waits for a prolog that finds none.
    """
    import fcntl

    from shifter.runtime.mounts import mounts_under

    path = os.path.realpath(path)  # as mountinfo names it: a trailing / or a link would bind again each time
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        fields = _propagation_fields(path)
        if fields is None:
            if mounts_under(path):
                return
            linux.mount(path, path, None, linux.MS_BIND)
            linux.mount(None, path, None, linux.MS_PRIVATE)
        elif any(field.startswith(("shared:", "master:")) for field in fields):
            linux.mount(None, path, None, linux.MS_PRIVATE)
    finally:
        os.close(fd)  # releases the lock


def _mount_image(image_file: str, target: str) -> None:
    try:
        device, dev_fd = loopdev.attach(image_file + ".squashfs")
    except FileNotFoundError:
        raise ShifterError(f"image file {image_file}.squashfs does not exist") from None
    except OSError as exc:
        raise NodeError(f"cannot attach a loop device: {exc.strerror}") from None
    try:
        linux.mount(device, target, "squashfs", linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV)
    except OSError as exc:
        raise NodeError(f"cannot mount {image_file}.squashfs: {exc.strerror}") from None
    finally:
        os.close(dev_fd)
    linux.mount(None, target, None, linux.MS_PRIVATE)


_WRITABLE_PARTS = ("image", "lower", "rw", "merged")


def _mount_writable_image(config: UdiRootConfig, image_file: str, base: str, account: container.Account) -> str:
    """The image under a per-job overlay (--writable); returns the merged directory.

    Below ``base`` (loopMount/<job>, root's 0700): ``image`` the squashfs, ``lower`` an idmapped
    bind of it whose root-owned files show as the user's (so the user may change them, in the
    overlay only), ``rw`` a tmpfs of writableLayerSize bytes holding the overlay's upper and
    work directories, ``merged`` the overlay.  Everything is nosuid and nodev; the epilog's
    teardown unmounts the lot and the tmpfs takes every write with it.
    """
    if any(char in base for char in ",:\\"):  # overlay's option syntax: lowerdir=a:b,upperdir=...
        raise NodeError(f"loopMount {config.loop_mount}: ',', ':' and '\\' cannot be used under an overlay")
    image, lower, rw, merged = (os.path.join(base, name) for name in _WRITABLE_PARTS)
    with node_step("the writable layer's directories"):
        for path in (image, lower, rw, merged):
            _make_dir(path, 0o700)
    _mount_image(image_file, image)
    with node_step("the writable layer's id-mapped image"):
        ns_fd = userns.image_owner_namespace(account)
        source_fd = fdpath.open_dir(image)
        target_fd = fdpath.open_dir(lower)
        try:
            fdpath.bind_fd(source_fd, target_fd, readonly=True, userns_fd=ns_fd)
        except OSError as exc:  # a kernel without idmapped squashfs: the option, not the node, is at fault
            raise RequestError(f"--writable is not available on this node (idmapped image mount: "
                               f"{exc.strerror})") from None
        finally:
            for fd in (ns_fd, source_fd, target_fd):
                os.close(fd)
    with node_step("the writable layer's tmpfs"):
        linux.mount("tmpfs", rw, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                    f"size={config.writable_layer_size},mode=0700")
        linux.mount(None, rw, None, linux.MS_PRIVATE)
        os.mkdir(os.path.join(rw, "upper"), 0o755)
        os.mkdir(os.path.join(rw, "work"), 0o700)
    with node_step("the writable layer's overlay"):
        linux.mount("overlay", merged, "overlay", linux.MS_NOSUID | linux.MS_NODEV,
                    f"lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work")
        linux.mount(None, merged, None, linux.MS_PRIVATE)
    return merged
def shared_udi_image(config: UdiRootConfig, request: SetupRequest, account: container.Account,
                     modules: list) -> int:
    """A step's /opt/udiImage: a descriptor of its job's on this node, to bind read-only; -1 to copy one.

    Copying optUdiImage (the sshd and its libraries: 18 MB) and the modules' copyPath was the
    largest part of a step's setup, and the job's environment already holds that tree when the
    step's modules are the job's.  Not when a module has a roothook (it may write below the
    tree).  The job's directory is root's (shifter/runtime/jobdir.py), its marker, root's, is written
    last: it is read and the tree opened through descriptors, without following symlinks.
    """
    if request.step is None or request.pubkey or any(module.roothook for module in modules):
        return -1
    from shifter.runtime import fdpath

    job = JobEnv(config, request.jobid)
    # the job's marker must name the same user and modules (values are escaped: no '"' inside them)
    template = marker_text("", account.user, "", [m.name for m in modules])
    user_field = template[template.index(',"user":'):template.index(',"volMap":')]
    modules_field = template[template.index(',"modules":'):]
    try:
        dir_fd = os.open(job.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return -1  # a job without an environment here (no --image, or its setup failed)
    udi_fd = -1
    try:
        marker_fd = fdpath.open_no_symlinks(dir_fd, os.path.relpath(job.marker, job.dir),
                                            os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        try:
            info = os.fstat(marker_fd)
            marker = os.read(marker_fd, 65536).decode(errors="replace") if stat.S_ISREG(info.st_mode) else ""
        finally:
            os.close(marker_fd)
        if os.fstat(dir_fd).st_uid != 0 or info.st_uid != 0 or info.st_nlink != 1 \
                or not marker.endswith(modules_field) or user_field + "," not in marker:
            return -1
        udi_fd = fdpath.open_no_symlinks(dir_fd, "root/opt/udiImage", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        if os.fstat(udi_fd).st_uid != 0:
            os.close(udi_fd)
            return -1
        return udi_fd
    except OSError:
        if udi_fd >= 0:
            os.close(udi_fd)
        return -1
    finally:
        os.close(dir_fd)


def plan_gpus(config: UdiRootConfig, request: SetupRequest, job: JobEnv):
    """The job's GPU injection (shifter/runtime/gpu.py), decided before anything is mounted.

    ``--module=none`` keeps the allocated devices but injects none of the driver's libraries
    and tools: the job brings its own user-space.  What the node lacks is the node's fault.
    """
    from shifter.formats.gpurecipe import load_recipe, parse_gpu_ids, site_env_values
    from shifter.runtime import gpu
    from shifter.runtime.gpudiscovery import discover

    with request_checks():
        gpus = parse_gpu_ids(request.gpus)
        userspace = "none" not in (request.modules or "").split(",")
    try:
        recipe = load_recipe(config.gpu_recipe)
        discovery = discover(recipe, config.gpu_driver_root, userspace=bool(gpus) and userspace,
                             site_env=site_env_values(config.site_env))
        return gpu.plan_injection(discovery, gpus, userspace, config.site_resources, job.gpu_hide,
                                  job.gpu_hide + ".d", local_ids=request.gpus_local)
    except NodeError:
        raise
    except (ShifterError, OSError) as err:
        raise NodeError(f"GPU recipe {config.gpu_recipe}: {describe(err)}") from None


def build_environment(config: UdiRootConfig, job: JobEnv, request: SetupRequest, account: container.Account,
                      identifier: str, image_file: str, modules: list, plan: list[str] | None,
                      gpu_injection=None, udi_image_fd: int = -1) -> None:
    """Everything of docs/internals.md "Per-job environment on a node", in order."""
    from shifter.formats.volumemap import check_per_node_caches, parse_volume_map, volume_signature

    with request_checks():
        user_volumes = parse_volume_map(";".join(request.volumes), site=False)
        check_per_node_caches(user_volumes, config.per_node_cache_size_limit, config.per_node_cache_max_count,
                              config.per_node_cache_allowed_fs_type)
        hostsfile = None
        if request.node_spec:
            from shifter.formats.hostsfile import hostsfile_text, parse_node_spec

            hostsfile = hostsfile_text(parse_node_spec(request.node_spec))
        marker = marker_text(identifier, account.user, volume_signature(user_volumes), [m.name for m in modules])

    with node_step("udiMount and loopMount"):
        jobdir.ensure_base(config.udi_mount, 0o755)
        jobdir.ensure_base(config.loop_mount, 0o700)
        _isolate_base(config.udi_mount)
        _isolate_base(config.loop_mount)
        # root's for good (shifter/runtime/jobdir.py), so the user cannot swap paths under the mounts being made;
        # 0711 lets the user volumes be resolved with the user's own permissions meanwhile
        _make_dir(job.dir, 0o711)
        _make_dir(job.root, 0o755)
        if request.image_type != "local":
            _make_dir(job.loop_mount, 0o700)
    if request.image_type == "local":
        image_dir = container.check_local_root(image_file, account)
    elif request.writable:
        image_dir = _mount_writable_image(config, image_file, job.loop_mount, account)
    else:
        _mount_image(image_file, job.loop_mount)
        image_dir = job.loop_mount
    with node_step(f"the job's {config.rootfs_type}"):
        linux.mount(config.rootfs_type, job.root, config.rootfs_type, linux.MS_NOSUID | linux.MS_NODEV,
                    "mode=0755")
        linux.mount(None, job.root, None, linux.MS_PRIVATE)
    if gpu_injection is not None:
        from shifter.runtime import gpu

        with node_step("the job's GPU device covers"):
            gpu.make_hide_sources(gpu_injection.hide_file, gpu_injection.hide_dir)
    spec = container.RootSpec(root=job.root, image_dir=image_dir, account=account, modules=modules,
                              user_volumes=user_volumes, hostsfile=hostsfile, cache_tag=f"job{job.jobid}",
                              gpu=gpu_injection, writable=request.writable, udi_image_fd=udi_image_fd)
    container.build_root(config, spec)
    if request.image_type != "local":
        filecopy.copy_file(image_file + ".meta", job.meta, mode=0o644)
    else:  # a host directory has no metadata: no ENV, ENTRY, CMD or WORKDIR
        from shifter.formats.meta import write_meta

        write_meta(job.meta, ImageMeta(format="VFS"))
        os.chmod(job.meta, 0o644)
    with node_step("the job's user namespace"):
        userns.pin_user_namespace(account, job.userns)
    cgroup = None
    if request.memory_cgroup:
        from shifter.runtime import jobcgroup

        try:
            cgroup = jobcgroup.create(request.memory_cgroup, account.uid, job.jobid)
        except OSError as exc:
            raise NodeError(f"memory cgroup: {exc.strerror}") from None
    if request.pubkey:
        from setuproot import sshd

        sshd.prepare(job.root, account, request.pubkey)
        if request.defer_sshd:  # the extern step starts it (spank_plugin/hooks.py extern); a squatter fails now
            sshd.refuse_squatter(job.root)
        else:
            sshd.start_unless_port_taken(job.root, account, cgroup, job.jobid)
    with node_step("the job's directory"):
        fd = os.open(job.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(marker)
        if gpu_injection is not None:
            from shifter.runtime.gpu import environment_operations

            launchplan.write_plan(job.gpu_env, launchplan.encode_operations(environment_operations(gpu_injection)))
        if plan is not None:
            launchplan.write_plan(job.plan, plan)
        if request.writable:
            os.close(os.open(job.writable, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644))
        if not config.mount_udi_root_writable:
            linux.mount(None, job.root, None,
                        linux.MS_REMOUNT | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_RDONLY)
        dir_fd = os.open(job.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            jobdir.admit_user(dir_fd, account.uid, account.gid)  # now the job's user, and only it, may enter
        finally:
            os.close(dir_fd)


def setup_job(request: SetupRequest) -> None:
    if os.geteuid() != 0:
        raise ShifterError("must run as root")
    config_path = request.config_path or default_config_path()
    try:  # before reading: a change after this makes the launch plan unused, never wrong
        config_info: os.stat_result | None = os.stat(config_path)
    except OSError:
        config_info = None  # load_config says what is wrong
    try:
        config = load_config(config_path)
    except ShifterError as err:  # the site's config, not the user's request: the node is broken
        raise NodeError(str(err)) from None
    with request_checks():
        job = JobEnv(config, request.jobid, request.step)
        account = resolve_account(request)
        identifier, image_file = resolve_image(config, request)
        if request.writable and request.image_type == "local":
            raise RequestError("--writable needs an image from the gateway, not a local: directory")
        if request.writable and not config.writable_layer_size:
            raise RequestError("--writable is turned off on this node (writableLayerSize=0 in udiRoot.conf)")
        meta = None if request.image_type == "local" else load_image_meta(identifier, image_file, account)
        modules = select_modules(config, request.modules)
    gpu_injection = plan_gpus(config, request, job) if config.gpu_recipe else None
    with request_checks():
        plan = None
        if config_info and meta is not None and not any(module.userhook for module in modules):
            gpu_ops = []
            if gpu_injection is not None:  # shifter.runtime.gpu (json, re) costs 4 ms to import: GPU nodes only
                from shifter.runtime.gpu import environment_operations

                gpu_ops = environment_operations(gpu_injection)
            plan = launchplan.plan_records(config_info, account.uid, identifier, ";".join(request.volumes),
                                           request.modules or "", meta, modules, config, gpu_ops)
    try:
        teardown.destroy(config, job, request.memory_cgroup)  # a stale environment of the same job (#249)
    except ShifterError as err:
        raise NodeError(f"cannot remove a stale environment of job {job.jobid}: {err}") from None
    udi_image_fd = shared_udi_image(config, request, account, modules)
    try:
        build_environment(config, job, request, account, identifier, image_file, modules, plan, gpu_injection,
                          udi_image_fd)
    except BaseException as err:
        if udi_image_fd >= 0:
            os.close(udi_image_fd)
        try:
            teardown.destroy(config, job, request.memory_cgroup)
        except ShifterError as undo_err:  # something stays on the node: only an admin can clear it
            raise NodeError(f"{describe(err)}; cleanup also failed: {undo_err}") from None
        if isinstance(err, (ShifterError, KeyboardInterrupt, SystemExit)):
            raise
        raise RequestError(describe(err)) from None  # unexpected, while building from the request
    if udi_image_fd >= 0:
        os.close(udi_image_fd)
