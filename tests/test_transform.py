"""Header transformation rules: parsing, the WSGI wrapper alone, and end to end through
waitress with the real loopback upstream (a custom ini and the shipped one)."""
from __future__ import annotations

import json

import pytest
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware

from meetinity_gateway.assembly import load_app, load_pipeline
from meetinity_gateway.config import ConfigError
from meetinity_gateway.transform import HeaderRule, HeaderRules, parse_transform
from tests.servers import WaitressServer, auth_headers, free_port, session, write_ini

# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, routes, rule", [
    ("auth response set Cache-Control no-store", ("auth",),
     HeaderRule("response", "set", ("Cache-Control",), "no-store")),
    ("* response remove Server, X-Powered-By", None,
     HeaderRule("response", "remove", ("Server", "X-Powered-By"))),
    ("users, profile request append Accept-Language fr-FR, en;q=0.5", ("users", "profile"),
     HeaderRule("request", "append", ("Accept-Language",), "fr-FR, en;q=0.5")),
    ("  api  REQUEST  Set  X-Tenant\tacme corp  ", ("api",),
     HeaderRule("request", "set", ("X-Tenant",), "acme corp")),
    ("api request remove Cookie", ("api",), HeaderRule("request", "remove", ("Cookie",))),
])
def test_parse(spec, routes, rule):
    assert parse_transform(spec) == (routes, rule)


@pytest.mark.parametrize("spec, reason", [
    ("api response set X-A a\r\nX-Injected: 1", "control characters"),
    ("api response set X-A a\nb", "control characters"),
    ("api request set X-A a\x00", "control characters"),
    ("api response set X-A caf\u20ac", "latin-1"),
    ("api response set Bad:Name v", "not a valid header name"),
    ("api response set X(A) v", "not a valid header name"),
    ("api response remove X-A, , X-B", "not a valid header name"),
    ("api request set X_Tenant v", "cannot hold '_'"),
    ("api response set Content-Length 5", "cannot be transformed"),
    ("api response remove Transfer-Encoding", "cannot be transformed"),
    ("api request set Host evil.example", "cannot be transformed"),
    ("api request set Connection close", "cannot be transformed"),
    ("api sideways set X-A v", "request or response"),
    ("api request replace X-A v", "set, append or remove"),
    ("api response set X-A", "needs a value"),
    ("api response remove", "needs a header name"),
    ("request set X-A v", "request or response"),
    ("", "expected"),
])
def test_bad_rules(spec, reason):
    with pytest.raises(ValueError, match=reason):
        parse_transform(spec)


# -- the wrapper alone -----------------------------------------------------------------------

def headers_app(environ, start_response):
    seen = {key: value for key, value in environ.items()
            if key.startswith("HTTP_") or key == "CONTENT_TYPE"}
    body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body))),
                              ("Server", "upstream/1.0"), ("X-Powered-By", "PHP"),
                              ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                              ("Cache-Control", "public"), ("Cache-Control", "max-age=60")])
    return [body]


def rules(*specs):
    return [parse_transform(spec)[1] for spec in specs]


def test_request_rules_alone():
    app = TestApp(LintMiddleware(HeaderRules(LintMiddleware(headers_app), rules(
        "x request set X-Tenant acme",
        "x request append Accept-Language fr",
        "x request append X-Trail one",
        "x request remove X-Debug, Cookie",
        "x request set Content-Type application/json",
    ))))
    seen = app.get("/", headers={"X-Tenant": "forged", "Accept-Language": "en",
                                 "X-Debug": "1", "Cookie": "s=1",
                                 "Content-Type": "text/plain"}).json
    assert seen["HTTP_X_TENANT"] == "acme"
    assert seen["HTTP_ACCEPT_LANGUAGE"] == "en, fr"
    assert seen["HTTP_X_TRAIL"] == "one"
    assert "HTTP_X_DEBUG" not in seen and "HTTP_COOKIE" not in seen
    assert seen["CONTENT_TYPE"] == "application/json"


def test_response_rules_alone_in_order():
    app = TestApp(LintMiddleware(HeaderRules(LintMiddleware(headers_app), rules(
        "x response remove Server, x-powered-by",
        "x response set Cache-Control no-store",
        "x response append Set-Cookie c=3",
        "x response append X-Frame-Options DENY",
    ))))
    response = app.get("/")
    assert "Server" not in response.headers and "X-Powered-By" not in response.headers
    assert response.headers.getall("Cache-Control") == ["no-store"]
    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2", "c=3"]
    assert response.headers["X-Frame-Options"] == "DENY"


# -- through the app factory and waitress ------------------------------------------------------

INI = """
[pipeline:main]
pipeline = observe errors gateway

[filter:observe]
use = egg:meetinity_gateway#observe

[filter:errors]
use = egg:meetinity_gateway#errors

[app:gateway]
use = egg:meetinity_gateway#main
upstream.svc = ${USER_SERVICE_URL}
route.api = /api/* -> svc /
route.other = /other/* -> svc /
transform.req_set = api request set X-Tenant ${TENANT:-meetinity}
transform.req_append = api request append Accept-Language fr
transform.req_remove = api request remove X-Debug, Cookie
transform.resp_set = api response set Cache-Control no-store, max-age=0
transform.resp_append = api response append Set-Cookie seen=1; Path=/
transform.resp_remove = api, other response remove X-Powered-By, Server
"""


def received(response) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    return headers


def test_every_kind_end_to_end(tmp_path, monkeypatch, upstream):
    monkeypatch.setenv("USER_SERVICE_URL", upstream.url)
    monkeypatch.setenv("TENANT", "acme")
    ini = write_ini(tmp_path / "gateway.ini", INI)
    client = session()
    with WaitressServer(load_app(ini)) as gateway:
        sent = {"X-Tenant": "forged", "Accept-Language": "en", "X-Debug": "1",
                "Cookie": "sid=1"}
        response = client.get(gateway.url + "/api/powered", headers=sent)
        upstream_saw = received(response)
        assert upstream_saw["x-tenant"] == ["acme"]
        assert upstream_saw["accept-language"] == ["en, fr"]
        assert "x-debug" not in upstream_saw and "cookie" not in upstream_saw
        assert "X-Powered-By" not in response.headers
        # The upstream's Server is gone; waitress names the gateway instead.
        assert response.headers["Server"] == "meetinity-gateway"
        assert response.headers["X-Keep"] == "yes"
        assert response.headers["Cache-Control"] == "no-store, max-age=0"
        assert response.raw.headers.getlist("Set-Cookie") == ["seen=1; Path=/"]

        cookies = client.get(gateway.url + "/api/cookies")
        assert cookies.raw.headers.getlist("Set-Cookie") == [
            "session=abc; Path=/; HttpOnly", "theme=dark; Path=/", "seen=1; Path=/"]

        other = client.get(gateway.url + "/other/powered", headers=sent)
        assert "X-Powered-By" not in other.headers
        assert "Cache-Control" not in other.headers
        untouched = received(other)
        assert untouched["x-tenant"] == ["forged"] and untouched["x-debug"] == ["1"]

    # The proxy's own answers of the route get the response rules too.
    monkeypatch.setenv("USER_SERVICE_URL", f"http://127.0.0.1:{free_port()}")
    with WaitressServer(load_app(ini)) as gateway:
        failed = client.get(gateway.url + "/api/anything")
        assert failed.status_code == 502
        assert failed.headers["Cache-Control"] == "no-store, max-age=0"


def test_shipped_rules(gateway):
    client = session()
    auth = client.get(gateway.url + "/api/auth/powered")
    assert auth.status_code == 200
    assert auth.headers["Cache-Control"] == "no-store"
    assert "X-Powered-By" not in auth.headers
    assert auth.headers["Server"] == "meetinity-gateway"
    users = client.get(gateway.url + "/api/users/42/powered", headers=auth_headers())
    assert users.status_code == 200
    assert "X-Powered-By" not in users.headers and "Cache-Control" not in users.headers


def test_crlf_from_a_variable_fails_at_start(tmp_path, monkeypatch, upstream):
    monkeypatch.setenv("USER_SERVICE_URL", upstream.url)
    monkeypatch.setenv("TENANT", "acme\r\nX-Injected: yes")
    ini = write_ini(tmp_path / "gateway.ini", INI)
    with pytest.raises(ConfigError) as info:
        load_pipeline(ini)
    assert info.value.key == "transform.req_set"
    assert info.value.section == "app:gateway" and info.value.file == str(ini)
    assert "control characters" in str(info.value)


@pytest.mark.parametrize("line, key, reason", [
    ("transform.x = nowhere response set X-A b", "transform.x", "unknown route 'nowhere'"),
    ("transform.y = api response set X-A", "transform.y", "needs a value"),
    ("transformer = api response set X-A b", "transformer", "unknown key"),
])
def test_bad_rules_in_the_ini_fail_at_start(tmp_path, monkeypatch, upstream, line, key, reason):
    monkeypatch.setenv("USER_SERVICE_URL", upstream.url)
    ini = write_ini(tmp_path / "gateway.ini", INI + line + "\n")
    with pytest.raises(ConfigError, match=reason) as info:
        load_pipeline(ini)
    assert info.value.key == key


# -- claims in request values ----------------------------------------------------------------

def _identity_app(claims, *specs):
    seen = []

    def inner(environ, start_response):
        seen.append({k: v for k, v in environ.items() if k == "HTTP_AUTHORIZATION"})
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    rules = [parse_transform(spec)[1] for spec in specs]
    extra = {} if claims is None else {"meetinity_gateway.claims": claims}
    return TestApp(LintMiddleware(HeaderRules(LintMiddleware(inner), rules)),
                   extra_environ=extra), seen


@pytest.mark.parametrize("sub", ["42", 42])
def test_a_request_value_names_the_verified_caller(sub):
    app, seen = _identity_app({"sub": sub},
                              "conv request set Authorization Bearer user:{claim:sub}")
    response = app.get("/", headers={"Authorization": "Bearer user:7"})
    assert response.status_int == 200
    assert seen == [{"HTTP_AUTHORIZATION": "Bearer user:42"}]   # never the client's value


@pytest.mark.parametrize("claims", [None, {}, {"sub": ""}, {"sub": None}, {"sub": True},
                                    {"sub": ["42"]}, {"sub": "4\r\n2"}, {"sub": "\u20ac"}])
def test_a_claim_the_token_lacks_is_403_never_an_empty_identity(claims):
    app, seen = _identity_app(claims, "conv request set Authorization Bearer user:{claim:sub}")
    response = app.get("/", headers={"Authorization": "Bearer user:7"}, status=403)
    assert response.json["error"]["code"] == 403 and "sub" in response.json["error"]["message"]
    assert seen == []


def test_claims_only_in_request_rules():
    with pytest.raises(ValueError, match="request rules only"):
        parse_transform("conv response set X-Who {claim:sub}")
