"""Real servers for end-to-end tests: the gateway under waitress, in a thread or a process."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from meetinity_gateway.assembly import load_pipeline
from meetinity_gateway.cli import create_server

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_INI = ROOT / "gateway.ini"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0, process=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class WaitressServer:
    """A WSGI app served by a real waitress in a background thread, on a free loopback port."""

    def __init__(self, app, threads: int = 4, host: str = "127.0.0.1", **adjustments) -> None:
        self._server = create_server(app, listen=f"{host}:0", threads=threads, **adjustments)
        self.port = self._server.effective_port
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stopping = False
        self._thread.start()

    def _run(self) -> None:
        try:
            self._server.run()
        except OSError:
            if not self._stopping:
                raise

    def stop(self) -> None:
        self._stopping = True
        # Closing live channels from this thread makes waitress log "unhandled close event".
        logging.getLogger("waitress").setLevel(logging.ERROR)
        # Close every channel, then the dispatcher: run() returns once its map is empty.
        while self._server._map:
            for channel in list(self._server._map.values()):
                channel.handle_close()
        self._server.task_dispatcher.shutdown()
        self._thread.join(5)

    def __enter__(self) -> "WaitressServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def write_ini(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


#: Environment variables the shipped gateway.ini reads: cleared so that tests start from the
#: shipped defaults, whatever the developer's shell exports.
GATEWAY_ENV_PREFIXES = (
    "JWT_", "CORS_", "RATE_LIMIT", "RATELIMIT_", "UPSTREAM_", "GATEWAY_", "TRUSTED_PROXIES",
    "MAX_BODY_SIZE", "USER_SERVICE_URL", "EVENT_SERVICE_URL", "MATCHING_SERVICE_URL",
    "MESSAGING_SERVICE_URL", "MATCHING_SUGGEST_", "HEALTH_TIMEOUT", "LOG_", "METRICS_",
    "TRACE_", "PROMETHEUS_MULTIPROC_DIR",
)


def clear_gateway_env(monkeypatch) -> None:
    for key in list(os.environ):
        if key.startswith(GATEWAY_ENV_PREFIXES):
            monkeypatch.delenv(key, raising=False)


@contextmanager
def module_gateway(env: dict[str, str], threads: int = 4):
    """The shipped gateway.ini under waitress for a whole test module (Hypothesis runs many
    examples against one): a clean environment plus the test JWT secret and ``env``, put
    back afterwards."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        clear_gateway_env(monkeypatch)
        server = shipped_gateway(monkeypatch, {"JWT_SECRET": TEST_JWT_SECRET, **env}, threads)
        try:
            yield server
        finally:
            server.stop()
    finally:
        monkeypatch.undo()


def shipped_gateway(monkeypatch, env: dict[str, str], threads: int = 4) -> WaitressServer:
    """The shipped gateway.ini, with ``env`` set, under waitress in this process."""
    # The app sizes its pools and bulkhead from GATEWAY_THREADS: keep it the server's.
    env = {"GATEWAY_THREADS": str(threads), **env}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pipeline = load_pipeline(SHIPPED_INI)
    return WaitressServer(pipeline.app, threads=threads, max_body_size=pipeline.max_body_size)


class GatewayUnderTest:
    """A gateway built from a small ini (observe, errors, router), under a real waitress.

    ``upstreams`` maps names to target strings; each gets a route ``/NAME/*``. ``settings``
    are ``[app:gateway]`` keys (``max_fails = 1`` …).
    """

    def __init__(self, directory: Path, upstreams: dict[str, str], threads: int = 4,
                 **settings) -> None:
        lines = [
            "[pipeline:main]", "pipeline = observe errors gateway", "",
            "[filter:observe]", "use = egg:meetinity_gateway#observe", "",
            "[filter:errors]", "use = egg:meetinity_gateway#errors", "",
            "[app:gateway]", "use = egg:meetinity_gateway#main",
            "route.health = GET /health -> @health",
            "route.live = GET /health/live -> @live",
            f"server_threads = {threads}",
        ]
        for name, targets in upstreams.items():
            lines.append(f"upstream.{name} = {targets}")
            lines.append(f"route.{name} = /{name}/* -> {name}")
        lines.extend(f"{key} = {value}" for key, value in settings.items())
        path = directory / "gateway-under-test.ini"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.pipeline = load_pipeline(path)
        self.server = WaitressServer(self.pipeline.app, threads=threads)
        self.url = self.server.url

    def pool(self, name: str):
        return self.pipeline.router.endpoints[name].pool

    def states(self, name: str) -> list[str]:
        return [row["state"] for row in self.pool(name).snapshot()]

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            for endpoint in self.pipeline.router.endpoints.values():
                close = getattr(endpoint, "close", None)
                if close is not None:
                    close()


class GatewayProcess:
    """``python -m meetinity_gateway serve`` in a child process (for memory and multi-process
    tests). Environment: this process's, plus ``env``."""

    def __init__(self, config: Path = SHIPPED_INI, env: dict[str, str] | None = None,
                 threads: int = 4, log: Path | None = None) -> None:
        """``log``: a file for the process' stderr (log lines), readable while it runs;
        else a pipe, read by :meth:`stderr` once it has exited (keep such a process quiet:
        a full pipe blocks it)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = log.open("wb") if log is not None else None
        child_env = dict(os.environ)
        child_env.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meetinity_gateway", "serve", "--config", str(config),
             "--listen", f"127.0.0.1:{self.port}", "--threads", str(threads)],
            env=child_env, cwd=str(ROOT),
            stdout=subprocess.DEVNULL,
            stderr=self._log_file or subprocess.PIPE,
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout=15, process=self.process)
        except Exception:
            self.stop()
            raise RuntimeError(f"gateway did not start: {self.stderr()}") from None

    def stderr(self) -> str:
        if self.log is not None:
            return self.log.read_text(encoding="utf-8", errors="replace")
        if self.process.poll() is None:
            return ""
        return (self.process.stderr.read() or b"").decode(errors="replace")

    def rss_kib(self, field: str = "VmRSS") -> int:
        """Resident memory of the process from /proc (Linux)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stderr:
            self.process.stderr.close()
        if self._log_file is not None:
            self._log_file.close()

    def __enter__(self) -> "GatewayProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def session() -> requests.Session:
    """A client session that ignores proxy variables (tests talk to loopback only)."""
    client = requests.Session()
    client.trust_env = False
    return client


#: The HS256 secret every test gateway is started with (tests only, never a real secret).
TEST_JWT_SECRET = "test-only-secret-0123456789abcdef0123456789abcdef"


def make_token(secret: str = TEST_JWT_SECRET, lifetime: int = 300, **claims) -> str:
    """An HS256 token shaped like the user service's (integer ``sub``, email, provider)."""
    import jwt

    now = int(time.time())
    payload = {"sub": 42, "email": "ada@example.com", "provider": "google",
               "iat": now, "exp": now + lifetime}
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


def auth_headers(**claims) -> dict[str, str]:
    """``Authorization: Bearer <valid token>`` for protected routes."""
    return {"Authorization": "Bearer " + make_token(**claims)}
