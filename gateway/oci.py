"""What the OCI distribution and image specs say about names, digests, media types and indexes.

Apart from the registry client because it is pure checking on the registry's and the
user's text, with no network: the pull pipeline validates a reference and picks a platform
with it before any client exists.
"""

from __future__ import annotations

import re

from shifter.errors import ShifterError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
REPO_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")


def check_reference(repository: str, reference: str) -> None:
    """Refuse repository names and references the distribution spec does not allow."""
    if len(repository) > 255 or not REPO_RE.fullmatch(repository):
        raise ShifterError(f"invalid repository name: {repository!r}")
    if not (TAG_RE.fullmatch(reference) or DIGEST_RE.fullmatch(reference)):
        raise ShifterError(f"invalid tag or digest: {reference!r}")


def check_digest(digest: str, what: str) -> None:
    """Only ``sha256:<64 hex>`` reaches a URL: an index or manifest is the registry's text."""
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise ShifterError(f"{what}: invalid digest {str(digest)[:80]!r}")


def select_platform(index: dict, platform: tuple[str, str, str | None]) -> dict:
    """The index entry for ``(os, architecture, variant)``; variant None takes the first match."""
    want_os, want_arch, want_variant = platform
    for entry in index.get("manifests") or []:
        if not isinstance(entry, dict):
            continue
        plat = entry.get("platform") or {}
        if plat.get("os") == want_os and plat.get("architecture") == want_arch and \
                (want_variant is None or plat.get("variant") == want_variant):
            return entry
    wanted = "/".join(p for p in platform if p)
    raise ShifterError(f"image has no manifest for platform {wanted}")
