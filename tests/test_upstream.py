"""Upstream pools: target syntax, balancing, ejection, retries, DNS, idle keep-alive recycling.

Units drive :class:`UpstreamPool` directly; everything about sockets runs against real
loopback upstreams (in this process, or child processes where one is killed) behind a real
waitress.
"""
from __future__ import annotations

import collections
import hashlib
import subprocess
import sys
import threading
import time

import pytest

from meetinity_gateway.assembly import load_pipeline
from meetinity_gateway.config import ConfigError
from meetinity_gateway.proxy.app import ProxyApp
from meetinity_gateway.proxy.bulkhead import UpstreamBusy, default_max_in_flight
from meetinity_gateway.proxy.targets import parse_targets
from meetinity_gateway.proxy.upstream import UpstreamPool, parse_failure_statuses
from tests.conftest import wait_until
from tests.servers import (
    ROOT,
    SHIPPED_INI,
    WaitressServer,
    free_port,
    session,
    wait_for_port,
)
from tests.upstream import Upstream


def served_by(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["upstream"]


# -- target syntax ----------------------------------------------------------------------------

def test_targets_with_weights_and_base_paths():
    specs = parse_targets("http://10.0.0.5:5001 weight=3, http://users.internal:5001/v1/\n"
                          "https://[::1]")
    assert [(s.host, s.port, s.weight, s.base_path, s.host_header) for s in specs] == [
        ("10.0.0.5", 5001, 3, "", "10.0.0.5:5001"),
        ("users.internal", 5001, 1, "/v1", "users.internal:5001"),
        ("::1", 443, 1, "", "[::1]"),
    ]
    assert [s.is_ip for s in specs] == [True, False, True]


@pytest.mark.parametrize("spec, reason", [
    ("", "no target"),
    (" , ", "no target"),
    ("ftp://a", r"must be http\(s\)://host"),
    ("http://a weight=0", "weight must be between 1 and 1000"),
    ("http://a weight=x", "unknown option 'weight=x'"),
    ("http://a wieght=2", "unknown option"),
    ("http://a?x=1", "must not have a query"),
    ("http://u:p@a", "must not hold credentials"),
    ("http://a:99999", "bad port"),
    ("http://a:1, http://a:1", "listed twice"),
])
def test_bad_target_specs_say_why(spec, reason):
    with pytest.raises(ValueError, match=reason):
        parse_targets(spec)


def write_ini(tmp_path, app_lines: str):
    path = tmp_path / "gw.ini"
    path.write_text(
        "[pipeline:main]\npipeline = errors gateway\n\n"
        "[filter:errors]\nuse = egg:meetinity_gateway#errors\n\n"
        "[app:gateway]\nuse = egg:meetinity_gateway#main\nroute.health = GET /health -> @health\n"
        + app_lines
    )
    return path


@pytest.mark.parametrize("lines, where", [
    ("upstream.a = http://127.0.0.1:1 weight=0\nroute.a = /a/* -> a\n",
     "upstream.a = 'http://127.0.0.1:1 weight=0': target"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\nbalance = random\n",
     "balance = 'random': expected one of round_robin, least_outstanding"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\nmax_fails = 0\n", "max_fails"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\nretries = -1\n", "retries"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\nreplay_size = lots\n",
     "replay_size"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\nhealth_interval = -1\n",
     "health_interval"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\nfailure_statuses = 404\n",
     "failure_statuses = '404': 404: only 5xx"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\nmax_eject_percent = 101\n",
     "max_eject_percent = '101': expected a percentage"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\nmax_in_flight = -2\n",
     "max_in_flight"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\neject_recheck = soon\n",
     "eject_recheck"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\nqueue_size = -1\n",
     "queue_size = '-1'"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\nqueue_size = many\n",
     "queue_size = 'many'"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\nqueue_timeout = -0.5\n",
     "queue_timeout = '-0.5'"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\nqueue_timeout = soon\n",
     "queue_timeout = 'soon'"),
    ("upstream.a = http://127.0.0.1:1\nroute.a = /a/* -> a\nserver_threads = 0\n",
     "server_threads"),
])
def test_bad_pool_settings_fail_at_start(tmp_path, lines, where):
    path = write_ini(tmp_path, lines)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert str(path) in str(info.value) and where in str(info.value)


# -- balancing and state, without sockets -------------------------------------------------------

def pool_of(spec: str, **options) -> UpstreamPool:
    return UpstreamPool(parse_targets(spec), name="svc", **options)


def test_weighted_round_robin_is_smooth_and_exact():
    pool = pool_of("http://127.0.0.1:1 weight=3, http://127.0.0.2:1")
    picks = []
    for _ in range(8):
        target = pool.acquire()
        picks.append(target.address)
        pool.done(target)
    assert picks.count("127.0.0.1") == 6 and picks.count("127.0.0.2") == 2
    # Smooth: the light target is not starved for 3 picks in a row twice.
    assert picks[:4].count("127.0.0.2") == 1


def test_balancing_is_exact_under_concurrent_threads():
    pool = pool_of("http://127.0.0.1:1 weight=2, http://127.0.0.2:1, http://127.0.0.3:1")
    counts = collections.Counter()
    lock = threading.Lock()

    def worker():
        for _ in range(400):
            target = pool.acquire()
            with lock:
                counts[target.address] += 1
            pool.done(target)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert counts == {"127.0.0.1": 1600, "127.0.0.2": 800, "127.0.0.3": 800}
    assert [row["outstanding"] for row in pool.snapshot()] == [0, 0, 0]


def test_least_outstanding_prefers_the_least_busy_target():
    pool = pool_of("http://127.0.0.1:1, http://127.0.0.2:1", balance="least_outstanding")
    first = pool.acquire()
    second = pool.acquire()
    assert {first.address, second.address} == {"127.0.0.1", "127.0.0.2"}
    pool.done(first)
    assert pool.acquire().address == first.address  # the other one is still busy


def test_a_success_resets_the_consecutive_failures():
    pool = pool_of("http://127.0.0.1:1", max_fails=2)
    target = pool.targets[0]
    for _ in range(5):
        pool.record(target, False)
        pool.record(target, True)
    assert pool.snapshot()[0]["state"] == "healthy"


# -- outlier ejection that cannot black-hole a service (fake clock, no sockets) -------------------

class FakeClock:
    """A clock the test moves by hand: the pool's state depends on nothing else."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def clocked_pool(spec: str, **options) -> tuple[UpstreamPool, FakeClock]:
    clock = FakeClock()
    options.setdefault("eject_recheck", 0)
    return pool_of(spec, clock=clock, **options), clock


def states(pool: UpstreamPool) -> list[str]:
    return [row["state"] for row in pool.snapshot()]


def test_answers_count_as_failures_only_where_configured():
    pool, _ = clocked_pool("http://127.0.0.1:1", max_fails=3)
    target = pool.targets[0]
    for status in (503, 503, 503, 502, 504, 500, 599):
        pool.answered(target, status)
    assert states(pool) == ["healthy"] and pool.snapshot()[0]["failures"] == 0
    strict, _ = clocked_pool("http://127.0.0.1:1, http://127.0.0.2:1", max_fails=3,
                             failure_statuses="502, 503")
    first = strict.targets[0]
    for status in (503, 502, 500):  # 500 is not configured: a success, the count restarts
        strict.answered(first, status)
    assert states(strict) == ["healthy", "healthy"]
    for status in (503, 502, 503):
        strict.answered(first, status)
    assert states(strict) == ["ejected", "healthy"]


@pytest.mark.parametrize("value, codes", [
    ("", set()), ("none", set()), ("502, 503 504", {502, 503, 504}),
    ("5xx", set(range(500, 600))), ([500, "503"], {500, 503}),
])
def test_failure_statuses_syntax(value, codes):
    assert parse_failure_statuses(value) == codes


@pytest.mark.parametrize("value, reason", [
    ("404", "only 5xx"), ("200", "only 5xx"), ("600", "only 5xx"), ("abc", "not a status"),
    ("4xx", "not a status"),
])
def test_failure_statuses_refuse_client_errors_and_junk(value, reason):
    with pytest.raises(ValueError, match=reason):
        parse_failure_statuses(value)


@pytest.mark.parametrize("count, percent, most", [
    (1, 50, 1), (2, 50, 1), (3, 50, 1), (4, 50, 2), (10, 50, 5), (10, 10, 1), (4, 100, 4),
    (3, 0, 0), (1, 0, 0),
])
def test_never_more_than_the_share_is_ejected(count, percent, most):
    spec = ", ".join(f"http://127.0.0.{i + 1}:1" for i in range(count))
    pool, _ = clocked_pool(spec, max_fails=1, max_eject_percent=percent)
    for target in pool.targets:
        pool.record(target, False)
    assert states(pool).count("ejected") == most
    # A target over the cap stays in rotation: every healthy one still gets requests.
    picked = set()
    for _ in range(count * 2):
        target = pool.acquire()
        picked.add(target.address)
        pool.done(target)
    expected = {t.address for t in pool.targets if not t.ejected} or {
        t.address for t in pool.targets}
    assert picked == expected


def test_every_target_ejected_routes_to_all_of_them():
    pool, _ = clocked_pool("http://127.0.0.1:1, http://127.0.0.2:1 weight=2", max_fails=1,
                           max_eject_percent=100, eject_time=30)
    for target in pool.targets:
        pool.record(target, False)
    assert states(pool) == ["ejected", "ejected"] and pool.degraded
    picks = collections.Counter()
    for _ in range(30):
        target = pool.acquire()  # never raises: panic routing
        picks[target.address] += 1
        pool.done(target)
    assert picks == {"127.0.0.1": 10, "127.0.0.2": 20}  # weights still hold
    assert pool.in_flight == 0


def test_a_pool_of_one_is_served_while_ejected_and_a_success_readmits_it():
    pool, clock = clocked_pool("http://127.0.0.1:1", max_fails=2, eject_time=30)
    target = pool.targets[0]
    pool.record(target, False)
    pool.record(target, False)
    assert states(pool) == ["ejected"]
    clock.advance(1)
    attempt = pool.acquire()
    began = clock()
    assert attempt is target
    pool.answered(target, 200, since=began)
    pool.done(target)
    assert states(pool) == ["healthy"] and not pool.degraded


def test_a_burst_of_failures_ejects_once():
    """Eight attempts in flight together, all failing: one ejection, not two or three."""
    pool, clock = clocked_pool("http://127.0.0.1:1", max_fails=3, eject_time=10)
    target = pool.targets[0]
    began = clock()
    attempts = [pool.acquire() for _ in range(8)]
    clock.advance(5)
    for attempt in attempts:
        pool.record(attempt, False, since=began)
        pool.done(attempt)
    row = pool.snapshot()[0]
    assert row["state"] == "ejected" and row["ejections"] == 1 and row["ejected_for"] == 10
    # Attempts started during the ejection (panic routing) fail too: spent as well.
    clock.advance(1)
    during = clock()
    for _ in range(5):
        pool.record(pool.acquire(), False, since=during)
        pool.done(target)
    assert pool.snapshot()[0]["ejections"] == 1
    # Ejection over (no re-checks here): back; late failures of the old attempts, and of
    # those started while it was ejected, do not count toward the next ejection.
    clock.advance(10)
    assert pool.acquire() is target and states(pool) == ["healthy"]
    pool.done(target)
    for since in (began, during, during):
        pool.record(target, False, since=since)
    assert states(pool) == ["healthy"] and pool.snapshot()[0]["failures"] == 0


def test_failures_while_ejected_neither_extend_nor_repeat_the_ejection():
    pool, clock = clocked_pool("http://127.0.0.1:1, http://127.0.0.2:1", max_fails=1,
                               max_eject_percent=100, eject_time=10)
    target = pool.targets[0]
    pool.record(target, False, since=clock())
    clock.advance(4)
    for _ in range(5):  # e.g. attempts of panic routing, or active checks
        pool.record(target, False, since=clock())
    row = pool.snapshot()[0]
    assert row["ejections"] == 1 and row["ejected_for"] == 6


def test_after_an_ejection_one_failure_does_not_eject_again_nor_double():
    pool, clock = clocked_pool("http://127.0.0.1:1, http://127.0.0.2:1", max_fails=3,
                               eject_time=10)
    target = pool.targets[0]
    for _ in range(3):
        pool.record(target, False, since=clock())
    assert pool.snapshot()[0]["ejected_for"] == 10
    clock.advance(10)
    pool.acquire()  # the ejection time is over: re-admitted as a whole
    pool.record(target, False, since=clock())  # the first request after it fails
    assert states(pool) == ["healthy", "healthy"]
    for _ in range(2):
        pool.record(target, False, since=clock())
    row = pool.snapshot()[0]
    # Ejected again soon after: the second step, 2 x eject_time (linear, at most 8x).
    assert row["state"] == "ejected" and row["ejections"] == 2 and row["ejected_for"] == 20
    for step in range(3, 12):
        clock.advance(row["ejected_for"])
        pool.acquire()
        for _ in range(3):
            pool.record(target, False, since=clock())
        row = pool.snapshot()[0]
        assert row["ejected_for"] == 10 * min(step, 8)
    # Healthy for 3 x eject_time takes three steps back.
    clock.advance(row["ejected_for"])
    pool.acquire()
    clock.advance(30)
    for _ in range(3):
        pool.record(target, False, since=clock())
    assert pool.snapshot()[0]["ejections"] == 11 - 3 + 1


def test_an_answer_to_an_old_attempt_does_not_readmit():
    pool, clock = clocked_pool("http://127.0.0.1:1, http://127.0.0.2:1", max_fails=1,
                               eject_time=10)
    target = pool.targets[0]
    began = clock()
    clock.advance(1)
    pool.record(target, False, since=clock())
    assert states(pool)[0] == "ejected"
    pool.answered(target, 200, since=began)  # slow answer to a request from before
    assert states(pool)[0] == "ejected"


def test_recheck_readmits_only_after_the_ejection_time_and_an_answer():
    pool, clock = clocked_pool("http://127.0.0.1:1, http://127.0.0.2:1", max_fails=1,
                               eject_time=10, eject_recheck=2)
    answers: list = []
    asked = []

    def ask(target, path=None, timeout=None):
        asked.append(target.address)
        return answers[0] if answers else None

    pool.ask = ask
    try:
        target = pool.targets[0]
        pool.record(target, False)
        assert pool.recheck() == 10 and asked == []  # not before the ejection time is over
        clock.advance(10)
        assert pool.recheck() == 2 and asked == ["127.0.0.1"]  # no answer: still out
        assert states(pool)[0] == "ejected" and pool.snapshot()[0]["ejected_for"] == 0
        for _ in range(5):  # a dead target gets no real request
            assert pool.acquire().address == "127.0.0.2"
            pool.done(pool.targets[1])
        answers.append(404)  # no /health route, but it answers: reachable
        assert pool.recheck() == 2 and len(asked) == 1  # asked again only after 2 s
        clock.advance(2)
        assert pool.recheck() is None and states(pool) == ["healthy", "healthy"]
        assert pool.targets[0].ejections == 1 and pool.snapshot()[0]["failures"] == 0
    finally:
        pool.close()


def test_recheck_with_active_health_needs_a_2xx_and_failure_statuses_count():
    pool, clock = clocked_pool("http://127.0.0.1:1, http://127.0.0.2:1", max_fails=1,
                               eject_time=1, eject_recheck=1, failure_statuses="503")
    answers = [503]
    pool.ask = lambda target, path=None, timeout=None: answers[0]
    try:
        pool.record(pool.targets[0], False)
        clock.advance(1)
        pool.recheck()
        assert states(pool)[0] == "ejected"  # 503 is configured as a failure
        answers[0] = 200
        clock.advance(1)
        pool.recheck()
        assert states(pool)[0] == "healthy"
    finally:
        pool.close()
    active, clock = clocked_pool("http://127.0.0.1:1, http://127.0.0.2:1", max_fails=1,
                                 eject_time=1, eject_recheck=1)
    active.health_interval = 60  # as if active checks were on (no thread needed here)
    active.ask = lambda target, path=None, timeout=None: answers[0]
    try:
        answers[0] = 404
        active.record(active.targets[0], False)
        clock.advance(1)
        active.recheck()
        assert states(active)[0] == "ejected"
    finally:
        active.close()


def test_concurrency_cap_refuses_at_once_and_counts():
    pool, _ = clocked_pool("http://127.0.0.1:1, http://127.0.0.2:1", max_in_flight=2)
    first, second = pool.acquire(), pool.acquire()
    with pytest.raises(UpstreamBusy) as info:
        pool.acquire()
    assert info.value.code == 503 and ("Retry-After", "1") in info.value.headers
    assert "svc" in info.value.message and pool.rejected == 1 and pool.in_flight == 2
    pool.done(first)
    third = pool.acquire()
    pool.done(second)
    pool.done(third)
    assert pool.in_flight == 0 and [row["outstanding"] for row in pool.snapshot()] == [0, 0]


def test_over_the_cap_a_request_waits_and_gets_the_next_slot():
    pool, _ = clocked_pool("http://127.0.0.1:1", max_in_flight=1, queue_size=2,
                           queue_timeout=30)
    first = pool.acquire()
    results: list = []

    def take():
        results.append(pool.acquire())

    waiter = threading.Thread(target=take, daemon=True)
    waiter.start()
    wait_until(lambda: pool.waiting == 1)
    assert results == [] and pool.in_flight == 1
    pool.done(first)  # handed over: the waiter has it, counted once
    waiter.join(10)
    assert results == [first] and pool.in_flight == 1 and pool.waiting == 0
    pool.done(results[0])
    assert pool.in_flight == 0 and pool.rejected == 0


def test_slots_are_handed_over_first_come_first_served_and_never_lost():
    pool, _ = clocked_pool("http://127.0.0.1:1", max_in_flight=2, queue_size=3,
                           queue_timeout=30)
    holders = [pool.acquire(), pool.acquire()]
    order: list[int] = []
    lock = threading.Lock()

    def take(number):
        target = pool.acquire()
        with lock:
            order.append(number)
        holders.append(target)

    threads = []
    for number in range(3):
        threads.append(threading.Thread(target=take, args=(number,), daemon=True))
        threads[-1].start()
        wait_until(lambda: pool.waiting == number + 1)
    # A newcomer while three wait: the queue is full, refused at once.
    with pytest.raises(UpstreamBusy) as info:
        pool.acquire()
    assert info.value.reason == "queue_full" and pool.rejected_by["queue_full"] == 1
    for step in range(3):
        pool.done(holders[step])
        wait_until(lambda: len(order) == step + 1)
        assert pool.in_flight == 2  # one out, one in: the cap is never exceeded
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2]
    for target in holders[3:]:
        pool.done(target)
    assert pool.in_flight == 0 and pool.waiting == 0


def test_a_wait_that_times_out_stalls_the_upstream_until_one_finishes():
    pool, _ = clocked_pool("http://127.0.0.1:1", max_in_flight=1, queue_size=4,
                           queue_timeout=0.05)
    hung = pool.acquire()
    with pytest.raises(UpstreamBusy) as info:
        pool.acquire()  # waits 0.05 s, nothing finishes
    assert info.value.reason == "queue_timeout" and "0.05 s" in info.value.message
    assert ("Retry-After", "1") in info.value.headers and info.value.code == 503
    # Stalled: no more waiting (each waiter would hold a server thread for nothing).
    for _ in range(3):
        with pytest.raises(UpstreamBusy) as info:
            pool.acquire()
        assert info.value.reason == "stalled"
    assert pool.rejected_by == {"queue_full": 0, "queue_timeout": 1, "stalled": 3}
    assert pool.rejected == 4 and pool.waiting == 0 and pool.in_flight == 1
    pool.done(hung)  # progress: the stall is over
    again = pool.acquire()
    pool.done(again)
    assert pool.in_flight == 0


def test_a_retry_never_waits_and_no_queue_means_refused_at_once():
    pool, _ = clocked_pool("http://127.0.0.1:1, http://127.0.0.2:1", max_in_flight=1,
                           queue_size=2, queue_timeout=30)
    first = pool.acquire()
    with pytest.raises(UpstreamBusy) as info:
        pool.acquire([first], wait=False)
    assert info.value.reason == "queue_full"
    pool.done(first)
    bare, _ = clocked_pool("http://127.0.0.1:1", max_in_flight=1)  # queue_size 0
    held = bare.acquire()
    with pytest.raises(UpstreamBusy) as info:
        bare.acquire()
    assert info.value.reason == "queue_full" and bare.queue_timeout == 0
    bare.done(held)


@pytest.mark.parametrize("kwargs", [{"queue_size": -1}, {"queue_timeout": -1}])
def test_bad_queue_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="queue_size and queue_timeout"):
        UpstreamPool(parse_targets("http://127.0.0.1:1"), max_in_flight=1, **kwargs)


def test_a_refused_start_response_gives_the_slot_back(upstream):
    app = ProxyApp(upstream.url, max_in_flight=1)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/echo", "SERVER_NAME": "gw",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http", "REMOTE_ADDR": "127.0.0.1"}

    def refusing(status, headers, exc_info=None):
        raise AssertionError("the server refuses these headers")

    try:
        for _ in range(3):
            with pytest.raises(AssertionError):
                app(dict(environ), refusing)
            assert app.pool.in_flight == 0
    finally:
        app.close()


@pytest.mark.parametrize("env, size, timeout", [
    ({"UPSTREAM_QUEUE_SIZE": "0"}, 0, 0), ({"UPSTREAM_QUEUE_TIMEOUT": "0"}, 0, 0),
    ({"UPSTREAM_QUEUE_SIZE": "5", "UPSTREAM_QUEUE_TIMEOUT": "2"}, 5, 2),
])
def test_shipped_ini_queue_knobs(monkeypatch, env, size, timeout):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pipeline = load_pipeline(SHIPPED_INI)
    pool = pipeline.router.endpoints["user_service"].pool
    try:
        assert (pool.queue_size, pool.queue_timeout) == (size, timeout)
    finally:
        pool.close()


@pytest.mark.parametrize("threads, cap", [
    (1, 1), (2, 1), (3, 1), (4, 2), (6, 4), (8, 6), (12, 9), (16, 12), (32, 24), (64, 48),
])
def test_default_cap_leaves_threads_free(threads, cap):
    assert default_max_in_flight(threads) == cap


@pytest.mark.parametrize("env, cap", [
    ({}, 6), ({"GATEWAY_THREADS": "4"}, 2), ({"GATEWAY_THREADS": "16"}, 12),
    ({"UPSTREAM_MAX_IN_FLIGHT": "3"}, 3), ({"UPSTREAM_MAX_IN_FLIGHT": "off"}, None),
])
def test_shipped_ini_derives_the_cap_from_the_threads(monkeypatch, env, cap):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pipeline = load_pipeline(SHIPPED_INI)
    pool = pipeline.router.endpoints["user_service"].pool
    threads = int(env.get("GATEWAY_THREADS", 8))
    try:
        assert pool.max_in_flight == cap
        # The queue takes the threads the cap leaves, for half a second at most.
        assert pool.queue_size == (threads - cap if cap else 0)
        assert pool.queue_timeout == (0.5 if cap else 0)
        assert pool.failure_statuses == frozenset() and pool.max_eject_percent == 50
        assert pool.eject_recheck == 1
    finally:
        pool.close()


# -- end to end: spread and weights through the shipped gateway ---------------------------------

@pytest.fixture
def three_upstreams():
    servers = [Upstream().start() for _ in range(3)]
    yield servers
    for server in servers:
        server.stop()


def test_even_spread_over_targets(gateway_factory, three_upstreams):
    gateway = gateway_factory(USER_SERVICE_URL=",".join(u.url for u in three_upstreams))
    client = session()
    counts = collections.Counter(
        served_by(client.get(gateway.url + "/api/auth/echo")) for _ in range(60)
    )
    assert set(counts) == {u.url for u in three_upstreams}
    assert all(18 <= count <= 22 for count in counts.values()), counts


def test_weights_are_honoured(gateway_factory, three_upstreams):
    heavy, light, _ = three_upstreams
    gateway = gateway_factory(USER_SERVICE_URL=f"{heavy.url} weight=3, {light.url}")
    client = session()
    counts = collections.Counter(
        served_by(client.get(gateway.url + "/api/auth/echo")) for _ in range(40)
    )
    assert 27 <= counts[heavy.url] <= 33 and counts[heavy.url] + counts[light.url] == 40


def test_host_header_is_the_configured_one(gateway_factory, upstream):
    gateway = gateway_factory(USER_SERVICE_URL=f"http://localhost:{upstream.port}",
                              UPSTREAM_DNS_INTERVAL="0")
    echo = session().get(gateway.url + "/api/auth/echo").json()
    assert [v for k, v in echo["headers"] if k.lower() == "host"] == [f"localhost:{upstream.port}"]


# -- killed target, retries, all down ----------------------------------------------------------

class UpstreamProcess:
    """``python -m tests.upstream`` in a child process, so it can really die."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.upstream", "--port", str(self.port)],
            cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port, timeout=15, process=self.process)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def test_killed_target_is_ejected_and_rejoins(gateway_factory):
    processes = [UpstreamProcess() for _ in range(3)]
    try:
        gateway = gateway_factory(
            USER_SERVICE_URL=",".join(p.url for p in processes),
            UPSTREAM_MAX_FAILS="2", UPSTREAM_EJECT_TIME="0.5",
        )
        client = session()
        for _ in range(6):
            served_by(client.post(gateway.url + "/api/auth/echo", data=b"x"))
        victim = processes[1]
        victim.kill()
        # Steady traffic: POSTs too, since a connect failure (nothing sent) is retried.
        results = [client.post(gateway.url + "/api/auth/echo", data=b"x") for _ in range(30)]
        errors = [r for r in results if r.status_code != 200]
        assert len(errors) <= 2, [r.text for r in errors]
        tail = [served_by(r) for r in results[-20:]]
        assert all(r.status_code == 200 for r in results[-20:])
        assert victim.url not in tail
        rows = {row["target"]: row for row in
                client.get(gateway.url + "/health").json()["targets"]["user_service"]}
        assert rows[victim.url]["state"] == "ejected"
        assert rows[victim.url]["probe"] == "down"

        processes[1] = UpstreamProcess(victim.port)  # back, on the same address

        def rejoined():
            return served_by(client.get(gateway.url + "/api/auth/echo")) == victim.url

        wait_until(rejoined, timeout=10)

        def all_healthy():  # /health reuses its report for a second
            health = client.get(gateway.url + "/health").json()
            return [row["state"] for row in health["targets"]["user_service"]] == [
                "healthy"] * 3

        wait_until(all_healthy, timeout=5)
    finally:
        for process in processes:
            process.kill()


def test_post_that_reached_a_dying_target_is_not_retried(gateway_factory):
    with Upstream() as first, Upstream() as second:
        gateway = gateway_factory(USER_SERVICE_URL=f"{first.url},{second.url}")
        response = session().post(gateway.url + "/api/auth/die", data=b"payload")
        assert response.status_code == 502
        assert response.json()["error"]["code"] == 502
        hits = [r for u in (first, second) for r in u.requests if r[1].endswith("/die")]
        assert len(hits) == 1


def test_get_and_small_put_are_retried_on_another_target(gateway_factory):
    with Upstream() as dying, Upstream() as healthy:
        healthy.dies = False
        gateway = gateway_factory(USER_SERVICE_URL=f"{dying.url},{healthy.url}",
                                  UPSTREAM_MAX_FAILS="100")
        client = session()
        for _ in range(3):
            assert served_by(client.get(gateway.url + "/api/auth/die")) == healthy.url
        body = b"replayable " * 100
        echo = client.put(gateway.url + "/api/auth/die", data=body)
        assert served_by(echo) == healthy.url
        assert echo.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert any(r[1].endswith("/die") for r in dying.requests)


def test_put_too_big_to_replay_is_not_retried(gateway_factory):
    with Upstream() as dying, Upstream() as healthy:
        healthy.dies = False
        gateway = gateway_factory(USER_SERVICE_URL=f"{dying.url},{healthy.url}",
                                  UPSTREAM_REPLAY_SIZE="1k")
        response = session().put(gateway.url + "/api/auth/die", data=b"x" * 2048)
        # Round-robin starts with the first target, which reads the body and dies.
        assert response.status_code == 502
        assert len(dying.requests) == 1 and healthy.requests == []


def test_all_targets_down_is_still_tried_never_503(gateway_factory):
    """Every target ejected: panic routing tries them anyway (a dead one costs a 502, which
    is the truth), instead of a 503 "no healthy target" that would outlive its recovery."""
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    gateway = gateway_factory(USER_SERVICE_URL=",".join(dead), UPSTREAM_MAX_FAILS="1",
                              UPSTREAM_EJECT_TIME="30", UPSTREAM_MAX_EJECT_PERCENT="100")
    client = session()
    for _ in range(3):
        response = client.get(gateway.url + "/api/auth/echo")
        assert response.status_code == 502, response.text
        assert response.json()["error"]["code"] == 502
    health = client.get(gateway.url + "/health").json()
    assert health["upstreams"] == {"user_service": "down"}
    assert [row["state"] for row in health["targets"]["user_service"]] == ["ejected"] * 2


def test_failure_isolation_between_upstreams(tmp_path, upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    path = write_ini(tmp_path, (
        f"upstream.good = {upstream.url}\nupstream.bad = {dead}\n"
        "route.good = /good/* -> good /g\nroute.bad = /bad/* -> bad /b\n"
        "max_fails = 1\neject_time = 30\n"
    ))
    pipeline = load_pipeline(path)
    with WaitressServer(pipeline.app) as server:
        client = session()
        assert client.get(server.url + "/bad/x").status_code == 502
        assert client.get(server.url + "/bad/x").status_code == 502  # panic: tried anyway
        for _ in range(5):
            assert client.get(server.url + "/good/x").status_code == 200
        health = client.get(server.url + "/health").json()
    assert health["upstreams"] == {"good": "up", "bad": "down"}
    assert health["targets"]["good"][0]["state"] == "healthy"
    assert health["targets"]["bad"][0]["state"] == "ejected"


def test_health_reports_each_target(gateway_factory, upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = gateway_factory(USER_SERVICE_URL=f"{upstream.url}, {dead} weight=2")
    response = session().get(gateway.url + "/health")
    assert response.status_code == 200  # one target up: the upstream can be served
    payload = response.json()
    assert payload["upstreams"] == {"user_service": "up"}
    rows = payload["targets"]["user_service"]
    assert [(r["target"], r["weight"], r["probe"]) for r in rows] == [
        (upstream.url, 1, "up"), (dead, 2, "down")]


# -- DNS re-resolution with a resolver hook ----------------------------------------------------

def two_loopback_upstreams_on_one_port():
    """Upstreams on 127.0.0.1:P and 127.0.0.2:P (the name's two addresses)."""
    for _ in range(10):
        port = free_port()
        try:
            first = Upstream("127.0.0.1", port)
        except OSError:
            continue
        try:
            second = Upstream("127.0.0.2", port)
        except OSError as exc:
            first.stop()
            if exc.errno in (49, 99, 10049):  # no 127.0.0.2 here (macOS, some Windows)
                pytest.skip("127.0.0.2 is not a usable loopback address on this system")
            continue
        return port, first.start(), second.start()
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


def test_dns_re_resolution_follows_the_resolver():
    port, first, second = two_loopback_upstreams_on_one_port()
    answers = {"users.internal": ["127.0.0.1"]}
    asked = []

    def resolve(host, asked_port):
        asked.append((host, asked_port))
        if host not in answers:
            raise OSError("no such host")
        return list(answers[host])

    app = ProxyApp(f"http://users.internal:{port}", name="users", resolver=resolve,
                   dns_interval=0.1)
    try:
        with WaitressServer(app) as server:
            client = session()
            echo = client.get(server.url + "/echo").json()
            assert echo["upstream"] == first.url
            assert [v for k, v in echo["headers"] if k.lower() == "host"] == [
                f"users.internal:{port}"]
            answers["users.internal"] = ["127.0.0.1", "127.0.0.2"]
            wait_until(lambda: len(app.pool.targets) == 2)
            seen = {served_by(client.get(server.url + "/echo")) for _ in range(6)}
            assert seen == {first.url, second.url}
            answers["users.internal"] = ["127.0.0.2"]
            wait_until(lambda: [t.address for t in app.pool.targets] == ["127.0.0.2"])
            assert {served_by(client.get(server.url + "/echo")) for _ in range(4)} == {
                second.url}
            del answers["users.internal"]  # DNS failing: the last good answer stays
            count = len(asked)
            wait_until(lambda: len(asked) > count + 1)
            assert served_by(client.get(server.url + "/echo")) == second.url
    finally:
        app.close()
        first.stop()
        second.stop()
    assert asked[0] == ("users.internal", port)
    assert not app.pool._thread.is_alive()  # close() stops the background thread


# -- active health checks ---------------------------------------------------------------------

def test_active_health_ejects_and_readmits_without_traffic():
    with Upstream() as sick, Upstream() as well:
        app = ProxyApp(f"{sick.url},{well.url}", name="svc", health_interval=0.1,
                       max_fails=1, eject_time=0.3, eject_recheck=0.1)
        try:
            sick.health_status = 500
            wait_until(lambda: app.pool.snapshot()[0]["state"] == "ejected")
            with WaitressServer(app) as server:
                client = session()
                assert {served_by(client.get(server.url + "/echo")) for _ in range(4)} == {
                    well.url}
                sick.health_status = 200
                wait_until(lambda: app.pool.snapshot()[0]["state"] == "healthy")
                assert {served_by(client.get(server.url + "/echo")) for _ in range(4)} == {
                    well.url, sick.url}
        finally:
            app.close()
        assert not app.pool._thread.is_alive()


# -- keep-alive connections: idle ones are not reused ----------------------------------------

def test_idle_connection_is_recycled_before_the_upstream_drops_it():
    with Upstream(idle_close=0.4) as upstream:
        recycling = ProxyApp(upstream.url, idle_timeout=0.2)
        reusing = ProxyApp(upstream.url, idle_timeout=30)
        try:
            with WaitressServer(recycling) as fresh, WaitressServer(reusing) as stale:
                client = session()
                for server in (fresh, stale):
                    assert client.post(server.url + "/echo", data=b"1").status_code == 200
                time.sleep(0.6)
                # A new connection: the upstream answers.
                assert client.post(fresh.url + "/echo", data=b"2").status_code == 200
                # The old connection, dropped by the upstream as the POST arrives: a 502
                # the gateway cannot retry (the POST may have been processed).
                assert client.post(stale.url + "/echo", data=b"2").status_code == 502
        finally:
            recycling.close()
            reusing.close()
    assert upstream.connections == 3
