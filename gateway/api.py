"""The HTTP API: the original's routes and JSON shapes, plus /api/status, /metrics and OpenAPI.

Compatibility details the original C ``shifterimg`` depends on: ``Content-Type`` is
exactly ``application/json`` and every response has a Content-Length (it prints
nothing otherwise); every route answers with and without the trailing slash (no
redirects: the C client does not follow them); tags arrive URL-escaped; records
have exactly 13 keys with ``"MISSING"`` for absent ones and a float ``last_pull``.

Status codes: 400 malformed request (also a client gone mid-body), 401
missing/bad/misdirected credential, 403 forbidden action, 404 unknown
system/image/route (a private image the caller may not read is indistinguishable
from a missing one), 405 wrong method, 408 body too slow, 413 body too large, 503
store or munged unavailable; 500 only for a bug, never for bad input.

Everything that may block (munge decoding, store calls) runs in a bounded thread
pool, never on the event loop: one slow store call or stuck munged stalls only
its own request.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from gateway.auth import Authenticator, AuthError, AuthUnavailable, RequestFacts, Session
from gateway.checks import BadRequest, Forbidden, NotFound, parse_acl
from gateway.config import GatewayConfig
from gateway.manager import ImageManager
from gateway.openapi import RECORD_KEYS, openapi_document
from gateway.store.base import outage
from shifter.errors import ShifterError

log = logging.getLogger("gateway.api")

MAX_BODY = 64 * 1024
MAX_JSON_DEPTH = 32  # the API's bodies are flat objects; deeper nesting is hostile
BODY_SECONDS = 30.0  # a body that trickles in slower than this holds a connection: 408
BLOCKING_THREADS = 64  # the pool for munge and store calls (see offload)
_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


_T = TypeVar("_T")
# A plain executor: a hop costs the event loop ~11 us of CPU where anyio.to_thread cost ~35 us
# (its limiter, cancel scope and checkpoints), and a lookup makes one hop per request.
_POOL = ThreadPoolExecutor(max_workers=BLOCKING_THREADS, thread_name_prefix="blocking")


async def offload(fn: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking call (munged, SQLite, MongoDB) in the bounded pool, off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(fn, *args))


def shutdown_pool() -> None:
    """At the gateway's stop: no new blocking calls; queued ones are dropped."""
    _POOL.shutdown(wait=False, cancel_futures=True)


def request_target(scope: Scope) -> str:
    """Path and query as the client sent them: what a bound credential names."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string") or b""
    return raw.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")


def _depth_ok(data: bytes) -> bool:
    """Nesting of ``[``/``{`` outside strings stays within MAX_JSON_DEPTH (json recurses per level)."""
    depth, in_string, escaped = 0, False, False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def dump_json(content: Any) -> bytes:
    return json.dumps(content, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


class JSONResponse(Response):
    """Compact JSON, ``Content-Type: application/json`` exactly (no charset), with Content-Length."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dump_json(content)


def record_json(rec: dict[str, Any]) -> dict[str, Any]:
    """The original's ``create_response``: exactly the 13 keys, ``"MISSING"`` for absent ones."""
    out: dict[str, Any] = {}
    for key in RECORD_KEYS:
        value = rec.get(key)
        out[key] = "MISSING" if value is None else value
    tag = rec.get("tag")
    out["tag"] = [tag] if isinstance(tag, str) else list(tag or [])
    try:
        out["last_pull"] = float(rec.get("last_pull"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        out["last_pull"] = "MISSING"
    return out


def error(status: int, message: str, request: Request | None = None) -> JSONResponse:
    url = request.url.path if request is not None else ""
    return JSONResponse(
        {"status": status, "error": message, "message": f"{_REASONS.get(status, 'Error')}: {url}"},
        status_code=status,
    )


class Gateway:
    """Route handlers bound to one manager and authenticator."""

    def __init__(self, config: GatewayConfig, manager: ImageManager, auth: Authenticator) -> None:
        self.config = config
        self.manager = manager
        self.auth = auth

    async def session(self, request: Request, body: bytes = b"", read_only: bool = False) -> Session:
        """The caller, from a credential that must name this request (see gateway.auth)."""
        system = request.path_params["system"]
        if system not in self.config.platforms:
            raise NotFound(f"unknown system {system!r}")
        facts = RequestFacts(request.method, request_target(request.scope), body, read_only)
        return await offload(self.auth.authenticate, request.headers.get("authentication"), system, facts)

    @staticmethod
    def image(request: Request) -> tuple[str, str]:
        return request.path_params["itype"], request.path_params["tag"].rstrip("/")

    @staticmethod
    async def raw_body(request: Request) -> bytes:
        """The body, bounded in size and time; a client gone mid-body is its own error."""
        length = request.headers.get("content-length")
        if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > MAX_BODY):
            raise _TooLarge()
        data = b""
        try:
            with anyio.fail_after(BODY_SECONDS):
                async for chunk in request.stream():
                    data += chunk
                    if len(data) > MAX_BODY:
                        raise _TooLarge()
        except ClientDisconnect:
            raise _ClientGone() from None
        except TimeoutError:
            raise _TooSlow() from None
        return data

    @staticmethod
    def parse_body(data: bytes) -> dict[str, Any]:
        """An optional JSON object body; anything else is a 400 naming the problem."""
        if not data.strip():
            return {}
        if not _depth_ok(data):
            raise BadRequest(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest("request body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise BadRequest("request body must be a JSON object")
        return doc

    # -- routes -------------------------------------------------------------------------

    async def root(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "routes": [
                    "lookup",
                    "pull",
                    "expire",
                    "list",
                    "autoexpire",
                    "doimport",
                    "metrics",
                    "queue",
                    "status",
                ]
            }
        )

    async def status(self, request: Request) -> JSONResponse:
        try:
            await offload(self.manager.store.ping)
        except ShifterError as err:
            return JSONResponse({"status": "down", "error": str(err)}, status_code=503)
        return JSONResponse({"status": "up"})

    async def lookup(self, request: Request) -> JSONResponse:
        session = await self.session(request, read_only=True)
        itype, tag = self.image(request)
        return JSONResponse(record_json(await offload(self.manager.lookup, session, itype, tag)))

    async def pull(self, request: Request) -> JSONResponse:
        data = await self.raw_body(request)
        session = await self.session(request, data)
        itype, tag = self.image(request)
        body = self.parse_body(data)
        uids = parse_acl(body.get("allowed_uids"), "allowed_uids")
        gids = parse_acl(body.get("allowed_gids"), "allowed_gids")
        refresh = body.get("refresh", False)
        if not isinstance(refresh, bool):
            raise BadRequest("refresh must be true or false")
        rec = await offload(functools.partial(self.manager.pull, refresh=refresh), session, itype, tag, uids, gids)
        return JSONResponse(record_json(rec))

    async def doimport(self, request: Request) -> JSONResponse:
        data = await self.raw_body(request)
        session = await self.session(request, data)
        itype, tag = self.image(request)
        body = self.parse_body(data)
        rec = await offload(self.manager.doimport, session, itype, tag, body)
        return JSONResponse(record_json(rec))

    async def list_images(self, request: Request) -> JSONResponse:
        session = await self.session(request, read_only=True)
        images = await offload(self.manager.list_images, session)
        return JSONResponse({"list": [record_json(r) for r in images]})

    async def expire(self, request: Request) -> JSONResponse:
        session = await self.session(request)
        itype, tag = self.image(request)
        return JSONResponse({"status": await offload(self.manager.expire, session, itype, tag)})

    async def autoexpire(self, request: Request) -> JSONResponse:
        session = await self.session(request)
        return JSONResponse({"status": await offload(self.manager.autoexpire, session)})

    async def metrics_docs(self, request: Request) -> JSONResponse:
        session = await self.session(request, read_only=True)
        raw = request.query_params.get("limit", "10")
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 6 or int(raw) > 100000:
            raise BadRequest("limit must be a number between 0 and 100000")
        docs = await offload(self.manager.metric_docs, session, int(raw))
        return JSONResponse(docs)

    async def queue(self, request: Request) -> JSONResponse:
        session = await self.session(request, read_only=True)
        return JSONResponse({"list": await offload(self.manager.queue_list, session)})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.manager.metrics.render(), media_type="text/plain; version=0.0.4")

    async def openapi(self, request: Request) -> JSONResponse:
        return JSONResponse(openapi_document(sorted(self.config.platforms)))


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class _ClientGone(Exception):
    """The client closed the connection (or broke the framing) before its body was complete."""


def _routes(gw: Gateway) -> list[Route]:
    image = "/{system}/{itype}/{tag:path}"
    table: list[tuple[str, Any, list[str]]] = [
        ("/api/lookup" + image, gw.lookup, ["GET"]),
        ("/api/pull" + image, gw.pull, ["POST"]),
        ("/api/doimport" + image, gw.doimport, ["POST"]),
        ("/api/expire" + image, gw.expire, ["GET"]),
        ("/api/list/{system}", gw.list_images, ["GET"]),
        ("/api/autoexpire/{system}", gw.autoexpire, ["GET"]),
        ("/api/metrics/{system}", gw.metrics_docs, ["GET"]),
        ("/api/queue/{system}", gw.queue, ["GET"]),
        ("/api/status", gw.status, ["GET"]),
        ("/api/openapi.json", gw.openapi, ["GET"]),
        ("/metrics", gw.prometheus, ["GET"]),
    ]
    routes = [Route("/", gw.root, methods=["GET"])]
    for path, handler, methods in table:
        routes.append(Route(path, _guard(handler), methods=methods))
        if not path.endswith("{tag:path}"):
            routes.append(Route(path + "/", _guard(handler), methods=methods))
    return routes


def _guard(handler: Any) -> Any:
    """Map domain errors to status codes; a bug becomes a logged 500 without a traceback to the user."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except AuthError as err:
            return error(401, str(err), request)
        except AuthUnavailable as err:
            return error(503, str(err), request)
        except Forbidden as err:
            return error(403, str(err), request)
        except NotFound as err:
            return error(404, str(err), request)
        except BadRequest as err:
            return error(400, str(err), request)
        except _TooLarge:
            return error(413, f"request body larger than {MAX_BODY} bytes", request)
        except _TooSlow:
            return error(408, f"request body not complete within {BODY_SECONDS:.0f} s", request)
        except _ClientGone:
            log.info("client %s left during the body of %s %s", _client(request.scope), request.method,
                     request.url.path)
            return error(400, "client disconnected before the body was complete", request)
        except ShifterError as err:
            return error(503 if "store" in str(err) else 500, str(err), request)
        except Exception as err:
            if (down := outage(err)) is not None:  # the database, not a bug: clients try another gateway
                log.warning("%s %s: %s", request.method, request.url.path, down)
                return error(503, down, request)
            log.exception("unexpected error on %s %s", request.method, request.url.path)
            return error(500, "internal error (logged by the gateway)", request)

    endpoint.__name__ = getattr(handler, "__name__", "endpoint")
    return endpoint


def _client(scope: Scope) -> str:
    client = scope.get("client") or ("-", 0)
    return str(client[0])
