"""``GET /status``: the operators' page — who sees it, what it shows, how it is protected,
and (headless Chromium) what a browser really renders of it."""
from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware

from meetinity_gateway.assembly import load_pipeline
from meetinity_gateway.middleware.ratelimit import RateLimitMiddleware
from meetinity_gateway.status import CONTENT_SECURITY_POLICY, StatusApp
from tests.conftest import require_tool
from tests.servers import ROOT, SHIPPED_INI, WaitressServer, free_port, make_token, session

LOOPBACK = {"REMOTE_ADDR": "127.0.0.1"}


def shipped_with(tmp_path: Path, extra: str) -> Path:
    """A copy of the shipped gateway.ini with ``extra`` keys in [app:gateway]."""
    text = SHIPPED_INI.read_text()
    marker = "route.events = /api/events/* -> event_service /events\n"
    assert marker in text
    config = tmp_path / "gateway.ini"
    config.write_text(text.replace(marker, marker + extra))
    return config


class _Text(HTMLParser):
    """The visible text of a page, and its tags."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.tags: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("style", "script", "title"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("style", "script", "title"):
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.parts).split())


def visible_text(page: str) -> tuple[str, list[str]]:
    parser = _Text()
    parser.feed(page)
    return parser.text, parser.tags


# -- the page alone -------------------------------------------------------------------------

def test_page_shows_pipeline_routes_upstreams_and_storage(tmp_path, monkeypatch, upstream):
    monkeypatch.setenv("USER_SERVICE_URL", upstream.url)
    # Values an operator types can hold markup: a folder name, a storage URI.
    folder = tmp_path / 'conf<b id="x">&amp'
    folder.mkdir()
    monkeypatch.setenv("RATELIMIT_STORAGE_URI", "memory://<script>alert(1)</script>")
    config = shipped_with(folder, "route.extra = GET, POST /api/extra/* -> user_service /x\n")
    pipeline = load_pipeline(config)
    app = TestApp(LintMiddleware(pipeline.app), extra_environ=LOOPBACK)
    response = app.get("/status")
    assert response.content_type == "text/html"
    page = response.text
    text, tags = visible_text(page)
    assert pipeline.fingerprint in text and str(config) in text
    assert "conf&lt;b id=&quot;x&quot;&gt;&amp;amp" in page and '<b id="x">' not in page
    assert "memory://&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "script" not in tags and "b" not in tags and "img" not in tags
    assert "observe errors cors ratelimit auth authorize userlimit gateway" in text
    assert "extra GET,POST /api/extra/* /api/extra user_service /x" in text
    assert "users * /api/users/* /api/users/x user_service /users ratelimit: none auth: token" \
        in text
    assert "ratelimit: auth: * /api/auth 60 per 1 minute" in text
    assert "connect 3s, read 30s" in text
    # Upstream targets and the rate-limit storage.
    assert f"{upstream.url} 1 healthy 0 0" in text
    assert "SlidingWindowCounterRateLimiter ok" in text
    assert re.search(r'<meta http-equiv="refresh" content="\d+">', page)


def test_page_security_headers_and_style_hash(tmp_path, monkeypatch, upstream):
    monkeypatch.setenv("USER_SERVICE_URL", upstream.url)
    app = TestApp(LintMiddleware(load_pipeline(SHIPPED_INI).app), extra_environ=LOOPBACK)
    response = app.get("/status")
    policy = response.headers["Content-Security-Policy"]
    assert policy == CONTENT_SECURITY_POLICY
    directives = dict(item.strip().split(" ", 1) for item in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in policy and "script-src" not in policy
    # The one style block is exactly what the policy's hash allows.
    style = re.search(r"<style>(.*?)</style>", response.text, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert directives["style-src"] == f"'sha256-{digest}'"
    assert 'style="' not in response.text  # inline attributes would need 'unsafe-hashes'
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Request-ID"]


@pytest.mark.parametrize("environ", [
    {"REMOTE_ADDR": "203.0.113.7"},
    {"REMOTE_ADDR": "203.0.113.7", "HTTP_X_FORWARDED_FOR": "127.0.0.1"},
    {"REMOTE_ADDR": "203.0.113.7", "HTTP_X_REAL_IP": "127.0.0.1"},
])
def test_outsiders_get_the_404_of_an_unknown_path(monkeypatch, upstream, environ):
    monkeypatch.setenv("USER_SERVICE_URL", upstream.url)
    app = TestApp(LintMiddleware(load_pipeline(SHIPPED_INI).app), extra_environ=environ)
    response = app.get("/status", status=404)
    assert response.json["error"]["message"] == "no route for /status"
    assert upstream.url not in response.text


def test_raw_socket_outsider_spoofing_forwarded_headers_sees_nothing(gateway_factory, upstream):
    """Shipped gateway.ini under waitress, TRUSTED_PROXIES=0, 127.0.0.1 not allowed: forged
    address headers in every spelling get the plain 404, no page, no target."""
    from tests.test_health import _raw_get

    gateway = gateway_factory(METRICS_ALLOW="10.0.0.0/8", TRUSTED_PROXIES="0")
    for spoof in ("", "X-Forwarded-For: 10.0.0.1\r\n", "X-Forwarded-For: 8.8.8.8, 10.0.0.1\r\n",
                  "X-Real-IP: 10.0.0.1\r\n", "Forwarded: for=10.0.0.1\r\n"):
        status, fields, body = _raw_get(gateway.port, "/status", spoof)
        assert status.startswith("HTTP/1.1 404"), (spoof, status)
        assert fields["content-type"] == "application/json"
        assert b"no route for /status" in body and str(upstream.port).encode() not in body
    allowed = gateway_factory(METRICS_ALLOW="127.0.0.0/8")
    status, fields, body = _raw_get(allowed.port, "/status")
    assert status == "HTTP/1.1 200 OK" and str(upstream.port).encode() in body


def test_methods_other_than_get_are_refused(monkeypatch, upstream):
    monkeypatch.setenv("USER_SERVICE_URL", upstream.url)
    app = TestApp(LintMiddleware(load_pipeline(SHIPPED_INI).app), extra_environ=LOOPBACK)
    response = app.post("/status", status=405)
    assert "GET" in response.headers["Allow"]
    alone = TestApp(LintMiddleware(StatusApp({})), extra_environ=LOOPBACK)
    assert alone.delete("/status", status=405).headers["Allow"] == "GET, HEAD"


def test_storage_password_hidden_and_failure_shown(monkeypatch):
    pytest.importorskip("redis")
    port = free_port()
    limiter = RateLimitMiddleware(
        lambda environ, start_response: [], rules={"all": "/ 5/minute"},
        storage_uri=f"redis://:hunter2secret@127.0.0.1:{port}/0", storage_timeout=0.2)

    class FakePipeline:
        app = limiter
        router = None
        names = ["ratelimit", "gateway"]
        fingerprint = "0123456789ab"
        file = "gateway.ini"

    status = StatusApp({})
    status.attach_pipeline(FakePipeline())
    page = status.render()
    assert "hunter2secret" not in page
    assert f"redis://:***@127.0.0.1:{port}/0" in page
    assert 'class="failing">unreachable' in page


# -- in a real browser ------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--no-proxy-server", "--mute-audio", "--hide-scrollbars",
]


def artifacts_dir() -> Path:
    """Where screenshots go: ``$TEST_ARTIFACTS`` or ``test-artifacts/`` (git-ignored)."""
    folder = Path(os.environ.get("TEST_ARTIFACTS") or ROOT / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def chromium_run(chromium: str, tmp_path: Path, *args: str,
                 timeout: float = 60.0) -> tuple[str, str]:
    """(stdout, stderr) of one headless Chromium run; its console goes to stderr."""
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={profile}", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, result.stderr


def test_status_page_in_headless_chromium(tmp_path, monkeypatch, upstream):
    chromium = require_tool("chromium", "the status page test renders it in headless Chromium")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: its target gets ejected
    for key, value in {"USER_SERVICE_URL": upstream.url, "EVENT_SERVICE_URL": dead,
                       "UPSTREAM_MAX_FAILS": "1", "UPSTREAM_EJECT_TIME": "300",
                       "UPSTREAM_RETRIES": "0"}.items():
        monkeypatch.setenv(key, value)
    config = shipped_with(tmp_path, "")  # EVENT_SERVICE_URL mounts the shipped events route
    pipeline = load_pipeline(config)
    with WaitressServer(pipeline.app, threads=4) as server:
        client = session()
        assert client.get(server.url + "/api/auth/echo").status_code == 200
        token = {"Authorization": "Bearer " + make_token()}
        assert client.get(server.url + "/api/events/1", headers=token).status_code == 502
        # Ejected; panic routing still tries it (502), and it counts once per ejection.
        assert client.get(server.url + "/api/events/1", headers=token).status_code == 502

        dom, console = chromium_run(chromium, tmp_path, "--dump-dom", server.url + "/status")
        # The strict policy blocked nothing the page needs (its style block is hash-allowed).
        assert "Content Security Policy" not in console, console[-2000:]
        text, tags = visible_text(dom)
        assert "Meetinity gateway status" in text
        assert pipeline.fingerprint in text
        assert "observe errors cors ratelimit auth authorize userlimit gateway" in text
        assert "events * /api/events/* /api/events event_service /events" in text
        assert re.search(rf"{re.escape(upstream.url)} 1 healthy 0 0 0/1 \(0 %\)", text), text
        assert re.search(rf"{re.escape(dead)} 1 ejected \(\d+ s left\) 0 0 2/2 \(100 %\)",
                         text), text
        assert "memory:// SlidingWindowCounterRateLimiter ok" in text
        assert "script" not in tags

        shot = artifacts_dir() / "status-page.png"
        if shot.exists():
            shot.unlink()
        chromium_run(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,1400",
                     server.url + "/status")
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
        print(f"status page screenshot: {shot}")


def test_page_says_the_overall_state_first_traffic_per_route_and_unmounted_routes(
        tmp_path, monkeypatch, upstream):
    monkeypatch.setenv("USER_SERVICE_URL", upstream.url)
    monkeypatch.setenv("RATE_LIMIT_AUTH", "100000/minute")
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("EVENT_SERVICE_URL", dead)
    pipeline = load_pipeline(SHIPPED_INI)
    app = TestApp(LintMiddleware(pipeline.app), extra_environ=LOOPBACK)
    page = app.get("/status").text
    text, _ = visible_text(page)
    # The state comes before anything else on the page.
    assert text.startswith("Meetinity gateway status ok ")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    # The routes of the unmounted services, as such.
    assert "conversations * /api/conversations/* — messaging_service /conversations — " \
        "not mounted: messaging_service has no URL" in text
    for _ in range(3):
        app.get("/api/auth/ok")
    app.get("/api/auth/status?code=503", status=503)
    token = make_token()
    for _ in range(3):  # the event service is down: its one target is ejected (max_fails)
        app.get("/api/events/1", headers={"Authorization": f"Bearer {token}"}, status=502)
    page = app.get("/status").text
    text, _ = visible_text(page)
    assert text.startswith("Meetinity gateway status failing upstream event_service: every "
                           "target ejected (panic routing)")
    match = re.search(r"auth (\d+) (\d+) \((\d+\.\d) %\) (\d+\.\d) ms ≤ (\S+) ms", text)
    assert match, text
    assert match.group(1) == "4" and match.group(2) == "1" and match.group(3) == "25.0"
    assert re.search(r"events 3 3 \(100\.0 %\)", text)
