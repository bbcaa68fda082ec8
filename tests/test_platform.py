"""The whole Meetinity platform behind the shipped gateway.ini (issue 12), end to end.

A real waitress serves the shipped pipeline; each of the four services is a recording loopback
upstream of its own, so every assertion says which service got what — or that none did.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meetinity_gateway.cli import main
from tests.rawkit import exchange
from tests.servers import SHIPPED_INI, TEST_JWT_SECRET, make_token, session, shipped_gateway
from tests.upstream import Upstream

SERVICES = ("user", "event", "matching", "messaging")

ADA = make_token(sub=42, lifetime=3600)                 # an ordinary user
BOB = make_token(sub=7, lifetime=3600)                  # another one
ADMIN = make_token(sub=1, role="admin", lifetime=3600)  # an administrator


@pytest.fixture
def platform(monkeypatch):
    """Four recording upstreams and a starter for the shipped gateway in front of them."""
    upstreams = {name: Upstream().start() for name in SERVICES}
    servers = []

    def start(**env):
        for name, upstream in upstreams.items():
            env.setdefault(f"{name.upper()}_SERVICE_URL", upstream.url)
        env.setdefault("JWT_SECRET", TEST_JWT_SECRET)
        env.setdefault("RATE_LIMIT_AUTH", "100000/minute")
        server = shipped_gateway(monkeypatch, env)
        servers.append(server)
        return server

    try:
        yield start, upstreams
    finally:
        for server in servers:
            server.stop()
        for upstream in upstreams.values():
            upstream.stop()


def call(server, method, path, token=None, **kwargs):
    headers = kwargs.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with session() as http:
        return http.request(method, server.url + path, headers=headers, timeout=15, **kwargs)


def counts(upstreams):
    return {name: len(upstream.requests) for name, upstream in upstreams.items()}


@pytest.mark.parametrize("method, path, token, service, upstream_path", [
    ("POST", "/api/auth/login", None, "user", "/auth/login"),
    ("GET", "/api/users/42", ADA, "user", "/users/42"),
    # Another user's record and search results are filtered: test_platform_clients.py.
    ("GET", "/api/users/search?q=ada", ADMIN, "user", "/users/search"),
    ("GET", "/api/events/5", ADA, "event", "/events/5"),
    ("POST", "/api/events", ADMIN, "event", "/events"),
    ("GET", "/api/event-categories", ADA, "event", "/event-categories"),
    ("GET", "/api/users/42/recommendations", ADA, "event", "/users/42/recommendations"),
    ("GET", "/api/users/042/recommendations", make_token(sub="042"), "event",
     "/users/42/recommendations"),
    ("GET", "/api/matching/matches/42", ADA, "matching", "/matches/42"),
    ("POST", "/api/matching/swipe", ADA, "matching", "/swipe"),
    ("GET", "/api/matching/algorithm/suggest/42?limit=3", ADA, "matching",
     "/algorithm/suggest/42"),
    ("GET", "/api/conversations/9", ADA, "messaging", "/conversations/9"),
    ("POST", "/api/conversations", ADA, "messaging", "/conversations"),
])
def test_every_shipped_route_reaches_its_service_and_path(platform, method, path, token,
                                                          service, upstream_path):
    start, upstreams = platform
    server = start()
    before = counts(upstreams)
    body = {"user_id": 42} if method == "POST" else None  # the swipe is ADA's own
    response = call(server, method, path, token, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["path"] == upstream_path
    assert response.json()["upstream"] == upstreams[service].url
    after = counts(upstreams)
    assert {name: after[name] - before[name] for name in SERVICES} == {
        name: int(name == service) for name in SERVICES}


@pytest.mark.parametrize("method, path", [
    ("PUT", "/api/users/7"), ("DELETE", "/api/users/7"), ("PATCH", "/api/users/7"),
    ("POST", "/api/users/7/photo"), ("DELETE", "/api/users/7/"),
    ("DELETE", "/api/users//7"), ("DELETE", "/api/users/%D9%A7"), ("PUT", "/api/users/007"),
    ("GET", "/api/users/7/recommendations"), ("GET", "/api/matching/matches/7"),
    ("GET", "/api/matching/algorithm/suggest/7"),
    # A user's sub-resources are private for reading too (a GDPR export, sessions, …).
    ("GET", "/api/users/7/export"), ("GET", "/api/users/7/sessions"),
    ("HEAD", "/api/users/7/connections"), ("GET", "/api/users/007/activities"),
])
def test_a_user_cannot_touch_another_users_resources(platform, method, path):
    start, upstreams = platform
    server = start()
    before = counts(upstreams)
    response = call(server, method, path, ADA)
    assert response.status_code == 403
    if method != "HEAD":  # a HEAD answer has no body
        body = response.json()["error"]
        assert body["code"] == 403 and body["message"].startswith("forbidden by rule ")
    assert counts(upstreams) == before  # no service saw it


def test_the_owner_may_change_and_delete_their_own_user(platform):
    start, upstreams = platform
    server = start()
    for method in ("PUT", "PATCH", "DELETE"):
        response = call(server, method, "/api/users/42", ADA, json={"bio": "hi"})
        assert response.status_code == 200
        assert response.json()["method"] == method
        assert response.json()["path"] == "/users/42"
    assert call(server, "POST", "/api/users/42/photo", ADA, data=b"x").status_code == 200
    assert len(upstreams["user"].requests) == 4
    assert call(server, "GET", "/api/users/42/export", ADA).status_code == 200
    assert len(upstreams["user"].requests) == 5
    # Bob's token, Bob's id.
    assert call(server, "DELETE", "/api/users/7", BOB).status_code == 200


def test_moderating_events_needs_the_admin_claim(platform):
    start, upstreams = platform
    server = start()
    for action in ("approve", "reject"):
        response = call(server, "POST", f"/api/events/5/{action}", ADA)
        assert response.status_code == 403
        assert response.json()["error"]["message"].startswith(f"forbidden by rule event_{action}")
    assert len(upstreams["event"].requests) == 0
    response = call(server, "POST", "/api/events/5/approve", ADMIN)
    assert response.status_code == 200 and response.json()["path"] == "/events/5/approve"
    # Reading and joining events stays open to any signed-in user.
    assert call(server, "GET", "/api/events/5", ADA).status_code == 200
    assert call(server, "POST", "/api/events/5/join", ADA,
                json={"email": "ada@example.com"}).status_code == 200


def test_listing_users_needs_the_admin_claim(platform):
    start, upstreams = platform
    server = start()
    for path in ("/api/users", "/api/users/", "/api/users?page=2"):
        assert call(server, "GET", path, ADA).status_code == 403
    assert len(upstreams["user"].requests) == 0
    response = call(server, "GET", "/api/users?page=2", ADMIN)
    assert response.status_code == 200
    assert (response.json()["path"], response.json()["query"]) == ("/users", "page=2")
    # Reading one profile stays open to any signed-in user; admin routes stay closed.
    assert call(server, "GET", "/api/users/42", ADA).status_code == 200
    assert call(server, "POST", "/api/event-categories", ADA, json={}).status_code == 403
    assert call(server, "POST", "/api/event-categories", ADMIN, json={}).status_code == 200


def test_every_service_needs_a_token(platform):
    start, upstreams = platform
    server = start()
    for path in ("/api/users/7", "/api/events", "/api/event-categories", "/api/event-tags",
                 "/api/matching/swipe", "/api/conversations", "/events", "/conversations",
                 "/api/auth/verification/request"):
        response = call(server, "GET", path)
        assert response.status_code == 401, path
    assert sum(counts(upstreams).values()) == 0


def test_a_per_route_timeout_fires_at_its_own_value(platform):
    start, upstreams = platform
    # suggest: 1 s of its own; every other route keeps the global 30 s.
    server = start(MATCHING_SUGGEST_READ_TIMEOUT="1")
    slow = call(server, "GET", "/api/matching/algorithm/suggest/42/slow?seconds=3", ADA)
    assert slow.status_code == 504
    assert slow.json()["error"]["code"] == 504
    other = call(server, "GET", "/api/matching/matches/42/slow?seconds=2", ADA)
    assert other.status_code == 200 and other.json() == {"slow": True}


def test_a_per_route_body_limit(tmp_path, monkeypatch, platform):
    start, upstreams = platform
    # A copy of the shipped file with a body limit of its own on the swipe route.
    text = SHIPPED_INI.read_text().replace(
        "policy.suggest =", "policy.swipe = max_body_size=1k\npolicy.suggest =")
    ini = tmp_path / "gateway.ini"
    ini.write_text(text)
    from meetinity_gateway.assembly import load_pipeline
    from tests.servers import WaitressServer

    for name, upstream in upstreams.items():
        monkeypatch.setenv(f"{name.upper()}_SERVICE_URL", upstream.url)
    pipeline = load_pipeline(ini)
    with WaitressServer(pipeline.app, max_body_size=pipeline.max_body_size) as server:
        # Ada's own swipe (the ownership check passes), over the route's own limit.
        assert call(server, "POST", "/api/matching/swipe", ADA,
                    json={"user_id": 42, "pad": "x" * 1025}).status_code == 413
        assert call(server, "POST", "/api/conversations", ADA, data=b"x" * 1025).status_code \
            == 200
    assert [r[1] for r in upstreams["messaging"].requests] == ["/conversations"]
    assert upstreams["matching"].requests == []


def test_an_empty_service_url_unmounts_its_routes(platform):
    start, upstreams = platform
    server = start(MESSAGING_SERVICE_URL="", MATCHING_SERVICE_URL="")
    for path, service in (("/api/conversations/9", "messaging_service"),
                          ("/api/matching/matches/42", "matching_service"),
                          ("/api/matching/swipe", "matching_service")):
        response = call(server, "GET", path, ADA)
        assert response.status_code == 404
        # The 404 names the unmounted service, not just "no route".
        assert response.json()["error"]["message"] == (
            f"no route for {path}: service {service} is not mounted (its upstream URL is "
            "empty)")
    response = call(server, "GET", "/api/nothing/here", ADA)
    assert response.json()["error"]["message"] == "no route for /api/nothing/here"
    assert call(server, "GET", "/api/events/5", ADA).status_code == 200
    health = call(server, "GET", "/health").json()
    assert health["upstreams"] == {"user_service": "up", "event_service": "up"}
    assert upstreams["messaging"].requests == [] and upstreams["matching"].requests == []


def test_health_lists_every_mounted_upstream(platform):
    start, upstreams = platform
    health = call(start(), "GET", "/health")
    assert health.status_code == 200
    assert health.json()["upstreams"] == {
        "user_service": "up", "event_service": "up", "matching_service": "up",
        "messaging_service": "up"}


def test_check_says_what_is_mounted_and_prints_the_policies(monkeypatch, capsys):
    monkeypatch.setenv("JWT_SECRET", TEST_JWT_SECRET)
    monkeypatch.setenv("EVENT_SERVICE_URL", "http://127.0.0.1:5002")
    monkeypatch.setenv("MATCHING_SUGGEST_READ_TIMEOUT", "45")
    assert main(["check", "--config", str(SHIPPED_INI)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Each upstream with its URL (an URL never holds credentials: refused at start).
    assert ("upstreams mounted: user_service=http://127.0.0.1:5001, "
            "event_service=http://127.0.0.1:5002") in lines
    assert "upstreams not mounted (empty URL): matching_service, messaging_service" in lines
    assert ("  recommendations: * /api/users/<int:id>/recommendations -> event_service "
            "/users/<id>/recommendations (parameters: id:int)") in lines
    assert "  users: connect 3s, read 30s, body 10M, retries 2, idle 4s" in lines
    assert any(line.startswith("  conversations: ") and "not mounted" in line for line in lines)
    assert ("  user_own: DELETE,PATCH,POST,PUT /api/users/<id>/* -> sub=<id> or role=admin"
            in lines)
    assert "  users_collection: DELETE,GET,PATCH,POST,PUT /api/users -> role=admin" in lines


# -- the class: no spelling of another user's id lets a write through --------------------------

@pytest.fixture(scope="module")
def shipped_once():
    import os

    monkeypatch = pytest.MonkeyPatch()
    for key in list(os.environ):
        if key.startswith(("JWT_", "CORS_", "RATE_LIMIT", "RATELIMIT_", "UPSTREAM_",
                           "GATEWAY_", "TRUSTED_PROXIES", "MAX_BODY_SIZE", "MATCHING_")) \
                or key.endswith("_SERVICE_URL"):
            monkeypatch.delenv(key, raising=False)
    upstreams = {name: Upstream().start() for name in SERVICES}
    server = None
    try:
        env = {f"{name.upper()}_SERVICE_URL": upstream.url
               for name, upstream in upstreams.items()}
        env.update(JWT_SECRET=TEST_JWT_SECRET, RATE_LIMIT_AUTH="100000/minute")
        server = shipped_gateway(monkeypatch, env)
        yield server, upstreams
    finally:
        if server is not None:
            server.stop()
        for upstream in upstreams.values():
            upstream.stop()
        monkeypatch.undo()


_DIGITS = {"7": ["7", "%37", "\u0667", "\uff17", "\u07c7", "\u0967"]}


@st.composite
def spellings_of_seven(draw):
    """Ways a service's int converter, or a lenient router, may read as 7."""
    digit = draw(st.sampled_from(_DIGITS["7"]))
    zeros = draw(st.sampled_from(["", "0", "00", "%30"]))
    segment = zeros + digit
    if not segment.isascii():
        segment = "".join(c if c.isascii() else "".join(f"%{b:02X}" for b in c.encode())
                          for c in segment)
    before = draw(st.sampled_from(["/", "//", "/./", "/%2F"]))
    after = draw(st.sampled_from(["", "/", "//", "/photo", ";x", "/.", "?x=1", "#f"]))
    return "/api/users" + before + segment + after


@settings(max_examples=120, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=spellings_of_seven(),
       method=st.sampled_from(["PUT", "PATCH", "DELETE", "POST"]),
       override=st.sampled_from([None, "PUT", "DELETE"]))
def test_property_no_write_reaches_another_users_resource(shipped_once, path, method, override):
    server, upstreams = shipped_once
    before = counts(upstreams)
    headers = {"Authorization": f"Bearer {ADA}"}
    if override:
        headers["X-HTTP-Method-Override"] = override
    request = (f"{method} {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
               + "Connection: close\r\n\r\n").encode("latin-1")
    response = exchange(server.port, request)
    assert counts(upstreams) == before, (path, response)
    assert response.status in (400, 403, 404), (path, response)
