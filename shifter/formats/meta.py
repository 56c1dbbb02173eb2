"""``<imagePath>/<id>.meta``: the image metadata the gateway publishes next to each image.

One ``KEY: value`` per line, key before the first ``:``, value trimmed; a line
starting with ``#`` or without ``:`` is ignored, unknown keys are ignored.
Written in the original gateway's order and byte format::

    FORMAT: squashfs
    ENTRY: ['/docker-entrypoint.sh']      (Python repr of a list, or a bare string)
    CMD: ['/bin/sh', '-c', 'x']
    WORKDIR: /root
    USERACL: 1000,1001                    (private images only)
    GROUPACL: 1002
    ENV: PATH=/usr/bin                    (one line per variable, image order)
    USER: alice

so the original C runtime reads our files and we read the original gateway's
(including Python 2's ``[u'...']`` lists).  Differences, deliberately: a value
ending in ``\\`` is taken literally (the C reader joined it with the next line,
corrupting ENV values), a bad ACL is a ShifterError instead of ``abort()``, an
unknown FORMAT is refused when read.

Lines end with ``\n`` and nothing else, on both sides: a reader that also split on
``\x1c``, ``\x85`` or ``\u2028`` (as ``str.splitlines`` does) would let an image's ENV value
forge a ``USERACL:`` line.  So the writer and the reader refuse, naming the key, any value
holding NUL, a control character other than tab or a Unicode line or paragraph separator,
and the reader refuses a file over MAX_META_BYTES or an ENV entry the kernel could not pass
to a process.
"""

from __future__ import annotations

import os

from shifter.errors import ShifterError
from shifter.record import Record

FORMATS = ("squashfs", "xfs", "ext4", "cramfs", "VFS")
MAX_ACL_IDS = 1000
MAX_META_BYTES = 8 * 1024 * 1024
MAX_ENV_BYTES = 128 * 1024  # MAX_ARG_STRLEN: execve refuses a longer environment string
_LINE_END = "\n"
_ALLOWED_CONTROL = "\t"
_LINE_SEPARATORS = frozenset("\u2028\u2029")


class ImageMeta(Record):
    """What the runtime needs to know about an image besides its file."""

    __slots__ = ("format", "entrypoint", "cmd", "workdir", "env", "user_acl", "group_acl", "user")
    _defaults = {
        "format": "squashfs", "entrypoint": None, "cmd": None, "workdir": None,
        "env": [], "user_acl": [], "group_acl": [], "user": None,
    }
    format: str
    entrypoint: list[str] | None
    cmd: list[str] | None
    workdir: str | None
    env: list[str]
    user_acl: list[int]
    group_acl: list[int]
    user: str | None

    def allows(self, uid: int, gid: int, groups: list[int] | tuple[int, ...] = ()) -> bool:
        """The original's ACL rule: public without ACLs, else uid listed or any of the gids listed."""
        if not self.user_acl and not self.group_acl:
            return True
        if uid in self.user_acl:
            return True
        return gid in self.group_acl or any(g in self.group_acl for g in groups)


def _quoted_list(text: str) -> list[str] | None:
    """Fast path for ``['a', "b", u'c']`` without escapes; None when anything else is there."""
    if not text.startswith("[") or not text.endswith("]"):
        return None
    items: list[str] = []
    pos, end = 1, len(text) - 1
    while True:
        while pos < end and text[pos] == " ":
            pos += 1
        if pos == end:
            return items if not items else None  # "[]" or a trailing comma
        if text[pos] == "u":
            pos += 1
        quote = text[pos] if pos < end else ""
        if quote not in ("'", '"'):
            return None
        close = text.find(quote, pos + 1, end)
        if close < 0:
            return None
        item = text[pos + 1:close]
        if "\\" in item:
            return None
        items.append(item)
        pos = close + 1
        while pos < end and text[pos] == " ":
            pos += 1
        if pos == end:
            return items
        if text[pos] != ",":
            return None
        pos += 1


def parse_argv(value: str) -> list[str] | None:
    """ENTRY/CMD: a Python-list text becomes a list; anything else one element; empty is None."""
    if not value:
        return None
    items = _quoted_list(value)
    if items is None and value.startswith("["):
        import ast  # rare (escapes in the list): keep ast off the launcher's import path

        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            parsed = None
        if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
            items = parsed
    if items is None:
        return [value]
    return items or None


def _parse_acl(key: str, value: str) -> list[int]:
    if not value:
        return []
    parts = value.split(",")
    if len(parts) > MAX_ACL_IDS:
        raise ShifterError(f"{key} lists {len(parts)} ids, more than the limit of {MAX_ACL_IDS}")
    ids: list[int] = []
    for part in parts:
        item = part.strip()
        if not item.isdigit() or not item.isascii():
            raise ShifterError(f"{key}: {item!r} is not a numeric id (in {value!r})")
        if len(item) > 10 or int(item) >= 2**32 - 1:  # uid_t; and never int() of thousands of digits
            raise ShifterError(f"{key}: id {item[:20]} is out of range")
        number = int(item)
        ids.append(number)
    return ids


def forbidden_character(value: str) -> str | None:
    """The first character that may not stand in a .meta line, or None."""
    if value.isprintable():  # the common case, at C speed
        return None
    for char in value:
        code = ord(char)
        if (code < 0x20 and char not in _ALLOWED_CONTROL) or 0x7F <= code <= 0x9F or char in _LINE_SEPARATORS:
            return char
    return None


def check_value(key: str, value: str) -> str:
    """``value`` unchanged, or a ShifterError naming the key and the character."""
    char = forbidden_character(value)
    if char is not None:
        raise ShifterError(f"{key} value {value[:60]!r} contains the control character {char!r}")
    return value


def parse_meta(text: str) -> ImageMeta:
    """Parse .meta text as written by either gateway; a line ends only at ``\\n``."""
    fields: dict[str, object] = {}
    env: list[str] = []
    for number, line in enumerate(text.split(_LINE_END), start=1):
        key, sep, value = line.partition(":")
        check_value(key.strip() if sep else f"line {number}", line)
        if line.startswith("#") or not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "FORMAT":
            if value not in FORMATS:
                raise ShifterError(f"unsupported image FORMAT {value!r} (known: {', '.join(FORMATS)})")
            fields["format"] = value
        elif key == "ENTRY":
            fields["entrypoint"] = parse_argv(value)
        elif key == "CMD":
            fields["cmd"] = parse_argv(value)
        elif key == "WORKDIR":
            fields["workdir"] = value or None
        elif key == "USERACL":
            fields["user_acl"] = _parse_acl(key, value)
        elif key == "GROUPACL":
            fields["group_acl"] = _parse_acl(key, value)
        elif key == "ENV":
            if len(value.encode("utf-8", "surrogateescape")) >= MAX_ENV_BYTES:
                raise ShifterError(f"ENV entry {value[:40]!r}... is longer than a process can receive "
                                   f"({MAX_ENV_BYTES} bytes)")
            if value:
                env.append(value)
        elif key == "USER":
            fields["user"] = value or None
    return ImageMeta(env=env, **fields)


def read_meta(path: str) -> ImageMeta:
    """Read and parse a .meta file; errors name the file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_META_BYTES + 1)
    except FileNotFoundError:
        raise ShifterError(f"image metadata {path} not found") from None
    except OSError as err:
        raise ShifterError(f"cannot read image metadata {path}: {err.strerror}") from None
    if len(data) > MAX_META_BYTES:
        raise ShifterError(f"image metadata {path} is larger than {MAX_META_BYTES} bytes")
    try:
        return parse_meta(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ShifterError(f"image metadata {path} is not UTF-8 (byte {err.start})") from None
    except ShifterError as err:
        raise ShifterError(f"image metadata {path}: {err}") from None


def _line(key: str, value: str) -> str:
    return f"{key}: {check_value(key, value)}{_LINE_END}"


def format_meta(meta: ImageMeta) -> str:
    """The original gateway's exact byte format and line order."""
    if meta.format not in FORMATS:
        raise ShifterError(f"unsupported image FORMAT {meta.format!r}")
    lines = [_line("FORMAT", meta.format)]
    if meta.entrypoint is not None:
        lines.append(_line("ENTRY", repr(list(meta.entrypoint))))
    if meta.cmd is not None:
        lines.append(_line("CMD", repr(list(meta.cmd))))
    if meta.workdir is not None:
        lines.append(_line("WORKDIR", meta.workdir))
    if meta.user_acl:
        lines.append(_line("USERACL", ",".join(str(int(i)) for i in meta.user_acl)))
    if meta.group_acl:
        lines.append(_line("GROUPACL", ",".join(str(int(i)) for i in meta.group_acl)))
    lines.extend(_line("ENV", item) for item in meta.env)
    if meta.user is not None:
        lines.append(_line("USER", meta.user))
    return "".join(lines)


def write_meta(path: str, meta: ImageMeta) -> None:
    """Write atomically: a temporary file in the same directory, fsync, rename, fsync the directory."""
    data = format_meta(meta).encode("utf-8")
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        import contextlib  # failure path only

        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
