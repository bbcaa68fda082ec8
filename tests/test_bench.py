"""The bench's own pieces work (no timing is asserted): the minimal pass-throughs forward
and stream like a proxy, and the per-layer tool builds every variant of the shipped
pipeline and gets a 200 from each."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

from tests.servers import TEST_JWT_SECRET, make_token
from tests.upstream import Upstream, pattern_digest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import passthrough  # noqa: E402  (bench/ is not a package)


@pytest.fixture
def upstream():
    with Upstream() as server:
        yield server


@pytest.mark.parametrize("client", ["urllib3", "stdlib"])
def test_passthrough_forwards_and_streams(upstream, client):
    app = passthrough.MAKERS[client](upstream.url, 2)
    web = Client(LintMiddleware(app))
    for _ in range(3):  # the kept-alive connection serves one request after another
        response = web.get("/echo/x?q=1", headers={"X-Probe": "yes"})
        assert response.status_code == 200
        echoed = response.get_json()
        assert echoed["method"] == "GET" and echoed["path"].endswith("/echo/x")
        assert echoed["query"] == "q=1"
        response.close()
    size = 3 * 65536 + 17
    response = web.get(f"/download?size={size}")
    assert hashlib.sha256(response.get_data()).hexdigest() == pattern_digest(size)
    response.close()
    body = os.urandom(200_000)
    response = web.post("/upload", input_stream=io.BytesIO(body),
                        headers={"Content-Length": str(len(body))})
    assert response.status_code == 200
    assert hashlib.sha256(body).hexdigest() in response.get_data(as_text=True)
    assert not any(name.lower() == "connection" for name, _ in response.headers)
    response.close()
    assert upstream.connections == 1  # one connection, kept alive for all five


def test_layers_tool_builds_every_variant(upstream):
    env = dict(os.environ, JWT_SECRET=TEST_JWT_SECRET, CORS_ORIGINS="https://app.example",
               RATE_LIMIT_DEFAULT="1000000/minute", RATE_LIMIT_USERS="1000000/minute",
               USER_SERVICE_URL=upstream.url, LOG_LEVEL="WARNING")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "layers.py"), upstream.url,
         "--token", make_token(), "--origin", "https://app.example",
         "--requests", "5", "--rounds", "1"],
        env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["layer_cost_us"]) == {"observe", "errors", "cors", "ratelimit", "auth",
                                            "authorize", "userlimit", "router", "proxy"}
    assert all(value > 0 for value in result["per_request_us"].values())
