"""What the API refuses before any work starts: the request errors, tags and ACL lists.

Shared by the HTTP layer (gateway.api) and the jobs (gateway.pulls, gateway.imports,
gateway.expiry), so that a bad tag or id gets the same one-line 400 wherever it arrives.
"""

from __future__ import annotations

from typing import Any

_TAG_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_:.+-@/")
IMAGE_TYPES = ("docker", "custom")


class NotFound(Exception):
    """404: unknown system, unknown image, or an image the caller may not read."""


class Forbidden(Exception):
    """403: the caller may not do this (not an admin, not an import user)."""


class BadRequest(Exception):
    """400: the request itself is malformed (names the problem)."""


def check_tag(itype: str, tag: str) -> str:
    """Validate a request's type and tag; returns the tag as stored (docker: ``:latest`` added)."""
    if itype not in IMAGE_TYPES:
        raise BadRequest(f"unsupported image type {itype!r} (use docker or custom)")
    if not tag or len(tag) > 512 or any(c not in _TAG_CHARS for c in tag):
        raise BadRequest(f"invalid image tag {tag!r}")
    if itype == "custom" and "/" in tag:
        raise BadRequest(f"invalid image tag {tag!r}: '/' is not allowed in a custom tag")
    if ".." in tag.split("/") or tag.startswith("/") or tag.endswith("/") or "//" in tag:
        raise BadRequest(f"invalid image tag {tag!r}")
    last = tag.rsplit("/", 1)[-1]
    if ":" not in last and "@" not in last:
        tag += ":latest"
    return tag


def parse_acl(value: Any, name: str) -> list[int]:
    """The original's ``"1000,1001"`` strings (lists of ints accepted too); ids <= 0 dropped."""
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise BadRequest(f"{name} must be a comma-separated string of ids")
    result = []
    for item in items:
        text = str(item).strip() if isinstance(item, str | int) and not isinstance(item, bool) else ""
        digits = text[1:] if text.startswith("-") else text
        # ASCII only (str.isdigit also takes "²" and "١٢٣"), short enough for int()
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 10:
            raise BadRequest(f"{name}: {str(item)[:40]!r} is not a numeric id")
        if int(text) >= 0xFFFFFFFF:
            raise BadRequest(f"{name}: {text} is not a valid id (must be below 4294967295)")
        if int(text) > 0:
            result.append(int(text))
    if len(result) > 1000:
        raise BadRequest(f"{name}: more than 1000 ids")
    return sorted(set(result))
