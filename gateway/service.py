"""``shifter-gateway --config imagemanager.json``: run the image gateway (uvicorn, one process).

One process serves HTTP (uvicorn with httptools on uvloop) and runs the pull workers
in threads, like the original; each conversion runs in a child process (gateway.buildproc).
SIGTERM/SIGINT stop accepting requests, let running requests finish, then stop the workers
and their conversion processes; a pull interrupted that way is picked up by the next start
(see gateway.recovery). Also runnable as ``python -m gateway.service --config ...``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys
from typing import Any

from shifter.errors import ShifterError

DEFAULT_CONFIG = "/etc/shifter/imagemanager.json"
HEADER_SECONDS = 10.0  # from the first byte of a request (or the connection) to its last header


class _AddressesOnly:
    """A transport as uvicorn's ``connection_made`` sees it: no ``"socket"`` extra info.

    uvicorn asks for the socket to read the peer's and its own address, and uvloop builds
    a new socket object for each such call (two per connection, ~25 us each); without it
    uvicorn takes the addresses uvloop already holds ("peername", "sockname").
    """

    __slots__ = ("_transport",)

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default if name == "socket" else self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def header_deadline_protocol() -> type:
    """uvicorn's httptools protocol with a header-read deadline.

    uvicorn's keep-alive timer stops at a request's first byte, so a client that
    sends half a request line and then nothing would hold its connection (and a slot
    of limit_concurrency) forever; here the connection closes after HEADER_SECONDS.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderDeadline(HttpToolsProtocol):  # type: ignore[misc]
        _header_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(HEADER_SECONDS, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            super().connection_made(_AddressesOnly(transport))
            self.transport = transport
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline


def _setup_logging(level: str, log_file: str | None) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel({"warn": "WARNING"}.get(level, level.upper()))
    access = logging.getLogger("uvicorn.access")  # replaced by gateway.api.AccessLog
    access.propagate = False
    access.handlers.clear()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ShifterError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


LOOKUP_SWITCH_INTERVAL = 0.0005  # seconds; CPython's default is 0.005


def serve(config_path: str) -> None:
    """Load the config, recover the store, serve until a signal arrives."""
    import uvicorn

    from gateway.api import shutdown_pool
    from gateway.asgi import AccessLog, create_app
    from gateway.configfile import load_config
    from gateway.manager import ImageManager
    from gateway.store.backend import open_store

    config = load_config(config_path)
    # cache, expand tree, store and work files are the gateway's alone; published
    # images get their modes explicitly (gateway.publish)
    os.umask(0o077)
    _setup_logging(config.log_level, config.log_file)
    log = logging.getLogger("gateway.service")
    sockets = [_bind(host, port) for host, port in config.listen]
    store = open_store(config.store, config.mongodb_name)
    manager = ImageManager(config, store)
    manager.start()
    try:
        access_log = AccessLog(config.access_log) if config.access_log else None
    except OSError as err:
        raise ShifterError(f"cannot open AccessLog {config.access_log}: {err.strerror}") from None
    app = create_app(config, manager, access_log=access_log)
    gc.collect()
    gc.freeze()  # the start-up objects never need scanning again: shorter GC pauses under load
    # the worker threads (store writes, publishing, the examiner's wait) hold the GIL for whole
    # switch intervals: a shorter one lets lookups in between (they hand it over several times each)
    sys.setswitchinterval(LOOKUP_SWITCH_INTERVAL)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            http=header_deadline_protocol(),
            loop="uvloop",
            lifespan="off",
            log_config=None,
            access_log=False,  # gateway.asgi.AccessLog writes it, without a LogRecord per request
            proxy_headers=False,  # the client address is the peer's: no X-Forwarded-For trusted
            server_header=False,
            timeout_keep_alive=30,
            backlog=2048,
            limit_concurrency=4096,
        )
    )
    log.info(
        "shifter-gateway %s listening on %s (store %s, auth %s)",
        os.getpid(),
        ", ".join(f"{h}:{p}" for h, p in config.listen),
        config.store.split("@")[-1],
        config.authentication,
    )
    try:
        server.run(sockets=sockets)
    finally:
        shutdown_pool()
        manager.stop()
        store.close()
        if access_log is not None:
            access_log.close()
        for sock in sockets:
            sock.close()
        log.info("shifter-gateway stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shifter-gateway", description="Shifter image gateway")
    parser.add_argument(
        "--config",
        default=os.environ.get("GWCONFIG", DEFAULT_CONFIG),
        help="imagemanager.json (default: $GWCONFIG or %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        serve(args.config)
    except ShifterError as err:
        print(f"shifter-gateway: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
