"""Configuration reload: swapped only when valid, in-flight requests unharmed, state kept.

In-process tests drive :class:`ReloadingApp` under a real waitress with ``check()`` (or its
polling thread); the end-to-end tests run ``meetinity-gateway serve --reload`` in a child
process under a bounded client load and change its files.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from meetinity_gateway.config import ConfigError
from meetinity_gateway.reload import ReloadingApp, reload_settings
from meetinity_gateway.shared import SharedState, shared
from tests.conftest import wait_until
from tests.servers import (
    SHIPPED_INI,
    TEST_JWT_SECRET,
    WaitressServer,
    auth_headers,
    free_port,
    session,
    wait_for_port,
)
from tests.upstream import Upstream

INI = """\
[pipeline:main]
pipeline = observe errors ratelimit gateway

[filter:observe]
use = egg:meetinity_gateway#observe

[filter:errors]
use = egg:meetinity_gateway#errors

[filter:ratelimit]
use = egg:meetinity_gateway#ratelimit
rule.limited = /api/limited ${{LIMIT:-3/minute}}

[app:gateway]
use = egg:meetinity_gateway#main
upstream.svc = ${{SVC_URL}}
max_fails = 1
eject_time = 60
retries = 0
route.health = GET /health -> @health
route.svc = /api/svc/* -> svc /
route.limited = /api/limited/* -> svc /
{extra}
"""


#: Reloads read .env files straight into os.environ: put the process back as it was.
pytestmark = pytest.mark.usefixtures("restore_environ")


def write(path: Path, text: str) -> None:
    """Replace the file atomically with a new modification time (as an editor saving)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    stamp = time.time() + 1 if not hasattr(write, "last") else max(time.time(), write.last) + 1
    write.last = stamp
    os.utime(path, (stamp, stamp))


@pytest.fixture
def workdir(tmp_path):
    folder = tmp_path / "conf"
    folder.mkdir()
    return folder


@pytest.fixture
def served():
    """A ReloadingApp (no polling thread unless asked) under a real waitress."""
    started = []

    def start(config: Path, watch: bool = False, interval: float = 1.0):
        app = ReloadingApp(config, watch=watch, interval=interval)
        server = WaitressServer(app, threads=4)
        started.append((app, server))
        return app, server

    yield start
    for app, server in started:
        app.close()
        server.stop()


def test_valid_change_is_swapped_in_and_state_survives(workdir, served, upstream, caplog):
    config = workdir / "gateway.ini"
    (workdir / ".env").write_text(f"SVC_URL={upstream.url}\n")
    write(config, INI.format(extra=""))
    app, server = served(config)
    client = session()
    old = app.pipeline
    for _ in range(2):
        assert client.get(server.url + "/api/limited/echo").status_code == 200
    assert client.get(server.url + "/api/svc/echo").json()["path"] == "/echo"
    assert client.get(server.url + "/api/events/1").status_code == 404

    with Upstream() as events:
        write(config, INI.format(extra=f"upstream.events = {events.url}\n"
                                       "route.events = /api/events/* -> events /events"))
        with caplog.at_level(logging.INFO, logger="meetinity_gateway.reload"):
            assert app.check() is True
        assert app.pipeline is not old and app.pipeline.fingerprint != old.fingerprint
        assert f"configuration reloaded: {old.fingerprint} -> {app.pipeline.fingerprint}" \
            in caplog.text
        answer = client.get(server.url + "/api/events/1")
        assert answer.status_code == 200 and answer.json()["upstream"] == events.url
        # The memory:// counters carried over: the third request of 3/minute is the last.
        assert client.get(server.url + "/api/limited/echo").status_code == 200
        assert client.get(server.url + "/api/limited/echo").status_code == 429
        # The upstream's pool (same URL and settings) is the same object: health, pools.
        assert (app.pipeline.router.endpoints["svc"].pool
                is old.router.endpoints["svc"].pool)
        # The metrics kept counting across the swap.
        metrics = client.get(server.url + "/metrics").text
        line = [row for row in metrics.splitlines() if row.startswith(
            'gateway_requests_total{method="GET",route="limited",status="2xx"}')]
        assert line and float(line[0].split()[-1]) == 3.0
        # /health shows the fingerprint of the new configuration.
        health = client.get(server.url + "/health").json()
        assert health["config"]["fingerprint"] == app.pipeline.fingerprint


def test_bad_file_leaves_the_running_pipeline_untouched(workdir, served, upstream, caplog):
    config = workdir / "gateway.ini"
    (workdir / ".env").write_text(f"SVC_URL={upstream.url}\n")
    write(config, INI.format(extra=""))
    app, server = served(config)
    good = app.pipeline
    bad_texts = [
        INI.format(extra="route.broken = /api/broken/* -> nowhere"),
        INI.format(extra="max_body_size = lots"),
        INI.format(extra="").replace("${LIMIT:-3/minute}", "3 per fortnight"),
        "[pipeline:main\nthis is not ini",
        "",
    ]
    for text in bad_texts:
        write(config, text)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="meetinity_gateway.reload"):
            assert app.check() is False
        assert app.pipeline is good
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, caplog.text
        message = errors[0].getMessage()
        assert "\n" not in message and message.startswith("configuration error: ")
        assert f"still serving configuration {good.fingerprint}" in message
        assert "Traceback" not in caplog.text
        # The same bad contents are not tried again every second.
        assert app.check() is None
        assert session().get(server.url + "/api/svc/echo").status_code == 200
    assert "no [pipeline:main] or [app:main] section" in app.last_error  # the empty file
    # A bad .env (a required variable removed) is refused too, and its variables put back.
    write(config, INI.format(extra=""))
    assert app.check() is None  # back to the good contents: nothing to do
    write(workdir / ".env", "OTHER=1\n")
    assert app.check() is False
    assert os.environ["SVC_URL"] == upstream.url and "OTHER" not in os.environ
    assert "SVC_URL is required" in app.last_error


def test_touch_without_change_reloads_nothing(workdir, served, upstream):
    config = workdir / "gateway.ini"
    (workdir / ".env").write_text(f"SVC_URL={upstream.url}\n")
    write(config, INI.format(extra=""))
    app, _ = served(config)
    write(config, config.read_text())
    assert app.check() is None and app.reloads == 0
    assert app.check(force=True) is True and app.reloads == 1  # SIGHUP's way


def test_env_file_changes_follow_but_real_environment_wins(workdir, served, monkeypatch):
    with Upstream() as first, Upstream() as second:
        config = workdir / "gateway.ini"
        (workdir / ".env").write_text(f"SVC_URL={first.url}\nLIMIT=1/minute\n")
        monkeypatch.setenv("LIMIT", "1000/minute")  # real environment: never overridden
        write(config, INI.format(extra=""))
        app, server = served(config)
        client = session()
        assert client.get(server.url + "/api/svc/echo").json()["upstream"] == first.url
        write(workdir / ".env", f"SVC_URL={second.url}\nLIMIT=1/minute\n")
        assert app.check() is True
        assert client.get(server.url + "/api/svc/echo").json()["upstream"] == second.url
        for _ in range(3):
            assert client.get(server.url + "/api/limited/echo").status_code == 200


def test_upstream_health_survives_a_reload(workdir, served, upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    config = workdir / "gateway.ini"
    (workdir / ".env").write_text(f"SVC_URL={dead}\n")
    write(config, INI.format(extra=""))
    app, server = served(config)
    client = session()
    assert client.get(server.url + "/api/svc/echo").status_code == 502  # ejects it (1 fail)
    before = client.get(server.url + "/health").json()["targets"]["svc"][0]
    assert before["state"] == "ejected" and before["ejections"] == 1
    old_pool = app.pipeline.router.endpoints["svc"].pool
    write(config, INI.format(extra="route.more = /api/more/* -> svc /"))
    assert app.check() is True
    # The new pipeline has the new route and the same pool: the target is still ejected,
    # with the same ejection (not a fresh pool that would have to find out again).
    assert app.pipeline.router.endpoints["svc"].pool is old_pool
    after = client.get(server.url + "/health").json()["targets"]["svc"][0]
    assert after["state"] == "ejected" and after["ejections"] == 1
    assert 30 < after["ejected_for"] <= before["ejected_for"]
    # Panic routing: the only target is tried anyway, and is still dead.
    assert client.get(server.url + "/api/more/echo").status_code == 502


def test_changed_upstream_settings_start_a_fresh_pool(workdir, served, upstream):
    config = workdir / "gateway.ini"
    (workdir / ".env").write_text(f"SVC_URL={upstream.url}\n")
    write(config, INI.format(extra=""))
    app, _ = served(config)
    old_pool = app.pipeline.router.endpoints["svc"].pool
    write(config, INI.format(extra="").replace("eject_time = 60", "eject_time = 30"))
    assert app.check() is True
    assert app.pipeline.router.endpoints["svc"].pool is not old_pool


def test_in_flight_request_finishes_on_the_pipeline_it_started_with(workdir, served):
    with Upstream() as old_target, Upstream() as new_target:
        config = workdir / "gateway.ini"
        (workdir / ".env").write_text(f"SVC_URL={old_target.url}\n")
        write(config, INI.format(extra=""))
        app, server = served(config)
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(session().get, server.url + "/api/svc/slow?seconds=1.5",
                               timeout=20)
            wait_until(lambda: old_target.requests, 10)
            write(workdir / ".env", f"SVC_URL={new_target.url}\n")
            assert app.check() is True
            fresh = session().get(server.url + "/api/svc/echo", timeout=20)
            assert fresh.json()["upstream"] == new_target.url
            answer = slow.result(timeout=20)
        assert answer.status_code == 200 and answer.json() == {"slow": True}
        assert [target for _, target, _ in old_target.requests] == ["/slow?seconds=1.5"]


def test_polling_thread_notices_a_change(workdir, served, upstream):
    config = workdir / "gateway.ini"
    (workdir / ".env").write_text(f"SVC_URL={upstream.url}\n")
    write(config, INI.format(extra=""))
    app, server = served(config, watch=True, interval=0.05)
    write(config, INI.format(extra="route.more = /api/more/* -> svc /"))
    wait_until(lambda: app.reloads, 10)
    assert app.reloads == 1
    assert session().get(server.url + "/api/more/echo").status_code == 200


def test_reload_settings():
    assert reload_settings(False) == (False, 1.0)
    assert reload_settings(True) == (True, 1.0)
    os.environ.update(RELOAD="yes", RELOAD_INTERVAL="0.5")
    assert reload_settings(False) == (True, 0.5)
    os.environ["RELOAD"] = "perhaps"
    with pytest.raises(ConfigError) as info:
        reload_settings(False)
    assert "RELOAD = 'perhaps'" in str(info.value)


def test_shared_state_identity_and_failed_builds():
    class Thing:
        closed = False

        def close(self):
            self.closed = True

    state = SharedState()
    assert shared("x", 1, Thing) is not shared("x", 1, Thing)  # outside a build: never kept
    with state.build():
        a, b = shared("x", 1, Thing), shared("x", 1, Thing)  # two layers, same identity
    assert a is not b
    with state.build():
        assert shared("x", 1, Thing) is a and shared("x", 1, Thing) is b
        c = shared("x", 2, Thing)
    fresh = []
    with pytest.raises(RuntimeError):
        with state.build():
            assert shared("x", 2, Thing) is c
            fresh.append(shared("y", 1, Thing))
            raise RuntimeError("validation failed")
    assert fresh[0].closed and not c.closed
    assert state.kinds() == {"x": 3}  # the failed build changed nothing
    with state.build():
        assert shared("x", 2, Thing) is c
    assert state.kinds() == {"x": 1}  # only what the last configuration uses is kept


# -- end to end: `serve --reload` under load ----------------------------------------------------

class ServeProcess:
    """``meetinity-gateway serve --reload`` in a child; stderr collected as it comes."""

    def __init__(self, config: Path, env: dict, extra_args=()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        child_env = {k: v for k, v in os.environ.items()
                     if not k.startswith(("LOG_", "GATEWAY_", "JWT_", "RELOAD"))}
        child_env.update(env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meetinity_gateway", "serve", "--config", str(config),
             "--listen", f"127.0.0.1:{self.port}", "--threads", "4", *extra_args],
            env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            wait_for_port("127.0.0.1", self.port, timeout=20, process=self.process)
        except Exception:
            self.stop()
            raise RuntimeError("gateway did not start:\n" + "\n".join(self.lines)) from None

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, fragment: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if fragment in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line with {fragment!r}:\n" + "\n".join(self.lines[-30:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._reader.join(5)


class Load:
    """A bounded client loop: a few threads sending requests until stopped (or a cap)."""

    def __init__(self, url: str, threads: int = 3, cap_seconds: float = 60.0) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + cap_seconds
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        client = session()
        headers = auth_headers()
        paths = ["/api/users/42/echo", "/api/auth/echo", "/health/live"]
        n = 0
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            path = paths[(index + n) % len(paths)]
            n += 1
            try:
                response = client.get(self.url + path, headers=headers, timeout=10)
                good = response.status_code == 200
                detail = f"{path}: {response.status_code} {response.text[:200]}"
            except Exception as exc:  # any failure to get an answer counts
                good, detail = False, f"{path}: {type(exc).__name__}: {exc}"
            with self._lock:
                if good:
                    self.ok += 1
                else:
                    self.failures.append(detail)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def _shipped_with(extra: str) -> str:
    text = SHIPPED_INI.read_text()
    marker = "route.events = /api/events/* -> event_service /events\n"
    assert marker in text
    return text.replace(marker, marker + extra)


def test_serve_reload_under_load_adds_a_route_and_rejects_a_bad_file(tmp_path, upstream):
    config = tmp_path / "gateway.ini"
    write(config, SHIPPED_INI.read_text())
    (tmp_path / ".env").write_text(
        f"USER_SERVICE_URL={upstream.url}\nJWT_SECRET={TEST_JWT_SECRET}\n"
        "RATE_LIMIT_AUTH=100000/minute\nLOG_FORMAT=text\nRELOAD_INTERVAL=0.1\n")
    gateway = ServeProcess(config, {}, extra_args=["--reload"])
    load = None
    try:
        start_line = gateway.wait_for_line("meetinity-gateway ")
        first = json.loads(session().get(gateway.url + "/health").text)["config"]["fingerprint"]
        assert f"(config {first})" in start_line
        load = Load(gateway.url)
        time.sleep(0.5)
        with Upstream() as events:
            write(config, _shipped_with(
                f"upstream.extra_service = {events.url}\n"
                "route.extra = /api/extra/* -> extra_service /events\n"))
            gateway.wait_for_line("configuration reloaded")
            answer = session().get(gateway.url + "/api/extra/7", headers=auth_headers(), timeout=10)
            assert answer.status_code == 200 and answer.json()["path"] == "/events/7"
            second = session().get(gateway.url + "/health").json()["config"]["fingerprint"]
            assert second != first
            time.sleep(0.5)
            write(config, _shipped_with("route.broken = /api/broken/* -> nowhere\n"))
            error = gateway.wait_for_line("configuration error")
            assert "unknown target 'nowhere'" in error and f"still serving configuration " \
                f"{second}" in error
            time.sleep(0.5)
            # Still the good configuration: the events route answers, the fingerprint stays.
            assert session().get(gateway.url + "/api/extra/8", headers=auth_headers(),
                                 timeout=10).status_code == 200
            assert session().get(gateway.url + "/api/broken/1", headers=auth_headers(),
                                 timeout=10).status_code == 404
            assert session().get(gateway.url + "/health").json()["config"]["fingerprint"] \
                == second
        load.stop()
        assert load.failures == [], load.failures[:5]
        assert load.ok >= 30, load.ok
    finally:
        if load is not None:
            load.stop()
        gateway.stop()
    assert sum("configuration reloaded" in line for line in gateway.lines) == 1
    assert sum("configuration error" in line for line in gateway.lines) == 1
    assert not any("Traceback" in line for line in gateway.lines)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP is POSIX")
def test_sighup_reloads(tmp_path, upstream):
    config = tmp_path / "gateway.ini"
    write(config, SHIPPED_INI.read_text())
    (tmp_path / ".env").write_text(
        f"USER_SERVICE_URL={upstream.url}\nJWT_SECRET={TEST_JWT_SECRET}\nLOG_FORMAT=text\n"
        "RELOAD=true\nRELOAD_INTERVAL=3600\n")  # polling too slow to matter: the signal
    gateway = ServeProcess(config, {})
    try:
        gateway.wait_for_line("watching")
        write(config, _shipped_with("route.extra = /api/extra/* -> user_service /x\n"))
        gateway.process.send_signal(signal.SIGHUP)
        gateway.wait_for_line("configuration reloaded")
        response = session().get(gateway.url + "/api/extra/1", headers=auth_headers(), timeout=10)
        assert response.status_code == 200 and response.json()["path"] == "/x/1"
    finally:
        gateway.stop()


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample of a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            sample, _, value = line.rpartition(" ")
            if all(f'{key}="{val}"' in sample for key, val in labels.items()):
                return float(value)
    raise AssertionError(f"no {name} {labels} in:\n{text}")


def test_metrics_say_version_target_states_and_reloads(workdir, served, upstream):
    """No process, build-info, per-target-state or reload metrics: what every anchor has."""
    from meetinity_gateway import __version__

    config = workdir / "gateway.ini"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: ejected after one failure
    (workdir / ".env").write_text(f"SVC_URL={upstream.url}\n")
    write(config, INI.format(extra=""))
    app, server = served(config)
    client = session()
    text = client.get(server.url + "/metrics").text
    assert metric(text, "gateway_build_info", version=__version__) == 1
    target = f"http://127.0.0.1:{upstream.port}"
    assert metric(text, "gateway_upstream_target_state", upstream="svc", target=target,
                  state="healthy") == 1
    assert metric(text, "gateway_upstream_target_state", target=target, state="ejected") == 0
    before = {result: metric(text, "gateway_config_reloads_total", result=result)
              for result in ("success", "failure")}
    if sys.platform.startswith("linux"):  # where the platform has them
        assert metric(text, "process_resident_memory_bytes") > 0
        assert metric(text, "process_open_fds") > 0
    write(config, INI.format(extra="route.broken = nonsense"))
    assert app.check() is False
    (workdir / ".env").write_text(f"SVC_URL={dead}\n")
    write(config, INI.format(extra=""))
    assert app.check() is True
    assert client.get(server.url + "/api/svc/x").status_code == 502  # ejects the one target
    text = client.get(server.url + "/metrics").text
    assert metric(text, "gateway_upstream_target_state", target=dead, state="ejected") == 1
    # The next request finds every target ejected and routes to them anyway: panic.
    assert client.get(server.url + "/api/svc/x").status_code == 502
    text = client.get(server.url + "/metrics").text
    assert metric(text, "gateway_config_reloads_total", result="success") == \
        before["success"] + 1
    assert metric(text, "gateway_config_reloads_total", result="failure") == \
        before["failure"] + 1
    assert metric(text, "gateway_upstream_target_state", upstream="svc", target=dead,
                  state="panic") == 1
    assert metric(text, "gateway_upstream_target_state", target=dead, state="ejected") == 0
