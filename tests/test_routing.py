"""The router, alone (webtest + LintMiddleware)."""
from __future__ import annotations

import json

import pytest
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware

from meetinity_gateway.proxy.app import UPSTREAM_PATH_KEY
from meetinity_gateway.routing import ROUTE_KEY, Router, parse_route


def endpoint(name):
    def app(environ, start_response):
        body = json.dumps({"endpoint": name, "route": environ[ROUTE_KEY],
                           "upstream_path": environ[UPSTREAM_PATH_KEY]}).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    return app


ROUTES = [
    ("health", "GET /health -> @health"),
    ("live", "GET /health/live -> @live"),
    ("users", "/api/users/* -> user_service /users"),
    ("auth", "POST,get /api/auth/* -> user_service /auth"),
    ("raw", "/raw/* -> user_service"),
    ("flat", "/api/flat/* -> user_service /"),
]


@pytest.fixture
def app():
    router = Router([parse_route(n, s) for n, s in ROUTES],
                    {"user_service": endpoint("user_service"), "@health": endpoint("health"),
                     "@live": endpoint("live")})
    return TestApp(LintMiddleware(router))


@pytest.mark.parametrize("path, route, upstream_path", [
    ("/api/users", "users", "/users"),
    ("/api/users/", "users", "/users/"),
    ("/api/users/7", "users", "/users/7"),
    ("/api/users/7/photos/", "users", "/users/7/photos/"),
    ("/api/users//7", "users", "/users//7"),
    ("/raw/a/b", "raw", "/raw/a/b"),
    ("/api/flat/x", "flat", "/x"),
    ("/api/flat", "flat", "/"),
    ("/health", "health", "/health"),
    ("/health/live", "live", "/health/live"),
])
def test_routes_and_rewrites(app, path, route, upstream_path):
    body = app.get(path).json
    assert body["route"] == route
    assert body["upstream_path"] == upstream_path


@pytest.mark.parametrize("path", ["/api/usersX", "/api", "/", "/health/other", "/raw2",
                                  "/api/flatten"])
def test_unmatched_is_json_404(app, path):
    response = app.get(path, status=404)
    assert response.json["error"]["code"] == 404
    assert response.content_type == "application/json"


def test_wrong_method_is_json_405_with_allow(app):
    response = app.post("/health", status=405)
    assert response.json["error"]["code"] == 405
    assert response.headers["Allow"] == "GET, HEAD"
    response = app.delete("/api/auth/login", status=405)
    assert response.headers["Allow"] == "GET, HEAD, POST"


def test_head_comes_with_get(app):
    assert app.head("/health").status_int == 200


def test_never_redirects(app):
    for path in ["/health/", "/api/users/", "/api//users"]:
        response = app.get(path, expect_errors=True)
        assert response.status_int in (200, 404)


@pytest.mark.parametrize("spec, message", [
    ("/api/users -> ", "expected"),
    ("api/users -> x", "expected"),
    ("/api/users -> x /users", "rewrite needs a prefix"),
    ("/api/../x/* -> x", "dot-segment"),
    ("/api/<x>/* -> x", "not a path prefix"),
    ("G3T /x -> x", "expected"),
])
def test_bad_route_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_route("bad", spec)


def test_router_rejects_unknown_targets_and_duplicates():
    with pytest.raises(ValueError, match="unknown target"):
        Router([parse_route("a", "/a/* -> nowhere")], {})
    with pytest.raises(ValueError, match="already routed"):
        Router([parse_route("a", "/a/* -> x"), parse_route("b", "/a/ -> x")], {"x": endpoint("x")})


def test_describe():
    assert parse_route("users", "/api/users/* -> user_service /users").describe() == \
        "users: * /api/users/* -> user_service /users"
    assert parse_route("h", "get /health -> @health").describe() == "h: GET /health -> @health"
