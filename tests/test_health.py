"""Health endpoints: alone, and through the shipped gateway."""
from __future__ import annotations

import pytest
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

from meetinity_gateway.health import HealthApp, LiveApp
from tests.servers import free_port, session
from tests.upstream import Upstream


def test_all_up_is_200(upstream):
    app = TestApp(LintMiddleware(HealthApp({"user_service": upstream.url})))
    response = app.get("/health")
    payload = response.json
    targets = payload.pop("targets")
    assert payload == {"status": "ok", "service": "api-gateway",
                       "upstreams": {"user_service": "up"}}
    assert targets == {"user_service": [{
        "target": upstream.url, "weight": 1, "state": "healthy", "failures": 0,
        "outstanding": 0, "probe": "up"}]}
    assert upstream.requests[-1][:2] == ("GET", "/health")


def test_one_down_is_503_naming_it(upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    with Upstream() as sick:
        sick.health_status = 500
        app = TestApp(LintMiddleware(HealthApp(
            {"user_service": upstream.url, "event_service": dead, "match_service": sick.url},
            timeout=1,
        )))
        response = app.get("/health", status=503)
    payload = response.json
    targets = payload.pop("targets")
    assert payload == {"status": "error", "service": "api-gateway", "upstreams": {
        "user_service": "up", "event_service": "down", "match_service": "down"}}
    assert {name: [row["probe"] for row in rows] for name, rows in targets.items()} == {
        "user_service": ["up"], "event_service": ["down"], "match_service": ["down"]}


def test_results_are_cached_briefly(upstream):
    app = TestApp(LintMiddleware(HealthApp({"user_service": upstream.url}, cache_seconds=60)))
    for _ in range(5):
        app.get("/health")
    assert len(upstream.requests) == 1


def test_slow_upstream_health_is_down_within_the_timeout(upstream):
    app = HealthApp({"user_service": upstream.url}, timeout=0.2, health_path="/slow?seconds=2")
    assert app.check() == {"user_service": "down"}


# werkzeug's lint does not know that a HEAD answer keeps the GET's Content-Length.
@pytest.mark.filterwarnings("ignore:Content-Length and the number of bytes")
def test_live_is_always_200():
    app = TestApp(LintMiddleware(LiveApp()))
    assert app.get("/health/live").json == {"status": "ok", "service": "api-gateway"}
    head = Client(LintMiddleware(LiveApp())).head("/health/live")
    assert head.status_code == 200 and head.data == b""
    head.close()


def test_through_the_gateway(gateway_factory, upstream):
    gateway = gateway_factory()
    response = session().get(gateway.url + "/health")
    assert response.status_code == 200
    assert response.json()["upstreams"] == {"user_service": "up"}

    down = gateway_factory(USER_SERVICE_URL=f"http://127.0.0.1:{free_port()}")
    response = session().get(down.url + "/health")
    assert response.status_code == 503
    payload = response.json()
    assert payload["targets"]["user_service"][0]["probe"] == "down"
    del payload["targets"]
    assert payload == {"status": "error", "service": "api-gateway",
                       "upstreams": {"user_service": "down"}}
    # Liveness does not depend on the upstreams.
    assert session().get(down.url + "/health/live").status_code == 200
