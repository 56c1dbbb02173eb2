"""Volume maps: the ``--volume`` / ``siteFs`` syntax of the original Shifter.

Syntax: ``from:to[:flag[:flag...]]``, entries joined by ``;``.  An entry wrapped
in double quotes has them stripped and empty entries are skipped.  Flag names
are case-insensitive: ``ro``, ``rec``, ``slave``, ``private`` and
``perNodeCache=size=<n>[,bs=<n>][,fs=xfs][,method=loop]``.

Users and the site are held to different rules (reference section 2.6):

* users may only use ``ro`` and ``perNodeCache``, must give a target, and the
  target may not start with ``/etc``, ``/var``, ``etc``, ``var``,
  ``/opt/udiImage`` or ``opt/udiImage`` (a string prefix test, so ``/etcfoo``
  and ``/variable`` are refused too), nor be ``/opt``/``opt``; ``/var/tmp`` is
  allowed explicitly;
* the site may use every flag, may omit the target (``to = from``) and may not
  target exactly ``/opt /etc /var /etc/passwd /etc/group /etc/nsswitch.conf``.

Differences from the original, deliberately: where it silently dropped
characters outside ``[A-Za-z0-9_.+-/]`` from paths we refuse the entry and show
it; unknown ``perNodeCache`` keys and empty flags are errors instead of being
ignored; no volume may target the container's root ``/`` (its unmount would take the
whole container), paths are bounded (PATH_MAX, NAME_MAX) and a user request holds at
most MAX_USER_VOLUMES entries.  The canonical form and the signature are byte-identical.
"""

from __future__ import annotations

from shifter.errors import ShifterError
from shifter.record import Record

MIB = 1024 * 1024
PATH_MAX = 4095  # bytes, without the terminating NUL
NAME_MAX = 255
MAX_USER_VOLUMES = 128
_MAX_SIZE_DIGITS = 30  # far beyond any disk, still exact integer arithmetic

_PATH_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.+-/")
_BYTE_SCALE = "bkmgtpe"

_USER_TO_PREFIX_DENIED = ("/etc", "/var", "etc", "var", "/opt/udiImage", "opt/udiImage")
_USER_TO_EXACT_DENIED = ("/opt", "opt")
_USER_TO_EXACT_ALLOWED = ("/var/tmp",)
_SITE_DENIED_BASES = ("opt", "etc", "var", "etc/passwd", "etc/group", "etc/nsswitch.conf")
_SITE_TO_EXACT_DENIED = frozenset(p for base in _SITE_DENIED_BASES for p in (base, "/" + base))

# Flag names in the original's type-bit order: the canonical form sorts flags by it.
_FLAG_ORDER = ("ro", "rec", "pernodecache", "slave", "private")
_USER_FLAGS = frozenset({"ro", "pernodecache"})


class PerNodeCache(Record):
    """A per-node scratch filesystem: a sparse ``fstype`` file, loop-mounted for the job."""

    __slots__ = ("size", "block_size", "fstype", "method")
    _defaults = {"block_size": MIB, "fstype": "xfs", "method": "loop"}
    size: int
    block_size: int
    fstype: str
    method: str

    def canonical(self) -> str:
        return f"perNodeCache=size={self.size},bs={self.block_size},method={self.method},fstype={self.fstype}"


class VolumeMount(Record):
    """One validated ``from:to[:flags]`` entry."""

    __slots__ = ("source", "target", "read_only", "recursive", "slave", "private", "per_node_cache")
    _defaults = {
        "read_only": False, "recursive": False, "slave": False, "private": False, "per_node_cache": None,
    }
    source: str
    target: str
    read_only: bool
    recursive: bool
    slave: bool
    private: bool
    per_node_cache: PerNodeCache | None

    def canonical(self) -> str:
        """The original's raw form: ``from:to`` then the flags in type-bit order."""
        parts = [self.source, self.target]
        if self.read_only:
            parts.append("ro")
        if self.recursive:
            parts.append("rec")
        if self.per_node_cache is not None:
            parts.append(self.per_node_cache.canonical())
        if self.slave:
            parts.append("slave")
        if self.private:
            parts.append("private")
        return ":".join(parts)


def parse_bytes(text: str) -> int:
    """``"4T"`` -> bytes: a decimal number, then b k m g t p e (x1024^n), optionally ``B``/``iB`` after it.

    Case-insensitive, so ``500K``, ``500KB`` and ``500kib`` are equal (the original read only the
    first letter after the number; other trailing text is refused here instead of ignored).
    """
    raw = text.strip()
    end = 0
    while end < len(raw) and (raw[end].isdigit() or raw[end] == "."):
        end += 1
    number, suffix = raw[:end], raw[end:].lower()
    if not number.isascii() or number.count(".") > 1 or not number.strip("."):
        raise ShifterError(f"invalid byte size {text!r}")
    if len(number) > _MAX_SIZE_DIGITS:
        raise ShifterError(f"invalid byte size {text[:40]!r}: too many digits")
    if suffix in ("", "b"):
        scale = 0
    elif suffix[0] in _BYTE_SCALE and suffix[1:] in ("", "b", "ib"):
        scale = _BYTE_SCALE.index(suffix[0])
    else:
        raise ShifterError(f"invalid byte size {text!r}: unknown unit {raw[end:]!r} (use b k m g t p e)")
    whole, _, fraction = number.partition(".")
    factor = 1024**scale
    result = int(whole or "0") * factor + (int(fraction) * factor // 10 ** len(fraction) if fraction else 0)
    if result <= 0:
        raise ShifterError(f"invalid byte size {text!r}: must be positive")
    return result


def _parse_per_node_cache(args: str, entry: str) -> PerNodeCache:
    size: int | None = None
    block_size, fstype, method = MIB, "xfs", "loop"
    for item in args.split(","):
        key, sep, value = item.partition("=")
        key_l = key.lower()
        if not sep or not value:
            raise ShifterError(f"volume {entry!r}: perNodeCache option {item!r} needs a value")
        try:
            if key_l == "size":
                size = parse_bytes(value)
            elif key_l == "bs":
                block_size = parse_bytes(value)
            elif key_l in ("fs", "fstype"):  # fstype: the canonical form's spelling
                if value.lower() != "xfs":
                    raise ShifterError(f"unsupported perNodeCache fs {value!r} (only xfs)")
                fstype = "xfs"
            elif key_l == "method":
                if value.lower() != "loop":
                    raise ShifterError(f"unsupported perNodeCache method {value!r} (only loop)")
                method = "loop"
            else:
                raise ShifterError(f"unknown perNodeCache option {key!r}")
        except ShifterError as err:
            raise ShifterError(f"volume {entry!r}: {err}") from None
    if size is None:
        raise ShifterError(f"volume {entry!r}: perNodeCache needs size=<bytes>")
    return PerNodeCache(size=size, block_size=block_size, fstype=fstype, method=method)


def _check_path(path: str, what: str, entry: str) -> None:
    bad = sorted({c for c in path if c not in _PATH_CHARS})
    if bad:
        raise ShifterError(f"volume {entry!r}: illegal character(s) {''.join(bad)!r} in {what} path {path!r}")
    if not path.startswith("/"):
        raise ShifterError(f"volume {entry!r}: {what} path {path!r} must be absolute")
    if ".." in path:
        raise ShifterError(f"volume {entry!r}: {what} path {path!r} may not contain '..'")
    if len(path.encode()) > PATH_MAX or any(len(part.encode()) > NAME_MAX for part in path.split("/")):
        raise ShifterError(f"volume {entry[:80]!r}...: {what} path is longer than PATH_MAX or NAME_MAX")


def user_target_allowed(target: str) -> bool:
    """The original's user-target rule, quirks included (prefix test, /var/tmp allowed)."""
    if target in _USER_TO_EXACT_ALLOWED:
        return True
    if target.startswith(_USER_TO_PREFIX_DENIED):
        return False
    return target not in _USER_TO_EXACT_DENIED


def site_target_allowed(target: str) -> bool:
    """The original's site-target rule: only a few exact paths are refused."""
    return target not in _SITE_TO_EXACT_DENIED


def _parse_entry(entry: str, site: bool) -> VolumeMount:
    body = entry
    if len(body) >= 2 and body[0] == '"' and body[-1] == '"':
        body = body[1:-1]
    tokens = body.split(":")
    source = tokens[0]
    if len(tokens) == 1:
        if not site:
            raise ShifterError(f"volume {entry!r}: no target given (use /from:/to)")
        target = source
    else:
        target = tokens[1]
    if not source:
        raise ShifterError(f"volume {entry!r}: empty source path")
    if not target:
        raise ShifterError(f"volume {entry!r}: empty target path")
    _check_path(source, "source", entry)
    _check_path(target, "target", entry)
    if all(part in ("", ".") for part in target.split("/")):
        raise ShifterError(f"volume {entry!r}: the container's root / cannot be a volume target")

    seen: dict[str, PerNodeCache | None] = {}
    for flag in tokens[2:]:
        name, sep, args = flag.partition("=")
        name_l = name.lower()
        if name_l not in _FLAG_ORDER:
            raise ShifterError(f"volume {entry!r}: unknown flag {flag!r}")
        if not site and name_l not in _USER_FLAGS:
            raise ShifterError(f"volume {entry!r}: flag {name!r} is reserved to the site")
        if name_l in seen:
            raise ShifterError(f"volume {entry!r}: flag {name!r} given twice")
        if name_l == "pernodecache":
            if not sep:
                raise ShifterError(f"volume {entry!r}: perNodeCache needs size=<bytes>")
            seen[name_l] = _parse_per_node_cache(args, entry)
        elif sep:
            raise ShifterError(f"volume {entry!r}: flag {name!r} takes no arguments")
        else:
            seen[name_l] = None
    if "slave" in seen and "private" in seen:
        raise ShifterError(f"volume {entry!r}: flags slave and private exclude each other")

    if site:
        if not site_target_allowed(target):
            raise ShifterError(f"volume {entry!r}: site volumes may not be mounted on {target}")
    elif not user_target_allowed(target):
        raise ShifterError(f"volume {entry!r}: mounting on {target} is not allowed")

    return VolumeMount(
        source=source,
        target=target,
        read_only="ro" in seen,
        recursive="rec" in seen,
        slave="slave" in seen,
        private="private" in seen,
        per_node_cache=seen.get("pernodecache"),
    )


def parse_volume_map(text: str, site: bool) -> list[VolumeMount]:
    """Parse a ``;``-joined volume map with the user (site=False) or site rules."""
    mounts: list[VolumeMount] = []
    for segment in text.split(";"):
        entry = segment.strip()
        if entry:
            if not site and len(mounts) == MAX_USER_VOLUMES:
                raise ShifterError(f"more than {MAX_USER_VOLUMES} volumes requested")
            mounts.append(_parse_entry(entry, site))
    return mounts


def check_per_node_caches(mounts: list[VolumeMount], size_limit: int, max_count: int,
                          allowed_fs_types: list[str]) -> None:
    """A request's perNodeCache volumes against the site's limits (udiRoot.conf perNodeCache*)."""
    caches = [m for m in mounts if m.per_node_cache is not None]
    if len(caches) > max_count:
        raise ShifterError(f"{len(caches)} perNodeCache volumes requested, more than perNodeCacheMaxCount "
                           f"{max_count}")
    for mount in caches:
        cache = mount.per_node_cache
        if cache.fstype not in allowed_fs_types:
            raise ShifterError(f"volume {mount.target}: perNodeCache fs {cache.fstype} is not allowed "
                               f"(perNodeCacheAllowedFsType: {' '.join(allowed_fs_types) or 'none'})")
        if cache.size > size_limit:
            raise ShifterError(f"volume {mount.target}: perNodeCache size {cache.size} exceeds "
                               f"perNodeCacheSizeLimit {size_limit}")


def volume_signature(mounts: list[VolumeMount]) -> str:
    """The original's ``getVolMapSignature``: canonical forms sorted bytewise, joined by ``;``."""
    return ";".join(sorted(m.canonical() for m in mounts))


signature = volume_signature
