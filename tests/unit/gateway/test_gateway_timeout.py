"""The client's gatewayTimeout bounds a whole exchange with one gateway: real loopback sockets
that behave like a frozen gateway (accepted by the kernel, never answered) and like one that
trickles its answer a byte at a time."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from shifter.client.gatewayclient import DEFAULT_TIMEOUT, GatewayClient, _raw_http


@pytest.fixture
def frozen() -> Iterator[int]:
    """A listening socket nobody accepts from: what a SIGSTOPped gateway looks like."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@pytest.fixture
def trickling() -> Iterator[int]:
    """Answers every connection with a valid response, one byte every 50 ms (about 4 s in all)."""
    response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    stop = threading.Event()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                for byte in response:
                    if stop.is_set():
                        return
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        break
                    time.sleep(0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_a_frozen_gateway_costs_the_timeout_and_no_more(frozen: int) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        _raw_http("GET", "127.0.0.1", frozen, "/api/status", {}, b"", 0.5)
    assert 0.45 < time.monotonic() - started < 1.0


def test_a_trickling_gateway_is_cut_at_the_timeout_not_per_read(trickling: int) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        _raw_http("GET", "127.0.0.1", trickling, "/api/status", {}, b"", 1.0)
    assert time.monotonic() - started < 1.5  # each byte came within 50 ms: a per-read bound never fires
    assert _raw_http("GET", "127.0.0.1", trickling, "/api/status", {}, b"", 10.0).body == b"{}"


def test_gateway_timeout_zero_or_unset_is_the_default() -> None:
    for value in (0, 0.0, -1):
        assert GatewayClient(["http://127.0.0.1:1"], "sys", value, munge_socket="").timeout == DEFAULT_TIMEOUT
    assert GatewayClient(["http://127.0.0.1:1"], "sys", 3, munge_socket="").timeout == 3.0
