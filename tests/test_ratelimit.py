"""Rate limiting: rules, keys, headers, strategies, config errors; Redis end to end."""
from __future__ import annotations

import json
import logging
import re
import threading
import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from limits.storage import MemoryStorage
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

from meetinity_gateway.assembly import load_pipeline
from meetinity_gateway.config import ConfigError
from meetinity_gateway.middleware.ratelimit import (
    RATELIMIT_KEY,
    RateLimitMiddleware,
    filter_factory,
    parse_limits,
    parse_rule,
)
from tests.conftest import require_tool
from tests.redisserver import RedisServer, SilentServer
from tests.servers import SHIPPED_INI, TEST_JWT_SECRET, GatewayProcess, free_port, session

CLIENT_TIMEOUT = 5  # seconds: a hang check, far above the storage timeouts configured here


def hello(environ, start_response):
    body = json.dumps({"path": environ["PATH_INFO"],
                       "ratelimit": environ.get(RATELIMIT_KEY)}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def app_with(**kwargs) -> TestApp:
    kwargs.setdefault("rules", {"auth": "/api/auth 3/minute"})
    return TestApp(LintMiddleware(RateLimitMiddleware(hello, **kwargs)),
                   extra_environ={"REMOTE_ADDR": "198.51.100.7"})


def ratelimit_of(response) -> tuple[str, int, int]:
    """``RateLimit: "name";r=R;t=T`` → (name, R, T)."""
    match = re.fullmatch(r'"([^"]+)";r=(\d+);t=(\d+)', response.headers["RateLimit"])
    assert match, response.headers["RateLimit"]
    return match.group(1), int(match.group(2)), int(match.group(3))


def avoid_window_edge(window: int, margin: float = 3.0) -> None:
    """Counters' windows are aligned on multiples of ``window`` since the epoch: start a
    short exact-count test away from an edge, so no count rolls into the next window."""
    left = window - time.time() % window
    if left < margin:
        time.sleep(left + 0.05)


# -- rules ----------------------------------------------------------------------------------

def test_parse_rule_reads_methods_prefix_and_several_limits():
    rule = parse_rule("login", "post, get /api/auth/login/* 100/hour; 10/minute")
    assert rule.methods == {"POST", "GET", "HEAD"}
    assert rule.prefix == "/api/auth/login"
    assert [item.get_expiry() for item in rule.limits] == [60, 3600]  # shortest first
    assert rule.policy_names() == ["login-60s", "login-3600s"]
    assert parse_rule("any", "/api 5 per 10 seconds").methods is None
    assert parse_rule("off", "/api off").limits == ()
    assert parse_rule("empty", "/api").limits == ()


@pytest.mark.parametrize("spec, reason", [
    ("api/auth 10/minute", "expected"),
    ("/api/auth lots", "limits notation"),
    ("/api/auth 10/fortnight", "limits notation"),
    ("/api/auth 0/minute", "at least 1"),
    ("/api/auth 10/minute; 20 per 60 seconds", "same 60s window"),
    ("/api/../auth 10/minute", "dot-segment"),
    ("/api//auth 10/minute", "not a path prefix"),
])
def test_parse_rule_rejects_bad_specs(spec, reason):
    with pytest.raises(ValueError, match=reason):
        parse_rule("r", spec)


def test_bad_rule_name_is_refused():
    with pytest.raises(ValueError, match="rule name"):
        parse_rule('a"b', "/api 1/minute")
    assert parse_limits("off") == ()


def test_prefix_matches_on_segment_boundaries():
    app = app_with(rules={"auth": "/api/auth 1/minute"})
    assert ratelimit_of(app.get("/api/auth"))[:2] == ("auth", 0)
    app.get("/api/auth/login", status=429)  # same budget below the prefix
    other = app.get("/api/authX")
    assert "RateLimit" not in other.headers and "RateLimit-Policy" not in other.headers
    assert other.json["ratelimit"] is None


def test_longest_prefix_and_method_specific_rule_win():
    app = app_with(rules={
        "api": "/api 100/minute",
        "auth": "/api/auth 50/minute",
        "login": "POST /api/auth/login 2/minute",
    })
    assert ratelimit_of(app.get("/api/users/7"))[0] == "api"
    assert ratelimit_of(app.get("/api/auth/refresh"))[0] == "auth"
    assert ratelimit_of(app.get("/api/auth/login"))[0] == "auth"  # GET: not the POST rule
    assert ratelimit_of(app.post("/api/auth/login"))[0] == "login"
    assert app.post("/api/auth/login").status_int == 200
    app.post("/api/auth/login", status=429)
    # Other methods and rules keep their own budgets.
    assert app.get("/api/auth/login").status_int == 200


def test_get_rule_covers_head():
    app = app_with(rules={"read": "GET /api 1/minute"})
    app.head("/api/x")
    app.get("/api/x", status=429)
    assert "RateLimit" not in app.post("/api/x").headers


def test_default_applies_only_where_no_rule_does():
    app = app_with(rules={"auth": "/api/auth 5/minute"}, default="2/minute")
    assert ratelimit_of(app.get("/health"))[0] == "default"
    assert ratelimit_of(app.get("/api/users"))[0] == "default"
    app.get("/anything", status=429)
    assert app.get("/api/auth/login").status_int == 200  # its own rule, its own budget
    # Without a default, uncovered paths pass untouched.
    assert "RateLimit" not in app_with(default="off").get("/health").headers


def test_disabled_rule_lets_its_prefix_fall_back():
    app = app_with(rules={"auth": "/api/auth off"}, default="1/minute")
    assert ratelimit_of(app.get("/api/auth/login"))[0] == "default"


def test_conflicting_method_rules_are_a_config_error():
    with pytest.raises(ConfigError, match="both cover"):
        RateLimitMiddleware(hello, rules={"a": "POST /api 1/minute", "b": "POST /api 2/minute"})


# -- answers and headers --------------------------------------------------------------------

# webtest's lint does not know that a HEAD answer keeps the GET's Content-Length.
@pytest.mark.filterwarnings("ignore:Content-Length and the number of bytes")
def test_quota_then_429_with_headers_in_the_json_shape():
    app = app_with()
    for remaining in (2, 1, 0):
        response = app.get("/api/auth/login")
        assert response.headers["RateLimit-Policy"] == '"auth";q=3;w=60'
        name, r, t = ratelimit_of(response)
        assert (name, r) == ("auth", remaining) and 0 <= t <= 60
    refused = app.get("/api/auth/login", status=429, headers={"X-Request-ID": "abc-1"})
    assert refused.content_type == "application/json"
    assert refused.json == {"error": {"code": 429, "message": "too many requests",
                                      "request_id": "abc-1"}}
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["RateLimit-Policy"] == '"auth";q=3;w=60'
    assert ratelimit_of(refused)[1] == 0
    # HEAD gets the same answer without a body.
    head = app.head("/api/auth/login", status=429)
    assert head.body == b"" and "Retry-After" in head.headers


def test_several_limits_report_the_most_restrictive():
    app = app_with(rules={"auth": "/api/auth 5/minute; 3/hour"})
    response = app.get("/api/auth")
    assert response.headers["RateLimit-Policy"] == (
        '"auth-60s";q=5;w=60, "auth-3600s";q=3;w=3600')
    assert ratelimit_of(response)[:2] == ("auth-3600s", 2)  # 2 left of 3 < 4 left of 5
    app.get("/api/auth")
    app.get("/api/auth")
    refused = app.get("/api/auth", status=429)
    assert ratelimit_of(refused)[:2] == ("auth-3600s", 0)
    # The hour's budget decides, not the minute's: with a sliding window counter one request
    # comes back when the hour's fixed window rolls over (its count then weighs < 3), so the
    # wait is until that boundary, or more than the minute when the boundary is further off.
    to_boundary = 3600 - time.time() % 3600
    assert int(refused.headers["Retry-After"]) >= min(61, math.floor(to_boundary))


def test_legacy_headers_only_when_asked():
    assert "X-RateLimit-Limit" not in app_with().get("/api/auth").headers
    app = app_with(legacy_headers=True)
    response = app.get("/api/auth")
    assert response.headers["X-RateLimit-Limit"] == "3"
    assert response.headers["X-RateLimit-Remaining"] == "2"
    reset = int(response.headers["X-RateLimit-Reset"])
    assert time.time() - 1 <= reset <= time.time() + 61  # Unix time, not a delta


def test_wrapped_apps_own_ratelimit_headers_are_replaced():
    def chatty(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2"),
                                  ("RateLimit", '"upstream";r=999;t=1'),
                                  ("ratelimit-policy", '"upstream";q=999;w=1')])
        return [b"ok"]

    app = TestApp(LintMiddleware(RateLimitMiddleware(chatty, rules={"a": "/ 3/minute"})))
    response = app.get("/x", extra_environ={"REMOTE_ADDR": "192.0.2.1"})
    assert len(response.headers.getall("RateLimit")) == 1
    assert ratelimit_of(response)[:2] == ("a", 2)
    assert response.headers.getall("RateLimit-Policy") == ['"a";q=3;w=60']


def test_cors_preflight_is_not_counted():
    app = app_with(rules={"auth": "/api/auth 1/minute"})
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    for _ in range(3):
        response = app.options("/api/auth/login", headers=preflight)
        assert "RateLimit" not in response.headers
    app.post("/api/auth/login")
    # A plain OPTIONS is an ordinary request, counted as such.
    app.options("/api/auth/login", status=429)


@pytest.mark.parametrize("extra", [
    {"Content-Length": "5"},
    {"Transfer-Encoding": "chunked"},
    {"X-HTTP-Method-Override": "DELETE"},
    {"X-Method-Override": "POST"},
    {"Access-Control-Request-Method": "P O S T"},
])
def test_a_preflight_shaped_request_that_is_not_one_is_counted(extra):
    # The one definition of a preflight (preflight.py): with a body, a method override or a
    # malformed requested method, an OPTIONS is an ordinary request, counted like any other.
    app = app_with(rules={"auth": "/api/auth 1/minute"})
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    headers.update(extra)
    body = b"hello" if "Content-Length" in extra else b""
    environ = {"REMOTE_ADDR": "192.0.2.9"}
    if "Transfer-Encoding" in extra:
        environ["wsgi.input_terminated"] = True
    first = app.request("/api/auth/login", method="OPTIONS", headers=headers, body=body,
                        environ=environ)
    assert "RateLimit" in first.headers
    app.request("/api/auth/login", method="OPTIONS", headers=headers, body=body,
                environ=environ, status=429)


# -- who is counted -------------------------------------------------------------------------

def test_clients_are_counted_by_address():
    app = app_with(rules={"auth": "/api/auth 1/minute"})
    app.get("/api/auth", extra_environ={"REMOTE_ADDR": "192.0.2.1"})
    app.get("/api/auth", extra_environ={"REMOTE_ADDR": "192.0.2.1"}, status=429)
    app.get("/api/auth", extra_environ={"REMOTE_ADDR": "192.0.2.2"})
    app.get("/api/auth", extra_environ={"REMOTE_ADDR": "2001:db8::1"})


def test_forwarded_for_is_ignored_without_trusted_proxies():
    app = app_with(rules={"auth": "/api/auth 2/minute"})
    for n in range(2):
        app.get("/api/auth", headers={"X-Forwarded-For": f"203.0.113.{n}"})
    app.get("/api/auth", headers={"X-Forwarded-For": "203.0.113.99"}, status=429)


def test_forwarded_for_counts_clients_behind_trusted_proxies():
    app = app_with(rules={"auth": "/api/auth 1/minute"}, trusted_proxies=1)
    app.get("/api/auth", headers={"X-Forwarded-For": "203.0.113.1"})
    app.get("/api/auth", headers={"X-Forwarded-For": "203.0.113.2"})
    # A forged entry in front of the one our proxy appended changes nothing.
    app.get("/api/auth", headers={"X-Forwarded-For": "10.9.9.9, 203.0.113.1"}, status=429)


def test_key_header_counts_by_hashed_value_then_by_address():
    storage = MemoryStorage()
    app = app_with(rules={"api": "/api 1/minute"}, key_header="X-API-Key", storage=storage)
    app.get("/api/x", headers={"X-API-Key": "secret/key-A"})
    app.get("/api/x", headers={"X-API-Key": "secret/key-A"},
            extra_environ={"REMOTE_ADDR": "192.0.2.9"}, status=429)  # same key, other address
    app.get("/api/x", headers={"X-API-Key": "secret/key-B"})
    app.get("/api/x")  # no key: the address
    app.get("/api/x", status=429)
    keys = list(storage.storage) + list(storage.events)
    assert keys and not any("secret" in key for key in keys)


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
def test_counters_keep_their_storage_names(strategy):
    """The counters are named as limits names them from (our namespace, the instance's
    namespace, the rule, the caller): a shared storage (Redis) keeps every budget across a
    gateway upgrade; the local fallback's counters are named apart."""
    storage = MemoryStorage()
    limits = parse_limits("5/minute")
    app = app_with(rules={"auth": "/api/auth 5/minute"}, storage=storage, strategy=strategy,
                   namespace="edge")
    app.get("/api/auth")
    expected = limits[0].key_for("meetinity_gateway", "edge", "auth", "addr:198.51.100.7")
    assert expected.endswith("meetinity_gateway/edge/auth/addr:198.51.100.7/5/1/minute")
    keys = list(storage.storage) + list(storage.events)
    assert keys and all(key == expected or key.startswith(expected + "/") for key in keys), keys


def test_memory_storage_calls_no_exception_wrappers_yet_counts():
    """The memory storage's methods run unwrapped (limits re-wraps them per subclass), and the
    budget still holds under concurrent requests."""
    from meetinity_gateway.ratestore import SweptMemoryStorage as _SweptMemoryStorage

    storage = _SweptMemoryStorage("memory://")
    for name in ("get", "incr", "acquire_sliding_window_entry", "get_sliding_window",
                 "acquire_entry", "get_moving_window"):
        assert not hasattr(getattr(type(storage), name), "__wrapped__"), name
    app = app_with(rules={"auth": "/api/auth 20/minute"}, storage=storage)
    avoid_window_edge(60)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(
            lambda _: app.get("/api/auth", expect_errors=True).status_int, range(40)))
    assert statuses.count(200) == 20 and statuses.count(429) == 20


# -- strategies and concurrency -------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
def test_every_strategy_enforces_the_quota(strategy):
    avoid_window_edge(60)
    app = app_with(rules={"auth": "/api/auth 4/minute"}, strategy=strategy)
    statuses = [app.get("/api/auth", expect_errors=True).status_int for _ in range(6)]
    assert statuses == [200] * 4 + [429] * 2


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
def test_concurrent_hits_never_over_admit(strategy):
    middleware = RateLimitMiddleware(hello, rules={"auth": "/api/auth 37/day"},
                                     strategy=strategy)
    avoid_window_edge(86400)

    def burst(_):
        client = Client(middleware)
        return [client.get("/api/auth", environ_base={"REMOTE_ADDR": "192.0.2.5"}).status_code
                for _ in range(5)]

    with ThreadPoolExecutor(20) as pool:
        statuses = [s for batch in pool.map(burst, range(20)) for s in batch]
    assert statuses.count(200) == 37
    assert statuses.count(429) == 100 - 37


# -- storage failures -----------------------------------------------------------------------

def test_storage_down_fails_open_to_a_local_count_with_one_warning(caplog):
    pytest.importorskip("redis")
    url = f"redis://:pw-secret@127.0.0.1:{free_port()}/0"  # nothing listens there
    avoid_window_edge(60)
    app = app_with(storage_uri=url, retry_interval=0.01, warn_interval=3600)
    with caplog.at_level(logging.WARNING, logger="meetinity_gateway.ratelimit"):
        for remaining in (2, 1, 0):
            response = app.get("/api/auth")
            assert response.headers["RateLimit-Policy"] == '"auth";q=3;w=60'
            assert ratelimit_of(response)[:2] == ("auth", remaining)  # the local count
            assert response.json["ratelimit"]["storage_failed"] is True
            time.sleep(0.02)  # past retry_interval: the storage is probed again each time
        refused = app.get("/api/auth", status=429)  # not unlimited: one process' share
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
    warnings = [r for r in caplog.records if r.name == "meetinity_gateway.ratelimit"]
    assert len(warnings) == 1 and "failing open" in warnings[0].getMessage()
    assert "pw-secret" not in warnings[0].getMessage()  # the password is masked


def test_storage_down_fails_closed_with_503():
    pytest.importorskip("redis")
    url = f"redis://127.0.0.1:{free_port()}/0"
    app = app_with(storage_uri=url, on_error="closed", retry_interval=2)
    for _ in range(2):
        response = app.get("/api/auth", status=503)
        assert response.json["error"]["code"] == 503
        assert response.headers["Retry-After"] == "2"
    assert app.get("/health").status_int == 200  # unlimited paths never touch the storage


# -- configuration --------------------------------------------------------------------------

@pytest.mark.parametrize("conf, key", [
    ({"rule.auth": "/api/auth lots"}, "rule.auth"),
    ({"rule.auth": "/api/auth ${RATE_LIMIT_AUTH:-10/minutes/ever}"}, "rule.auth"),
    ({"rule.a b": "/api 1/minute"}, "rule.a b"),
    ({"default": "ten"}, "default"),
    ({"strategy": "token-bucket"}, "strategy"),
    ({"on_error": "maybe"}, "on_error"),
    ({"storage_uri": "nosuch://x"}, "storage_uri"),
    ({"storage_uri": "memory"}, "storage_uri"),
    ({"storage_timeout": "0"}, "storage_timeout"),
    ({"legacy_headers": "perhaps"}, "legacy_headers"),
    ({"trusted_proxies": "-1"}, "trusted_proxies"),
    ({"rules": "/api 1/minute"}, "rules"),
])
def test_filter_factory_rejects_bad_settings_at_start(conf, key):
    with pytest.raises(ConfigError) as info:
        filter_factory({"__file__": "gateway.ini"}, **conf)(hello)
    assert info.value.key == key
    assert "gateway.ini" in str(info.value)


def test_a_rule_needing_an_unset_variable_names_its_key_and_file(monkeypatch):
    monkeypatch.delenv("RATE_LIMIT_NOT_SET", raising=False)
    with pytest.raises(ConfigError) as info:
        filter_factory({"__file__": "gateway.ini"}, **{"rule.auth": "${RATE_LIMIT_NOT_SET}"})
    assert info.value.key == "rule.auth"
    assert "gateway.ini" in str(info.value) and "RATE_LIMIT_NOT_SET" in str(info.value)


def test_filter_factory_builds_a_working_middleware():
    make = filter_factory({}, **{"rule.auth": "POST /api/auth 1/minute; 5/hour",
                                 "default": "off", "strategy": "moving-window",
                                 "storage_uri": "memory://", "on_error": "closed",
                                 "legacy_headers": "yes", "key_header": "",
                                 "trusted_proxies": "1"})
    middleware = make(hello)
    assert middleware.describe() == ["auth: POST /api/auth 1 per 1 minute; 5 per 1 hour"]
    app = TestApp(LintMiddleware(middleware), extra_environ={"REMOTE_ADDR": "192.0.2.1"})
    assert app.post("/api/auth").headers["X-RateLimit-Limit"] == "1"
    app.post("/api/auth", status=429)


def test_shipped_ini_fails_at_start_on_a_bad_limit(monkeypatch):
    monkeypatch.setenv("RATE_LIMIT_AUTH", "lots/minute")
    with pytest.raises(ConfigError) as info:
        load_pipeline(SHIPPED_INI)
    message = str(info.value)
    assert "[filter:ratelimit]" in message and "rule.auth" in message and "lots" in message


def test_shipped_ini_limits_auth_per_address_and_services_per_user(monkeypatch):
    monkeypatch.setenv("JWT_SECRET", TEST_JWT_SECRET)
    pipeline = load_pipeline(SHIPPED_INI)
    layers = []
    layer = pipeline.app
    while hasattr(layer, "app"):
        if isinstance(layer, RateLimitMiddleware):
            layers.append(layer)
        layer = layer.app
    by_address, by_user = layers
    # One login is 4 auth calls: 60/minute lets 15 logins a minute through one address.
    # Session checks (every app start, a venue behind one address) are not logins.
    assert by_address.describe() == [
        "auth: * /api/auth 60 per 1 minute",
        "auth_session: * /api/auth/profile, /api/auth/verify 600 per 1 minute",
    ]
    assert by_address.rule_for("GET", "/api/auth/profile").name == "auth_session"
    assert by_address.rule_for("POST", "/api/auth/google").name == "auth"
    assert (by_address.claim, by_address.namespace) == (None, "ratelimit")
    assert by_address.rule_for("GET", "/api/users/1") is None
    assert (by_user.claim, by_user.namespace) == ("sub", "userlimit")
    assert by_user.describe() == [
        "users: * /api/users 300 per 1 minute",
        "events: * /api/events, /api/event-categories, /api/event-tags, /api/event-series, "
        "/api/event-templates, /api/search, /api/check-in, /events 300 per 1 minute",
        "matching: * /api/matching 120 per 1 minute",
        "messaging: * /api/conversations, /conversations 300 per 1 minute",
    ]
    assert by_user.rule_for("GET", "/api/auth/login") is None


# -- end to end: waitress, Redis, several processes -----------------------------------------

@pytest.fixture
def redis_server():
    pytest.importorskip("redis")
    with RedisServer(require_tool("redis-server", "rate limits shared through Redis")) as srv:
        yield srv


def _get(url: str, client=None, **kwargs):
    client = client or session()
    return client.get(url, timeout=CLIENT_TIMEOUT, **kwargs)


def test_two_gateway_processes_share_one_budget_through_redis(redis_server, upstream):
    env = {"RATELIMIT_STORAGE_URI": redis_server.url, "RATE_LIMIT_AUTH": "5/minute",
           "USER_SERVICE_URL": upstream.url, "JWT_SECRET": TEST_JWT_SECRET}
    with GatewayProcess(env=env) as first, GatewayProcess(env=env) as second:
        avoid_window_edge(60)
        gateways = [first, second]
        remaining = []
        for n in range(5):
            response = _get(gateways[n % 2].url + "/api/auth/login")
            assert response.status_code == 200, response.text
            remaining.append(int(re.search(r";r=(\d+)", response.headers["RateLimit"])[1]))
        assert remaining == [4, 3, 2, 1, 0]
        for gateway in gateways:
            refused = _get(gateway.url + "/api/auth/login")
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == 429
            assert int(refused.headers["Retry-After"]) >= 1


def test_memory_storage_gives_each_process_its_own_budget(upstream):
    env = {"RATELIMIT_STORAGE_URI": "memory://", "RATE_LIMIT_AUTH": "2/minute",
           "USER_SERVICE_URL": upstream.url, "JWT_SECRET": TEST_JWT_SECRET}
    with GatewayProcess(env=env) as first, GatewayProcess(env=env) as second:
        avoid_window_edge(60)
        for gateway in (first, second):
            statuses = [_get(gateway.url + "/api/auth/x").status_code for _ in range(3)]
            assert statuses == [200, 200, 429]


def test_spoofed_forwarded_for_does_not_reset_the_count(gateway_factory):
    gateway = gateway_factory(RATE_LIMIT_AUTH="3/minute", TRUSTED_PROXIES="0")
    avoid_window_edge(60)
    statuses = [_get(gateway.url + "/api/auth/x",
                     headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code
                for n in range(5)]
    assert statuses == [200, 200, 200, 429, 429]


def test_trusted_proxy_clients_are_counted_apart(gateway_factory):
    gateway = gateway_factory(RATE_LIMIT_AUTH="2/minute", TRUSTED_PROXIES="1")
    avoid_window_edge(60)
    for client in ("203.0.113.1", "203.0.113.2"):
        statuses = [_get(gateway.url + "/api/auth/x",
                         headers={"X-Forwarded-For": client}).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]


@pytest.mark.parametrize("on_error", ["open", "closed"])
def test_redis_killed_mid_run(redis_server, gateway_factory, on_error, upstream):
    gateway = gateway_factory(RATELIMIT_STORAGE_URI=redis_server.url, RATE_LIMIT_AUTH="50/minute",
                              RATELIMIT_ON_ERROR=on_error, RATELIMIT_STORAGE_TIMEOUT="0.5",
                              RATELIMIT_PROCESSES="5")
    avoid_window_edge(60)
    client = session()
    first = _get(gateway.url + "/api/auth/x", client)
    assert first.status_code == 200 and ratelimit_of(first)[1] == 49
    redis_server.stop()
    for n in range(3):
        response = _get(gateway.url + "/api/auth/x", client)  # bounded: no hang
        if on_error == "open":
            assert response.status_code == 200
            assert response.json()["path"] == "/auth/x"  # really served by the upstream
            assert ratelimit_of(response)[1] == 10 - 1 - n  # this process' share: 50 / 5
        else:
            assert response.status_code == 503
            assert response.json()["error"]["code"] == 503
            assert int(response.headers["Retry-After"]) >= 1
    assert _get(gateway.url + "/health/live", client).status_code == 200


def test_counting_resumes_when_redis_comes_back(redis_server, gateway_factory):
    gateway = gateway_factory(RATELIMIT_STORAGE_URI=redis_server.url, RATE_LIMIT_AUTH="50/minute",
                              RATELIMIT_PROCESSES="2")
    avoid_window_edge(60)
    client = session()
    assert ratelimit_of(_get(gateway.url + "/api/auth/x", client))[1] == 49
    redis_server.stop()
    assert ratelimit_of(_get(gateway.url + "/api/auth/x", client))[1] == 24  # local: 50 / 2
    with RedisServer(redis_server.executable, port=redis_server.port):
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while time.monotonic() < deadline:  # the storage is probed every retry_interval
            remaining = ratelimit_of(_get(gateway.url + "/api/auth/x", client))[1]
            if remaining > 24:
                break
            time.sleep(0.1)
        assert remaining == 49  # a fresh Redis: a fresh count


@pytest.mark.parametrize("on_error, status", [("open", 200), ("closed", 503)])
def test_silent_redis_costs_a_timeout_not_a_hang(gateway_factory, on_error, status):
    pytest.importorskip("redis")
    with SilentServer() as silent:
        gateway = gateway_factory(RATELIMIT_STORAGE_URI=silent.url, RATE_LIMIT_AUTH="5/minute",
                                  RATELIMIT_ON_ERROR=on_error, RATELIMIT_STORAGE_TIMEOUT="0.2")
        for _ in range(2):
            assert _get(gateway.url + "/api/auth/x").status_code == status


def test_concurrent_requests_through_redis_never_over_admit(redis_server, gateway_factory):
    # 20 concurrent clients on the shipped bulkhead: every answer is the rate limiter's.
    gateway = gateway_factory(RATELIMIT_STORAGE_URI=redis_server.url, RATE_LIMIT_AUTH="25/day")
    avoid_window_edge(86400)
    start = threading.Barrier(20)

    def burst(_):
        client = session()
        start.wait(CLIENT_TIMEOUT)
        return [_get(gateway.url + "/api/auth/x", client).status_code for _ in range(3)]

    with ThreadPoolExecutor(20) as pool:
        statuses = [s for batch in pool.map(burst, range(20)) for s in batch]
    assert statuses.count(200) == 25
    assert statuses.count(429) == 60 - 25


def test_redis_keys_are_namespaced_and_expire(redis_server, gateway_factory):
    import redis

    gateway = gateway_factory(RATELIMIT_STORAGE_URI=redis_server.url, RATE_LIMIT_AUTH="5/minute")
    _get(gateway.url + "/api/auth/x")
    client = redis.Redis.from_url(redis_server.url, socket_timeout=CLIENT_TIMEOUT)
    keys = [key.decode() for key in client.keys("*")]
    assert keys and all("meetinity_gateway/ratelimit/auth/addr:127.0.0.1" in key for key in keys)
    assert all(0 < client.ttl(key) <= 120 for key in keys)
    client.close()


def test_memory_storage_sweeps_once_a_second_with_limits_private_hook():
    # _SweptMemoryStorage replaces limits' private expiry scheduler: if limits renames it,
    # this fails instead of the gateway silently starting a thread every 10 ms again.
    from limits.storage import MemoryStorage

    from meetinity_gateway.ratestore import SweptMemoryStorage as _SweptMemoryStorage

    assert hasattr(MemoryStorage, "_MemoryStorage__schedule_expiry")
    assert hasattr(MemoryStorage, "_MemoryStorage__expire_events")
    storage = _SweptMemoryStorage("memory://")
    storage.timer.join(1)  # limits' own first sweep, started by its constructor
    storage.incr("k", expiry=0.05)
    assert storage.timer.daemon and storage.timer.interval == 1.0
    time.sleep(0.1)
    assert storage.get("k") == 0  # expired on read, before any sweep
    middleware = RateLimitMiddleware(lambda e, s: [], rules=[])
    assert isinstance(middleware.limiter.storage, _SweptMemoryStorage)


# -- one storage round trip per limit (ratecount) agrees with limits' hit + stats ------------

@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_one_round_trip_hit_agrees_with_limits_hit_then_stats(backend, request):
    from limits import parse
    from limits.storage import storage_from_string
    from limits.strategies import SlidingWindowCounterRateLimiter

    from meetinity_gateway.middleware import ratecount

    uri = "memory://"
    if backend == "redis":
        uri = request.getfixturevalue("redis_server").url
    limiter = SlidingWindowCounterRateLimiter(storage_from_string(uri))
    assert ratecount.supports(limiter)
    item = parse("4/hour")
    trail = []
    for _ in range(7):
        allowed, remaining, reset_in = ratecount.hit(limiter, item, "once")
        reference = limiter.hit(item, "twice")
        stats = limiter.get_window_stats(item, "twice")
        trail.append((allowed, remaining, reference,
                      max(0, int(stats.remaining)) if reference else 0))
        assert 0 <= reset_in <= 2 * 3600 and (allowed or reset_in >= 1)
    assert [(a, r) for a, r, _, _ in trail] == [(a, r) for _, _, a, r in trail]
    assert [a for a, _, _, _ in trail] == [True] * 4 + [False] * 3
    assert [r for _, r, _, _ in trail] == [3, 2, 1, 0, 0, 0, 0]
