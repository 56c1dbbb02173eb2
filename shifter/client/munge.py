"""MUNGE credentials through libmunge, in-process (no `munge`/`unmunge` process per call).

Used by the gateway (decode, once per request) and by its clients (encode, once per
request: credentials are replay-protected). Stdlib only and without ``ctypes.util``
because the SPANK submission hook imports it under ``python -I -S``.

The socket is libmunge's default (``/run/munge/munge.socket.2``) unless given;
clients honour ``SHIFTER_MUNGE_SOCKET`` through :func:`client_socket`.
"""

from __future__ import annotations

import ctypes
import os

from shifter.errors import ShifterError

DEFAULT_SOCKET = "/run/munge/munge.socket.2"
_OPT_SOCKET = 8  # MUNGE_OPT_SOCKET in munge.h
_OPT_UID_RESTRICTION = 9  # MUNGE_OPT_UID_RESTRICTION

# munge_err_t values worth naming (munge.h)
EMUNGE_SOCKET = 6
EMUNGE_BAD_CRED = 8
EMUNGE_CRED_INVALID = 14
EMUNGE_CRED_EXPIRED = 15
EMUNGE_CRED_REWOUND = 16
EMUNGE_CRED_REPLAYED = 17
EMUNGE_CRED_UNAUTHORIZED = 18

_REASONS = {
    EMUNGE_CRED_EXPIRED: "expired credential",
    EMUNGE_CRED_REWOUND: "rewound credential (encoded in the future)",
    EMUNGE_CRED_REPLAYED: "replayed credential",
    EMUNGE_CRED_INVALID: "invalid credential",
    EMUNGE_BAD_CRED: "invalid credential format",
    EMUNGE_CRED_UNAUTHORIZED: "credential not meant for this service (uid restriction)",
}


class MungeError(ShifterError):
    """A credential could not be made or checked; ``code`` is libmunge's munge_err_t."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Lib:
    """The loaded libmunge and libc symbols, typed once."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libmunge.so.2")
        except OSError as err:
            raise ShifterError(f"munge: cannot load libmunge.so.2: {err}") from None
        libc = ctypes.CDLL("libc.so.6")
        self.free = libc.free
        self.free.argtypes = [ctypes.c_void_p]
        self.free.restype = None
        self.ctx_create = lib.munge_ctx_create
        self.ctx_create.restype = ctypes.c_void_p
        self.ctx_create.argtypes = []
        self.ctx_destroy = lib.munge_ctx_destroy
        self.ctx_destroy.argtypes = [ctypes.c_void_p]
        self.ctx_destroy.restype = None
        self.ctx_set_str = lib.munge_ctx_set
        self.ctx_set_str.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
        self.ctx_set_str.restype = ctypes.c_int
        # munge_ctx_set is variadic: a second function object typed for the uid_t options
        self.ctx_set_uint = lib["munge_ctx_set"]
        self.ctx_set_uint.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
        self.ctx_set_uint.restype = ctypes.c_int
        self.ctx_strerror = lib.munge_ctx_strerror
        self.ctx_strerror.argtypes = [ctypes.c_void_p]
        self.ctx_strerror.restype = ctypes.c_char_p
        self.strerror = lib.munge_strerror
        self.strerror.argtypes = [ctypes.c_int]
        self.strerror.restype = ctypes.c_char_p
        self.encode = lib.munge_encode
        self.encode.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        self.encode.restype = ctypes.c_int
        self.decode = lib.munge_decode
        self.decode.argtypes = [
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
        ]
        self.decode.restype = ctypes.c_int


_lib: _Lib | None = None


def _libmunge() -> _Lib:
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib


def client_socket() -> str | None:
    """The socket clients use: ``SHIFTER_MUNGE_SOCKET`` if set, else libmunge's default."""
    return os.environ.get("SHIFTER_MUNGE_SOCKET") or None


def _context(lib: _Lib, socket: str | None) -> int:
    ctx = lib.ctx_create()
    if not ctx:
        raise MungeError(5, "munge: out of memory creating a context")
    if socket is not None and lib.ctx_set_str(ctx, _OPT_SOCKET, os.fsencode(socket)) != 0:
        lib.ctx_destroy(ctx)
        raise MungeError(2, f"munge: bad socket path {socket!r}")
    return ctx


def _failure(lib: _Lib, ctx: int, code: int, action: str) -> MungeError:
    detail = (lib.ctx_strerror(ctx) or lib.strerror(code) or b"unknown error").decode(errors="replace")
    reason = _REASONS.get(code)
    message = f"munge {action} failed: {reason} ({detail})" if reason else f"munge {action} failed: {detail}"
    return MungeError(code, message)


def encode(payload: bytes = b"", socket: str | None = None, *, decoder_uid: int | None = None) -> str:
    """A fresh credential for the calling uid/gid carrying ``payload``.

    ``decoder_uid`` restricts decoding to that uid (munge's uid restriction), so a
    payload meant for one service cannot be read by anyone else with ``unmunge``.
    """
    lib = _libmunge()
    ctx = _context(lib, socket)
    out = ctypes.c_void_p()
    try:
        if decoder_uid is not None and lib.ctx_set_uint(ctx, _OPT_UID_RESTRICTION, decoder_uid) != 0:
            raise _failure(lib, ctx, 2, "encode")
        code = lib.encode(ctypes.byref(out), ctx, payload or None, len(payload))
        if code != 0:
            raise _failure(lib, ctx, code, "encode")
        cred = ctypes.string_at(out.value).decode("ascii")
    finally:
        if out.value:
            lib.free(out.value)
        lib.ctx_destroy(ctx)
    return cred


_STALE = (EMUNGE_CRED_EXPIRED, EMUNGE_CRED_REWOUND, EMUNGE_CRED_REPLAYED)


def decode(cred: str, socket: str | None = None, *, accept_stale: bool = False) -> tuple[int, int, bytes]:
    """Check ``cred`` through munged; returns ``(uid, gid, payload)``.

    Raises MungeError naming the reason (expired, replayed, invalid, daemon unreachable).
    ``accept_stale`` accepts expired or replayed credentials that are otherwise valid:
    the ``~/.udiRoot/.cred`` store uses munge as local sealing, not as a fresh proof.
    """
    try:
        raw = cred.strip().encode("ascii")
    except (UnicodeEncodeError, AttributeError):
        raise MungeError(EMUNGE_BAD_CRED, "munge decode failed: invalid credential format") from None
    if not raw or b"\0" in raw:
        raise MungeError(EMUNGE_BAD_CRED, "munge decode failed: invalid credential format")
    lib = _libmunge()
    ctx = _context(lib, socket)
    buf = ctypes.c_void_p()
    length = ctypes.c_int(0)
    uid = ctypes.c_uint(0)
    gid = ctypes.c_uint(0)
    try:
        code = lib.decode(
            raw, ctx, ctypes.byref(buf), ctypes.byref(length), ctypes.byref(uid), ctypes.byref(gid)
        )
        if code != 0 and not (accept_stale and code in _STALE):
            raise _failure(lib, ctx, code, "decode")
        payload = ctypes.string_at(buf.value, length.value) if buf.value and length.value > 0 else b""
    finally:
        if buf.value:
            lib.free(buf.value)
        lib.ctx_destroy(ctx)
    return uid.value, gid.value, payload
