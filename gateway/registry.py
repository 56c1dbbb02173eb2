"""A small OCI distribution client: manifests and verified blobs from one repository.

Names, digests, media types and platform selection are checked in gateway.oci; the
verified blobs are kept in gateway.blobcache.

HTTP goes through ``requests`` (one pooled session per client: connection reuse,
the environment's proxies and ``no_proxy``, CA bundles); redirects and retries stay
here because where credentials may go is decided per hop.  Bodies are streamed raw
(``Accept-Encoding: identity``, no content decoding) and hashed in-process with
``hashlib``, 5x faster than spawning ``sha256sum`` as the original did.
Authentication follows the registry's challenge: every request is sent
anonymously first; a ``Bearer`` challenge is answered with a token fetched anonymously,
then with the user's credentials (HTTP Basic to the token realm); a ``Basic`` challenge
with the credentials.  Needing the credentials marks the image private.

Where credentials may go (see ``credentials_may_go``): a token realm must be https
unless the registry itself is configured as http, and receives the credentials only
on the registry's own host or a host of its parent domain (``auth.docker.io`` for
``registry-1.docker.io``); a redirect to another host, or from https to http (the
registry's own host included), loses the Authorization header.  A token service's answer
is never followed as a redirect.  Digests from manifests and indexes are checked before
they become part of a URL.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
import requests.adapters
import urllib3.exceptions

from gateway.oci import (
    DIGEST_RE,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    TAG_RE,
    check_digest,
)
from shifter.errors import ShifterError

_ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
_MAX_MANIFEST = 4 << 20
_MAX_CONFIG = 16 << 20
_CHUNK = 1 << 20
RETRIES = 4
_TIMEOUT = 60.0
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


# what a broken-off body raises while it is read from ``Response.body``
_READ_ERRORS = (OSError, urllib3.exceptions.HTTPError, requests.RequestException)


@dataclass
class Response:
    status: int
    headers: Any  # case-insensitive mapping
    body: Any  # the raw stream: read(n), readinto(buf), undecoded
    reply: requests.Response

    def close(self) -> None:
        self.reply.close()


class TransferError(ShifterError):
    """A download broke off (connection reset, truncated body): worth another attempt."""


def _parent_domain(host: str) -> str | None:
    """``docker.io`` for ``registry-1.docker.io``; None for IP addresses and short names."""
    if host.replace(".", "").isdigit() or ":" in host:
        return None
    labels = host.split(".")
    return ".".join(labels[1:]) if len(labels) >= 3 else None


def credentials_may_go(registry_url: str, url: str) -> bool:
    """Whether the registry's credentials may be sent to ``url`` (a token realm or a redirect).

    Never to plain http when the registry is https, and only to the registry's own
    host or, over https, to a host of its parent domain.
    """
    reg, dest = urllib.parse.urlsplit(registry_url), urllib.parse.urlsplit(url)
    if dest.scheme != "https" and not (dest.scheme == "http" and reg.scheme == "http"):
        return False
    reg_host, dest_host = (reg.hostname or "").lower(), (dest.hostname or "").lower()
    if dest_host == reg_host:  # e.g. a token service next to the registry
        return True
    parent = _parent_domain(reg_host)
    return parent is not None and dest.scheme == "https" and dest_host.endswith("." + parent)


def _short(digest: str) -> str:
    return digest[:19] + ".." if len(digest) > 21 else digest


class RegistryClient:
    """One repository on one registry; thread-safe for parallel blob downloads."""

    def __init__(self, url: str, repository: str, credentials: tuple[str, str] | None = None,
                 cacert: str | None = None, auth_method: str = "token") -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ShifterError(f"invalid registry URL: {url!r}")
        if auth_method not in ("token", "basic"):
            raise ShifterError(f"invalid authMethod {auth_method!r} (token or basic)")
        self.scheme = parsed.scheme
        self.netloc = parsed.netloc
        self.url = f"{parsed.scheme}://{parsed.netloc}"
        self.base_path = parsed.path.rstrip("/")
        if "/" not in repository and (parsed.hostname or "").endswith("docker.io"):
            repository = "library/" + repository
        self.repository = repository
        self.credentials = credentials
        self.auth_method = auth_method
        self.private = False
        self._auth_header: str | None = None
        self._stage = 0
        self._auth_worked = False  # the current header was accepted at least once
        self._lock = threading.Lock()
        if cacert is not None and not os.path.isfile(cacert):
            raise ShifterError(f"cannot load the CA file {cacert}: no such file")
        self._session = requests.Session()  # proxies and no_proxy from the environment
        # per request: a session-level CA file loses to REQUESTS_CA_BUNDLE in the environment
        self._verify: str | bool = cacert or True
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    # -- HTTP -------------------------------------------------------------------------

    def _send(self, url: str, headers: dict[str, str]) -> Response:
        """One GET with bounded retries and back-off on 429, 5xx and connection errors."""
        netloc = urllib.parse.urlsplit(url).netloc
        headers = {"Accept-Encoding": "identity", **headers}  # digests are over the bytes as stored
        delay = 0.5
        for attempt in range(RETRIES + 1):
            try:
                reply = self._session.get(url, headers=headers, stream=True, allow_redirects=False,
                                          timeout=_TIMEOUT, verify=self._verify)
            except requests.exceptions.SSLError as err:
                raise ShifterError(f"registry {netloc}: TLS error: {_reason(err)}") from None
            except (OSError, requests.RequestException) as err:
                if attempt == RETRIES:
                    raise ShifterError(f"registry {netloc} unreachable: {_reason(err)}") from None
                time.sleep(delay)
                delay *= 2
                continue
            if (reply.status_code == 429 or reply.status_code >= 500) and attempt < RETRIES:
                wait = delay
                retry_after = reply.headers.get("Retry-After", "")
                if retry_after.isascii() and retry_after.isdigit() and len(retry_after) < 6:
                    wait = min(float(retry_after), 10.0)
                reply.close()
                time.sleep(wait)
                delay *= 2
                continue
            return Response(reply.status_code, reply.headers, reply.raw, reply)
        raise AssertionError("unreachable")

    def _basic(self) -> str:
        assert self.credentials is not None
        user, password = self.credentials
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def _token(self, challenge: str, with_credentials: bool) -> str | None:
        params = dict(_CHALLENGE_RE.findall(challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise ShifterError(f"registry {self.netloc}: bad token realm in WWW-Authenticate")
        if realm.startswith("http://") and self.scheme == "https":
            raise ShifterError(f"registry {self.netloc}: refusing a plain-http token realm")
        if with_credentials and not credentials_may_go(self.url, realm):
            host = urllib.parse.urlsplit(realm).netloc
            raise ShifterError(f"registry {self.netloc}: not sending credentials to token realm {host}")
        query = urllib.parse.urlencode({k: v for k, v in params.items() if k in ("service", "scope")})
        url = realm + ("&" if "?" in realm else "?") + query if query else realm
        headers = {"Authorization": self._basic()} if with_credentials else {}
        resp = self._send(url, headers)
        try:
            if resp.status in (401, 403):
                return None
            if resp.status != 200:
                raise ShifterError(f"registry {self.netloc}: token service answered {resp.status}")
            try:
                doc = json.loads(resp.body.read(1 << 20))
            except ValueError:
                raise ShifterError(f"registry {self.netloc}: token service sent invalid JSON") from None
        finally:
            resp.close()
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise ShifterError(f"registry {self.netloc}: token service sent no token")
        return "Bearer " + token

    def _authenticate(self, challenge: str) -> bool:
        """Choose the next Authorization header after a 401; False when nothing is left.

        Stages: anonymous, then an anonymous token (Bearer only), then the credentials
        (a token fetched with them, or Basic).  Reaching the last stage makes the image private.
        """
        scheme = challenge.split(" ", 1)[0].lower()
        if self.auth_method == "basic":
            scheme = "basic"
        if scheme == "bearer" and self._auth_worked and self._stage:
            # the token expired during a long pull: fetch a new one the same way
            self._auth_worked = False
            header = self._token(challenge, with_credentials=self._stage == 2)
            if header is not None:
                self._auth_header = header
                return True
        if self._stage >= 2:
            return False
        if scheme == "bearer" and self._stage == 0:
            self._stage = 1
            header = self._token(challenge, with_credentials=False)
            if header is not None:
                self._auth_header = header
                return True
        if self.credentials is None:
            return False
        if scheme == "bearer":
            header = self._token(challenge, with_credentials=True)
            if header is None:
                raise ShifterError(f"registry {self.netloc}: credentials refused for {self.repository}")
        elif scheme == "basic":
            header = self._basic()
        else:
            return False
        self._auth_header = header
        self._stage = 2
        self.private = True
        return True

    def get(self, path: str, accept: str | None = None) -> Response:
        """GET ``/v2/<repo>/<path>`` with authentication, following redirects."""
        url = f"{self.scheme}://{self.netloc}{self.base_path}/v2/{self.repository}/{path}"
        for _ in range(4):  # at most: anonymous, anonymous token, token with credentials
            with self._lock:
                auth = self._auth_header
            headers = {"Accept": accept} if accept else {}
            if auth:
                headers["Authorization"] = auth
            resp = self._follow(url, headers)
            if resp.status != 401:
                if auth and resp.status < 400:
                    self._auth_worked = True
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            with self._lock:
                if self._auth_header != auth:
                    continue  # another thread already authenticated
                if not self._authenticate(challenge):
                    why = "needs credentials" if self.credentials is None else "refused the credentials"
                    raise ShifterError(f"registry {self.netloc} {why} for {self.repository}")
        raise ShifterError(f"registry {self.netloc}: authentication failed for {self.repository}")

    def _follow(self, url: str, headers: dict[str, str]) -> Response:
        """GET following redirects; the Authorization goes only where credentials_may_go says."""
        origin = urllib.parse.urlsplit(url)
        for _ in range(6):
            resp = self._send(url, headers)
            if resp.status not in (301, 302, 303, 307, 308):
                return resp
            location = resp.headers.get("Location", "")
            resp.close()
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise ShifterError(f"registry {self.netloc}: bad redirect")
            dest = urllib.parse.urlsplit(url)
            if (dest.netloc, dest.scheme) != (origin.netloc, origin.scheme) and not (
                dest.netloc == origin.netloc and dest.scheme == "https"
            ):
                # another host, or a downgrade to http: never the registry's Authorization
                headers = {k: v for k, v in headers.items() if k != "Authorization"}
        raise ShifterError(f"registry {self.netloc}: too many redirects")

    # -- manifests and blobs ---------------------------------------------------------

    def manifest(self, reference: str) -> tuple[str, str, dict]:
        """(digest, media type, document) of a manifest, its digest verified."""
        if not (isinstance(reference, str) and (TAG_RE.fullmatch(reference) or DIGEST_RE.fullmatch(reference))):
            raise ShifterError(f"manifest reference {str(reference)[:80]!r} is not a tag or sha256 digest")
        resp = self.get(f"manifests/{reference}", accept=_ACCEPT)
        try:
            if resp.status == 404:
                raise ShifterError(f"image {self.repository}:{reference} not found on {self.netloc}")
            if resp.status != 200:
                raise ShifterError(f"registry {self.netloc}: manifest {reference} answered {resp.status}")
            body = _read(resp, _MAX_MANIFEST + 1, f"manifest {reference}")
            if len(body) > _MAX_MANIFEST:
                raise ShifterError(f"registry {self.netloc}: manifest {reference} is too large")
            content_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        finally:
            resp.close()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        expected = reference if reference.startswith("sha256:") else resp.headers.get("Docker-Content-Digest")
        if expected and expected.startswith("sha256:") and expected != digest:
            raise ShifterError(f"manifest {_short(expected)} digest mismatch")
        try:
            doc = json.loads(body)
        except ValueError:
            raise ShifterError(f"manifest {reference} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise ShifterError(f"manifest {reference} is not a JSON object")
        media_type = doc.get("mediaType") or content_type
        if doc.get("schemaVersion") == 1:
            raise ShifterError(f"manifest {reference}: schema 1 manifests are not supported")
        if media_type not in INDEX_TYPES + MANIFEST_TYPES:
            if "manifests" in doc:
                media_type = OCI_INDEX
            elif "layers" in doc:
                media_type = OCI_MANIFEST
            else:
                raise ShifterError(f"manifest {reference}: unsupported media type {media_type!r}")
        return digest, media_type, doc

    def blob_bytes(self, digest: str, limit: int) -> bytes:
        """A small blob (an image config) read into memory and verified."""
        check_digest(digest, "image config")
        resp = self.get(f"blobs/{digest}")
        try:
            if resp.status != 200:
                raise ShifterError(f"registry {self.netloc}: blob {_short(digest)} answered {resp.status}")
            data = _read(resp, limit + 1, f"blob {_short(digest)}")
        finally:
            resp.close()
        if len(data) > limit:
            raise ShifterError(f"blob {_short(digest)} is too large")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ShifterError(f"blob {_short(digest)} digest mismatch")
        return data

    def download(self, digest: str, size: int, dest: str, counter: Callable[[int], None]) -> None:
        """Stream a blob into ``dest`` (via a temporary name), hashing as it arrives."""
        check_digest(digest, "layer")
        resp = self.get(f"blobs/{digest}")
        directory = os.path.dirname(dest)
        fd, partial = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.partial-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                if resp.status != 200:
                    raise ShifterError(f"registry {self.netloc}: blob {_short(digest)}"
                                       f" answered {resp.status}")
                sha = hashlib.sha256()
                got = 0
                while True:
                    try:
                        # read1: what has arrived, so ``counter`` (the pull deadline) hears of a trickle at once
                        chunk = resp.body.read1(_CHUNK)
                    except _READ_ERRORS as err:
                        raise TransferError(f"layer {_short(digest)}: download failed: {err}") from None
                    if not chunk:
                        break
                    got += len(chunk)
                    if got > size:
                        raise ShifterError(f"layer {_short(digest)} is larger than its manifest says")
                    sha.update(chunk)
                    out.write(chunk)
                    counter(len(chunk))
                if got != size:
                    raise TransferError(f"layer {_short(digest)} is truncated ({got} of {size} bytes)")
                if "sha256:" + sha.hexdigest() != digest:
                    raise ShifterError(f"layer {_short(digest)} digest mismatch")
            os.chmod(partial, 0o600)  # a private image's layers are as private as the image
            os.rename(partial, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise
        finally:
            resp.close()


def _read(resp: Response, limit: int, what: str) -> bytes:
    try:
        return resp.body.read(limit)
    except _READ_ERRORS as err:
        raise ShifterError(f"{what}: transfer failed: {err}") from None


def _reason(err: Exception) -> str:
    """The innermost cause of a requests error, in one line (requests nests urllib3's)."""
    while err.args and isinstance(err.args[0], Exception):
        err = err.args[0]
    reason = getattr(err, "reason", None)
    text = str(reason if isinstance(reason, Exception) else err)
    return " ".join(text.split())[:300]
