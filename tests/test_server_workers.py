"""Several worker processes, one truth: ``serve --workers 2`` refuses rate limits that each
worker would count alone, and its ``/metrics`` adds up every worker's requests (Prometheus'
multiprocess mode, set up by ``serve`` itself)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.redisserver import RedisServer
from tests.servers import ROOT, SHIPPED_INI, TEST_JWT_SECRET, free_port, session
from tests.test_server_smoke import Served, require_server

REQUESTS = 40
_COUNT = re.compile(r'^gateway_requests_total\{[^}]*route="auth"[^}]*\} ([0-9.e+]+)$', re.M)


@pytest.mark.parametrize("name", ["gunicorn", "granian"])
def test_several_workers_refuse_in_memory_limits(name, upstream):
    require_server(name)
    port = free_port()
    env = {"JWT_SECRET": TEST_JWT_SECRET, "USER_SERVICE_URL": upstream.url,
           "GATEWAY_WORKERS": "2"}
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "meetinity_gateway", "serve", "--config", str(SHIPPED_INI),
         "--server", name, "--listen", f"127.0.0.1:{port}"],
        env={**child_env, **env}, cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert result.stderr.startswith("configuration error: ")
    assert "[filter:ratelimit] storage_uri = 'memory://'" in result.stderr
    assert "2 workers" in result.stderr and "RATELIMIT_STORAGE_URI" in result.stderr


@pytest.fixture
def redis_server():
    with RedisServer(require_tool("redis-server", "shared rate limits")) as server:
        yield server


def _auth_count(client, url: str) -> float:
    body = client.get(url + "/metrics", timeout=10).text
    return sum(float(value) for value in _COUNT.findall(body))


@pytest.mark.parametrize("folder_from", ["serve", "operator"])
def test_two_gunicorn_workers_report_one_set_of_counters(folder_from, tmp_path, upstream,
                                                         redis_server):
    require_server("gunicorn")
    temporary = tmp_path / "tmp"  # where serve makes its own directory (TMPDIR)
    temporary.mkdir()
    env = {"USER_SERVICE_URL": upstream.url, "GATEWAY_WORKERS": "2", "TMPDIR": str(temporary),
           "RATELIMIT_STORAGE_URI": redis_server.url, "RATE_LIMIT_AUTH": "100000/minute"}
    if folder_from == "operator":
        folder = tmp_path / "metrics"
        folder.mkdir()
        # A previous run's file: its 1000 requests must not be added to this run's.
        stale = _stale_counter_file(tmp_path / "previous")
        (folder / "counter_1.db").write_bytes(stale.read_bytes())
        (folder / "keep.txt").write_text("not prometheus-client's: left alone")
        env["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
        env["RATELIMIT_PROCESSES"] = "2"  # right: no warning
    served = Served("gunicorn", env)
    try:
        if folder_from == "serve":
            [folder] = temporary.glob("meetinity-gateway-metrics-*")
        statuses: list[int] = []

        def call(count: int) -> None:
            for _ in range(count):
                # A new connection each time: the kernel hands it to either worker.
                with session() as client:
                    statuses.append(client.get(served.url + "/api/auth/echo",
                                               headers={"Connection": "close"},
                                               timeout=10).status_code)

        # Two callers at once: within the shipped per-upstream cap of each worker (threads/2).
        threads = [threading.Thread(target=call, args=(REQUESTS // 2,)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert statuses == [200] * REQUESTS
        # Both workers counted some of them (each keeps its counters in its own file)...
        counters = {path.name for path in folder.glob("counter_*.db")}
        assert len(counters) == 2 and "counter_1.db" not in counters, counters
        # ...and whichever worker answers the scrape reports all of them.
        for _ in range(6):
            with session() as client:
                assert _auth_count(client, served.url) == REQUESTS
    finally:
        served.stop()
    # RATELIMIT_PROCESSES left at 1 under two workers: each would be too generous while Redis
    # is away, and serve says so.
    warned = "set RATELIMIT_PROCESSES to the number of gateway processes" in served.stderr
    if folder_from == "serve":
        assert not folder.exists()  # serve's own directory goes with it
        assert warned, served.stderr
    else:
        assert (folder / "keep.txt").is_file()
        assert not warned, served.stderr


def _stale_counter_file(folder: Path) -> Path:
    """A counter file as prometheus-client writes it, holding 1000 auth requests."""
    folder.mkdir()
    script = (
        "from prometheus_client import Counter\n"
        "c = Counter('requests', 'x', ('route', 'method', 'status'), namespace='gateway')\n"
        "c.labels('auth', 'GET', '2xx').inc(1000)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60,
                   env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)})
    [path] = folder.glob("counter_*.db")
    return path
