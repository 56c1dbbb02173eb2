"""The HTTP API: the original's routes and JSON shapes, plus /api/status, /metrics and OpenAPI.

Compatibility details the original C ``shifterimg`` depends on: ``Content-Type`` is
exactly ``application/json`` and every response has a Content-Length (it prints
nothing otherwise); every route answers with and without the trailing slash (no
redirects: the C client does not follow them); tags arrive URL-escaped; records
have exactly 13 keys with ``"MISSING"`` for absent ones and a float ``last_pull``.

Status codes: 400 malformed request, 401 missing/bad credential, 403 forbidden
action, 404 unknown system/image/route (a private image the caller may not read
is indistinguishable from a missing one), 405 wrong method, 413 body too large,
503 store unavailable; 500 only for a bug, never for bad input.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from gateway.auth import Authenticator, AuthError, Session
from gateway.config import GatewayConfig
from gateway.manager import BadRequest, Forbidden, ImageManager, NotFound, check_tag, parse_acl
from gateway.openapi import RECORD_KEYS, openapi_document
from shifter.errors import ShifterError

log = logging.getLogger("gateway.api")

MAX_BODY = 64 * 1024
_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


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

    def session(self, request: Request) -> Session:
        system = request.path_params["system"]
        if system not in self.config.platforms:
            raise NotFound(f"unknown system {system!r}")
        return self.auth.authenticate(request.headers.get("authentication"), system)

    @staticmethod
    def image(request: Request) -> tuple[str, str]:
        return request.path_params["itype"], request.path_params["tag"].rstrip("/")

    @staticmethod
    async def body(request: Request) -> dict[str, Any]:
        """An optional JSON object body; anything else is a 400 naming the problem."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise _TooLarge()
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise _TooLarge()
        if not data.strip():
            return {}
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
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
            self.manager.store.ping()
        except ShifterError as err:
            return JSONResponse({"status": "down", "error": str(err)}, status_code=503)
        return JSONResponse({"status": "up"})

    async def lookup(self, request: Request) -> JSONResponse:
        session = self.session(request)
        itype, tag = self.image(request)
        return JSONResponse(record_json(self.manager.lookup(session, itype, tag)))

    async def pull(self, request: Request) -> JSONResponse:
        session = self.session(request)
        itype, tag = self.image(request)
        body = await self.body(request)
        uids = parse_acl(body.get("allowed_uids"), "allowed_uids")
        gids = parse_acl(body.get("allowed_gids"), "allowed_gids")
        refresh = body.get("refresh", False)
        if not isinstance(refresh, bool):
            raise BadRequest("refresh must be true or false")
        rec = self.manager.pull(session, itype, tag, uids, gids, refresh=refresh)
        return JSONResponse(record_json(rec))

    async def doimport(self, request: Request) -> JSONResponse:
        session = self.session(request)
        itype, tag = self.image(request)
        body = await self.body(request)
        rec = await run_in_threadpool(self.manager.doimport, session, itype, tag, body)
        return JSONResponse(record_json(rec))

    async def list_images(self, request: Request) -> JSONResponse:
        session = self.session(request)
        return JSONResponse({"list": [record_json(r) for r in self.manager.list_images(session)]})

    async def expire(self, request: Request) -> JSONResponse:
        session = self.session(request)
        itype, tag = self.image(request)
        return JSONResponse({"status": self.manager.expire(session, itype, tag)})

    async def autoexpire(self, request: Request) -> JSONResponse:
        session = self.session(request)
        return JSONResponse({"status": await run_in_threadpool(self.manager.autoexpire, session)})

    async def metrics_docs(self, request: Request) -> JSONResponse:
        session = self.session(request)
        raw = request.query_params.get("limit", "10")
        if not raw.isdigit() or int(raw) > 100000:
            raise BadRequest("limit must be a number between 0 and 100000")
        docs = await run_in_threadpool(self.manager.metric_docs, session, int(raw))
        return JSONResponse(docs)

    async def queue(self, request: Request) -> JSONResponse:
        session = self.session(request)
        return JSONResponse({"list": self.manager.queue_list(session)})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.manager.metrics.render(), media_type="text/plain; version=0.0.4")

    async def openapi(self, request: Request) -> JSONResponse:
        return JSONResponse(openapi_document(sorted(self.config.platforms)))


class _TooLarge(Exception):
    pass


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
        except Forbidden as err:
            return error(403, str(err), request)
        except NotFound as err:
            return error(404, str(err), request)
        except BadRequest as err:
            return error(400, str(err), request)
        except _TooLarge:
            return error(413, f"request body larger than {MAX_BODY} bytes", request)
        except ShifterError as err:
            return error(503 if "store" in str(err) else 500, str(err), request)
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.url.path)
            return error(500, "internal error (logged by the gateway)", request)

    endpoint.__name__ = getattr(handler, "__name__", "endpoint")
    return endpoint


class AccessLog:
    """One line per request, written from the event loop thread into a buffered file.

    Cheaper than uvicorn's logging-based access log (a formatted LogRecord per request);
    flushed at most once a second, at the latest a second after a line was written (so an
    admin tailing it sees every request), and at shutdown.
    """

    def __init__(self, path: str) -> None:
        self._fh = open(path, "a", buffering=1 << 16, encoding="utf-8")  # noqa: SIM115 (lives with the app)
        self._flushed = time.time()
        self._flush_scheduled = False

    def write(self, scope: Scope, status: int, started: float) -> None:
        client = scope.get("client") or ("-", 0)
        now = time.time()
        path = scope.get("path", "")
        self._fh.write(
            f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(now))} {client[0]} "
            f"{scope.get('method', '-')} {path!r} {status} {(now - started) * 1000:.1f}ms\n"
        )
        if now - self._flushed > 1.0:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(1.0, self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        self._flushed = time.time()
        if not self._fh.closed:
            self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class GatewayApp:
    """The ASGI entry: lookups take a short path; everything else goes through Starlette.

    A lookup is the request every job submission makes, so it skips Starlette's
    middleware, request object and route table (~40% of the per-request CPU) but uses
    the same manager, authenticator and response encoding as the Starlette route.
    """

    def __init__(self, starlette: Starlette, gw: Gateway, access_log: AccessLog | None) -> None:
        self.starlette = starlette
        self.gw = gw
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.starlette(scope, receive, send)
            return
        started = time.time()
        path: str = scope["path"]
        if scope["method"] == "GET" and path.startswith("/api/lookup/"):
            status, body = self.lookup(scope, path)
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        else:
            status_box = [0]

            async def send_and_see(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status_box[0] = message["status"]
                await send(message)

            await self.starlette(scope, receive, send_and_see if self.access_log else send)
            status = status_box[0]
        if self.access_log is not None:
            self.access_log.write(scope, status, started)

    def lookup(self, scope: Scope, path: str) -> tuple[int, bytes]:
        parts = path[len("/api/lookup/") :].split("/", 2)
        if len(parts) < 3:
            return 404, _error_body(404, "not found", path)
        system, itype, tag = parts[0], parts[1], parts[2].rstrip("/")
        header = None
        for name, value in scope["headers"]:
            if name == b"authentication":
                header = value.decode("latin-1")
                break
        try:
            if system not in self.gw.config.platforms:
                raise NotFound(f"unknown system {system!r}")
            session = self.gw.auth.authenticate(header, system)
            rec = self.gw.manager.lookup(session, itype, tag)
            return 200, dump_json(record_json(rec))
        except AuthError as err:
            return 401, _error_body(401, str(err), path)
        except NotFound as err:
            return 404, _error_body(404, str(err), path)
        except BadRequest as err:
            return 400, _error_body(400, str(err), path)
        except ShifterError as err:
            return 503, _error_body(503, str(err), path)
        except Exception:
            log.exception("unexpected error on GET %s", path)
            return 500, _error_body(500, "internal error (logged by the gateway)", path)


def _error_body(status: int, message: str, path: str) -> bytes:
    reason = _REASONS.get(status, "Error")
    return dump_json({"status": status, "error": message, "message": f"{reason}: {path}"})


def create_app(
    config: GatewayConfig,
    manager: ImageManager,
    auth: Authenticator | None = None,
    access_log: AccessLog | None = None,
) -> GatewayApp:
    """The ASGI app; the caller owns the manager's lifecycle (see gateway.service)."""
    gw = Gateway(config, manager, auth or Authenticator(config))

    async def http_error(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        return error(code, _REASONS.get(code, "error").lower(), request)

    app = Starlette(routes=_routes(gw), exception_handlers={HTTPException: http_error, 500: http_error})
    app.router.redirect_slashes = False
    return GatewayApp(app, gw, access_log)


__all__ = ["create_app", "record_json", "RECORD_KEYS", "check_tag", "AccessLog"]
