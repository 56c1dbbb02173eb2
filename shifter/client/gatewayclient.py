"""Client of the image gateway's HTTP API (the original's routes and JSON shapes).

Stdlib only and light to import: the SPANK submission hook and the launcher use it
under ``python -I -S``. Plain ``http://`` gateways are spoken to over a raw socket
(``http.client`` alone costs ~20 ms of imports); ``https://`` falls back to
``http.client``. Every request carries a fresh munge credential that only the
gateway's uid may decode and that names the request it was made for (method,
target, body digest, gateway: see shifter.formats.requestbinding). Only a pull's credential
also carries the caller's registry logins from ``~/.udiRoot/.cred`` as
``{"authorized_locations": {...}}``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from shifter.client import munge
from shifter.errors import ShifterError
from shifter.formats import requestbinding

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~2 ms to import on the submission path: annotations only
    from collections.abc import Callable
    from typing import Any

    from shifter.formats.imageref import ImageRef

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_MAX_BODY = 64 * 1024 * 1024
DEFAULT_TIMEOUT = 60.0  # udiRoot.conf gatewayTimeout unset or 0


def escape(text: str) -> str:
    """Percent-escape like curl_easy_escape: everything but RFC 3986 unreserved bytes."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in text.encode())


def cred_path() -> str:
    """``~/.udiRoot/.cred`` of the calling user (HOME, else the passwd entry)."""
    home = os.environ.get("HOME")
    if not home:
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
    return os.path.join(home, ".udiRoot", ".cred")


def read_cred_file(path: str, system: str) -> dict[str, str]:
    """The ``<system>:<location>=<munge credential>`` lines for ``system`` as {location: credential}."""
    creds: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, cred = line.strip().partition("=")
                sysname, sep2, location = key.partition(":")
                if sep and sep2 and sysname == system and location:
                    creds[location] = cred
    except FileNotFoundError:
        pass
    except OSError as err:
        raise ShifterError(f"cannot read {path}: {err.strerror}") from None
    return creds


def authorized_locations(
    system: str, path: str | None = None, socket_path: str | None = None
) -> dict[str, str]:
    """{location: "user:password"} unsealed from the cred file; entries not sealed by this uid are skipped."""
    result: dict[str, str] = {}
    for location, cred in read_cred_file(path or cred_path(), system).items():
        try:
            uid, _gid, payload = munge.decode(cred, socket_path, accept_stale=True)
        except munge.MungeError:
            continue
        if uid == os.getuid() and payload:
            result[location] = payload.decode("utf-8", errors="replace")
    return result


DEFAULT_GATEWAY_USER = "shifter"  # the account the shipped systemd unit runs the gateway as


def resolve_gateway_uid(user: str | int | None) -> int:
    """uid of ``imageGatewayUser`` (a name or a number); unset: the ``shifter`` account, else root."""
    if isinstance(user, int):
        return user
    if user is not None and user.isascii() and user.isdigit():
        return int(user)
    import pwd

    try:
        return pwd.getpwnam(user or DEFAULT_GATEWAY_USER).pw_uid
    except KeyError:
        if user:
            raise ShifterError(f"imageGatewayUser {user!r}: no such user") from None
        return 0


class _Response:
    __slots__ = ("status", "content_type", "body")

    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body


def _split_url(url: str) -> tuple[str, str, int, str]:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise ShifterError(f"image gateway {url}: not an http(s) URL")
    hostport, _, base = rest.partition("/")
    host, port = hostport, 443 if scheme == "https" else 80
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        if tail.startswith(":"):
            port = int(tail[1:])
    elif hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        if not p.isdigit():
            raise ShifterError(f"image gateway {url}: bad port")
        port = int(p)
    if not host:
        raise ShifterError(f"image gateway {url}: no host")
    return scheme, host, port, "/" + base.strip("/") if base.strip("/") else ""


def _read_chunked(data: bytes) -> bytes:
    out = bytearray()
    while True:
        line, sep, data = data.partition(b"\r\n")
        if not sep:
            raise ValueError("truncated chunked body")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]


def _raw_http(
    method: str, host: str, port: int, path: str, headers: dict[str, str], body: bytes, timeout: float
) -> _Response:
    """One HTTP/1.1 exchange over a fresh TCP connection (Connection: close).

    ``timeout`` bounds the whole exchange, not each read: a frozen gateway (SIGSTOP, a hung
    host) still completes the TCP handshake from its listen backlog and then never answers,
    and one that trickles bytes must not hold the caller past its gatewayTimeout either.
    """
    deadline = time.monotonic() + timeout
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Connection: close",
        f"Content-Length: {len(body)}",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body

    def recv(sock: socket.socket) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(left)
        return sock.recv(65536)

    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(request)
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = recv(sock)
            if not chunk:
                raise ValueError("connection closed before a complete response")
            raw += chunk
            if len(raw) > _MAX_BODY:
                raise ValueError("response too large")
        hdr, _, payload = raw.partition(b"\r\n\r\n")
        lines = hdr.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"malformed status line {lines[0][:80]!r}")
        fields = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            fields[k.strip().lower()] = v.strip()
        length = int(fields["content-length"]) if fields.get("content-length", "").isdigit() else None
        if length is not None and length > _MAX_BODY:
            raise ValueError("response too large")
        while length is None or len(payload) < length:
            chunk = recv(sock)
            if not chunk:
                break
            payload += chunk
            if len(payload) > _MAX_BODY:
                raise ValueError("response too large")
    if length is not None:
        if len(payload) < length:
            raise ValueError("response shorter than its Content-Length")
        payload = payload[:length]
    elif fields.get("transfer-encoding", "").lower() == "chunked":
        payload = _read_chunked(payload)
    return _Response(int(parts[1]), fields.get("content-type", ""), payload)


def _https(
    host: str, port: int, path: str, method: str, headers: dict[str, str], body: bytes, timeout: float
) -> _Response:
    import http.client

    conn = http.client.HTTPSConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return _Response(resp.status, resp.getheader("Content-Type", ""), resp.read(_MAX_BODY))
    finally:
        conn.close()


class GatewayClient:
    """Talks to the first gateway of ``urls`` (in random order, like the original) that answers.

    A gateway that does not answer (refused, timed out after ``timeout`` seconds, 5xx) is
    moved to the end of the list for this client's later requests, and named once, in one
    ``warn`` line, when another gateway answered instead: a polling ``shifterimg pull`` with
    one gateway frozen waits for it once, not on every poll, and says so once.
    """

    def __init__(
        self,
        urls: list[str] | str,
        system: str,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        munge_socket: str | None = None,
        cred_file: str | None = None,
        shuffle: bool = True,
        gateway_user: str | int | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if isinstance(urls, str):
            urls = urls.split()
        self.urls = [u.rstrip("/") for u in urls if u.strip()]
        if not self.urls:
            raise ShifterError("no image gateway configured (imageGateway in udiRoot.conf)")
        if shuffle and len(self.urls) > 1:
            import random  # only with several gateways: spread the load like the original

            random.shuffle(self.urls)
        if not system or "/" in system:
            raise ShifterError(f"bad system name {system!r}")
        self.system = system
        # gatewayTimeout 0 or unset is the default, not "no wait at all" (a non-blocking socket)
        self.timeout = float(timeout) if timeout and timeout > 0 else DEFAULT_TIMEOUT
        self.munge_socket = munge_socket if munge_socket is not None else munge.client_socket()
        self.cred_file = cred_file
        self.gateway_user = gateway_user
        self.warn = warn if warn is not None else _warn_stderr
        self._gateway_uid: int | None = None
        self._named: set[str] = set()  # dead gateways already reported

    # -- plumbing -------------------------------------------------------------

    def gateway_uid(self) -> int:
        """The only uid munged lets decode our credentials (udiRoot.conf imageGatewayUser)."""
        if self._gateway_uid is None:
            self._gateway_uid = resolve_gateway_uid(self.gateway_user)
        return self._gateway_uid

    def _logins(self) -> dict[str, str]:
        return authorized_locations(self.system, self.cred_file, self.munge_socket)

    def _one(
        self, url: str, method: str, path: str, body: bytes | None, logins: dict[str, str]
    ) -> _Response:
        scheme, host, port, base = _split_url(url)
        payload: dict[str, Any] = {
            requestbinding.KEY: requestbinding.claim(
                method, base + path, body or b"", requestbinding.gateway_name(host, port)
            )
        }
        if logins:
            payload["authorized_locations"] = logins
        cred = munge.encode(
            json.dumps(payload, separators=(",", ":")).encode(), self.munge_socket, decoder_uid=self.gateway_uid()
        )
        headers = {"authentication": cred, "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if scheme == "https":
            return _https(host, port, base + path, method, headers, body or b"", self.timeout)
        return _raw_http(method, host, port, base + path, headers, body or b"", self.timeout)

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        not_found: str | None = None,
        *,
        with_logins: bool = False,
    ) -> Any:
        """Send to each gateway until one answers 2xx; returns the decoded JSON.

        Unreachable gateways, 5xx and 404 move on to the next gateway (another one may
        know the image); other 4xx are final. ``not_found`` is the error message for a
        404 from every gateway. ``with_logins`` sends the registry logins (pulls only).
        """
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        payload = self._logins() if with_logins else {}
        errors: list[str] = []
        dead: list[tuple[str, str]] = []  # (url, reason) of gateways that did not answer
        saw_404 = False
        for url in list(self.urls):
            try:
                resp = self._one(url, method, path, data, payload)
            except munge.MungeError:
                raise
            except (OSError, ValueError) as err:
                errors.append(f"image gateway {url}: {_reason(err)}")
                dead.append((url, _reason(err)))
                continue
            if 200 <= resp.status < 300:
                try:
                    result = json.loads(resp.body)
                except ValueError:
                    errors.append(f"image gateway {url}: response is not JSON")
                    dead.append((url, "response is not JSON"))
                    continue
                self._demote(dead, url)
                return result
            message = _error_message(resp)
            if resp.status == 404:
                saw_404 = True
                errors.append(f"image gateway {url}: {message}")
                continue
            if resp.status >= 500:
                errors.append(f"image gateway {url}: HTTP {resp.status} {message}")
                dead.append((url, f"HTTP {resp.status} {message}"))
                continue
            self._demote(dead, url)
            raise ShifterError(f"image gateway {url}: HTTP {resp.status} {message}")
        self._demote(dead, None)
        if saw_404 and not_found:
            raise ShifterError(not_found)
        raise ShifterError(errors[-1] if len(errors) == 1 else "; ".join(errors))

    def _demote(self, dead: list[tuple[str, str]], answered: str | None) -> None:
        """Try the gateways that did not answer last from now on; name each once when another answered."""
        for url, reason in dead:
            self.urls.remove(url)
            self.urls.append(url)
            if answered is not None and url not in self._named:
                self._named.add(url)
                self.warn(f"image gateway {url} did not answer ({reason}); used {answered}")

    def _image_path(self, mode: str, itype: str, tag: str) -> str:
        return f"/api/{mode}/{escape(self.system)}/{escape(itype)}/{escape(tag)}/"

    # -- the API --------------------------------------------------------------

    def lookup(self, ref: ImageRef) -> dict[str, Any]:
        """The READY record for ``ref``; ShifterError "image not found: <type>:<tag>" otherwise."""
        tag = _lookup_tag(ref)
        rec = self.request(
            "GET", self._image_path("lookup", ref.type, tag), not_found=f"image not found: {ref.type}:{tag}"
        )
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or rec.get("status") != "READY":
            raise ShifterError(f"image not found: {ref.type}:{tag}")
        return rec

    def pull(
        self, ref: ImageRef, allowed_uids: list[int] | None = None, allowed_gids: list[int] | None = None
    ) -> dict[str, Any]:
        """Start (or poll: the call is idempotent) a pull; returns the record with its status."""
        body = _acl_body(allowed_uids, allowed_gids)
        rec = self.request(
            "POST", self._image_path("pull", ref.type, _pull_tag(ref)), body=body, with_logins=True
        )
        return _record(rec)

    def images(self) -> list[dict[str, Any]]:
        """The READY images the caller may see."""
        result = self.request("GET", f"/api/list/{escape(self.system)}/")
        items = result.get("list", result.get("data")) if isinstance(result, dict) else None
        if not isinstance(items, list):
            raise ShifterError("image gateway: malformed image list")
        return [r for r in items if isinstance(r, dict)]

    def expire(self, ref: ImageRef) -> Any:
        """Queue removal of an image (admins only); the gateway's ``status`` value."""
        tag = _pull_tag(ref)
        result = self.request(
            "GET", self._image_path("expire", ref.type, tag), not_found=f"image not found: {ref.type}:{tag}"
        )
        return result.get("status") if isinstance(result, dict) else None

    def autoexpire(self) -> Any:
        """Expire everything past its expiration time (admins only); the gateway's ``status``."""
        result = self.request("GET", f"/api/autoexpire/{escape(self.system)}/")
        return result.get("status") if isinstance(result, dict) else None

    def doimport(
        self,
        ref: ImageRef,
        filepath: str,
        fmt: str = "squashfs",
        allowed_uids: list[int] | None = None,
        allowed_gids: list[int] | None = None,
    ) -> dict[str, Any]:
        """Ask the gateway to import a squashfs file visible to it (ImportUsers only)."""
        body = _acl_body(allowed_uids, allowed_gids) or {}
        body.update({"filepath": filepath, "format": fmt})
        rec = self.request("POST", self._image_path("doimport", ref.type, ref.tag), body=body)
        return _record(rec)


def _lookup_tag(ref: ImageRef) -> str:
    tag = getattr(ref, "lookup_tag", None)
    if isinstance(tag, str):
        return tag
    if ref.type in ("docker", "custom") and ":" not in ref.tag.rsplit("/", 1)[-1]:
        return ref.tag + ":latest"
    return ref.tag


def _pull_tag(ref: ImageRef) -> str:
    if ref.type == "docker":
        return _lookup_tag(ref)
    return ref.tag


def _acl_body(uids: list[int] | None, gids: list[int] | None) -> dict[str, str] | None:
    body = {}
    if uids:
        body["allowed_uids"] = ",".join(str(int(u)) for u in uids)
    if gids:
        body["allowed_gids"] = ",".join(str(int(g)) for g in gids)
    return body or None


def _record(rec: Any) -> dict[str, Any]:
    if not isinstance(rec, dict) or not isinstance(rec.get("status"), str):
        raise ShifterError("image gateway: malformed record in response")
    return rec


def _warn_stderr(line: str) -> None:
    sys.stderr.write(f"shifter: {line}\n")
    sys.stderr.flush()


def _reason(err: Exception) -> str:
    if isinstance(err, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


def _error_message(resp: _Response) -> str:
    try:
        doc = json.loads(resp.body)
    except ValueError:
        return resp.body[:200].decode("utf-8", errors="replace").strip() or f"HTTP {resp.status}"
    if isinstance(doc, dict):
        for key in ("error", "message", "detail"):
            if isinstance(doc.get(key), str):
                return doc[key]
    return f"HTTP {resp.status}"
