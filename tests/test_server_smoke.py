"""``meetinity-gateway serve --server waitress|granian|gunicorn``: the same ``gateway.ini``
under each server, end to end — a proxied call with a token, a 401, a 429, 50 MB streamed
each way, and server-sent events delivered piece by piece."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import pytest

from tests.conftest import STRICT
from tests.rawkit import RawClient, RawConnection, RawRequest, ScriptedUpstream
from tests.servers import (ROOT, SHIPPED_INI, TEST_JWT_SECRET, auth_headers, free_port, session,
                           wait_for_port)
from tests.upstream import pattern, pattern_digest

SERVERS = ["waitress", "granian", "gunicorn"]
SIZE = 50 * 1000 * 1000


def require_server(name: str) -> None:
    if name == "gunicorn" and sys.platform == "win32":
        pytest.skip("gunicorn does not run on Windows")
    if name != "waitress" and importlib.util.find_spec(name) is None:
        message = f"{name} is not installed (pip install -r requirements-dev.txt)"
        if STRICT:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


class Served:
    """``python -m meetinity_gateway serve --server NAME`` in a child process (``threads``:
    ``--threads``; ``None``: the shipped ``[server:main]`` threads)."""

    def __init__(self, name: str, env: dict[str, str], threads: int | None = 4) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        child_env.update({"JWT_SECRET": TEST_JWT_SECRET, "LOG_LEVEL": "WARNING"}, **env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meetinity_gateway", "serve", "--config", str(SHIPPED_INI),
             "--server", name, "--listen", f"127.0.0.1:{self.port}"]
            + ([] if threads is None else ["--threads", str(threads)]),
            env=child_env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port("127.0.0.1", self.port, timeout=30, process=self.process)
        except Exception:
            self.stop()
            raise RuntimeError(f"{name} did not start: {self.stderr}") from None
        time.sleep(0.3)  # worker processes: the master listens before they import the app

    stderr = ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.stderr = self.process.stderr.read().decode(errors="replace")
        self.process.stderr.close()


@pytest.fixture
def serve_with():
    started = []

    def start(name: str, **env: str) -> Served:
        require_server(name)
        served = Served(name, env)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


@pytest.mark.parametrize("name", SERVERS)
def test_end_to_end_under_each_server(serve_with, upstream, name):
    gateway = serve_with(name, USER_SERVICE_URL=upstream.url, RATE_LIMIT_AUTH="3/minute",
                         MAX_BODY_SIZE="64M")
    client = session()
    # a proxied call with a token
    response = client.get(gateway.url + "/api/users/42", headers=auth_headers(), timeout=20)
    assert response.status_code == 200, response.text
    forwarded = {name.lower(): value for name, value in response.json()["headers"]}
    assert forwarded["x-user-id"] == "42"
    # a 401
    response = client.get(gateway.url + "/api/users/42", timeout=20)
    assert response.status_code == 401 and "Bearer" in response.headers["WWW-Authenticate"]
    assert response.json()["error"]["code"] == 401
    # a 429
    statuses = [client.get(gateway.url + "/api/auth/x", timeout=20).status_code
                for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    # 50 MB down, streamed
    digest = hashlib.sha256()
    with client.get(gateway.url + f"/api/users/42/download?size={SIZE}", headers=auth_headers(),
                    stream=True, timeout=60) as response:
        assert response.status_code == 200
        for piece in response.iter_content(1 << 20):
            digest.update(piece)
    assert digest.hexdigest() == pattern_digest(SIZE)
    # 50 MB up, chunked from a generator
    response = client.post(gateway.url + "/api/users/42/upload", data=pattern(SIZE),
                           headers=auth_headers(), timeout=120)
    assert response.status_code == 200, response.text
    assert response.json() == {"body_length": SIZE, "body_sha256": pattern_digest(SIZE)}


class EventUpstream(ScriptedUpstream):
    """Answers every request with ten server-sent events, 200 ms apart, chunked; records
    when each was written."""

    def __init__(self) -> None:
        super().__init__(self.events)
        self.sent: list[float] = []
        self.start()

    def events(self, request: RawRequest, conn: RawConnection) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                  b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        for index in range(10):
            event = b"data: event %d\n\n" % index
            conn.send(b"%x\r\n%s\r\n" % (len(event), event))
            self.sent.append(time.monotonic())
            conn.pause(0.2)
        conn.send(b"0\r\n\r\n")

    def close(self) -> None:
        self.stop()


@pytest.mark.parametrize("name", SERVERS)
def test_events_reach_the_client_piece_by_piece(serve_with, name):
    events = EventUpstream()
    try:
        gateway = serve_with(name, USER_SERVICE_URL=events.url)
        received: dict[int, float] = {}
        with RawClient(gateway.url, timeout=10) as client:
            client.send(b"GET /api/auth/events HTTP/1.1\r\nHost: a\r\n"
                        b"Accept: text/event-stream\r\n\r\n")
            data = b""
            while len(received) < 10:
                piece = client.sock.recv(65536)
                assert piece, f"closed after {len(received)} events"
                now = time.monotonic()
                data += piece
                for index in range(10):
                    if index not in received and b"data: event %d\n" % index in data:
                        received[index] = now
    finally:
        events.close()
    delays = [received[i] - events.sent[i] for i in range(10)]
    # Piece by piece: every event arrives before the upstream writes the next (200 ms on).
    assert all(delay < 0.2 for delay in delays[:-1]), delays
    # ... and typically within 50 ms of being written (median: one slow tick of a loaded
    # machine does not fail the test).
    assert statistics.median(delays) < 0.05, delays
