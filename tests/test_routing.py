"""The router, alone (webtest + LintMiddleware)."""
from __future__ import annotations

import json

import pytest
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware

from meetinity_gateway.proxy.app import UPSTREAM_PATH_KEY
from meetinity_gateway.routing import PATH_PARAMS_KEY, ROUTE_KEY, Router, parse_route


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
    ("/api/../x/* -> x", "dot-segment"),
    ("/api/<int:id>/x -> x /users/<uid>", "parameter <uid> is not in the path"),
    ("/api/x -> x /users/<id>", "parameter <id> is not in the path"),
    ("/api/<foo:x> -> x", "unknown converter 'foo'"),
    ("/api/<x>/<int:x> -> x", "appears twice"),
    ("/api/<path:p>/* -> x", "cannot be followed"),
    ("/api/a<b -> x", "bad segment"),
    ("/api/<int(bogus=1):x> -> x", "/api/"),
    ("/api/x -> x /a/../b", "dot-segment"),
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


# -- parameterised routes (issue 12, point 1) -------------------------------------------------

PLATFORM = [
    ("users", "/api/users/* -> user_service /users"),
    ("recommendations",
     "/api/users/<int:id>/recommendations -> event_service /users/<id>/recommendations"),
    ("event", "GET /api/events/<int:id> -> event_service /events/<id>"),
    ("event_slug", "GET /api/events/<slug> -> event_service /events/by-slug/<slug>"),
    ("events", "/api/events/* -> event_service /events"),
    ("owned", "/api/things/<uuid:key>/* -> event_service /t/<key>"),
    ("suggest", "GET /api/matching/algorithm/suggest/<int:id> -> matching /algorithm/suggest/<id>"),
    ("swipe", "POST /api/matching/swipe -> matching /swipe"),
]


@pytest.fixture
def platform():
    endpoints = {name: endpoint(name) for name in ("user_service", "event_service", "matching")}
    router = Router([parse_route(n, s) for n, s in PLATFORM], endpoints)
    return TestApp(LintMiddleware(router))


@pytest.mark.parametrize("path, route, upstream_path", [
    ("/api/users/7/recommendations", "recommendations", "/users/7/recommendations"),
    ("/api/users/007/recommendations", "recommendations", "/users/7/recommendations"),
    ("/api/users/7/recommendations/", "recommendations", "/users/7/recommendations"),
    # Not an int, or deeper: the prefix route keeps it.
    ("/api/users/x/recommendations", "users", "/users/x/recommendations"),
    ("/api/users/-1/recommendations", "users", "/users/-1/recommendations"),
    ("/api/users/7/recommendations/9", "users", "/users/7/recommendations/9"),
    ("/api/users/7", "users", "/users/7"),
    ("/api/users", "users", "/users"),
    # Ties decided by Werkzeug's ordering, not file order: int beats string beats prefix.
    ("/api/events/12", "event", "/events/12"),
    ("/api/events/summer-fest", "event_slug", "/events/by-slug/summer-fest"),
    ("/api/events/12/registrations", "events", "/events/12/registrations"),
    ("/api/events", "events", "/events"),
    ("/api/things/00000000-0000-0000-0000-000000000001", "owned",
     "/t/00000000-0000-0000-0000-000000000001"),
    ("/api/things/00000000-0000-0000-0000-000000000001/a/b", "owned",
     "/t/00000000-0000-0000-0000-000000000001/a/b"),
    ("/api/matching/algorithm/suggest/5", "suggest", "/algorithm/suggest/5"),
])
def test_parameterised_routes_most_specific_wins(platform, path, route, upstream_path):
    body = platform.get(path).json
    assert (body["route"], body["upstream_path"]) == (route, upstream_path)


def test_a_method_specific_route_falls_through_to_the_prefix(platform):
    # POST /api/events/12 is not "event" (GET only): the prefix route takes it.
    body = platform.post("/api/events/12").json
    assert (body["route"], body["upstream_path"]) == ("events", "/events/12")
    assert platform.get("/api/things/not-a-uuid", status=404).json["error"]["code"] == 404
    response = platform.get("/api/matching/swipe", status=405)
    assert response.headers["Allow"] == "POST"


def test_path_parameters_go_into_the_environ():
    seen = {}

    def app(environ, start_response):
        seen.update(environ[PATH_PARAMS_KEY])
        start_response("204 No Content", [])
        return []

    router = Router([parse_route("r", "/a/<int:id>/b/<name> -> x /z/<name>/<id>")], {"x": app})
    TestApp(router).get("/a/5/b/caf%C3%A9", status=204)
    assert seen == {"id": 5, "name": "caf\xc3\xa9"}  # PEP 3333: latin-1 mapped bytes


@pytest.mark.parametrize("first, second", [
    ("/a/<x> -> x", "/a/<y> -> x"),
    ("/a/<int:x>/* -> x", "/a/<int:y>/* -> x"),
    ("/a/<string:x> -> x", "/a/<x> -> x"),
    ("GET,POST /a/<x> -> x", "POST /a/<y> -> x"),
    ("/a/<int:x> -> x", "/a/<int:y> -> x"),
    ("/a/* -> x", "/a -> x"),
    ("/a/<x>/* -> x", "/a/<y> -> x"),
    ("/a/<int:x>/b/* -> x", "/a/<int:y>/b -> x"),
])
def test_ties_that_file_order_would_decide_are_refused(first, second):
    with pytest.raises(ValueError, match="already routed by a"):
        Router([parse_route("a", first), parse_route("b", second)], {"x": endpoint("x")})


def test_a_route_naming_the_method_wins_over_an_all_methods_route_whatever_the_order():
    for specs in (["/a/<x> -> x", "POST /a/<y> -> x"], ["POST /a/<y> -> x", "/a/<x> -> x"]):
        routes = [parse_route(name, spec) for name, spec in zip(("first", "second"), specs)]
        app = TestApp(Router(routes, {"x": endpoint("x")}))
        post_route = routes[0].name if specs[0].startswith("POST") else routes[1].name
        assert app.post("/a/1").json["route"] == post_route
        assert app.get("/a/1").json["route"] != post_route


def test_same_path_with_disjoint_methods_is_fine():
    router = Router([parse_route("read", "GET /a/<x> -> x"),
                     parse_route("write", "PUT,DELETE /a/<y> -> x")], {"x": endpoint("x")})
    app = TestApp(router)
    assert app.get("/a/1").json["route"] == "read"
    assert app.delete("/a/1").json["route"] == "write"


def test_describe_prints_parameters_and_notes():
    route = parse_route("rec", "GET /api/users/<int:id>/recommendations -> ev /u/<id>/r")
    assert route.describe() == ("rec: GET /api/users/<int:id>/recommendations -> ev /u/<id>/r "
                                "(parameters: id:int)")
    router = Router([route], {"ev": endpoint("ev")}, notes={"rec": "read 5s"},
                    unmounted=[parse_route("m", "/api/matching/* -> matching /")])
    assert router.describe(notes=True) == [
        route.describe() + " [read 5s]",
        "m: * /api/matching/* -> matching / [not mounted: matching has no URL]",
    ]
