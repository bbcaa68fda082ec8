"""Per-user rate limits (issue 12, point 3): the ratelimit filter used a second time, after
auth, keyed by a verified claim (``key = claim:sub``), its counters apart from the
per-address instance's; units with werkzeug's test client, end to end under a real waitress
with real tokens, and with both instances sharing a real Redis."""
from __future__ import annotations

import json
import re

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from limits.storage import MemoryStorage
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware

from meetinity_gateway.assembly import load_pipeline
from meetinity_gateway.config import ConfigError
from meetinity_gateway.middleware.ratelimit import (
    RateLimitMiddleware,
    filter_factory,
    parse_key,
    parse_rule,
)
from tests.conftest import require_tool
from tests.redisserver import RedisServer
from tests.servers import SHIPPED_INI, auth_headers, make_token, session, write_ini

CLAIMS = "meetinity_gateway.claims"
CLIENT_TIMEOUT = 5


def hello(environ, start_response):
    body = json.dumps({"path": environ["PATH_INFO"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def user_app(storage=None, **kwargs) -> TestApp:
    kwargs.setdefault("rules", {"users": "/api/users, /api/profile 2/minute"})
    kwargs.setdefault("key", "claim:sub")
    middleware = RateLimitMiddleware(hello, storage=storage or MemoryStorage(), **kwargs)
    return TestApp(LintMiddleware(middleware), extra_environ={"REMOTE_ADDR": "198.51.100.7"})


def as_user(sub) -> dict:
    return {CLAIMS: {"sub": sub, "exp": 2_000_000_000}}


def statuses(app, path, n, **kwargs) -> list[int]:
    return [app.get(path, expect_errors=True, **kwargs).status_int for _ in range(n)]


# -- the key ----------------------------------------------------------------------------------

def test_parse_key():
    assert parse_key("address") is None
    assert parse_key(" claim:sub ") == "sub"
    assert parse_key("claim:https://example.com/user_id") == "https://example.com/user_id"
    for bad in ("", "sub", "claim:", "claim:a b", "header:X-User-ID", "Address", "claims:sub"):
        with pytest.raises(ValueError, match="'address' or 'claim:NAME'"):
            parse_key(bad)


def test_users_behind_one_address_each_have_their_own_budget():
    app = user_app()
    assert statuses(app, "/api/users/1", 3, extra_environ=as_user(1)) == [200, 200, 429]
    assert statuses(app, "/api/users/2", 3, extra_environ=as_user(2)) == [200, 200, 429]
    # The claim's value is the user: 7 and "7" are one user (JSON numbers or strings).
    app.get("/api/users/7", extra_environ=as_user(7))
    app.get("/api/users/7", extra_environ=as_user("7"))
    app.get("/api/users/7", extra_environ=as_user(7), status=429)


def test_prefixes_of_one_rule_share_the_users_budget():
    app = user_app()
    app.get("/api/users/1", extra_environ=as_user(1))
    app.get("/api/profile", extra_environ=as_user(1))
    refused = app.get("/api/profile/photo", extra_environ=as_user(1), status=429)
    assert refused.json["error"]["code"] == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Policy"] == '"users";q=2;w=60'


@pytest.mark.parametrize("claims", [
    None, {}, {"email": "a@example.com"}, {"sub": ""}, {"sub": None}, {"sub": True},
    {"sub": ["1"]}, {"sub": {"id": 1}}, "sub=1",
])
def test_requests_without_a_usable_claim_are_counted_by_address(claims):
    app = user_app()
    extra = {} if claims is None else {CLAIMS: claims}
    assert statuses(app, "/api/users", 2, extra_environ=extra) == [200, 200]
    # The same address with no claims at all: the same (address) budget.
    app.get("/api/users", status=429)
    app.get("/api/users", extra_environ={"REMOTE_ADDR": "198.51.100.8"})  # other address


@pytest.mark.parametrize("header", ["X-User-ID", "X-User-Id", "x-user-id", "Sub",
                                    "X-Forwarded-User", "Authorization"])
def test_request_headers_never_choose_the_key(header):
    app = user_app()
    for n in range(2):
        app.get("/api/users", headers={header: f"forged-{n}"}, extra_environ=as_user(1))
    # A new header value is not a new budget: user 1 is out.
    app.get("/api/users", headers={header: "forged-new"}, extra_environ=as_user(1), status=429)
    # Without claims (anonymous), the header does not pick a user either: the address counts.
    anon = user_app()
    for n in range(2):
        anon.get("/api/users", headers={header: str(n)})
    anon.get("/api/users", headers={header: "99"}, status=429)


def test_instances_on_one_storage_keep_their_counters_apart():
    shared = MemoryStorage()
    rules = {"api": "/api 2/minute"}
    by_address = RateLimitMiddleware(hello, rules=rules, storage=shared)
    by_user = RateLimitMiddleware(hello, rules=rules, key="claim:sub", namespace="userlimit",
                                  storage=shared)
    app = TestApp(LintMiddleware(by_address), extra_environ={"REMOTE_ADDR": "198.51.100.7"})
    # Anonymous requests fall back to the address in both instances: same rule name, same
    # address, same storage — still two budgets because the namespaces differ.
    assert statuses(app, "/api/x", 3) == [200, 200, 429]
    user_only = TestApp(LintMiddleware(by_user), extra_environ={"REMOTE_ADDR": "198.51.100.7"})
    assert statuses(user_only, "/api/x", 3) == [200, 200, 429]
    keys = list(shared.storage)
    assert any("/ratelimit/api/addr:198.51.100.7/" in key for key in keys)
    assert any("/userlimit/api/addr:198.51.100.7/" in key for key in keys)
    # Stacked as in the pipeline, an anonymous request counts once in each budget.
    stacked = TestApp(LintMiddleware(RateLimitMiddleware(by_user, rules=rules, storage=shared)),
                      extra_environ={"REMOTE_ADDR": "198.51.100.9"})
    assert statuses(stacked, "/api/x", 3) == [200, 200, 429]
    # Without the namespace both instances would spend one budget twice per request.
    clash = RateLimitMiddleware(hello, rules=rules, key="claim:sub", storage=shared)
    same = TestApp(LintMiddleware(RateLimitMiddleware(clash, rules=rules, storage=shared)),
                   extra_environ={"REMOTE_ADDR": "198.51.100.10"})
    assert statuses(same, "/api/x", 2) == [200, 429]


def test_claim_values_are_hashed_before_they_reach_the_storage():
    storage = MemoryStorage()
    app = user_app(storage=storage)
    app.get("/api/users", extra_environ=as_user("ada/../secret@example.com"))
    keys = list(storage.storage)
    assert keys and all("secret" not in key for key in keys)
    assert all(re.search(r"/userlimit/users/claim\.sub:[0-9a-f]{64}/", key) is None
               for key in keys)  # default namespace: ratelimit
    assert all(re.search(r"/ratelimit/users/claim\.sub:[0-9a-f]{64}/", key) for key in keys)
    # A URI-like claim name brings no "/" or braces into the keys.
    storage = MemoryStorage()
    app = user_app(storage=storage, key="claim:https://example.com/{uid}")
    app.get("/api/users", extra_environ={CLAIMS: {"https://example.com/{uid}": "u-1"}})
    app.get("/api/users", extra_environ={CLAIMS: {"https://example.com/{uid}": "u-1"}})
    app.get("/api/users", extra_environ={CLAIMS: {"https://example.com/{uid}": "u-1"}},
            status=429)
    keys = list(storage.storage)
    assert keys and all(re.fullmatch(
        r"LIMITER/meetinity_gateway/ratelimit/users/claim\.[0-9a-f]{16}:[0-9a-f]{64}/2/1/minute"
        r"(/\d+)?",  # sliding-window-counter: a window number
        key) for key in keys), keys


# -- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("conf, key", [
    ({"key": "claim:"}, "key"),
    ({"key": "user"}, "key"),
    ({"key": "claim:s u b"}, "key"),
    ({"namespace": "user limit"}, "namespace"),
    ({"namespace": ""}, "namespace"),
    ({"processes": "0"}, "processes"),
    ({"processes": "two"}, "processes"),
    ({"rule.a": "/api/users, api/profile 1/minute"}, "rule.a"),
    ({"rule.a": "/api/users,, /api/profile 1/minute"}, "rule.a"),
])
def test_bad_settings_are_config_errors(conf, key):
    with pytest.raises(ConfigError) as info:
        filter_factory({"__file__": "gateway.ini"}, **conf)(hello)
    assert info.value.key == key and "gateway.ini" in str(info.value)


def test_two_any_method_rules_on_one_prefix_are_a_config_error():
    with pytest.raises(ConfigError, match="both cover /api/profile"):
        RateLimitMiddleware(hello, rules={"users": "/api/users, /api/profile 5/minute",
                                          "profile": "/api/profile 1/minute"})
    rule = parse_rule("svc", "GET,POST /api/events/*, /api/registrations 5/minute")
    assert rule.prefixes == ("/api/events", "/api/registrations") and "HEAD" in rule.methods


@pytest.mark.parametrize("value", ["claim", "claim:", "ip", "claim:sub extra"])
def test_unknown_key_in_an_ini_names_file_section_key_and_value(tmp_path, value):
    ini = write_ini(tmp_path / "gateway.ini", f"""
[pipeline:main]
pipeline = userlimit gateway

[filter:userlimit]
use = egg:meetinity_gateway#ratelimit
key = {value}
rule.users = /api/users 5/minute

[app:gateway]
use = egg:meetinity_gateway#main
route.health = GET /health -> @health
""")
    with pytest.raises(ConfigError) as info:
        load_pipeline(ini)
    message = str(info.value)
    assert str(ini) in message and "[filter:userlimit]" in message
    assert f"key = {value!r}" in message and "claim:NAME" in message


# -- end to end: shipped gateway.ini, real waitress, real tokens ------------------------------

def _get(url, client=None, **kwargs):
    return (client or session()).get(url, timeout=CLIENT_TIMEOUT, **kwargs)


def test_two_users_behind_one_address_get_their_own_budgets(gateway_factory, upstream):
    from tests.test_ratelimit import avoid_window_edge

    gateway = gateway_factory(RATE_LIMIT_USERS="3/minute", RATE_LIMIT_AUTH="5/minute")
    avoid_window_edge(60)
    ada, bob = auth_headers(sub=1), auth_headers(sub=2)
    client = session()
    assert [_get(gateway.url + "/api/users/1", client, headers=ada).status_code
            for _ in range(3)] == [200, 200, 200]
    refused = _get(gateway.url + "/api/users/1/photo", client, headers=ada)  # same budget
    assert refused.status_code == 429 and refused.json()["error"]["code"] == 429
    assert refused.headers["RateLimit-Policy"] == '"users";q=3;w=60'
    assert int(refused.headers["Retry-After"]) >= 1
    # Bob shares Ada's address (127.0.0.1) but not her budget.
    assert [_get(gateway.url + "/api/users/2", client, headers=bob).status_code
            for _ in range(4)] == [200, 200, 200, 429]
    # /api/auth is anonymous and counted per address, whichever token comes along.
    auth = [_get(gateway.url + "/api/auth/login", client, headers=h).status_code
            for h in (ada, bob, {}, ada, bob, {})]
    assert auth == [200, 200, 200, 200, 200, 429]
    # Requests the upstream saw: 3 (Ada) + 3 (Bob) users + 5 auth; refusals never arrived.
    assert len(upstream.requests) == 11


def test_only_a_verified_sub_chooses_the_budget(gateway_factory, upstream):
    from tests.test_ratelimit import avoid_window_edge

    gateway = gateway_factory(RATE_LIMIT_USERS="2/minute")
    avoid_window_edge(60)
    url = gateway.url + "/api/users/1/x"
    ada = auth_headers(sub=1)
    client = session()
    for forged in ("999", "2", "1"):
        response = _get(url, client, headers={**ada, "X-User-ID": forged})
        if forged == "1":
            assert response.status_code == 429  # still Ada's third request
        else:
            assert response.status_code == 200
            sent = dict((k.lower(), v) for k, v in upstream.requests[-1][2])
            assert sent["x-user-id"] == "1"  # the verified identity, not the client's copy
    # Tokens that fail verification never reach the per-user layer, and so never spend
    # (or open) anyone's budget: a forged signature, an expired token, alg "none".
    bad_tokens = [
        make_token(secret="not-the-gateway-secret-0123456789abcdef", sub=2),
        make_token(lifetime=-120, sub=2),
        jwt.encode({"sub": 2, "exp": 2_000_000_000}, None, algorithm="none"),
    ]
    for token in bad_tokens:
        response = _get(url, client, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401
    bob = auth_headers(sub=2)
    url = gateway.url + "/api/users/2/x"
    assert [_get(url, client, headers=bob).status_code for _ in range(3)] == [200, 200, 429]


def test_both_instances_share_redis_under_their_own_namespaces(gateway_factory, monkeypatch):
    pytest.importorskip("redis")
    import redis

    from tests.test_ratelimit import avoid_window_edge

    with RedisServer(require_tool("redis-server", "rate limits shared through Redis")) as srv:
        env = dict(RATELIMIT_STORAGE_URI=srv.url, RATE_LIMIT_USERS="2/minute",
                   RATE_LIMIT_AUTH="2/minute")
        first, second = gateway_factory(**env), gateway_factory(**env)
        avoid_window_edge(60)
        ada = auth_headers(sub=1)
        # One budget across both gateways, per user and per address.
        users = [_get(g.url + "/api/users/1", headers=ada).status_code
                 for g in (first, second, first)]
        auth = [_get(g.url + "/api/auth/x").status_code for g in (second, first, second)]
        assert users == [200, 200, 429] and auth == [200, 200, 429]
        client = redis.Redis.from_url(srv.url, socket_timeout=CLIENT_TIMEOUT)
        try:
            keys = sorted(key.decode() for key in client.keys("*"))
        finally:
            client.close()
        assert any("meetinity_gateway/userlimit/users/claim.sub:" in key for key in keys)
        assert any("meetinity_gateway/ratelimit/auth/addr:127.0.0.1" in key for key in keys)
        assert not any("/users/addr:" in key or "/auth/claim" in key for key in keys)


def test_shipped_ini_wires_the_per_user_variables(monkeypatch):
    for name, value in (("RATE_LIMIT_USERS", "11/minute"), ("RATE_LIMIT_EVENTS", "12/minute"),
                        ("RATE_LIMIT_MATCHING", "13/minute"),
                        ("RATE_LIMIT_MESSAGING", "14/minute; 100/hour")):
        monkeypatch.setenv(name, value)
    layer = load_pipeline(SHIPPED_INI).app
    found = []
    while hasattr(layer, "app"):
        if isinstance(layer, RateLimitMiddleware):
            found.append(layer)
        layer = layer.app
    by_user = found[-1]
    expected = {"/api/users/7": ("users", 11), "/events/3": ("events", 12),
                "/api/events/3": ("events", 12), "/api/event-tags": ("events", 12),
                "/api/event-categories": ("events", 12), "/api/matching/swipe": ("matching", 13),
                "/api/conversations/9": ("messaging", 14), "/conversations": ("messaging", 14)}
    for path, (name, amount) in expected.items():
        rule = by_user.rule_for("POST", path)
        assert (rule.name, rule.limits[0].amount) == (name, amount), path
    assert by_user.rule_for("GET", "/api/eventsX") is None
    monkeypatch.setenv("RATE_LIMIT_MATCHING", "often")
    with pytest.raises(ConfigError) as info:
        load_pipeline(SHIPPED_INI)
    assert "[filter:userlimit]" in str(info.value) and "rule.matching" in str(info.value)


def test_every_rate_limit_variable_is_documented():
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(SHIPPED_INI, encoding="utf-8")
    names = set()
    for section in ("filter:ratelimit", "filter:userlimit"):
        for value in parser[section].values():
            names.update(re.findall(r"\$\{([A-Z0-9_]+)", value))
    assert {"RATE_LIMIT_USERS", "RATE_LIMIT_EVENTS", "RATE_LIMIT_MATCHING",
            "RATE_LIMIT_MESSAGING", "RATELIMIT_PROCESSES"} <= names
    env_example = (SHIPPED_INI.parent / ".env.example").read_text(encoding="utf-8")
    reference = (SHIPPED_INI.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
    for name in names:
        assert re.search(rf"^{name}=", env_example, re.M), name
        assert f"`{name}`" in reference, name


# -- rules with several prefixes: the matcher against a reference ----------------------------

_SEGMENT = st.sampled_from(["api", "users", "user", "auth", "x", "profile"])
_PREFIX = st.lists(_SEGMENT, max_size=3).map(lambda segments: "/" + "/".join(segments))


@settings(max_examples=150, deadline=None, print_blob=True)
@given(st.lists(st.lists(_PREFIX, min_size=1, max_size=3), min_size=1, max_size=4),
       st.lists(_SEGMENT | st.just("usersX"), max_size=4))
def test_rule_for_is_the_rule_with_the_longest_covering_prefix(rule_prefixes, segments):
    owner: dict[str, str] = {}
    rules = {}
    for number, prefixes in enumerate(rule_prefixes):
        mine = [p for p in dict.fromkeys(prefixes) if p not in owner]  # one rule per prefix
        if mine:
            owner.update((p, f"r{number}") for p in mine)
            rules[f"r{number}"] = ", ".join(mine) + " 5/minute"
    middleware = RateLimitMiddleware(hello, rules=rules)
    path = "/" + "/".join(segments)
    covering = [p for p in owner if p == "/" or path == p or path.startswith(p + "/")]
    expected = owner[max(covering, key=len)] if covering else None
    rule = middleware.rule_for("GET", path)
    assert (rule.name if rule else None) == expected
