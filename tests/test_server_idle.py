"""Idle, half-open and trickling connections cannot take ``meetinity-gateway serve`` off the
air (the CLI's server in a child process, raw sockets)."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.rawkit import RawClient
from tests.servers import session

IDLE = 500
TRICKLING = 500


def _raise_own_fd_limit(wanted: int) -> None:
    resource = pytest.importorskip("resource", reason="POSIX open-file limit")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"open-file hard limit {hard} < {wanted} needed by this test")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def test_normal_client_answered_while_1000_connections_idle_or_trickle(gateway_process):
    _raise_own_fd_limit(IDLE + TRICKLING + 256)
    gateway = gateway_process()
    sockets: list[socket.socket] = []
    stop = threading.Event()

    def trickle(targets):
        # One byte a second on every trickling connection; headers never end.
        while not stop.wait(1.0):
            for sock in targets:
                try:
                    sock.send(b"a")
                except OSError:
                    pass

    try:
        for _ in range(IDLE):
            sockets.append(socket.create_connection(("127.0.0.1", gateway.port), timeout=10))
        tricklers = []
        for _ in range(TRICKLING):
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
            sock.sendall(b"GET /api/auth/x HTTP/1.1\r\nHost: a\r\nX-Slow: ")
            tricklers.append(sock)
        sockets.extend(tricklers)
        thread = threading.Thread(target=trickle, args=(tricklers,), daemon=True)
        thread.start()
        client = session()
        for _ in range(3):
            started = time.monotonic()
            response = client.get(gateway.url + "/api/auth/echo", timeout=10,
                                  headers={"Connection": "close"})
            assert response.status_code == 200
            # functional bound, generous for a loaded machine (1 s on an idle one)
            assert time.monotonic() - started < 5
            time.sleep(0.5)
        assert gateway.process.poll() is None
    finally:
        stop.set()
        for sock in sockets:
            sock.close()


def test_headers_that_never_end_are_cut(gateway_process):
    gateway = gateway_process(GATEWAY_HEADER_TIMEOUT="1")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /api/auth/x HTTP/1.1\r\nHost: a\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 8:
            try:
                sock.send(b"X-A: 1\r\n")  # still sending: only the deadline can end it
            except OSError:
                closed = True
                break
            sock.settimeout(0.5)
            try:
                if sock.recv(100) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
        assert closed
        assert time.monotonic() - started < 6


def test_idle_keep_alive_connections_are_closed_after_the_idle_timeout(gateway_process):
    gateway = gateway_process(GATEWAY_IDLE_TIMEOUT="1")
    with RawClient(gateway.port) as client:
        started = time.monotonic()
        data, closed = client.read_until_close(timeout=8)
    assert closed and data == b""
    assert time.monotonic() - started < 6
