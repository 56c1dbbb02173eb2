"""Image references: ``[type:]tag`` as users write them (``--image=docker:ubuntu:22.04``).

The original's rules (reference section 2.3): the types are docker, custom, id
and local; when the text before the first ``:`` is one of them it is the type,
otherwise the site's ``defaultImageType`` applies and the whole text is the tag
(so ``ubuntu:16.04`` is ``docker`` / ``ubuntu:16.04`` and ``host:5000/repo`` is
a docker tag).  Tags may hold ``[A-Za-z0-9_:.+-@]``, plus ``/`` for docker and
local.  The original silently dropped any other character (``custom:foo/bar``
became ``foobar``); we refuse the reference and show it.  We also refuse
structurally broken references (empty path components, ``..``, an empty tag,
a malformed digest, an ``id`` that is not 64 lowercase hex digits, a ``local``
path that is not absolute).
"""

from __future__ import annotations

from shifter.errors import ShifterError
from shifter.record import Record

IMAGE_TYPES = ("docker", "custom", "id", "local")
_BASE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_:.+-@")
_SLASH_CHARS = _BASE_CHARS | {"/"}
_HEX = frozenset("0123456789abcdef")
_DIGEST_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in _HEX for c in text)


class ImageRef(Record):
    """A parsed reference: ``type`` is one of IMAGE_TYPES, ``tag`` is what follows it."""

    __slots__ = ("type", "tag")
    type: str
    tag: str

    @property
    def lookup_tag(self) -> str:
        """The tag the gateway knows: docker/custom tags without a tag or digest get ``:latest``."""
        if self.type not in ("docker", "custom"):
            return self.tag
        last = self.tag.rsplit("/", 1)[-1]
        if ":" in last or "@" in last:
            return self.tag
        return self.tag + ":latest"

    def __str__(self) -> str:
        return f"{self.type}:{self.tag}"


def _is_registry(component: str) -> bool:
    """Docker's rule: a first path component naming a host has a '.', a ':' or is localhost."""
    return "." in component or ":" in component or component == "localhost"


def _check_docker(tag: str, shown: str) -> None:
    name, at, digest = tag.partition("@")
    if at:
        algo, colon, hexpart = digest.partition(":")
        if not colon or algo not in _DIGEST_LENGTHS or not _is_hex(hexpart, _DIGEST_LENGTHS[algo]):
            want = "sha256:<64 hex digits>"
            raise ShifterError(f"invalid image reference {shown!r}: bad digest {digest!r} (want {want})")
    components = name.split("/")
    if len(components) > 1 and _is_registry(components[0]):
        host, colon, port = components[0].partition(":")
        if "" in host.split(".") or (colon and not port.isdigit()):
            raise ShifterError(f"invalid image reference {shown!r}: bad registry {components[0]!r}")
        components = components[1:]
    repo_last, colon, version = components[-1].partition(":")
    for component in [*components[:-1], repo_last]:
        if component in ("", ".", ".."):
            raise ShifterError(f"invalid image reference {shown!r}: empty or relative path component")
        if ":" in component:
            raise ShifterError(f"invalid image reference {shown!r}: ':' inside the repository path")
    if colon and (not version or ":" in version):
        raise ShifterError(f"invalid image reference {shown!r}: bad tag {version!r}")


def parse_image_ref(text: str, default_type: str = "docker") -> ImageRef:
    """Parse ``[type:]tag``; raise ShifterError showing the input when it is not a valid reference."""
    shown = text
    text = text.strip()
    if not text:
        raise ShifterError("no image given (expected [type:]tag, e.g. docker:ubuntu:22.04)")
    prefix, colon, rest = text.partition(":")
    if colon and prefix in IMAGE_TYPES:
        image_type, tag = prefix, rest
    else:
        if default_type not in IMAGE_TYPES:
            raise ShifterError(f"unknown default image type {default_type!r}")
        image_type, tag = default_type, text
    if not tag:
        raise ShifterError(f"invalid image reference {shown!r}: empty tag")
    allowed = _SLASH_CHARS if image_type in ("docker", "local") else _BASE_CHARS
    bad = sorted({c for c in tag if c not in allowed})
    if bad:
        chars = "".join(bad)
        kind = f"a {image_type} tag"
        raise ShifterError(f"invalid image reference {shown!r}: character(s) {chars!r} not allowed in {kind}")
    if image_type == "id":
        if not _is_hex(tag, 64):
            raise ShifterError(f"invalid image reference {shown!r}: an id is 64 lowercase hex digits")
    elif image_type == "local":
        if not tag.startswith("/") or ".." in tag.split("/"):
            raise ShifterError(f"invalid image reference {shown!r}: a local image is an absolute host path")
    elif image_type == "docker":
        _check_docker(tag, shown)
    elif tag.startswith((":", "@")) or tag.endswith((":", "@")):
        raise ShifterError(f"invalid image reference {shown!r}: empty name or tag")
    return ImageRef(image_type, tag)


def split_docker_tag(tag: str) -> tuple[str | None, str, str]:
    """``[registry/]repository[:tag|@digest]`` -> (registry or None, repository, tag or digest).

    The first path component is a registry host when it contains ``.`` or
    ``:`` or is ``localhost`` (Docker's rule).  A missing tag is ``latest``.
    Docker Hub's implicit ``library/`` prefix is left to the caller.
    """
    name, at, digest = tag.partition("@")
    reference = digest if at else ""
    registry: str | None = None
    first, slash, remainder = name.partition("/")
    if slash and _is_registry(first):
        registry, name = first, remainder
    repository = name
    if not at:
        head, sep, last = name.rpartition("/")
        repo_last, colon, version = last.partition(":")
        if colon:
            repository = f"{head}{sep}{repo_last}"
            reference = version
        else:
            reference = "latest"
    return registry, repository, reference
