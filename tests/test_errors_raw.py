"""The error edge through the shipped gateway under a real waitress, with raw sockets.

No request target holding a control character (raw anywhere, percent-encoded in the path)
or a dot-segment followed by parameters ever reaches an upstream: a recording loopback
upstream checks it, for the examples of issue 11 (point 7) and, with Hypothesis, for the
whole class.
"""
from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rawkit import exchange, request_bytes
from tests.servers import make_token, module_gateway
from tests.upstream import Upstream

TOKEN = make_token(sub=7, lifetime=3600)


@pytest.fixture(scope="module")
def shipped():
    with Upstream() as upstream:
        env = {"RATE_LIMIT_AUTH": "100000/minute"}
        for name in ("USER", "EVENT", "MATCHING", "MESSAGING"):
            env[f"{name}_SERVICE_URL"] = upstream.url
        with module_gateway(env) as server:
            yield server, upstream


def send(server, target: bytes, method="GET"):
    headers = [("Authorization", f"Bearer {TOKEN}")]
    return exchange(server.port, request_bytes(method, target, headers, close=True),
                    method=method)


def assert_refused(shipped, target: bytes, method="GET"):
    server, upstream = shipped
    before = len(upstream.requests)
    response = send(server, target, method)
    assert len(upstream.requests) == before, (target, upstream.requests[before:])
    assert response.status == 400, (target, response)
    return response


def test_the_targets_are_served_when_clean(shipped):
    # Positive control: the same routes do reach the upstream.
    server, upstream = shipped
    for target in (b"/api/auth/login?next=javascript:", b"/api/users/7/x;v=1",
                   b"/api/users/7?q=a%09b%0Ac"):
        before = len(upstream.requests)
        assert send(server, target).status == 200
        assert len(upstream.requests) == before + 1
    # The encoded control characters in the query went upstream as sent, never decoded.
    assert upstream.requests[-1][1] == "/users/7?q=a%09b%0Ac"


@pytest.mark.parametrize("target", [
    b"/api/auth/login?next=java\tscript:", b"/api/auth/login?next=java\x00script:",
    b"/api/auth/login?next=java\x7fscript:", b"/api/auth/lo\tgin", b"/api/auth/lo\x01gin",
    b"/api/users/7\x1b", b"/api/users/7#\x0b", b"/api/users/7%00", b"/api/users/7%09",
    b"/api/users/%7F", b"/api/users/7%0d%0aX-Injected:%201",
])
def test_control_characters_are_a_json_400(shipped, target):
    response = assert_refused(shipped, target)
    assert response.json()["error"]["message"].startswith("control character")


@pytest.mark.parametrize("segment", [b"..;", b"..;x", b".;x", b"%2e%2e;x", b"%2E%2e;",
                                     b"..%3b", b"%2e%2e%3Bx", b".;"])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_dot_segments_with_parameters_are_a_json_400(shipped, segment, method):
    response = assert_refused(shipped, b"/api/auth/" + segment + b"/users/1", method)
    assert response.json()["error"]["message"] == "dot-segment in path"


_CONTROL = st.sampled_from([*range(0x20), 0x7F])
_SAFE = st.text(alphabet="abcXYZ019-._~!$&'()*+,=:@", max_size=6).map(str.encode)
_PREFIX = st.sampled_from([b"/api/auth/", b"/api/users/7/", b"/api/profile/", b"/health/",
                           b"/api/auth", b"/"])
_DOT = st.sampled_from([b".", b".."]).flatmap(
    lambda dots: st.lists(st.sampled_from([b".", b"%2e", b"%2E"]), min_size=len(dots),
                          max_size=len(dots)).map(b"".join))


@st.composite
def control_targets(draw):
    """A target with one control byte somewhere: path, query or fragment; raw, or encoded in
    the path."""
    byte = draw(_CONTROL)
    before, after = draw(_SAFE), draw(_SAFE)
    where = draw(st.sampled_from(["path", "query", "fragment", "encoded-path"]))
    prefix = draw(_PREFIX)
    if where == "path":
        return prefix + before + bytes([byte]) + after
    if where == "encoded-path":
        return prefix + before + b"%%%02X" % byte + after
    if where == "query":
        return prefix + before + b"?q=" + after + bytes([byte]) + b"&r=1"
    return prefix + before + b"#" + bytes([byte])


@st.composite
def dot_param_targets(draw):
    """A path with a ``.``/``..`` segment followed by parameters, in every spelling."""
    separator = draw(st.sampled_from([b";", b"%3b", b"%3B"]))
    segment = draw(_DOT) + separator + draw(_SAFE)
    tail = draw(st.sampled_from([b"", b"/users/1", b"/", b"?x=1"]))
    return draw(_PREFIX).rstrip(b"/") + b"/" + segment + tail


@settings(max_examples=150, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.one_of(control_targets(), dot_param_targets()),
       method=st.sampled_from(["GET", "POST", "DELETE", "OPTIONS"]))
def test_property_unsafe_targets_never_reach_the_upstream(shipped, target, method):
    server, upstream = shipped
    before = len(upstream.requests)
    response = send(server, target, method)
    assert len(upstream.requests) == before, (target, upstream.requests[before:])
    assert response.status == 400, (target, response)
    if b"\r" not in target and b"\n" not in target:
        # CR/LF end the request line: waitress refuses those itself, before the app runs.
        assert response.json()["error"]["code"] == 400
