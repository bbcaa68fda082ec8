"""Health endpoints: alone, and through the shipped gateway."""
from __future__ import annotations

import pytest
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

from meetinity_gateway.health import HealthApp, LiveApp
from tests.servers import free_port, session
from tests.upstream import Upstream

#: webtest sends no REMOTE_ADDR: these unit tests call from loopback, an operator's address.
LOOPBACK = {"REMOTE_ADDR": "127.0.0.1"}


def test_all_up_is_200(upstream):
    app = TestApp(LintMiddleware(HealthApp({"user_service": upstream.url})),
                  extra_environ=LOOPBACK)
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
        )), extra_environ=LOOPBACK)
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
    del payload["targets"], payload["config"]
    assert payload == {"status": "error", "service": "api-gateway",
                       "upstreams": {"user_service": "down"}}
    # Liveness does not depend on the upstreams.
    assert session().get(down.url + "/health/live").status_code == 200


# -- who sees the per-target detail (the same allow-list as /metrics) ------------------------

PUBLIC_KEYS = {"status", "service", "upstreams"}


@pytest.mark.parametrize("environ, trusted, detail", [
    ({"REMOTE_ADDR": "203.0.113.7"}, 0, False),
    # A spoofed X-Forwarded-For counts for nothing when no proxy is trusted.
    ({"REMOTE_ADDR": "203.0.113.7", "HTTP_X_FORWARDED_FOR": "127.0.0.1"}, 0, False),
    ({"REMOTE_ADDR": "203.0.113.7", "HTTP_X_FORWARDED_FOR": "10.0.0.1, 127.0.0.1"}, 0, False),
    # Behind one trusted balancer (a private address), the client is the one it names.
    ({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "203.0.113.7"}, 1, False),
    ({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "127.0.0.1, 203.0.113.7"}, 1, False),
    ({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "192.168.1.5"}, 1, True),
    ({"REMOTE_ADDR": "::ffff:127.0.0.1"}, 0, True),
    ({"REMOTE_ADDR": "::1"}, 0, True),
    ({"REMOTE_ADDR": "not an address"}, 0, False),
    ({}, 0, False),
])
def test_detail_only_for_allow_listed_clients(upstream, environ, trusted, detail):
    app = TestApp(LintMiddleware(HealthApp({"user_service": upstream.url},
                                           trusted_proxies=trusted, fingerprint="abc123")),
                  extra_environ=environ)
    payload = app.get("/health").json
    if detail:
        assert set(payload) == PUBLIC_KEYS | {"targets", "config"}
        assert payload["config"] == {"fingerprint": "abc123"}
    else:
        assert payload == {"status": "ok", "service": "api-gateway",
                           "upstreams": {"user_service": "up"}}


def test_empty_allow_list_shows_detail_to_nobody(upstream):
    app = TestApp(LintMiddleware(HealthApp({"user_service": upstream.url}, detail_allow=())),
                  extra_environ=LOOPBACK)
    assert set(app.get("/health").json) == PUBLIC_KEYS


def test_bad_detail_allow_is_a_config_error(monkeypatch):
    from meetinity_gateway.assembly import load_pipeline
    from meetinity_gateway.config import ConfigError
    from tests.servers import SHIPPED_INI

    monkeypatch.setenv("METRICS_ALLOW", "10.0.0.0/8, everyone")
    with pytest.raises(ConfigError) as info:
        load_pipeline(SHIPPED_INI)
    assert "everyone" in str(info.value)


def _raw_get(port: int, path: str, headers: str = "") -> tuple[str, dict, bytes]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n{headers}"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return lines[0], fields, body


def test_shipped_gateway_hides_the_network_map_from_outsiders(gateway_factory, upstream):
    """Raw sockets, shipped gateway.ini: a client outside METRICS_ALLOW — even one claiming an
    allowed address in X-Forwarded-For with TRUSTED_PROXIES=0 — sees up/down only."""
    import json

    gateway = gateway_factory(METRICS_ALLOW="10.0.0.0/8", TRUSTED_PROXIES="0")
    for spoof in ("", "X-Forwarded-For: 10.0.0.1\r\n", "X-Real-IP: 10.0.0.1\r\n",
                  "Forwarded: for=10.0.0.1\r\n", "X-Forwarded-For: 127.0.0.1, 10.9.9.9\r\n"):
        status, fields, body = _raw_get(gateway.port, "/health", spoof)
        assert status == "HTTP/1.1 200 OK", (spoof, status)
        assert json.loads(body) == {"status": "ok", "service": "api-gateway",
                                    "upstreams": {"user_service": "up"}}
        assert str(upstream.port).encode() not in body and b"127.0.0.1" not in body
        # The same client gets no metrics either: one allow-list.
        status, _, _ = _raw_get(gateway.port, "/metrics", spoof)
        assert status.startswith("HTTP/1.1 404")

    # An allowed client (loopback is in the default list) sees the detail.
    allowed = gateway_factory(METRICS_ALLOW="127.0.0.0/8, ::1")
    status, _, body = _raw_get(allowed.port, "/health")
    payload = json.loads(body)
    assert payload["targets"]["user_service"][0]["target"] == upstream.url
    assert len(payload["config"]["fingerprint"]) == 12
    # ...and the metrics, with a request id although they are served outside the error edge.
    status, fields, _ = _raw_get(allowed.port, "/metrics", "X-Request-ID: scrape-42\r\n")
    assert status == "HTTP/1.1 200 OK" and fields["x-request-id"] == "scrape-42"


def test_a_fail_open_limiter_without_its_storage_makes_the_gateway_degraded(gateway_factory):
    pytest.importorskip("redis")
    gateway = gateway_factory(RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{free_port()}/0")
    client = session()
    health = client.get(gateway.url + "/health", timeout=10)
    assert health.json()["status"] == "ok" and "ratelimit" not in health.json()
    # Counted locally (on_error=open, the default): served, but not as configured.
    assert client.get(gateway.url + "/api/auth/x", timeout=10).status_code == 200
    health = client.get(gateway.url + "/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["status"] == "degraded"
    assert health.json()["ratelimit"] == {"ratelimit": "failing (on_error=open)"}
