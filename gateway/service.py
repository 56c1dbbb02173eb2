"""``shifter-gateway --config imagemanager.json``: run the image gateway (uvicorn).

One process serves HTTP (uvicorn with httptools on uvloop) and runs the pull workers
in threads, like the original; each conversion runs in a child process (gateway.buildproc).
SIGTERM/SIGINT stop accepting requests, let running requests finish, then stop the workers
and their conversion processes; a pull interrupted that way is picked up by the next start
(see gateway.recovery). Also runnable as ``python -m gateway.service --config ...``.

With ``APIProcesses`` N > 1 the listening sockets are bound once and N processes are forked
to serve them, each a whole gateway on the shared store (its own owner identity, leases and
recovery, as several gateways on one host are): one Python process is bound to one core by
the GIL. The parent only supervises: it forwards SIGTERM/SIGINT, and a worker that exits
on its own stops the others and makes the service exit non-zero (the service manager
restarts it; nothing is restarted silently). Workers die with the parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
import time
import traceback
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


def _setup_logging(level: str, log_file: str | None, with_pid: bool = False) -> None:
    """One handler for the whole process (and, inherited, its API processes: the file is
    opened O_APPEND and every record is written and flushed whole, so lines never mix)."""
    pid = "[%(process)d] " if with_pid else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {pid}%(name)s: %(message)s")
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


WORKER_STOP_SECONDS = 60.0  # after SIGTERM, a worker still running this long is killed
_SUPERVISED = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


def serve(config_path: str) -> int:
    """Load the config, bind the listening sockets, serve until a signal arrives; the exit code."""
    from gateway.configfile import load_config

    config = load_config(config_path)
    # cache, expand tree, store and work files are the gateway's alone; published
    # images get their modes explicitly (gateway.publish)
    os.umask(0o077)
    _setup_logging(config.log_level, config.log_file, with_pid=config.api_processes > 1)
    sockets = [_bind(host, port) for host, port in config.listen]
    if config.api_processes == 1:
        _serve_one(config, sockets)
        return 0
    return _supervise(config, sockets)


def _serve_one(config: Any, sockets: list[socket.socket]) -> None:
    """One whole gateway: recover the store, serve ``sockets`` until SIGTERM/SIGINT."""
    import uvicorn

    from gateway.api import shutdown_pool
    from gateway.asgi import AccessLog, create_app
    from gateway.manager import ImageManager
    from gateway.store.backend import open_store

    log = logging.getLogger("gateway.service")
    store = open_store(config.store, config.mongodb_name)
    manager = ImageManager(config, store)
    # which process answered a scrape: with APIProcesses > 1 each serves its own counters
    pid = float(os.getpid())
    manager.metrics.gauge("shifter_gateway_process_id", "The pid of the gateway process that answered.",
                          lambda: pid)
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
    # uvicorn stops gracefully on SIGTERM (SIGINT) and then raises the signal again under the handler it
    # found: with the default one the process died there, before the cleanup below (conversion
    # processes ended, the store closed, "stopped" logged). The handler it finds asks the server
    # to stop: harmless after the shutdown, and a SIGTERM just before uvicorn takes the signal
    # over still stops it.
    for signo in (signal.SIGTERM, signal.SIGINT):  # SIGINT: its KeyboardInterrupt skipped nothing, but left a traceback
        signal.signal(signo, lambda signo, frame: setattr(server, "should_exit", True))
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



def _supervise(config: Any, sockets: list[socket.socket]) -> int:
    """Fork ``config.api_processes`` gateways on ``sockets``; wait for a signal or a worker's exit.

    The signals are blocked before the first fork and taken with sigwaitinfo, so a worker
    that dies at once or a SIGTERM during start-up is never missed.
    """
    log = logging.getLogger("gateway.service")
    parent = os.getpid()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISED)
    workers: dict[int, int] = {}  # pid -> worker number
    try:
        for number in range(config.api_processes):
            pid = os.fork()
            if pid == 0:
                _worker(config, sockets, parent, mask)  # never returns
            workers[pid] = number
    except OSError as err:
        log.error("cannot start API process %d: %s", len(workers), err.strerror)
        _stop_workers(workers, log)
        return 1
    finally:
        for sock in sockets:  # the workers hold them now
            sock.close()
    log.info(
        "shifter-gateway %d: %d API processes (%s) on %s",
        parent,
        len(workers),
        " ".join(str(p) for p in workers),
        ", ".join(f"{h}:{p}" for h, p in config.listen),
    )
    failed = _wait_workers(workers, log)
    log.info("shifter-gateway %d stopped%s", parent, " after a failure" if failed else "")
    return 1 if failed else 0


def _worker(config: Any, sockets: list[socket.socket], parent: int, mask: Any) -> None:
    """The forked API process: dies with the parent, serves, exits with its own status."""
    code = 1
    try:
        from shifter.runtime.linux import die_with_parent

        die_with_parent(parent, signal.SIGTERM)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _serve_one(config, sockets)
        code = 0
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: uvicorn stopped, re-raised SIGINT
        code = 0
    except ShifterError as err:
        print(f"shifter-gateway[{os.getpid()}]: {err}", file=sys.stderr)
        logging.getLogger("gateway.service").error("%s", err)
    except BaseException:  # noqa: BLE001 - reported, then the worker's exit status says it
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never back into the parent's code (atexit, finally blocks)


def _wait_workers(workers: dict[int, int], log: logging.Logger, stopping: bool = False) -> bool:
    """Until every worker is gone; True if one exited on its own or failed to stop cleanly.
    ``stopping``: they have been sent SIGTERM already."""
    failed = False
    deadline: float | None = time.monotonic() + WORKER_STOP_SECONDS if stopping else None
    while workers:
        if deadline is None:
            info = signal.sigwaitinfo(_SUPERVISED)
        else:
            info = signal.sigtimedwait(_SUPERVISED, max(0.0, deadline - time.monotonic()))
            if info is None:  # a worker ignored SIGTERM for WORKER_STOP_SECONDS
                for pid in workers:
                    log.error("API process %d did not stop in %.0fs: killed", pid, WORKER_STOP_SECONDS)
                    _signal(pid, signal.SIGKILL)
                deadline = None
                continue
        if info.si_signo != signal.SIGCHLD:
            if not stopping:
                log.info("%s: stopping %d API processes", signal.Signals(info.si_signo).name, len(workers))
            stopping = True
            deadline = deadline or time.monotonic() + WORKER_STOP_SECONDS
            for pid in workers:  # SIGTERM (uvicorn stops the same way; SIGINT would leave a traceback)
                _signal(pid, signal.SIGTERM)
            continue
        while workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                workers.clear()
                break
            if pid == 0:
                break
            if workers.pop(pid, None) is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            # a worker that got SIGTERM before it took the signal over dies of it: still a clean stop
            if not stopping or code not in (0, -signal.SIGTERM):
                how = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
                log.error("API process %d %s; stopping the service", pid, how)
                failed = True
            if not stopping:
                stopping = True
                deadline = time.monotonic() + WORKER_STOP_SECONDS
                for other in workers:
                    _signal(other, signal.SIGTERM)
    return failed


def _signal(pid: int, signo: int) -> None:
    try:
        os.kill(pid, signo)
    except ProcessLookupError:
        pass


def _stop_workers(workers: dict[int, int], log: logging.Logger) -> None:
    """SIGTERM the workers started so far and wait for them (a failed start)."""
    for pid in workers:
        _signal(pid, signal.SIGTERM)
    _wait_workers(workers, log, stopping=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shifter-gateway", description="Shifter image gateway")
    parser.add_argument(
        "--config",
        default=os.environ.get("GWCONFIG", DEFAULT_CONFIG),
        help="imagemanager.json (default: $GWCONFIG or %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        return serve(args.config)
    except ShifterError as err:
        print(f"shifter-gateway: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
