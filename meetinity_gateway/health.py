"""Health endpoints: ``/health`` (gateway and upstreams) and ``/health/live`` (process only).

``HealthApp`` answers, in the shape the platform's services use::

    {"status": "ok", "service": "api-gateway", "upstreams": {"user_service": "up"}}

200 when every upstream answers ``GET <upstream>/health`` with a 2xx within ``timeout``,
else 503 with ``"status": "error"`` and the failing upstreams marked ``"down"``. Results are
cached for ``cache_seconds`` so that a flood of ``/health`` requests cannot become a flood
of upstream requests.

``LiveApp`` answers 200 whenever the process serves: a liveness probe must not restart the
gateway because a service behind it is down.
"""
from __future__ import annotations

import json
import threading
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor

import requests

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["HealthApp", "LiveApp"]

SERVICE = "api-gateway"


def _json(start_response: StartResponse, environ, status: str, payload: dict) -> list[bytes]:
    body = json.dumps(payload, separators=(",", ":")).encode()
    start_response(status, [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
    ])
    return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]


class LiveApp:
    """200 whenever the process serves."""

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        return _json(start_response, environ, "200 OK", {"status": "ok", "service": SERVICE})


class HealthApp:
    """The gateway's status plus each upstream's (see the module docstring).

    :param upstreams: base URLs by upstream name.
    :param timeout: seconds allowed for each upstream's ``/health`` (connect and read).
    :param cache_seconds: how long one round of checks is reused (0: never).
    """

    def __init__(
        self,
        upstreams: t.Mapping[str, str],
        *,
        timeout: float = 2.0,
        cache_seconds: float = 1.0,
        health_path: str = "/health",
    ) -> None:
        self.upstreams = {name: url.rstrip("/") for name, url in upstreams.items()}
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.health_path = health_path
        self.session = requests.Session()
        self.session.trust_env = False
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, str]] | None = None

    def _probe(self, base_url: str) -> str:
        try:
            response = self.session.get(
                base_url + self.health_path, timeout=self.timeout, allow_redirects=False
            )
            response.close()
        except requests.RequestException:
            return "down"
        return "up" if 200 <= response.status_code < 300 else "down"

    def check(self) -> dict[str, str]:
        """``{upstream name: "up" | "down"}``, from cache when fresh."""
        with self._lock:
            now = time.monotonic()
            if self._cached and now - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            names = list(self.upstreams)
            if len(names) <= 1:
                states = [self._probe(self.upstreams[n]) for n in names]
            else:
                with ThreadPoolExecutor(max_workers=len(names)) as pool:
                    states = list(pool.map(self._probe, (self.upstreams[n] for n in names)))
            result = dict(zip(names, states))
            self._cached = (time.monotonic(), result)
            return result

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        upstreams = self.check()
        healthy = all(state == "up" for state in upstreams.values())
        payload = {
            "status": "ok" if healthy else "error",
            "service": SERVICE,
            "upstreams": upstreams,
        }
        status = "200 OK" if healthy else "503 Service Unavailable"
        return _json(start_response, environ, status, payload)
