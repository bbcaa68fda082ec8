"""CORS middleware: units through webtest + LintMiddleware, then the shipped gateway."""
from __future__ import annotations

import sys

import pytest
import webtest
from werkzeug.middleware.lint import LintMiddleware

from meetinity_gateway.assembly import load_pipeline
from meetinity_gateway.config import ConfigError
from meetinity_gateway.middleware.cors import (
    EXPOSED_ALWAYS,
    CorsMiddleware,
    OriginMatcher,
    filter_factory,
    parse_origin,
)
from meetinity_gateway.problems import error_response
from tests.servers import TEST_JWT_SECRET, SHIPPED_INI, auth_headers, free_port, session

APP = "https://app.meetinity.com"
MOBILE_HEADERS = "authorization, content-type, x-client-version, x-client-platform"


class Inner:
    """A WSGI app that records the requests reaching it and answers as told."""

    def __init__(self, status="200 OK", headers=(), body=b'{"ok":true}'):
        self.status = status
        self.headers = list(headers)
        self.body = body
        self.calls = []

    def __call__(self, environ, start_response):
        self.calls.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
        start_response(self.status, [("Content-Type", "application/json"),
                                     ("Content-Length", str(len(self.body))), *self.headers])
        return [self.body]


def client(inner=None, **kwargs):
    inner = inner or Inner()
    return webtest.TestApp(LintMiddleware(CorsMiddleware(inner, **kwargs))), inner


def cors_headers(response):
    return {k: v for k, v in response.headerlist if k.lower().startswith("access-control-")}


# werkzeug's lint wants "Content-Length: 0" on a 204; RFC 9110 (section 8.6) forbids sending
# Content-Length with a 204 at all, and the middleware follows the RFC.
rfc_204 = pytest.mark.filterwarnings("ignore:204 responses must have an empty content length")


def preflight(app, origin=APP, method="POST", headers=None, path="/api/auth/login", **kw):
    request_headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        request_headers["Access-Control-Request-Headers"] = headers
    return app.options(path, headers=request_headers, **kw)


# -- origins ---------------------------------------------------------------------------------

@pytest.mark.parametrize("origin, allowed", [
    ("https://meetinity.com", True),
    ("https://app.meetinity.com", True),
    ("https://a.b.meetinity.com", True),
    ("https://x.meetinity.com.evil.com", False),
    ("https://evilmeetinity.com", False),
    ("https://x-meetinity.com", False),
    ("http://app.meetinity.com", False),
    ("https://app.meetinity.com:8443", False),
    ("https://.meetinity.com", False),
    ("https://app.meetinity.com/", False),
    ("http://localhost:3000", True),
    ("http://localhost:3001", False),
    ("null", False),
    ("", False),
])
def test_origin_matcher_exact_and_anchored_patterns(origin, allowed):
    matcher = OriginMatcher(["https://meetinity.com", "https://*.meetinity.com",
                             "http://localhost:3000"])
    assert matcher.allows(origin) is allowed


def test_configured_origins_are_normalized():
    matcher = OriginMatcher(["HTTPS://Meetinity.COM:443", "http://Example.com:80"])
    assert matcher.exact == {"https://meetinity.com", "http://example.com"}
    assert parse_origin("http://127.0.0.1:8000") == ("http", "127.0.0.1", 8000)


@pytest.mark.parametrize("bad", [
    "null", "meetinity.com", "https://meetinity.com/", "https://meetinity.com/path",
    "https://user@meetinity.com", "https://meetinity.com?x=1", "https://*.com",
    "https://x.*.meetinity.com", "https://*meetinity.com", "https://meetinity.com:0",
    "https://meetinity.com:70000", "https://meetinity.com:abc", "https://[::1]:8080",
    "https://", "https://bad_host.com", "*, https://meetinity.com",
])
def test_bad_origin_is_a_config_error_naming_the_key(bad):
    with pytest.raises(ConfigError) as info:
        CorsMiddleware(Inner(), origins=bad)
    assert info.value.key == "origins"


def test_any_origin_with_credentials_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        CorsMiddleware(Inner(), origins=["*"], allow_credentials=True)
    assert info.value.key == "allow_credentials"
    assert "credentials" in str(info.value)


@pytest.mark.parametrize("kwargs, key", [
    ({"allow_methods": ["GET", "BAD METHOD"]}, "allow_methods"),
    ({"allow_methods": []}, "allow_methods"),
    ({"allow_headers": ["X-Ok", "Bad:Header"]}, "allow_headers"),
    ({"expose_headers": ["Bad Header"]}, "expose_headers"),
    ({"max_age": -1}, "max_age"),
    ({"max_age": "600"}, "max_age"),
])
def test_bad_keyword_arguments_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as info:
        CorsMiddleware(Inner(), **kwargs)
    assert info.value.key == key


# -- actual requests -----------------------------------------------------------------------

def test_allowed_origin_gets_its_origin_vary_and_exposed_headers():
    app, inner = client(origins=[APP, "https://*.meetinity.com"], allow_credentials=True)
    response = app.get("/api/users/1", headers={"Origin": "https://x.meetinity.com"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://x.meetinity.com"
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert response.headers["Vary"] == "Origin"
    exposed = [h.strip() for h in response.headers["Access-Control-Expose-Headers"].split(",")]
    for name in EXPOSED_ALWAYS:
        assert name in exposed
    assert {"X-Request-ID", "RateLimit", "RateLimit-Policy", "X-RateLimit-Limit",
            "X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After"} <= set(exposed)
    assert inner.calls == [("GET", "/api/users/1")]


def test_any_origin_answers_star_without_credentials():
    app, _ = client()  # default: "*"
    response = app.get("/x", headers={"Origin": "https://anyone.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert response.headers["Vary"] == "Origin"


def test_extra_exposed_headers_are_added_to_the_required_ones():
    app, _ = client(expose_headers="X-Total-Count, x-request-id")
    response = app.get("/x", headers={"Origin": APP})
    exposed = [h.strip() for h in response.headers["Access-Control-Expose-Headers"].split(",")]
    assert exposed == list(EXPOSED_ALWAYS) + ["X-Total-Count"]


@pytest.mark.parametrize("origin", [None, "https://evil.example", "null"])
def test_disallowed_or_missing_origin_passes_through_without_cors_headers(origin):
    app, inner = client(origins=[APP])
    headers = {"Origin": origin} if origin else {}
    response = app.post_json("/api/auth/login", {"a": 1}, headers=headers)
    assert response.status_int == 200
    assert cors_headers(response) == {}
    assert response.headers["Vary"] == "Origin"
    assert inner.calls == [("POST", "/api/auth/login")]


def test_vary_is_merged_not_duplicated():
    inner = Inner(headers=[("Vary", "Accept-Encoding"), ("Vary", "origin, Accept")])
    app, _ = client(inner, origins=[APP])
    response = app.get("/x", headers={"Origin": APP})
    assert [v for k, v in response.headerlist if k == "Vary"] == ["Accept-Encoding, origin, Accept"]


def test_vary_star_is_left_alone():
    app, _ = client(Inner(headers=[("Vary", "*")]), origins=[APP])
    response = app.get("/x", headers={"Origin": APP})
    assert [v for k, v in response.headerlist if k == "Vary"] == ["*"]


def test_inner_access_control_headers_are_replaced_for_an_allowed_origin():
    inner = Inner(headers=[("Access-Control-Allow-Origin", "*"),
                           ("Access-Control-Allow-Credentials", "false"),
                           ("access-control-expose-headers", "X-Secret"),
                           ("X-Public", "yes")])
    app, _ = client(inner, origins=[APP], allow_credentials=True)
    response = app.get("/x", headers={"Origin": APP})
    names = [k.lower() for k, _ in response.headerlist]
    assert names.count("access-control-allow-origin") == 1
    assert names.count("access-control-allow-credentials") == 1
    assert names.count("access-control-expose-headers") == 1
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert "X-Secret" not in response.headers["Access-Control-Expose-Headers"]
    assert response.headers["X-Public"] == "yes"


@pytest.mark.parametrize("code, extra", [
    (401, [("WWW-Authenticate", 'Bearer error="invalid_token"')]),
    (404, []),
    (429, [("Retry-After", "30")]),
    (502, []),
    (504, []),
])
def test_gateway_made_errors_carry_cors_headers(code, extra):
    def failing(environ, start_response):
        return error_response(environ, start_response, code, "gateway said no", headers=extra)

    app, _ = client(failing, origins=[APP])
    response = app.get("/api/users/1", headers={"Origin": APP}, status=code)
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert response.json["error"]["code"] == code
    for name, value in extra:
        assert response.headers[name] == value


def test_exc_info_is_passed_through_when_an_error_replaces_a_started_response():
    def replaces(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise RuntimeError("upstream broke before the first byte")
        except RuntimeError:
            return error_response(environ, start_response, 502, "upstream unavailable",
                                  exc_info=sys.exc_info())

    app, _ = client(replaces, origins=[APP])
    response = app.get("/x", headers={"Origin": APP}, status=502)
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert response.json["error"]["message"] == "upstream unavailable"


# -- preflights ------------------------------------------------------------------------------

@rfc_204
def test_preflight_is_answered_204_and_never_reaches_the_app():
    app, inner = client(origins=[APP], allow_credentials=True, max_age=120)
    response = preflight(app, headers=MOBILE_HEADERS, status=204)
    assert response.body == b""
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in response.headers["Access-Control-Allow-Methods"].split(", ")
    granted = {h.lower() for h in response.headers["Access-Control-Allow-Headers"].split(", ")}
    assert granted == {"authorization", "content-type", "x-client-version",
                       "x-client-platform"}
    assert response.headers["Access-Control-Max-Age"] == "120"
    assert "Origin" in response.headers["Vary"]
    assert inner.calls == []


@rfc_204
def test_preflight_defaults_max_age_600_and_omits_empty_allow_headers():
    app, _ = client()
    response = preflight(app, origin="https://any.example", method="DELETE", status=204)
    assert response.headers["Access-Control-Max-Age"] == "600"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Headers" not in response.headers
    assert "Access-Control-Expose-Headers" not in response.headers


@rfc_204
def test_preflight_with_configured_headers_answers_the_configured_list():
    app, _ = client(allow_headers=["Authorization", "Content-Type"])
    response = preflight(app, headers="content-type", status=204)
    assert response.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"


@pytest.mark.parametrize("kwargs, origin, method, headers, reason", [
    ({"origins": [APP]}, "https://evil.example", "POST", None, "origin not allowed"),
    ({"origins": [APP]}, "https://x.meetinity.com.evil.com", "GET", None, "origin not allowed"),
    ({"allow_methods": ["GET", "POST"]}, APP, "DELETE", None, "method 'DELETE' not allowed"),
    ({"allow_headers": ["Content-Type"]}, APP, "POST", "content-type, x-secret",
     "header 'x-secret' not allowed"),
    ({}, APP, "POST", "x-ok, bad header", "malformed header name 'bad header'"),
    ({}, APP, "POST", ", ".join(f"x-h{i}" for i in range(65)), "too many headers requested"),
])
def test_refused_preflight_is_403_json_without_cors_headers(kwargs, origin, method, headers,
                                                            reason):
    app, inner = client(**kwargs)
    response = preflight(app, origin=origin, method=method, headers=headers, status=403)
    assert cors_headers(response) == {}
    assert response.json["error"]["code"] == 403
    assert response.json["error"]["message"] == f"CORS preflight refused: {reason}"
    assert "Origin" in response.headers["Vary"]
    assert inner.calls == []


def test_plain_options_is_not_a_preflight():
    app, inner = client(origins=[APP])
    response = app.options("/api/users", headers={"Origin": APP})
    assert response.status_int == 200
    assert inner.calls == [("OPTIONS", "/api/users")]
    assert response.headers["Access-Control-Allow-Origin"] == APP


def test_options_with_request_method_but_no_origin_goes_to_the_app():
    app, inner = client(origins=[APP])
    app.options("/api/users", headers={"Access-Control-Request-Method": "GET"})
    assert inner.calls == [("OPTIONS", "/api/users")]


@pytest.mark.parametrize("extra, body", [
    ({"X-HTTP-Method-Override": "DELETE"}, b""),
    ({"X-HTTP-Method": "DELETE"}, b""),
    ({"X-Method-Override": "DELETE"}, b""),
    ({}, b'{"x": 1}'),
    ({"Access-Control-Request-Method": "DE LETE"}, b""),
])
@pytest.mark.parametrize("origin", [APP, "https://evil.example"])
def test_preflight_lookalikes_are_refused_and_never_forwarded(extra, body, origin):
    app, inner = client(origins=[APP])
    headers = {"Origin": origin, "Access-Control-Request-Method": "GET", **extra}
    response = app.request("/api/users/7", method="OPTIONS", headers=headers, body=body,
                           status=400)
    assert response.json["error"]["message"].startswith("malformed CORS preflight")
    assert cors_headers(response) == {}
    assert inner.calls == []


def test_is_preflight_is_the_one_definition():
    from meetinity_gateway.preflight import is_preflight

    base = {"REQUEST_METHOD": "OPTIONS", "HTTP_ORIGIN": APP,
            "HTTP_ACCESS_CONTROL_REQUEST_METHOD": "PUT"}
    assert is_preflight(base)
    assert is_preflight({**base, "CONTENT_LENGTH": "0"})
    for change in ({"REQUEST_METHOD": "options"}, {"REQUEST_METHOD": "GET"},
                   {"HTTP_ORIGIN": ""}, {"HTTP_ACCESS_CONTROL_REQUEST_METHOD": ""},
                   {"CONTENT_LENGTH": "3"}, {"HTTP_TRANSFER_ENCODING": "chunked"},
                   {"HTTP_X_HTTP_METHOD_OVERRIDE": "DELETE"}):
        assert not is_preflight({**base, **change}), change
    assert not is_preflight({k: v for k, v in base.items() if k != "HTTP_ORIGIN"})


# -- filter_factory --------------------------------------------------------------------------

def test_filter_factory_casts_strings(monkeypatch):
    monkeypatch.setenv("CORS_ORIGINS", f"{APP}, https://*.meetinity.com")
    make = filter_factory({}, origins="${CORS_ORIGINS:-*}", allow_credentials="yes",
                          allow_methods="GET, POST", allow_headers="", max_age="60",
                          expose_headers="X-Total-Count")
    middleware = make(Inner())
    assert middleware.origins.exact == {APP}
    assert middleware.allow_credentials is True
    assert middleware.allow_methods == ("GET", "POST")
    assert middleware.allow_headers is None
    assert middleware.max_age == 60
    assert middleware.expose_headers[-1] == "X-Total-Count"


@pytest.mark.parametrize("conf, key", [
    ({"origins": "*", "allow_credentials": "true"}, "allow_credentials"),
    ({"origins": "https://meetinity.com/"}, "origins"),
    ({"max_age": "ten"}, "max_age"),
    ({"allow_credentials": "maybe"}, "allow_credentials"),
    ({"orgins": "*"}, "orgins"),
])
def test_filter_factory_fails_at_start(conf, key):
    with pytest.raises(ConfigError) as info:
        filter_factory({"__file__": "gateway.ini"}, **conf)
    assert info.value.key == key


def test_shipped_ini_fails_at_start_on_star_with_credentials(monkeypatch):
    monkeypatch.setenv("CORS_ALLOW_CREDENTIALS", "true")
    monkeypatch.setenv("JWT_SECRET", TEST_JWT_SECRET)
    with pytest.raises(ConfigError) as info:
        load_pipeline(SHIPPED_INI)
    assert info.value.section == "filter:cors"
    assert "credentials" in str(info.value)


# -- the shipped gateway, end to end ---------------------------------------------------------

def _pipeline_names():
    return load_pipeline(SHIPPED_INI).names


def test_shipped_pipeline_puts_cors_right_after_errors():
    names = _pipeline_names()
    assert names.index("cors") == names.index("errors") + 1


def test_gateway_default_any_origin_and_preflight_never_reaches_upstream(gateway, upstream):
    with session() as http:
        answer = http.options(gateway.url + "/api/users/7", headers={
            "Origin": "https://any.example", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": MOBILE_HEADERS})
        assert answer.status_code == 204
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
        assert "x-client-platform" in answer.headers["Access-Control-Allow-Headers"]
        assert upstream.requests == []
        # The actual request: the request id is exposed, the upstream's CORS header dropped.
        answer = http.get(gateway.url + "/api/users/42/hop",
                          headers={"Origin": "https://any.example", **auth_headers()})
        assert answer.status_code == 200
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
        assert "X-Request-ID" in answer.headers["Access-Control-Expose-Headers"]
        assert answer.headers["X-Request-ID"]
        assert answer.raw.headers.getlist("Access-Control-Allow-Origin") == ["*"]


def test_gateway_errors_carry_cors_headers_for_an_allowed_origin(gateway_factory):
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = gateway_factory(CORS_ORIGINS=APP, CORS_ALLOW_CREDENTIALS="true",
                              UPSTREAM_READ_TIMEOUT="0.3")
    down = gateway_factory(CORS_ORIGINS=APP, USER_SERVICE_URL=dead)
    auth_in_pipeline = "auth" in _pipeline_names()
    cases = [
        (gateway.url + "/api/nothing-here", auth_headers(), 404),  # deny by default
        (gateway.url + "/api/users/slow?seconds=2", auth_headers(), 504),
        (down.url + "/api/auth/login", {}, 502),
    ]
    if auth_in_pipeline:
        cases.append((gateway.url + "/api/users/7", {"Authorization": "Bearer nope"}, 401))
    with session() as http:
        for url, headers, code in cases:
            answer = http.get(url, headers={"Origin": APP, **headers})
            assert answer.status_code == code, url
            assert answer.headers["Access-Control-Allow-Origin"] == APP, url
            assert answer.headers["Access-Control-Allow-Credentials"] == "true"
            assert answer.headers["Vary"] == "Origin" or "Origin" in answer.headers["Vary"]
            assert answer.json()["error"]["code"] == code
            assert answer.json()["error"]["request_id"] == answer.headers["X-Request-ID"]


def test_gateway_disallowed_origin_gets_no_cors_but_is_served(gateway_factory, upstream):
    gateway = gateway_factory(CORS_ORIGINS=APP)
    with session() as http:
        answer = http.post(gateway.url + "/api/auth/login", json={"email": "a@b.c"},
                           headers={"Origin": "https://evil.example"})
        assert answer.status_code == 200
        assert not [k for k in answer.headers if k.lower().startswith("access-control-")]
        assert "Origin" in answer.headers["Vary"]
        refused = http.options(gateway.url + "/api/auth/login", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert refused.status_code == 403
        assert refused.json()["error"]["message"] == "CORS preflight refused: origin not allowed"
        assert not [k for k in refused.headers if k.lower().startswith("access-control-")]
    assert [r[0] for r in upstream.requests] == ["POST"]
