"""Every serving recipe of docs/serving.md, run as written from the repository folder: it listens
where it should, proxies a call, writes the access log, logs its start-up line, writes every
log line (its own server's included) as JSON, shows the same /status, and keeps the access
line of a request that finished while it stopped."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import wait_until, require_tool
from tests.servers import ROOT, TEST_JWT_SECRET, free_port, session, wait_for_port

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and gunicorn")


def tool(name: str) -> str:
    """A console script of this environment (installed by requirements-dev.txt)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else require_tool(name, f"pip install {name}")


class Recipe:
    """A command run from the repository folder with the test's environment."""

    def __init__(self, argv: list[str], port: int, env: dict[str, str]) -> None:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        child_env.update(env)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(argv, cwd=str(ROOT), env=child_env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for_port("127.0.0.1", port, timeout=30, process=self.process)
        except Exception:
            self.stop()
            raise RuntimeError(f"{argv} did not start: {self.output()}") from None

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.output()

    stderr = ""

    def output(self) -> str:
        if self.process.poll() is None:
            return ""
        out, err = self.process.communicate()
        self.stderr = err.decode(errors="replace")  # the log stream
        return out.decode(errors="replace") + self.stderr


@pytest.fixture
def env(upstream):
    return {"JWT_SECRET": TEST_JWT_SECRET, "USER_SERVICE_URL": upstream.url,
            "RATE_LIMIT_AUTH": "100000/minute", "LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}


def check(recipe: Recipe, upstream) -> None:
    try:
        response = session().get(recipe.url + "/api/auth/recipe", timeout=20)
        assert response.status_code == 200, response.text
        assert response.json()["path"] == "/auth/recipe"
    finally:
        output = recipe.stop()
    access = []
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("path") == "/api/auth/recipe":
            access.append(record)
    assert [line["status"] for line in access] == [200], output
    assert recipe.process.returncode == 0, output


def test_meetinity_gateway_serve_listens_where_the_ini_says(env, upstream):
    port = free_port()
    recipe = Recipe([tool("meetinity-gateway"), "serve"], port,
                    dict(env, GATEWAY_LISTEN=f"127.0.0.1:{port}"))
    check(recipe, upstream)


def test_gunicorn_paste_listens_where_the_ini_says(env, upstream):
    port = free_port()
    recipe = Recipe([tool("gunicorn"), "--paste", "gateway.ini"], port,
                    dict(env, GATEWAY_LISTEN=f"127.0.0.1:{port}"))
    check(recipe, upstream)


def test_gunicorn_wsgi_module_with_its_own_bind(env, upstream):
    port = free_port()
    recipe = Recipe([tool("gunicorn"), "-w", "2", "-b", f"127.0.0.1:{port}",
                     "meetinity_gateway.wsgi:application"], port, env)
    check(recipe, upstream)


def test_pserve_listens_where_the_ini_says(env, upstream):
    port = free_port()
    recipe = Recipe([tool("pserve"), "gateway.ini"], port,
                    dict(env, GATEWAY_LISTEN=f"127.0.0.1:{port}"))
    check(recipe, upstream)


#: Every recipe of docs/serving.md, as written (the listen address from the
#: environment, as an operator's unit file would set it).
RECIPES = {
    "serve": lambda port: [tool("meetinity-gateway"), "serve"],
    "serve granian": lambda port: [tool("meetinity-gateway"), "serve", "--server", "granian"],
    "serve gunicorn": lambda port: [tool("meetinity-gateway"), "serve", "--server", "gunicorn"],
    "gunicorn --paste": lambda port: [tool("gunicorn"), "--paste", "gateway.ini"],
    "gunicorn wsgi": lambda port: [tool("gunicorn"), "-w", "2", "-b", f"127.0.0.1:{port}",
                                   "meetinity_gateway.wsgi:application"],
    # -q: pserve's own "Starting server in PID …" is a plain-text line on stderr
    "pserve": lambda port: [tool("pserve"), "-q", "gateway.ini"],
}


def records(output: str) -> tuple[list[dict], list[str]]:
    """(JSON log records, lines that are not JSON) of a recipe's stderr and stdout."""
    parsed, other = [], []
    for line in output.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            other.append(line)
            continue
        if isinstance(record, dict):
            parsed.append(record)
        else:
            other.append(line)
    return parsed, other


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_logs_json_only_a_start_up_line_and_a_true_status_page(
        name, env, upstream):
    port = free_port()
    recipe = Recipe(RECIPES[name](port), port,
                    dict(env, GATEWAY_LISTEN=f"127.0.0.1:{port}", LOG_LEVEL="WARNING"))
    try:
        client = session()
        response = client.get(recipe.url + "/api/auth/recipe", timeout=20)
        assert response.status_code == 200, response.text
        status = client.get(recipe.url + "/status", timeout=20)
        assert status.status_code == 200
        page = status.text
    finally:
        output = recipe.stop()
    # /status knows the pipeline whatever loaded it (PasteDeploy under --paste and pserve).
    assert "not loaded by" not in page and "no router" not in page, page
    assert "no rate-limit layer" not in page, page
    assert re.search(r"<li><code>observe</code></li>.*<li><code>userlimit</code></li>", page)
    assert "memory://" in page  # the limiters' storage
    # Every log line (stderr; its server's own included) is JSON under LOG_FORMAT=json.
    # (stdout may hold what a launcher prints for a person: pserve's "Starting server".)
    parsed, other = records(recipe.stderr)
    assert other == [], output
    # At LOG_LEVEL=WARNING, one line still says that, where and what the gateway serves.
    started = [r for r in parsed if r.get("message", "").startswith(
        f"serving on http://127.0.0.1:{port}: meetinity-gateway ")]
    assert started, output
    line = started[0]
    assert line["level"] == "WARNING"
    assert "observe -> errors -> cors -> ratelimit -> auth -> authorize -> userlimit" \
        in line["message"]
    assert re.search(r"\(config [0-9a-f]{12}\)", line["message"])
    assert f"user_service={upstream.url}" in line["message"]
    assert recipe.process.returncode == 0, output


@pytest.mark.parametrize("name", ["serve", "serve granian", "serve gunicorn"])
def test_a_request_finished_during_the_stop_is_logged(name, env, upstream):
    """granian lost the access lines of its last requests: those of a worker that exits
    through os._exit never reached stderr."""
    port = free_port()
    recipe = Recipe(RECIPES[name](port), port, dict(env, GATEWAY_LISTEN=f"127.0.0.1:{port}"))
    answers = []

    def slow() -> None:
        answers.append(session().get(recipe.url + "/api/auth/slow?seconds=2", timeout=20))

    try:
        assert session().get(recipe.url + "/api/auth/first", timeout=20).status_code == 200
        caller = threading.Thread(target=slow)
        caller.start()
        wait_until(lambda: any(r[1].startswith("/auth/slow") for r in upstream.requests), 10,
                   "the slow request reaching the upstream")
        recipe.process.send_signal(signal.SIGTERM)  # while the slow request is in flight
        caller.join(20)
        # One stop signal: the server drains and exits by itself. (recipe.stop() would send
        # a second one if it were still exiting, which cuts what is left: exit status 1.)
        try:
            recipe.process.wait(30)
        except subprocess.TimeoutExpired:
            pass  # stop() below ends it; the exit status assertion then says so
    finally:
        output = recipe.stop()
    assert [answer.status_code for answer in answers] == [200], output
    parsed, _ = records(output)
    logged = {(r.get("path"), r.get("status")) for r in parsed}
    assert {("/api/auth/first", 200), ("/api/auth/slow", 200)} <= logged, output
    assert recipe.process.returncode == 0, output


@pytest.mark.parametrize("name", list(RECIPES))
def test_readiness_fails_while_a_fail_closed_limiter_cannot_count(name, env, upstream):
    """Every limited path answered 503 (Redis gone, RATELIMIT_ON_ERROR=closed) while /health
    said ok: a load balancer kept sending traffic to a gateway that refused all of it."""
    pytest.importorskip("redis")
    port, nothing = free_port(), free_port()  # nothing listens on the storage's port
    recipe = Recipe(RECIPES[name](port), port, dict(
        env, GATEWAY_LISTEN=f"127.0.0.1:{port}", RATELIMIT_ON_ERROR="closed",
        RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{nothing}/0"))
    try:
        client = session()
        assert client.get(recipe.url + "/api/auth/x", timeout=20).status_code == 503
        health = client.get(recipe.url + "/health", timeout=20)
    finally:
        output = recipe.stop()
    assert health.status_code == 503, output
    assert health.json()["status"] == "error"
    assert health.json()["ratelimit"]["ratelimit"] == "failing (on_error=closed)"
