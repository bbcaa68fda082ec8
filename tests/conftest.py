"""Shared fixtures: a real loopback upstream and the shipped gateway under a real waitress."""
from __future__ import annotations

import os
import shutil
import time

import pytest

from meetinity_gateway import config as config_module
from tests.servers import TEST_JWT_SECRET, GatewayProcess, clear_gateway_env, shipped_gateway
from tests.upstream import Upstream

#: Set by .ci/run: a test that would skip for a missing system tool fails instead.
STRICT = os.environ.get("MEETINITY_STRICT_SKIPS", "").lower() in ("1", "true", "yes")


def require_tool(name: str, why: str) -> str:
    """The tool's path; skips (fails under MEETINITY_STRICT_SKIPS=1) when it is missing."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed ({why}); .ci/run installs it"
    if STRICT:
        pytest.fail(message + " — MEETINITY_STRICT_SKIPS=1 forbids skipping", pytrace=False)
    pytest.skip(message)


def wait_until(condition, timeout: float = 10.0, what: str = "condition",
               ignore: tuple[type[BaseException], ...] = ()):
    """Poll ``condition()`` until it returns something true, and return that; fail the test
    (AssertionError naming ``what``) after ``timeout`` seconds. Exceptions of the types in
    ``ignore`` count as "not yet" (a server still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.01)


@pytest.fixture
def restore_environ():
    """For code that writes ``os.environ`` itself (``.env`` files read by ``main()`` or a
    reload): the process environment, and what the config module took from ``.env`` files,
    are put back as they were after the test."""
    saved, ours = dict(os.environ), dict(config_module._from_env_file)
    yield
    os.environ.clear()
    os.environ.update(saved)
    config_module._from_env_file.clear()
    config_module._from_env_file.update(ours)


@pytest.fixture(autouse=True)
def _clean_gateway_env(monkeypatch):
    """Tests start from the shipped defaults, whatever the developer's shell exports, plus
    the one variable the shipped gateway.ini requires: the (test-only) JWT secret."""
    clear_gateway_env(monkeypatch)
    monkeypatch.setenv("JWT_SECRET", TEST_JWT_SECRET)


@pytest.fixture
def upstream():
    with Upstream() as server:
        yield server


@pytest.fixture
def gateway_factory(monkeypatch, upstream):
    """Start the shipped gateway.ini under waitress with extra environment variables."""
    servers = []

    def start(**env):
        """Shipped gateway.ini with ``env``; defaults: this test's upstream, the test JWT
        secret, and rate limits (per address on auth, per user on the services) high enough
        never to trigger by accident."""
        env.setdefault("USER_SERVICE_URL", upstream.url)
        env.setdefault("JWT_SECRET", TEST_JWT_SECRET)
        for limit in ("AUTH", "USERS", "EVENTS", "MATCHING", "MESSAGING"):
            env.setdefault(f"RATE_LIMIT_{limit}", "100000/minute")
        server = shipped_gateway(monkeypatch, env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def gateway(gateway_factory):
    return gateway_factory()


@pytest.fixture
def gateway_process(upstream):
    """Start ``python -m meetinity_gateway serve`` (the shipped gateway.ini) in a child
    process with extra environment variables; defaults: this test's upstream, the test JWT
    secret, an auth rate limit that never triggers. Stopped after the test."""
    processes = []

    def start(**env):
        env.setdefault("USER_SERVICE_URL", upstream.url)
        env.setdefault("JWT_SECRET", TEST_JWT_SECRET)
        env.setdefault("RATE_LIMIT_AUTH", "100000/minute")
        process = GatewayProcess(env=env)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.stop()
