"""Rate limiting while Redis fails: the shipped gateway under a real waitress, a real
``redis-server`` frozen with SIGSTOP (then SIGCONT) or killed, and a counting proxy between
them that shows every connection and command the gateway sends (issue 13, point 5).

What must hold: one attempt per request at the configured timeout; while Redis fails only one
request at a time probes it, the others apply the failure policy at once; fail-open counts
each process' share of the limit locally; fail-closed is a 503 with Retry-After; counting
returns to Redis by itself once a probe succeeds.
"""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from limits.storage import MemoryStorage
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware

from meetinity_gateway.middleware.ratelimit import RateLimitMiddleware
from tests.conftest import require_tool
from tests.redisserver import RedisProxy, RedisServer, parse_commands
from tests.servers import shipped_gateway, session

TIMEOUT = 1.0  # RATELIMIT_STORAGE_TIMEOUT in these tests: long enough to tell 1 try from 2
CLIENT_TIMEOUT = 10  # a hang check, far above anything the gateway should take
RETRY_INTERVAL = 1.0  # the filter's default: a probe at most once a second


@pytest.fixture
def redis_server():
    pytest.importorskip("redis")
    server = RedisServer(require_tool("redis-server", "rate limits shared through Redis"))
    try:
        yield server
    finally:
        if server.process.poll() is None:
            try:
                server.thaw()
            except OSError:
                pass
        server.stop()


@pytest.fixture
def proxy(redis_server):
    with RedisProxy(redis_server.port) as counting:
        yield counting


@pytest.fixture
def start_gateway(monkeypatch, upstream):
    servers = []

    def start(**env):
        env.setdefault("USER_SERVICE_URL", upstream.url)
        env.setdefault("RATELIMIT_STORAGE_TIMEOUT", str(TIMEOUT))
        server = shipped_gateway(monkeypatch, env, threads=8)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def remaining(response) -> int:
    match = re.search(r";r=(\d+);", response.headers.get("RateLimit", ""))
    assert match, dict(response.headers)
    return int(match.group(1))


def timed_get(url: str, client=None):
    client = client or session()
    started = time.monotonic()
    response = client.get(url, timeout=CLIENT_TIMEOUT)
    return response, time.monotonic() - started


def avoid_window_edge(window: int = 60, margin: float = 8.0) -> None:
    left = window - time.time() % window
    if left < margin:
        time.sleep(left + 0.05)


def test_parse_commands_reads_resp_arrays_and_keeps_partial_input():
    buffer = bytearray(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\nPING\r\n*2\r\n$4\r\nEV")
    assert parse_commands(buffer) == ["GET", "PING", "PING"]
    assert buffer == b"*2\r\n$4\r\nEV"
    buffer += b"AL\r\n$1\r\nx\r\n"
    assert parse_commands(buffer) == ["EVAL"] and buffer == b""


def test_frozen_redis_costs_one_attempt_per_request(redis_server, proxy, start_gateway):
    gateway = start_gateway(RATELIMIT_STORAGE_URI=proxy.url, RATE_LIMIT_AUTH="1000/minute")
    client = session()
    assert timed_get(gateway.url + "/api/auth/x", client)[0].status_code == 200  # warm: pool
    redis_server.freeze()
    proxy.reset()
    response, elapsed = timed_get(gateway.url + "/api/auth/x", client)
    assert response.status_code == 200  # fail-open (the default)
    assert response.json()["path"] == "/auth/x"  # served by the upstream
    # One command reached Redis for this request, on one connection: no retry, no second
    # connection. (redis-py's default, or our former Retry(NoBackoff(), 1), sent it twice.)
    assert [name for _, name in proxy.commands] == ["EVALSHA"], proxy.commands
    assert proxy.connections == 0 and proxy.waits == 1
    # Functional bound: one timeout, not two (generous for a loaded machine).
    assert TIMEOUT * 0.9 <= elapsed < 2 * TIMEOUT


@pytest.mark.parametrize("on_error", ["open", "closed"])
def test_only_one_request_at_a_time_probes_a_frozen_redis(redis_server, proxy, start_gateway,
                                                          on_error):
    gateway = start_gateway(RATELIMIT_STORAGE_URI=proxy.url, RATE_LIMIT_AUTH="100000/minute",
                            RATELIMIT_ON_ERROR=on_error)
    url = gateway.url + "/api/auth/x"
    assert timed_get(url)[0].status_code == 200
    redis_server.freeze()
    timed_get(url)  # the first request finds out: the storage is failing from now on
    proxy.reset()
    stop_at = time.monotonic() + 3.5
    lock = threading.Lock()
    results: list[tuple[int, float, str | None]] = []

    def hammer(_):
        client = session()
        while time.monotonic() < stop_at:
            response, elapsed = timed_get(url, client)
            with lock:
                results.append((response.status_code, elapsed,
                                response.headers.get("Retry-After")))

    started = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(hammer, range(12)))
    duration = time.monotonic() - started

    # Never more than one request waiting on Redis at a time, at most one probe per
    # retry_interval, and only the probes paid the timeout; the rest answered at once.
    assert proxy.max_waiting <= 1
    probes = proxy.waits
    assert 1 <= probes <= duration / RETRY_INTERVAL + 1, proxy.commands
    slow = [elapsed for _, elapsed, _ in results if elapsed >= TIMEOUT * 0.9]
    assert len(slow) <= probes
    assert len(results) > 4 * probes  # the others did not wait for the storage
    assert all(elapsed < 2 * TIMEOUT for _, elapsed, _ in results)
    if on_error == "open":
        assert {status for status, _, _ in results} == {200}
    else:
        assert {status for status, _, _ in results} == {503}
        assert all(int(retry_after) >= 1 for _, _, retry_after in results)


@pytest.mark.parametrize("fault", ["frozen", "killed"])
def test_fail_open_allows_exactly_each_process_share(redis_server, proxy, start_gateway, fault):
    # 50/minute shared by 5 processes: while Redis is down this process allows 10.
    gateway = start_gateway(RATELIMIT_STORAGE_URI=proxy.url, RATE_LIMIT_AUTH="50/minute",
                            RATELIMIT_PROCESSES="5")
    url = gateway.url + "/api/auth/x"
    avoid_window_edge()
    first = timed_get(url)[0]
    assert first.status_code == 200 and remaining(first) == 49  # counted in Redis
    if fault == "frozen":
        redis_server.freeze()
    else:
        redis_server.stop()

    def burst(_):
        client = session()
        return [timed_get(url, client)[0] for _ in range(3)]

    with ThreadPoolExecutor(10) as pool:
        responses = [r for batch in pool.map(burst, range(10)) for r in batch]
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    for response in responses:
        assert response.headers["RateLimit-Policy"] == '"auth";q=50;w=60'
        if response.status_code == 429:
            assert response.json()["error"]["code"] == 429
            assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert sorted(remaining(r) for r in responses if r.status_code == 200) == list(range(10))


def test_counting_returns_to_redis_after_sigcont(redis_server, proxy, start_gateway):
    gateway = start_gateway(RATELIMIT_STORAGE_URI=proxy.url, RATE_LIMIT_AUTH="100/minute",
                            RATELIMIT_PROCESSES="4")
    url = gateway.url + "/api/auth/x"
    avoid_window_edge(margin=15)
    client = session()
    assert remaining(timed_get(url, client)[0]) == 99
    redis_server.freeze()
    assert remaining(timed_get(url, client)[0]) == 24  # local share: 100 / 4
    redis_server.thaw()
    deadline = time.monotonic() + CLIENT_TIMEOUT
    left = None
    while time.monotonic() < deadline:
        left = remaining(timed_get(url, client)[0])
        if left > 30:  # a count from Redis again
            break
        time.sleep(0.1)
    # Redis kept the first hit (and may have run the probe sent while it was frozen).
    assert left is not None and 96 <= left <= 98
    proxy.reset()
    for expected in (left - 1, left - 2):
        assert remaining(timed_get(url, client)[0]) == expected  # every request counts there
    assert len(proxy.commands) >= 2


def test_restarted_redis_is_used_again_without_a_failed_request(redis_server, start_gateway):
    # A restart leaves every pooled connection dead: redis-py replaces a dead connection when
    # it takes it from the pool, so even with no retries no request fails over it.
    gateway = start_gateway(RATELIMIT_STORAGE_URI=redis_server.url,
                            RATE_LIMIT_AUTH="100/minute")
    url = gateway.url + "/api/auth/x"
    avoid_window_edge()
    with ThreadPoolExecutor(4) as pool:  # several pooled connections
        assert all(r.status_code == 200 for r, _ in pool.map(lambda _: timed_get(url), range(8)))
    redis_server.stop()
    with RedisServer(redis_server.executable, port=redis_server.port):
        time.sleep(0.2)
        client = session()
        counts = [remaining(timed_get(url, client)[0]) for _ in range(3)]
        assert counts == [99, 98, 97]  # a fresh server, a fresh count, no fallback


# -- the breaker, unit by unit, with a storage that fails and stalls on command -----------------

class FlakyStorage(MemoryStorage):
    """limits' memory storage that fails (``down``) or stalls until ``release`` is set
    (``stall``) on command, counting the calls that reach it."""

    def __init__(self) -> None:
        super().__init__("memory://")
        self.down = False
        self.stall = False
        self.release = threading.Event()
        self.calls = 0
        self.entered = threading.Event()

    def incr(self, *args, **kwargs):
        self.calls += 1
        self.entered.set()
        if self.stall:
            self.release.wait(CLIENT_TIMEOUT)
        if self.down:
            raise ConnectionError("storage down (test)")
        return super().incr(*args, **kwargs)


def breaker_app(storage, **kwargs):
    middleware = RateLimitMiddleware(hello, rules={"auth": "/api/auth 1000/minute"},
                                     strategy="fixed-window", storage=storage,
                                     retry_interval=0.2, **kwargs)
    return middleware, TestApp(LintMiddleware(middleware),
                               extra_environ={"REMOTE_ADDR": "198.51.100.7"})


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


@pytest.mark.parametrize("on_error, status", [("open", 200), ("closed", 503)])
def test_breaker_skips_the_storage_then_probes_and_closes(on_error, status):
    storage = FlakyStorage()
    middleware, app = breaker_app(storage, on_error=on_error)
    app.get("/api/auth")
    assert storage.calls == 1
    storage.down = True
    app.get("/api/auth", status=status)  # the failure that opens the breaker
    assert storage.calls == 2
    for _ in range(5):
        app.get("/api/auth", status=status)  # no storage call at all
    assert storage.calls == 2
    time.sleep(0.25)
    app.get("/api/auth", status=status)  # one probe, still down
    app.get("/api/auth", status=status)
    assert storage.calls == 3
    storage.down = False
    time.sleep(0.25)
    app.get("/api/auth")  # the probe succeeds: closed
    for _ in range(3):
        app.get("/api/auth")
    assert storage.calls == 7


def test_one_probe_at_a_time_and_the_others_do_not_wait():
    storage = FlakyStorage()
    middleware, app = breaker_app(storage)
    storage.down = True
    app.get("/api/auth")  # opens the breaker
    time.sleep(0.25)
    storage.stall, storage.entered = True, threading.Event()
    probe = threading.Thread(target=app.get, args=("/api/auth",))
    probe.start()
    try:
        assert storage.entered.wait(CLIENT_TIMEOUT)  # the probe is inside the storage
        time.sleep(0.25)  # past retry_interval: only the lock keeps the others out
        calls = storage.calls
        for _ in range(10):
            started = time.monotonic()
            app.get("/api/auth")
            assert time.monotonic() - started < CLIENT_TIMEOUT / 2  # did not wait for it
        assert storage.calls == calls
    finally:
        storage.release.set()
        probe.join(CLIENT_TIMEOUT)


def test_a_late_success_of_an_earlier_request_does_not_close_the_breaker():
    storage = FlakyStorage()
    middleware, app = breaker_app(storage)
    storage.stall = True
    early = threading.Thread(target=app.get, args=("/api/auth",))
    early.start()  # inside the storage, will succeed once released
    try:
        assert storage.entered.wait(CLIENT_TIMEOUT)
        storage.stall, storage.down = False, True
        app.get("/api/auth")  # fails: the breaker opens
        storage.down = False
    finally:
        storage.release.set()
        early.join(CLIENT_TIMEOUT)
    calls = storage.calls
    app.get("/api/auth")  # before retry_interval: the breaker is still open
    assert storage.calls == calls
    time.sleep(0.25)
    app.get("/api/auth")
    app.get("/api/auth")
    assert storage.calls == calls + 2  # the probe closed it
