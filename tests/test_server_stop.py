"""A stop signal drains ``meetinity-gateway serve``: in-flight requests finish and are logged,
kept-alive connections are told ``Connection: close``, then the process exits."""
from __future__ import annotations

import json
import re
import signal
import socket
import sys
import time

import pytest

from tests.rawkit import RawClient

pytestmark = pytest.mark.skipif(sys.platform == "win32",
                                reason="sends POSIX signals to the child process")


@pytest.fixture
def served(gateway_process):
    def start(**env):
        env.setdefault("LOG_FORMAT", "json")
        env.setdefault("LOG_LEVEL", "INFO")
        return gateway_process(**env)

    return start


def access_lines(stderr: str) -> list[dict]:
    lines = []
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "status" in record and "path" in record:
            lines.append(record)
    return lines


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_finishes_in_flight_requests_and_logs_them(served, signum):
    gateway = served(GATEWAY_DRAIN_SECONDS="15")
    kept_alive = RawClient(gateway.url)
    slow = RawClient(gateway.url)
    try:
        kept_alive.send(b"GET /api/auth/first HTTP/1.1\r\nHost: a\r\n\r\n")
        answer = kept_alive.read_response()
        status, headers = answer.status, answer.fields
        assert status == 200 and headers.get("connection") != "close"

        slow.send(b"GET /api/auth/slow?seconds=2 HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.3)  # the request is in flight
        gateway.process.send_signal(signum)
        time.sleep(0.5)

        # No new connections while draining ...
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", gateway.port), timeout=2).close()
        # ... but a kept-alive connection's next request is answered, and told to close.
        kept_alive.send(b"GET /api/auth/second HTTP/1.1\r\nHost: a\r\n\r\n")
        answer = kept_alive.read_response()
        status, headers = answer.status, answer.fields
        assert status == 200 and headers["connection"] == "close"

        slow.settimeout(15)
        answer = slow.read_response()
        status, headers, body = answer.status, answer.fields, answer.body
        assert status == 200 and headers["connection"] == "close"
        assert json.loads(body) == {"slow": True}
        gateway.process.wait(15)
    finally:
        kept_alive.close()
        slow.close()
    assert gateway.process.returncode == 0
    logged = {(line["path"], line["status"]) for line in access_lines(gateway.stderr())}
    assert {("/api/auth/first", 200), ("/api/auth/second", 200),
            ("/api/auth/slow", 200)} <= logged


def test_drain_deadline_cuts_what_is_left_and_exits(served):
    gateway = served(GATEWAY_DRAIN_SECONDS="1")
    slow = RawClient(gateway.url)
    try:
        slow.send(b"GET /api/auth/slow?seconds=30 HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.3)
        started = time.monotonic()
        gateway.process.terminate()
        gateway.process.wait(15)
        assert time.monotonic() - started < 12
    finally:
        slow.close()
    # A request was lost: the exit status says so.
    assert gateway.process.returncode == 1
    assert re.search(r"still in flight after 1\.\d s, cut by the drain deadline of 1 s: "
                     r"GET /api/auth/slow from 127\.0\.0\.1", gateway.stderr())


def test_a_second_stop_signal_cuts_at_once_and_says_so_truthfully(served):
    """The second signal cut a request after half a second: the log said "after 20 s", the
    access line said 200 for a client that got nothing, and the exit status was 0."""
    gateway = served(GATEWAY_DRAIN_SECONDS="20")
    slow = RawClient(gateway.url)
    try:
        slow.send(b"GET /api/auth/slow?seconds=2 HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.3)  # the request is in flight
        gateway.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        gateway.process.send_signal(signal.SIGTERM)
        gateway.process.wait(15)
        assert slow.sock.recv(65536) == b""  # the client got nothing
    finally:
        slow.close()
    stderr = gateway.stderr()
    assert gateway.process.returncode == 1, stderr
    match = re.search(r"still in flight after (\d+\.\d) s, cut by a second stop signal: "
                      r"GET /api/auth/slow", stderr)
    assert match and float(match.group(1)) < 20, stderr
    [line] = [r for r in access_lines(stderr) if r["path"] == "/api/auth/slow"]
    assert line["status"] == 0 and line["error"].startswith("cut at stop"), line


def test_idle_server_stops_at_once(served):
    gateway = served()
    started = time.monotonic()
    gateway.process.terminate()
    gateway.process.wait(10)
    assert gateway.process.returncode == 0
    assert time.monotonic() - started < 5
