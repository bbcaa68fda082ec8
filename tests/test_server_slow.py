"""Slow readers cannot pin the gateway's threads or memory (``meetinity-gateway serve`` in a
child process, raw sockets that read slowly or not at all)."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.servers import session

SIZE = 20 * 1000 * 1000
READERS = 50

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="resident memory is read from /proc (Linux)")


@pytest.fixture
def served(gateway_process):
    def start(**env):
        env.setdefault("LOG_LEVEL", "WARNING")
        env.setdefault("LOG_FORMAT", "text")
        return gateway_process(**env)

    return start


def slow_reader(port: int, size: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /api/auth/download?size=%d HTTP/1.1\r\nHost: a\r\n\r\n" % size)
    return sock


def answered(url: str, bound: float = 10.0) -> bool:
    started = time.monotonic()
    response = session().get(url, timeout=bound, headers={"Connection": "close"})
    return response.status_code == 200 and time.monotonic() - started < bound


def test_fifty_slow_readers_of_20mb_cost_little_memory_and_no_service(served):
    gateway = served()
    assert answered(gateway.url + "/api/auth/echo")
    before = gateway.rss_kib()
    readers = []
    peak = before
    stop = threading.Event()

    def read_slowly():
        # 1 KiB a second from each reader: they are alive, only slow.
        while not stop.wait(1.0):
            for sock in readers:
                try:
                    sock.recv(1024)
                except OSError:
                    pass

    thread = threading.Thread(target=read_slowly, daemon=True)
    try:
        for _ in range(READERS):
            readers.append(slow_reader(gateway.port, SIZE))
        thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            # The other clients are served throughout.
            assert answered(gateway.url + "/health/live")
            assert answered(gateway.url + "/api/auth/echo")
            peak = max(peak, gateway.rss_kib())
            time.sleep(0.5)
        peak = max(peak, gateway.rss_kib("VmHWM"))
    finally:
        stop.set()
        for sock in readers:
            sock.close()
    grown_mib = (peak - before) / 1024
    assert grown_mib < 64, f"resident memory grew by {grown_mib:.1f} MiB"


def test_a_reader_too_slow_for_send_timeout_frees_its_thread(served):
    # Four threads, four readers that do not read, each far beyond a 1 MiB spool: every
    # thread waits on a client, until the send timeout frees it.
    gateway = served(GATEWAY_OUTBUF_SPOOL="1M", GATEWAY_SEND_TIMEOUT="2")
    readers = [slow_reader(gateway.port, SIZE) for _ in range(4)]
    try:
        assert answered(gateway.url + "/api/auth/echo", bound=20)
        # A reader whose request got a thread only after the echo's is being served now:
        # leave it time to stall and be cut too (2 s) before anything is read, or draining
        # the sockets below would let it receive its whole answer.
        time.sleep(5)
        for sock in readers:
            received = 0
            sock.settimeout(15)
            while True:
                try:
                    data = sock.recv(1 << 20)
                except ConnectionResetError:
                    break

                if not data:
                    break
                received += len(data)
            assert received < SIZE  # cut, not delivered
    finally:
        for sock in readers:
            sock.close()
