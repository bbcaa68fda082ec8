"""Every serving recipe of the README, run as written from the repository folder: it listens
where it should, proxies a call, and writes the access log."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
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
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.output()

    def output(self) -> str:
        if self.process.poll() is None:
            return ""
        out, err = self.process.communicate()
        return out.decode(errors="replace") + err.decode(errors="replace")


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
