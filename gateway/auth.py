"""Who is calling: the ``authentication`` header (a munge credential) turned into a Session.

Every request must carry a valid credential (the original let requests without the
header through as an anonymous session). Decoding goes through libmunge in-process,
with the platform's ``mungeSocketPath`` selecting the munged (one key per system).

A credential is accepted only for the request it names (shifter.formats.requestbinding):
same method, target and body digest, and a gateway address that is this gateway's
(``GatewayAddresses``, else derived from ``Listen``). Credentials naming no request
(the original C ``shifterimg``) are accepted as ``UnboundCredentials`` says: by
default only on read-only routes, where a replay can disclose but change nothing.
``"Authentication": "mock"`` accepts the original's test header
``good:user:group[:token[:uid:gid]]`` instead; it is for black-box tests only and is
never the default.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import threading
import time
from dataclasses import dataclass, field

from gateway.config import GatewayConfig
from shifter.client import munge
from shifter.errors import ShifterError
from shifter.formats import requestbinding

_ID_CACHE_SECONDS = 60.0


class AuthError(Exception):
    """Missing or bad credentials: the API answers 401 with this message."""


class AuthUnavailable(ShifterError):
    """munged cannot be asked (down, stuck socket): the API answers 503, the client tries elsewhere."""


# libmunge failures that say nothing about the credential, only about reaching munged
_DAEMON_FAILURES = (munge.EMUNGE_SOCKET, 1, 5, 7)  # socket, SNAFU, no memory, timeout


@dataclass(frozen=True)
class RequestFacts:
    """The request a credential arrived with, as a bound credential must name it."""

    method: str
    target: str  # path and query as sent (still percent-escaped)
    body: bytes = b""
    read_only: bool = False  # a route that changes nothing: unbound credentials may do


@dataclass(frozen=True)
class Session:
    """The authenticated caller on one system."""

    system: str
    user: str
    uid: int
    group: str
    gid: int
    groups: frozenset[int] = frozenset()
    tokens: dict[str, str] = field(default_factory=dict)
    admin: bool = False  # the uid is one of the platform's admins (names resolved to uids)
    importer: bool = False  # the uid may import (ImportUsers resolved to uids)

    def may_read(self, private: bool | None, user_acl: list[int] | None, group_acl: list[int] | None) -> bool:
        """The original's ``_checkread``: public images, or the caller is in an ACL."""
        if not private or (not user_acl and not group_acl):
            return True
        if self.uid in (user_acl or []):
            return True
        gids = set(group_acl or [])
        return self.gid in gids or bool(self.groups & gids)


class _IdentityCache:
    """uid/gid -> names and supplementary groups, cached briefly (lookups are per request)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[tuple[int, int], tuple[float, str, str, frozenset[int]]] = {}
        self._uids: dict[tuple[str, ...], tuple[float, frozenset[int]]] = {}

    def uids(self, names: tuple[str, ...]) -> frozenset[int]:
        """The uids that configured user names (or ASCII numbers) stand for; unknown names none.

        Compared by uid, so a mock or remote session that merely carries the name of an
        admin, or a renamed account, gains nothing.
        """
        now = time.monotonic()
        hit = self._uids.get(names)
        if hit is not None and now - hit[0] < _ID_CACHE_SECONDS:
            return hit[1]
        found = set()
        for name in names:
            if name.isascii() and name.isdigit():
                found.add(int(name))
                continue
            try:
                found.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                pass
        result = frozenset(found)
        with self._lock:
            self._uids[names] = (now, result)
        return result

    def identity(self, uid: int, gid: int) -> tuple[str, str, frozenset[int]]:
        now = time.monotonic()
        hit = self._users.get((uid, gid))
        if hit is not None and now - hit[0] < _ID_CACHE_SECONDS:
            return hit[1], hit[2], hit[3]
        try:
            user = pwd.getpwuid(uid).pw_name
            groups = frozenset(os.getgrouplist(user, gid))
        except KeyError:
            user, groups = str(uid), frozenset({gid})
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
        with self._lock:
            if len(self._users) > 10000:
                self._users.clear()
            self._users[(uid, gid)] = (now, user, group, groups)
        return user, group, groups


def payload_doc(payload: bytes) -> dict[str, object]:
    """The credential's JSON payload; an empty or non-JSON one (old clients) is ``{}``."""
    if not payload:
        return {}
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def parse_tokens(payload: bytes | dict[str, object]) -> dict[str, str]:
    """``{"authorized_locations": {loc: "user:pass"}}`` from the credential payload; else none."""
    doc = payload if isinstance(payload, dict) else payload_doc(payload)
    locations = doc.get("authorized_locations")
    if not isinstance(locations, dict):
        return {}
    return {k: v for k, v in locations.items() if isinstance(k, str) and isinstance(v, str)}


def own_addresses(listen: tuple[tuple[str, int], ...]) -> frozenset[str]:
    """host:port names clients may use for a gateway listening on ``listen``.

    A wildcard listener answers to this host's names and addresses; a specific one
    to its address (and ``localhost`` for loopback). DNS aliases and load balancers
    need ``GatewayAddresses``.
    """
    names: set[str] = set()
    for host, port in listen:
        hosts = {host}
        if host in ("0.0.0.0", "::", ""):
            hosts = {socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1", "::1"}
            try:
                hosts |= {str(ai[4][0]) for ai in socket.getaddrinfo(socket.gethostname(), None)}
            except OSError:
                pass
        elif host in ("127.0.0.1", "::1"):
            hosts.add("localhost")
        names |= {requestbinding.gateway_name(h, port) for h in hosts if h}
    return frozenset(names)


class Authenticator:
    """Turns the header into a Session for a configured system."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.mode = config.authentication
        self.unbound = config.unbound_credentials
        self.addresses = frozenset(config.gateway_addresses) or own_addresses(config.listen)
        self._ids = _IdentityCache()

    def authenticate(self, header: str | None, system: str, facts: RequestFacts) -> Session:
        """Session for ``system``; AuthError (401) for a missing, bad or misdirected credential.

        Blocks on munged: call it off the event loop. AuthUnavailable when munged is unreachable.
        """
        platform = self.config.platforms[system]
        if not header:
            raise AuthError("missing authentication header (a munge credential)")
        if self.mode == "mock":
            user, uid, group, gid, tokens = self._mock(header)
        else:
            try:
                uid, gid, payload = munge.decode(header, platform.munge_socket)
            except munge.MungeError as err:
                if err.code in _DAEMON_FAILURES:
                    raise AuthUnavailable(f"cannot check credentials: {err}") from None
                raise AuthError(str(err)) from None
            except ValueError as err:
                raise AuthError(f"bad credential: {err}") from None
            doc = payload_doc(payload)
            self._check_binding(doc.get(requestbinding.KEY), facts)
            tokens = parse_tokens(doc)
            user, group = "", ""
        name, gname, groups = self._ids.identity(uid, gid)
        user = user or name
        group = group or gname
        return Session(
            system=system,
            user=user,
            uid=uid,
            group=group,
            gid=gid,
            groups=groups,
            tokens=tokens,
            admin=uid in self._ids.uids(platform.admins),
            importer=self._may_import(uid),
        )

    def _may_import(self, uid: int) -> bool:
        """ImportUsers: "all", or the caller's uid is one the listed names resolve to."""
        listed = self.config.import_users
        if listed is None:
            return False
        return listed == "all" or (not isinstance(listed, str) and uid in self._ids.uids(listed))

    def _check_binding(self, bound: object, facts: RequestFacts) -> None:
        """The credential names exactly this request to this gateway, or is an allowed unbound one."""
        if bound is None:
            if self.unbound == "accept" or (self.unbound == "read-only" and facts.read_only):
                return
            raise AuthError(
                "credential names no request (an old client?); this gateway accepts those "
                + ("only for lookups and listings" if self.unbound == "read-only" else "for no request")
            )
        if not isinstance(bound, dict):
            raise AuthError(f"malformed {requestbinding.KEY} in credential")
        expected = requestbinding.claim(facts.method, facts.target, facts.body, "")
        for key, what in (("method", "method"), ("target", "path"), ("body", "body")):
            if bound.get(key) != expected[key]:
                raise AuthError(f"credential was made for another request (its {what} differs)")
        if bound.get("gateway") not in self.addresses:
            raise AuthError("credential was made for another gateway")

    @staticmethod
    def _mock(header: str) -> tuple[str, int, str, int, dict[str, str]]:
        """``good:user:group[:token[:uid:gid]]`` (3, 4 or 6 fields), as the original's mock mode."""
        fields = header.split(":")
        if len(fields) not in (3, 4, 6) or fields[0] != "good" or not fields[1] or not fields[2]:
            raise AuthError("bad mock credential (want good:user:group[:token[:uid:gid]])")
        user, group = fields[1], fields[2]
        tokens = parse_tokens(fields[3].encode()) if len(fields) >= 4 else {}
        if len(fields) == 6:
            if not all(f.isascii() and f.isdigit() and len(f) <= 10 and int(f) < 0xFFFFFFFF for f in fields[4:6]):
                raise AuthError("bad mock credential: uid and gid must be numbers below 4294967295")
            return user, int(fields[4]), group, int(fields[5]), tokens
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise AuthError(f"bad mock credential: unknown user {user!r} and no uid:gid") from None
        return user, pw.pw_uid, group, pw.pw_gid, tokens
