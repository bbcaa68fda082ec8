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
               RATE_LIMIT_USERS="1000000/minute",
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


def test_profile_tool_charges_samples_to_layers_and_thread_states():
    import underload as under_load  # bench/underload.py (bench/ is on sys.path above)

    assert under_load.__file__.endswith(os.path.join("bench", "underload.py"))
    site = "/venv/lib/python3.11/site-packages"
    gateway = "/src/meetinity_gateway"
    worker = ["Thread.run (/usr/lib/python3.11/threading.py:982)",
              f"handler_thread ({site}/waitress/task.py:84)",
              f"RateLimitMiddleware.__call__ ({gateway}/middleware/ratelimit.py:742)",
              f"Router.__call__ ({gateway}/routing.py:200)",
              f"ConnectionPool.request ({gateway}/proxy/client.py:308)",
              "SocketIO.readinto (/usr/lib/python3.11/socket.py:706)"]
    # the innermost frame of a layer takes the sample; the standard library is its caller's
    assert under_load.charge(worker) == "proxy"
    assert under_load.charge(worker[:4] + ["dumps (/usr/lib/python3.11/json/__init__.py:238)"]
                             ) == "router"
    assert under_load.charge(worker[:3]) == "mw:ratelimit"
    assert under_load.charge(["main (x.py:1)"]) == "other (no layer frame)"
    assert under_load.thread_state(worker) == "worker: blocked in a socket call"
    assert under_load.thread_state(
        worker + ["sock_recv_into (libpython3.11.so.1.0)",
                  "take_gil (libpython3.11.so.1.0)"]) == "worker: waiting for the GIL"
    assert under_load.thread_state(
        worker[:2] + ["Condition.wait (/usr/lib/python3.11/threading.py:320)",
                      "sem_clockwait (libc.so.6)"]) == "worker: waiting on a lock/condition"
    io_thread = [f"run ({gateway}/server.py:770)", f"loop ({site}/waitress/wasyncore.py:245)",
                 f"poll2 ({site}/waitress/wasyncore.py:204)"]
    assert under_load.thread_state(io_thread) == "I/O thread: in poll()"
    assert under_load.thread_state(
        io_thread[:2] + [f"GatewayChannel.readable ({gateway}/server.py:521)"]
    ) == "I/O thread: running Python"
    assert under_load.parse_variant("fast=/tmp/tree,GATEWAY_THREADS=4") == (
        "fast", str(Path("/tmp/tree").resolve()), {"GATEWAY_THREADS": "4"})
    assert under_load.parse_variant("t4=GATEWAY_THREADS=4") == (
        "t4", None, {"GATEWAY_THREADS": "4"})
