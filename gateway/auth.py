"""Who is calling: the ``authentication`` header (a munge credential) turned into a Session.

Every request must carry a valid credential (the original let requests without the
header through as an anonymous session). Decoding goes through libmunge in-process,
with the platform's ``mungeSocketPath`` selecting the munged (one key per system).
``"Authentication": "mock"`` accepts the original's test header
``good:user:group[:token[:uid:gid]]`` instead; it is for black-box tests only and is
never the default.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import threading
import time
from dataclasses import dataclass, field

from gateway.config import GatewayConfig
from shifter import munge

_ID_CACHE_SECONDS = 60.0


class AuthError(Exception):
    """Missing or bad credentials: the API answers 401 with this message."""


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
    admin: bool = False

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


def parse_tokens(payload: bytes) -> dict[str, str]:
    """``{"authorized_locations": {loc: "user:pass"}}`` from the credential payload; else none."""
    if not payload:
        return {}
    try:
        doc = json.loads(payload)
    except ValueError:
        return {}
    locations = doc.get("authorized_locations") if isinstance(doc, dict) else None
    if not isinstance(locations, dict):
        return {}
    return {k: v for k, v in locations.items() if isinstance(k, str) and isinstance(v, str)}


class Authenticator:
    """Turns the header into a Session for a configured system."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.mode = config.authentication
        self._ids = _IdentityCache()

    def authenticate(self, header: str | None, system: str) -> Session:
        """Session for ``system``; AuthError (401) for a missing or bad credential."""
        platform = self.config.platforms[system]
        if not header:
            raise AuthError("missing authentication header (a munge credential)")
        if self.mode == "mock":
            user, uid, group, gid, tokens = self._mock(header)
        else:
            try:
                uid, gid, payload = munge.decode(header, platform.munge_socket)
            except munge.MungeError as err:
                raise AuthError(str(err)) from None
            except ValueError as err:
                raise AuthError(f"bad credential: {err}") from None
            tokens = parse_tokens(payload)
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
            admin=user in platform.admins,
        )

    @staticmethod
    def _mock(header: str) -> tuple[str, int, str, int, dict[str, str]]:
        """``good:user:group[:token[:uid:gid]]`` (3, 4 or 6 fields), as the original's mock mode."""
        fields = header.split(":")
        if len(fields) not in (3, 4, 6) or fields[0] != "good" or not fields[1] or not fields[2]:
            raise AuthError("bad mock credential (want good:user:group[:token[:uid:gid]])")
        user, group = fields[1], fields[2]
        tokens = parse_tokens(fields[3].encode()) if len(fields) >= 4 else {}
        if len(fields) == 6:
            if not (fields[4].isdigit() and fields[5].isdigit()):
                raise AuthError("bad mock credential: uid and gid must be numbers")
            return user, int(fields[4]), group, int(fields[5]), tokens
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise AuthError(f"bad mock credential: unknown user {user!r} and no uid:gid") from None
        return user, pw.pw_uid, group, pw.pw_gid, tokens
