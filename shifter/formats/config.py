"""``udiRoot.conf``: the site configuration every node and every task reads.

Parsing follows the original (``shifter_parseConfig``) exactly:

* ``key=value`` split at the first ``=``; key and value whitespace-trimmed;
* a line is a comment only when ``#`` is its very first character (also inside
  a continuation); a line without ``=`` is ignored;
* a value ending in ``\\`` continues on the next line (taken whole, trimmed),
  the pieces joined with one space; no quoting;
* ``siteFs``, ``siteEnv*`` (and the same module subkeys) may repeat and append;
  other keys may repeat and the last one wins;
* ``module_<name>_<subkey>`` defines modules, so module names cannot hold ``_``.

Deliberate differences from the original:

* every error names the file, the line number and the key (the original
  printed "Couldn't understand key" and failed without a line);
* unknown ``module_*`` subkeys are errors (the original ignored them, so the
  documentation's ``module_mpich_copypath`` silently did nothing);
* an empty value (``key=``) leaves the key's default;
* bad values are errors: booleans and integers must be integers, siteEnv items
  must be ``NAME=value``, siteFs entries are checked with the site volume rules,
  and a file ending inside a continuation is refused;
* the required keys are udiMount, loopMount, imagePath, udiRootPath, etcPath
  and rootfsType.  The original also required modprobePath, insmodPath, cpPath,
  mvPath, chmodPath and ddPath; they are accepted (so existing files parse) but
  not required, because this implementation never executes those tools;
* ``siteResources`` (the directory created in the container for site resources, as in the
  original's GPU documentation) is accepted, and ``gpuRecipe``/``gpuDriverRoot`` are new: GPU
  support is data (``shifter/formats/recipes/<name>.json``) instead of the original's site script;
* the deprecated keys optionalSshdAsRoot, autoLoadKernelModule, kmodBasePath,
  kmodCacheFile and nodeContextPrefix are accepted and ignored.
"""

from __future__ import annotations

import os

from shifter.errors import ShifterError
from shifter.formats.volumemap import VolumeMount, parse_bytes, parse_volume_map
from shifter.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms to import: annotations only
    from collections.abc import Callable

REQUIRED_KEYS = ("udiMount", "loopMount", "imagePath", "udiRootPath", "etcPath", "rootfsType")
DEPRECATED_KEYS = frozenset(
    {"optionalSshdAsRoot", "autoLoadKernelModule", "kmodBasePath", "kmodCacheFile", "nodeContextPrefix"}
)
IMAGE_TYPES = ("docker", "custom", "id", "local")
_MODULE_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.+-")


class ModuleConfig(Record):
    """One ``module_<name>_*`` block of udiRoot.conf."""

    __slots__ = (
        "name", "site_fs", "site_env", "site_env_append", "site_env_prepend", "site_env_unset",
        "copy_path", "roothook", "userhook", "conflict", "enabled",
    )
    _defaults = {
        "site_fs": [], "site_env": [], "site_env_append": [], "site_env_prepend": [], "site_env_unset": [],
        "copy_path": None, "roothook": None, "userhook": None, "conflict": [], "enabled": True,
    }
    name: str
    site_fs: list[VolumeMount]
    site_env: list[str]
    site_env_append: list[str]
    site_env_prepend: list[str]
    site_env_unset: list[str]
    copy_path: str | None
    roothook: str | None
    userhook: str | None
    conflict: list[str]
    enabled: bool


# a user's perNodeCache is a sparse file on the node's perNodeCachePath: bounded unless the site says more
DEFAULT_PER_NODE_CACHE_SIZE_LIMIT = 100 * 1024**3
DEFAULT_PER_NODE_CACHE_MAX_COUNT = 4
# a --writable job's layer lives in the node's memory (tmpfs): bounded unless the site says more; 0 turns it off
DEFAULT_WRITABLE_LAYER_SIZE = 1024**3


class UdiRootConfig(Record):
    """The parsed udiRoot.conf, attributes in snake_case."""

    __slots__ = (
        "udi_mount", "loop_mount", "image_path", "udi_root_path", "etc_path", "rootfs_type",
        "per_node_cache_path", "per_node_cache_size_limit", "per_node_cache_allowed_fs_type",
        "per_node_cache_max_count", "writable_layer_size",
        "users_to_import", "site_pre_mount_hook", "site_post_mount_hook", "opt_udi_image",
        "allow_local_chroot", "allow_libc_pwd_calls", "populate_etc_dynamically",
        "mount_propagation_style", "mount_udi_root_writable", "max_group_count", "gateway_timeout",
        "image_gateway_user", "site_fs", "site_env", "site_env_append", "site_env_prepend", "site_env_unset",
        "image_gateways", "batch_type", "system", "default_image_type", "default_modules", "modules",
        "mkfs_xfs_path", "modprobe_path", "insmod_path", "cp_path", "mv_path", "chmod_path", "dd_path",
        "site_resources", "gpu_recipe", "gpu_driver_root", "source",
    )
    _defaults = {
        "per_node_cache_path": None, "per_node_cache_size_limit": DEFAULT_PER_NODE_CACHE_SIZE_LIMIT,
        "per_node_cache_allowed_fs_type": ["xfs"], "per_node_cache_max_count": DEFAULT_PER_NODE_CACHE_MAX_COUNT,
        "writable_layer_size": DEFAULT_WRITABLE_LAYER_SIZE,
        "users_to_import": [], "site_pre_mount_hook": None, "site_post_mount_hook": None,
        "opt_udi_image": None, "allow_local_chroot": False, "allow_libc_pwd_calls": False,
        "populate_etc_dynamically": False, "mount_propagation_style": "private",
        "mount_udi_root_writable": False, "max_group_count": 0, "gateway_timeout": 60, "image_gateway_user": None,
        "site_fs": [], "site_env": [], "site_env_append": [], "site_env_prepend": [], "site_env_unset": [],
        "image_gateways": [], "batch_type": None, "system": None, "default_image_type": "docker",
        "default_modules": [], "modules": {}, "mkfs_xfs_path": None, "modprobe_path": None,
        "insmod_path": None, "cp_path": None, "mv_path": None, "chmod_path": None, "dd_path": None,
        "site_resources": None, "gpu_recipe": None, "gpu_driver_root": "/", "source": "<string>",
    }
    udi_mount: str
    loop_mount: str
    image_path: str
    udi_root_path: str
    etc_path: str
    rootfs_type: str
    per_node_cache_path: str | None
    per_node_cache_size_limit: int
    per_node_cache_allowed_fs_type: list[str]
    per_node_cache_max_count: int  # per job
    writable_layer_size: int  # bytes of the tmpfs under a --writable job's overlay; 0: --writable refused
    users_to_import: list[str]
    site_pre_mount_hook: str | None
    site_post_mount_hook: str | None
    opt_udi_image: str | None
    allow_local_chroot: bool
    allow_libc_pwd_calls: bool
    populate_etc_dynamically: bool
    mount_propagation_style: str
    mount_udi_root_writable: bool
    max_group_count: int
    gateway_timeout: int
    image_gateway_user: str | None
    site_fs: list[VolumeMount]
    site_env: list[str]
    site_env_append: list[str]
    site_env_prepend: list[str]
    site_env_unset: list[str]
    image_gateways: list[str]
    batch_type: str | None
    system: str | None
    default_image_type: str
    default_modules: list[str]
    modules: dict[str, ModuleConfig]
    mkfs_xfs_path: str | None
    modprobe_path: str | None
    insmod_path: str | None
    cp_path: str | None
    mv_path: str | None
    chmod_path: str | None
    dd_path: str | None
    site_resources: str | None  # a path inside the container
    gpu_recipe: str | None  # shifter/formats/recipes/<name>.json; None: no GPU support
    gpu_driver_root: str
    source: str


# --- value converters: each takes the trimmed value and raises ShifterError("...") without location ---


def _text(value: str) -> str | None:
    return value or None


def _path(value: str) -> str | None:
    if not value:
        return None
    if not value.startswith("/"):
        raise ShifterError(f"must be an absolute path, got {value!r}")
    return value


def _int(value: str) -> int:
    digits = value[1:] if value[:1] in "+-" else value
    if not digits.isdigit() or not digits.isascii():
        raise ShifterError(f"must be an integer, got {value!r}")
    return int(value)


def _nonneg_int(value: str) -> int:
    number = _int(value)
    if number < 0:
        raise ShifterError(f"must not be negative, got {value!r}")
    return number


def _bool(value: str) -> bool:
    return _int(value) != 0


def _words(value: str) -> list[str]:
    return value.split()


def _env_items(value: str) -> list[str]:
    items = value.split()
    for item in items:
        name, sep, rest = item.partition("=")
        if not name or not sep or not rest:
            raise ShifterError(f"item {item!r} is not NAME=value")
    return items


def _env_names(value: str) -> list[str]:
    items = value.split()
    for item in items:
        if "=" in item:
            raise ShifterError(f"item {item!r} must be a bare variable name")
    return items


def _site_fs(value: str) -> list[VolumeMount]:
    return parse_volume_map(value, site=True)


def _propagation(value: str) -> str:
    if value not in ("private", "slave"):
        raise ShifterError(f"must be private or slave, got {value!r}")
    return value


def _size_or_off(value: str) -> int:
    """A byte size, or 0 to turn the feature off."""
    return 0 if value.strip() == "0" else parse_bytes(value)


def _image_type(value: str) -> str:
    if value not in IMAGE_TYPES:
        raise ShifterError(f"must be one of {', '.join(IMAGE_TYPES)}, got {value!r}")
    return value


def _module_list(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


# where the container's own content lives: siteResources there would hide or be hidden by it
_RESERVED_CONTAINER_DIRS = ("/dev", "/proc", "/sys", "/tmp", "/etc", "/var", "/var/tmp")


def _container_dir(value: str) -> str:
    """A directory setupRoot creates inside the container (siteResources)."""
    if not value.startswith("/"):
        raise ShifterError(f"must be an absolute path inside the container, got {value!r}")
    parts = [p for p in value.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ShifterError(f"must name a directory below / without '.' or '..', got {value!r}")
    clean = "/" + "/".join(parts)
    if any(clean == d or clean.startswith(d + "/") for d in _RESERVED_CONTAINER_DIRS):
        raise ShifterError(f"{clean} is where the container's own files are; use a path such as "
                           "/opt/shifter/site-resources")
    return clean


def _gpu_recipe(value: str) -> str | None:
    """``none`` turns GPU support off; any other name must be a recipe shipped with the package."""
    if value == "none":
        return None
    recipes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
    try:
        known = sorted(n[:-5] for n in os.listdir(recipes) if n.endswith(".json"))
    except OSError:
        known = []
    if value not in known:
        raise ShifterError(f"unknown GPU recipe {value!r} (known: {', '.join(known + ['none'])})")
    return value


def _gateways(value: str) -> list[str]:
    urls = value.split()
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ShifterError(f"gateway {url!r} is not an http(s) URL")
    return urls


# key -> (attribute, converter, appends)
_KEYS: dict[str, tuple[str, Callable[[str], object], bool]] = {
    "udiMount": ("udi_mount", _path, False),
    "loopMount": ("loop_mount", _path, False),
    "imagePath": ("image_path", _path, False),
    "udiRootPath": ("udi_root_path", _path, False),
    "etcPath": ("etc_path", _path, False),
    "rootfsType": ("rootfs_type", _text, False),
    "perNodeCachePath": ("per_node_cache_path", _path, False),
    "perNodeCacheSizeLimit": ("per_node_cache_size_limit", parse_bytes, False),
    "perNodeCacheAllowedFsType": ("per_node_cache_allowed_fs_type", _words, False),
    "perNodeCacheMaxCount": ("per_node_cache_max_count", _nonneg_int, False),
    "writableLayerSize": ("writable_layer_size", _size_or_off, False),
    "usersToImport": ("users_to_import", _words, False),
    "sitePreMountHook": ("site_pre_mount_hook", _path, False),
    "sitePostMountHook": ("site_post_mount_hook", _path, False),
    "optUdiImage": ("opt_udi_image", _path, False),
    "allowLocalChroot": ("allow_local_chroot", _bool, False),
    "allowLibcPwdCalls": ("allow_libc_pwd_calls", _bool, False),
    "populateEtcDynamically": ("populate_etc_dynamically", _bool, False),
    "mountPropagationStyle": ("mount_propagation_style", _propagation, False),
    "mountUdiRootWritable": ("mount_udi_root_writable", _bool, False),
    "maxGroupCount": ("max_group_count", _nonneg_int, False),
    "gatewayTimeout": ("gateway_timeout", _nonneg_int, False),
    "siteFs": ("site_fs", _site_fs, True),
    "siteEnv": ("site_env", _env_items, True),
    "siteEnvAppend": ("site_env_append", _env_items, True),
    "siteEnvPrepend": ("site_env_prepend", _env_items, True),
    "siteEnvUnset": ("site_env_unset", _env_names, True),
    "imageGateway": ("image_gateways", _gateways, False),
    "imageGatewayUser": ("image_gateway_user", _text, False),
    "batchType": ("batch_type", _text, False),
    "system": ("system", _text, False),
    "defaultImageType": ("default_image_type", _image_type, False),
    "defaultModules": ("default_modules", _module_list, False),
    "mkfsXfsPath": ("mkfs_xfs_path", _path, False),
    "modprobePath": ("modprobe_path", _path, False),
    "insmodPath": ("insmod_path", _path, False),
    "cpPath": ("cp_path", _path, False),
    "mvPath": ("mv_path", _path, False),
    "chmodPath": ("chmod_path", _path, False),
    "ddPath": ("dd_path", _path, False),
    "siteResources": ("site_resources", _container_dir, False),
    "gpuRecipe": ("gpu_recipe", _gpu_recipe, False),
    "gpuDriverRoot": ("gpu_driver_root", _path, False),
}

_MODULE_KEYS: dict[str, tuple[str, Callable[[str], object], bool]] = {
    "siteFs": ("site_fs", _site_fs, True),
    "siteEnv": ("site_env", _env_items, True),
    "siteEnvAppend": ("site_env_append", _env_items, True),
    "siteEnvPrepend": ("site_env_prepend", _env_items, True),
    "siteEnvUnset": ("site_env_unset", _env_names, True),
    "copyPath": ("copy_path", _path, False),
    "roothook": ("roothook", _path, False),
    "userhook": ("userhook", _path, False),
    "conflict": ("conflict", _words, True),
    "enabled": ("enabled", _bool, False),
}


def _logical_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, key, value) per assignment, with continuations joined as the original does."""
    entries: list[tuple[int, str, str]] = []
    pending: tuple[int, str, list[str]] | None = None
    number = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("#"):
            continue
        if pending is None:
            key, sep, rest = line.partition("=")
            if not sep:
                continue
            piece = rest.strip()
            start, parts = number, []
            key = key.strip()
        else:
            start, key, parts = pending
            piece = line.strip()
        if piece.endswith("\\"):
            parts.append(piece[:-1].strip())
            pending = (start, key, parts)
            continue
        parts.append(piece)
        pending = None
        entries.append((start, key, " ".join(parts).strip()))
    if pending is not None:
        line, key = pending[0], pending[1]
        raise ShifterError(f"line {line}: key '{key}' ends in a '\\' continuation at end of file")
    return entries


def _assign(values: dict[str, object], spec: tuple[str, Callable[[str], object], bool], value: str) -> None:
    attr, convert, appends = spec
    if not value:  # an empty value leaves the default, as the original's atoi/strdup("") mostly did
        return
    converted = convert(value)
    if appends:
        values.setdefault(attr, [])
        values[attr].extend(converted)  # type: ignore[attr-defined]
    else:
        values[attr] = converted


def _module_spec(key: str) -> tuple[str, tuple[str, Callable[[str], object], bool]]:
    rest = key[len("module_"):]
    name, sep, subkey = rest.partition("_")
    if not name or not sep or not subkey:
        raise ShifterError(f"unknown key '{key}' (modules are module_<name>_<subkey>)")
    if name == "none" or name.startswith(".") or any(c not in _MODULE_NAME_CHARS for c in name):
        raise ShifterError(f"invalid module name {name!r} in '{key}' (letters, digits, '.', '+', '-')")
    spec = _MODULE_KEYS.get(subkey)
    if spec is None:
        hint = next((k for k in _MODULE_KEYS if k.lower() == subkey.lower()), None)
        extra = f"; did you mean '{hint}'?" if hint else f" (known: {', '.join(_MODULE_KEYS)})"
        raise ShifterError(f"unknown module subkey '{subkey}' in '{key}'{extra}")
    return name, spec


def parse_config(text: str, source: str = "<string>") -> UdiRootConfig:
    """Parse udiRoot.conf text; every error names ``source``, the line and the key."""
    try:
        entries = _logical_lines(text)
    except ShifterError as err:
        raise ShifterError(f"{source} {err}") from None
    values: dict[str, object] = {}
    modules: dict[str, dict[str, object]] = {}
    for number, key, value in entries:
        if key in DEPRECATED_KEYS:
            continue
        where = f"{source} line {number}"
        try:
            if key.startswith("module_"):
                name, spec = _module_spec(key)
                target = modules.setdefault(name, {})
            else:
                target, spec = values, _KEYS.get(key)  # type: ignore[assignment]
                if spec is None:
                    raise ShifterError(f"unknown key '{key}'")
        except ShifterError as err:
            raise ShifterError(f"{where}: {err}") from None
        try:
            _assign(target, spec, value)
        except ShifterError as err:
            raise ShifterError(f"{where}: bad value for '{key}': {err}") from None
    for key in REQUIRED_KEYS:
        if not values.get(_KEYS[key][0]):
            raise ShifterError(f"{source}: required key '{key}' is not set")
    values["modules"] = {name: ModuleConfig(name=name, **fields) for name, fields in modules.items()}
    for name in values.get("default_modules", []):  # type: ignore[union-attr]
        if name != "none" and name not in values["modules"]:  # type: ignore[operator]
            raise ShifterError(f"{source}: defaultModules names unknown module '{name}'")
    if values.get("gpu_recipe") and not values.get("site_resources"):
        raise ShifterError(f"{source}: gpuRecipe={values['gpu_recipe']} needs siteResources (the directory in "
                           "the container that receives the driver's libraries and tools)")
    values["source"] = source
    return UdiRootConfig(**values)


def config_path(environ: dict[str, str]) -> str:
    """Which udiRoot.conf a user command reads: ``SHIFTER_UDIROOT_CONF``, else the installed one."""
    if environ.get("SHIFTER_UDIROOT_CONF"):
        return environ["SHIFTER_UDIROOT_CONF"]
    try:
        from shifter import buildinfo
    except ImportError:
        return "/etc/shifter/udiRoot.conf"
    return buildinfo.CONFIG_FILE


def load_config(path: str, check_owner: bool = True) -> UdiRootConfig:
    """Read and parse udiRoot.conf; it must be a root-owned file nobody else can write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ShifterError(f"{path}: configuration file does not exist") from None
    except OSError as err:
        raise ShifterError(f"{path}: cannot open configuration file: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000):
            raise ShifterError(f"{path}: configuration file is not a regular file")
        if check_owner and st.st_uid != 0:
            raise ShifterError(f"{path}: configuration file must be owned by root (owner uid {st.st_uid})")
        if st.st_mode & 0o022:
            mode = f"{st.st_mode & 0o7777:04o}"
            raise ShifterError(f"{path}: config file must not be group- or other-writable (mode {mode})")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ShifterError(f"{path}: configuration file is not UTF-8 text (byte {err.start})") from None
    return parse_config(text, source=path)
