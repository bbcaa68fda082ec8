"""No request without a valid token reaches a protected upstream, whatever its method.

Raw sockets against the shipped gateway.ini under a real waitress, with a loopback upstream
that records every request it receives (issue 11, point 2: OPTIONS used to pass ``auth`` as a
"preflight" while ``cors`` only answered preflights carrying ``Origin``).
"""
from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rawkit import exchange, request_bytes
from tests.servers import make_token, module_gateway
from tests.upstream import Upstream

PROTECTED = ["/api/users/7", "/api/users", "/api/auth/verification/request"]
ORIGIN = ("Origin", "https://app.meetinity.com")
ACRM = ("Access-Control-Request-Method", "DELETE")


@pytest.fixture(scope="module")
def shipped(request):
    """One shipped gateway for the module (Hypothesis runs many examples against it)."""
    with Upstream() as upstream:
        env = {"RATE_LIMIT_AUTH": "100000/minute"}
        for name in ("USER", "EVENT", "MATCHING", "MESSAGING"):
            env[f"{name}_SERVICE_URL"] = upstream.url
        with module_gateway(env) as server:
            yield server, upstream


def send(server, method, path, headers=(), body=b""):
    return exchange(server.port, request_bytes(method, path, headers, body or None, close=True),
                    method=method)


@pytest.mark.parametrize("path", PROTECTED)
@pytest.mark.parametrize("headers, body", [
    # The request: no Origin, a method override and a body.
    ([ACRM, ("X-HTTP-Method-Override", "DELETE")], b'{"role": "admin"}'),
    ([ACRM], b""),
    ([], b""),
    ([ORIGIN], b""),
    ([ACRM, ("Content-Type", "application/json")], b"{}"),
    ([ORIGIN, ACRM, ("X-HTTP-Method-Override", "DELETE")], b""),
    ([ORIGIN, ACRM], b'{"role": "admin"}'),
    ([ORIGIN, ("Access-Control-Request-Method", "")], b""),
    ([("Origin", ""), ACRM], b""),
])
def test_options_without_token_never_reaches_a_protected_upstream(shipped, path, headers, body):
    server, upstream = shipped
    before = len(upstream.requests)
    response = send(server, "OPTIONS", path, headers, body)
    assert response.status in (400, 401), response
    assert response.json()["error"]["code"] == response.status
    assert len(upstream.requests) == before


@pytest.mark.parametrize("path", PROTECTED)
def test_a_real_preflight_is_answered_by_cors_itself(shipped, path):
    server, upstream = shipped
    before = len(upstream.requests)
    response = send(server, "OPTIONS", path, [ORIGIN, ACRM])
    assert response.status == 204
    assert response.header("Access-Control-Allow-Origin") == ["*"]
    assert len(upstream.requests) == before


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
                                    "TRACE", "PROPFIND", "MKCOL", "X-ANYTHING"])
def test_every_method_needs_a_token(shipped, method):
    server, upstream = shipped
    before = len(upstream.requests)
    response = send(server, method, "/api/users/7", [ACRM, ("X-HTTP-Method-Override", "GET")])
    assert response.status == 401
    assert len(upstream.requests) == before


@pytest.mark.parametrize("method", ["options", "Options", "get", "delete"])
def test_lower_case_methods_are_refused_before_anything(shipped, method):
    server, upstream = shipped
    before = len(upstream.requests)
    response = send(server, method, "/api/users/7", [ORIGIN, ACRM])
    assert response.status == 400
    assert len(upstream.requests) == before


@pytest.mark.parametrize("target", ["*", "http://gateway.test/api/users/7",
                                    "HTTP://other.example:80/api/users/7?x=1"])
def test_other_target_forms_need_a_token_too(shipped, target):
    server, upstream = shipped
    before = len(upstream.requests)
    response = send(server, "OPTIONS", target, [ACRM, ("X-HTTP-Method-Override", "DELETE")])
    assert response.status in (400, 401, 404)
    assert len(upstream.requests) == before


def test_with_a_valid_token_options_is_forwarded(shipped):
    # The positive control: the same request with a token does reach the service.
    server, upstream = shipped
    token = make_token(sub=7)
    before = len(upstream.requests)
    response = send(server, "OPTIONS", "/api/users/7",
                    [("Authorization", f"Bearer {token}"), ACRM])
    assert response.status == 200
    assert len(upstream.requests) == before + 1
    assert upstream.requests[-1][0] == "OPTIONS"


_METHODS = st.sampled_from(["OPTIONS", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE",
                            "TRACE", "CONNECTX", "FOO"])
_HEADERS = st.lists(st.sampled_from([
    ORIGIN, ("Origin", "null"), ("Origin", "https://evil.example"), ACRM,
    ("Access-Control-Request-Method", "options"), ("Access-Control-Request-Headers", "x-a"),
    ("X-HTTP-Method-Override", "DELETE"), ("X-HTTP-Method", "PUT"),
    ("X-Method-Override", "PATCH"), ("Authorization", "Bearer"),
    ("Authorization", "Basic YTpi"), ("Authorization", "Bearer not.a.token"),
    ("Content-Type", "application/json"), ("X-User-ID", "1"),
]), max_size=6, unique=True)


@settings(max_examples=120, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=_METHODS, path=st.sampled_from(PROTECTED), headers=_HEADERS,
       body=st.sampled_from([b"", b"{}", b'{"role":"admin"}']))
def test_property_no_token_no_upstream(shipped, method, path, headers, body):
    server, upstream = shipped
    before = len(upstream.requests)
    response = send(server, method, path, headers, body)
    assert len(upstream.requests) == before, (method, path, headers, body, response)
    # Answered by the gateway itself: a real preflight (204), or a refusal (4xx).
    assert response.status == 204 or 400 <= response.status < 500, response
