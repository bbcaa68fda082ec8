"""CORS in a real browser: headless Chromium calls the gateway from another origin.

A page served on ``http://127.0.0.1:PORT_A`` calls the shipped gateway, served by waitress on
``http://localhost:PORT_B`` (another origin: another host name), with ``fetch()``, and posts
what it could read back to its own origin (a same-origin request, no CORS involved), where
the test collects it. Only a browser enforces CORS, so only a browser proves the headers are
right: the preflight of the JSON POST, the preflight of the mobile app's headers, the
exposed ``X-Request-ID``, and a 401 whose JSON body page code can read.
"""
from __future__ import annotations

import json
import queue
import subprocess
import time

import pytest

from meetinity_gateway.assembly import load_pipeline
from tests.conftest import require_tool
from tests.servers import SHIPPED_INI, WaitressServer, make_token

#: Each fetch the page makes, reported with what page code could read of the answer.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>cors probe</title></head><body>
<script>
const GATEWAY = %(gateway)s;
const STEPS = %(steps)s;
const READABLE = %(readable)s;
async function step(s) {
  try {
    const init = {method: s.method, headers: s.headers};
    if (s.json !== undefined) init.body = JSON.stringify(s.json);
    const r = await fetch(GATEWAY + s.path, init);
    const headers = {};
    for (const name of READABLE) headers[name] = r.headers.get(name);
    let body = null;
    try { body = await r.json(); } catch (e) { body = "not json: " + e; }
    return {ok: true, status: r.status, headers: headers, body: body};
  } catch (e) {
    return {ok: false, error: String(e)};
  }
}
(async () => {
  const results = {};
  for (const s of STEPS) results[s.name] = await step(s);
  await fetch("/report", {method: "POST", headers: {"Content-Type": "application/json"},
                          body: JSON.stringify(results)});
})();
</script></body></html>
"""

#: Response headers the page tries to read (the browser hides those not exposed).
READABLE = ["X-Request-ID", "RateLimit", "RateLimit-Policy", "X-RateLimit-Limit",
            "X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After", "Content-Type"]

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--no-proxy-server", "--disable-extensions", "--mute-audio",
    # The test gateway listens on 127.0.0.1 only; where the hosts file maps localhost to ::1
    # first, this keeps Chromium from depending on its fallback. The origin stays localhost.
    "--host-resolver-rules=MAP localhost 127.0.0.1",
]
DEADLINE = 40.0


class ProbePage:
    """Serves the probe page at ``/`` and collects the page's report at ``/report``."""

    def __init__(self) -> None:
        self.gateway = ""
        self.steps: list[dict] = []
        self.reports: queue.Queue = queue.Queue()

    def __call__(self, environ, start_response):
        path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
        if path == "/" and method == "GET":
            body = (PAGE % {"gateway": json.dumps(self.gateway),
                            "steps": json.dumps(self.steps),
                            "readable": json.dumps(READABLE)}).encode()
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                      ("Content-Length", str(len(body))),
                                      ("Cache-Control", "no-store")])
            return [body]
        if path == "/report" and method == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            self.reports.put(json.loads(environ["wsgi.input"].read(length)))
            start_response("204 No Content", [])
            return []
        start_response("404 Not Found", [("Content-Length", "0")])
        return []


def run_page(chromium: str, tmp_path, page_server: WaitressServer, page: ProbePage) -> dict:
    """Load the page in a fresh headless Chromium; the report it posts, within the deadline."""
    profile = tmp_path / f"profile-{page_server.port}"
    log_path = tmp_path / f"chromium-{page_server.port}.log"
    with log_path.open("wb") as log:
        browser = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", page_server.url + "/"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + DEADLINE
            while time.monotonic() < deadline:
                try:
                    return page.reports.get(timeout=0.2)
                except queue.Empty:
                    if browser.poll() is not None:
                        break
        finally:
            browser.terminate()
            try:
                browser.wait(10)
            except subprocess.TimeoutExpired:
                browser.kill()
                browser.wait(10)
    output = log_path.read_text(errors="replace")[-3000:]
    pytest.fail(f"the page reported nothing within {DEADLINE}s; chromium said:\n{output}")


@pytest.fixture
def chromium():
    return require_tool("chromium", "the CORS browser test drives headless Chromium")


@pytest.fixture
def pages():
    servers = []

    def start() -> tuple[WaitressServer, ProbePage]:
        page = ProbePage()
        server = WaitressServer(page, threads=2)
        servers.append(server)
        return server, page

    yield start
    for server in servers:
        server.stop()


def test_allowed_origin_works_end_to_end_in_chromium(chromium, tmp_path, pages,
                                                     gateway_factory, upstream):
    page_server, page = pages()
    gateway = gateway_factory(CORS_ORIGINS=page_server.url)
    names = load_pipeline(SHIPPED_INI).names
    page.gateway = f"http://localhost:{gateway.port}"

    mobile = {"Authorization": "Bearer " + make_token(), "X-Client-Version": "3.4.0",
              "X-Client-Platform": "web"}
    if "auth" in names:
        # The gateway's own 401 for a bad token.
        unauthorized = {"path": "/api/users/42", "headers": {"Authorization": "Bearer bad"}}
    else:
        # No auth layer in this pipeline: a 401 from the upstream, through the gateway.
        unauthorized = {"path": "/api/users/status?code=401",
                        "headers": {"Authorization": "Bearer bad"}}
    page.steps = [
        {"name": "login", "method": "POST", "path": "/api/auth/login",
         "headers": {"Content-Type": "application/json"},
         "json": {"email": "ada@example.com", "provider": "google"}},
        {"name": "user", "method": "GET", "path": "/api/users/42", "headers": mobile},
        {"name": "unauthorized", "method": "GET", **unauthorized},
        {"name": "not_found", "method": "GET", "path": "/api/nothing-here", "headers": mobile},
    ]
    report = run_page(chromium, tmp_path, page_server, page)

    for name in ("login", "user", "unauthorized", "not_found"):
        assert report[name]["ok"], (name, report[name])

    login = report["login"]
    assert login["status"] == 200
    assert login["body"]["method"] == "POST"
    assert login["body"]["path"] == "/auth/login"
    assert login["headers"]["X-Request-ID"]
    if "ratelimit" in names:
        limits = [login["headers"][h] for h in READABLE if "ratelimit" in h.lower()]
        assert any(limits), login["headers"]

    user = report["user"]
    assert user["status"] == 200
    sent = {k.lower(): v for k, v in user["body"]["headers"]}
    assert sent["x-client-version"] == "3.4.0"
    assert sent["x-client-platform"] == "web"
    request_id = user["headers"]["X-Request-ID"]
    assert request_id and sent["x-request-id"] == request_id

    unauthorized = report["unauthorized"]
    assert unauthorized["status"] == 401
    if "auth" in names:
        error = unauthorized["body"]["error"]
        assert error["code"] == 401
        assert error["message"]
        assert error["request_id"] == unauthorized["headers"]["X-Request-ID"]
    else:
        assert unauthorized["body"] == {"status": 401}

    not_found = report["not_found"]
    assert not_found["status"] == 404
    assert not_found["body"]["error"]["code"] == 404
    assert not_found["body"]["error"]["request_id"] == not_found["headers"]["X-Request-ID"]

    # The preflights were answered by the gateway: the upstream saw only real requests.
    assert "OPTIONS" not in [method for method, _, _ in upstream.requests]


def test_foreign_origin_is_blocked_by_chromium(chromium, tmp_path, pages, gateway_factory,
                                               upstream):
    allowed_server, _ = pages()
    foreign_server, page = pages()
    gateway = gateway_factory(CORS_ORIGINS=allowed_server.url)
    page.gateway = f"http://localhost:{gateway.port}"
    page.steps = [
        # A simple request: sent, but its answer carries no CORS header, so the page cannot
        # read it.
        {"name": "simple", "method": "GET", "path": "/api/auth/providers", "headers": {}},
        # A preflighted one: the preflight is refused, so the POST is never sent.
        {"name": "preflighted", "method": "POST", "path": "/api/auth/login",
         "headers": {"Content-Type": "application/json"}, "json": {"email": "x@y.z"}},
    ]
    report = run_page(chromium, tmp_path, foreign_server, page)

    for name in ("simple", "preflighted"):
        assert report[name]["ok"] is False, (name, report[name])
        assert "TypeError" in report[name]["error"]
    methods = [method for method, _, _ in upstream.requests]
    assert "POST" not in methods
    assert "OPTIONS" not in methods
