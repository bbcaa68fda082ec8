"""Health endpoints: ``/health`` (gateway and upstreams) and ``/health/live`` (process only).

``HealthApp`` answers, in the shape the platform's services use::

    {"status": "ok", "service": "api-gateway", "upstreams": {"user_service": "up"}}

and, only to clients in ``detail_allow`` (the operators' networks, the same allow-list as
``/metrics``), the per-target detail and the configuration's fingerprint::

    {"status": "ok", "service": "api-gateway", "upstreams": {"user_service": "up"},
     "targets": {"user_service": [{"target": "http://10.0.0.5:5001", "weight": 1,
                                   "state": "healthy", "failures": 0, "outstanding": 0,
                                   "probe": "up"}]},
     "config": {"fingerprint": "3f2a9c01d4e5"}}

Anyone else learns whether each upstream is up, never where the targets are nor how they
fail. The client address is the trusted one (``trusted_proxies``, see
:mod:`meetinity_gateway.net`): a spoofed ``X-Forwarded-For`` does not get the detail.

Each target is probed with ``GET <target>/health``; an upstream is ``"up"`` when at least one
of its targets answers 2xx within ``timeout`` (the gateway can still serve it), else
``"down"``; an upstream that is up while its pool has ejected targets is ``"degraded"``
(still served, the ejected targets' detail under ``targets``). 200 when no upstream is
down (``"status": "ok"``, or ``"degraded"`` when one is), else 503 with ``"status":
"error"``. ``state`` is the pool's passive view (``healthy`` or ``ejected``, see
:mod:`meetinity_gateway.proxy.upstream`); these probes do not change it. Results are cached
for ``cache_seconds`` so that a flood of ``/health`` requests cannot become a flood of
upstream requests.

The rate limiters count too (the pipeline's, handed over by the loader): while a limiter's
storage fails (Redis down), ``"ratelimit": {"ratelimit": "failing (on_error=closed)"}`` is
added; with ``on_error=closed`` every path it limits answers 503, so the gateway is not ready
(503, ``"status": "error"``); with ``on_error=open`` it serves, ``"degraded"``.

``LiveApp`` answers 200 whenever the process serves: a liveness probe must not restart the
gateway because a service behind it is down.
"""
from __future__ import annotations

import json
import threading
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor

from meetinity_gateway.net import DEFAULT_ALLOW, client_allowed, parse_networks
from meetinity_gateway.pipeline import described
from meetinity_gateway.proxy.targets import parse_targets
from meetinity_gateway.proxy.upstream import UpstreamPool

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

    :param upstreams: by upstream name, an :class:`UpstreamPool` (the proxy's own, so the
        report shows its passive state) or a target string (``URL [weight=N], …``).
    :param timeout: seconds allowed for each target's ``/health`` (connect and read).
    :param cache_seconds: how long one round of checks is reused (0: never).
    :param health_path: the path probed on each target.
    :param detail_allow: networks whose clients see the per-target detail (default loopback
        and private ranges, as ``/metrics``); ``()``: nobody.
    :param trusted_proxies: proxy hops trusted in ``X-Forwarded-For`` to find the client.
    :param fingerprint: the configuration's fingerprint, shown with the detail (or a callable
        returning it).
    """

    def __init__(
        self,
        upstreams: t.Mapping[str, str | UpstreamPool],
        *,
        timeout: float = 2.0,
        cache_seconds: float = 1.0,
        health_path: str = "/health",
        detail_allow: t.Iterable[str] = DEFAULT_ALLOW,
        trusted_proxies: int = 0,
        fingerprint: str | t.Callable[[], str | None] | None = None,
    ) -> None:
        self.detail_allow = parse_networks(detail_allow)
        self.trusted_proxies = trusted_proxies
        self.fingerprint = fingerprint
        self.pools: dict[str, UpstreamPool] = {}
        self._own: list[UpstreamPool] = []
        for name, value in upstreams.items():
            if isinstance(value, str):
                # Nobody routes through this pool: connect by name, no background thread.
                value = UpstreamPool(parse_targets(value), name=name, dns_interval=0,
                                     pool_size=2, health_timeout=timeout)
                self._own.append(value)
            self.pools[name] = value
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.health_path = health_path
        self._lock = threading.Lock()
        self._cached: tuple[float, tuple[dict, dict]] | None = None
        #: The pipeline's rate-limit layers by name (see :meth:`attach_pipeline`).
        self.limiters: dict[str, t.Any] = {}

    def attach_pipeline(self, pipeline) -> None:
        """Called by the loader (or :func:`~meetinity_gateway.assembly.adopt`) once the whole
        pipeline is built: its rate-limit layers' storage counts in the readiness."""
        self.limiters = {layer.name: layer.app for layer in described(pipeline)
                         if layer.kind == "ratelimit"}

    def limiter_states(self) -> dict[str, str]:
        """``{layer: "failing (on_error=closed)"}`` for each rate limiter whose storage fails."""
        return {name: f"failing (on_error={layer.on_error})"
                for name, layer in self.limiters.items() if layer.storage_failing}

    def close(self) -> None:
        for pool in self._own:
            pool.close()

    def _probe(self, job) -> bool:
        pool, target = job
        return pool.probe(target, self.health_path, self.timeout)

    def report(self) -> tuple[dict[str, str], dict[str, list[dict]]]:
        """``({upstream: "up" | "down"}, {upstream: [target detail, …]})``, cached."""
        with self._lock:
            now = time.monotonic()
            if self._cached and now - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            jobs = [(name, pool, target) for name, pool in self.pools.items()
                    for target in pool.targets]
            probes = [(pool, target) for _, pool, target in jobs]
            if len(jobs) <= 1:
                results = [self._probe(job) for job in probes]
            else:
                with ThreadPoolExecutor(max_workers=min(len(jobs), 16)) as executor:
                    results = list(executor.map(self._probe, probes))
            up = {(name, target) for (name, _, target), ok in zip(jobs, results) if ok}
            upstreams: dict[str, str] = {}
            details: dict[str, list[dict]] = {}
            for name, pool in self.pools.items():
                labels = {target.label: target for target in pool.targets}
                rows = pool.snapshot()
                for row in rows:
                    target = labels.get(row["target"])
                    row["probe"] = "up" if (name, target) in up else "down"
                details[name] = rows
                upstreams[name] = "up" if any(row["probe"] == "up" for row in rows) else "down"
                if upstreams[name] == "up" and pool.degraded:
                    upstreams[name] = "degraded"
            self._cached = (time.monotonic(), (upstreams, details))
            return upstreams, details

    def check(self) -> dict[str, str]:
        """``{upstream name: "up" | "down"}``, from cache when fresh."""
        return self.report()[0]

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        upstreams, details = self.report()
        limiters = self.limiter_states()
        # A limiter failing closed answers 503 on every path it limits: not ready. Failing
        # open, it still serves (each process counting alone): degraded.
        healthy = (all(state != "down" for state in upstreams.values())
                   and not any(state.endswith("closed)") for state in limiters.values()))
        degraded = any(state == "degraded" for state in upstreams.values()) or bool(limiters)
        payload: dict[str, t.Any] = {
            "status": ("degraded" if degraded else "ok") if healthy else "error",
            "service": SERVICE,
            "upstreams": upstreams,
        }
        if limiters:
            payload["ratelimit"] = limiters
        if client_allowed(environ, self.detail_allow, self.trusted_proxies):
            payload["targets"] = details
            fingerprint = self.fingerprint() if callable(self.fingerprint) else self.fingerprint
            if fingerprint:
                payload["config"] = {"fingerprint": fingerprint}
        status = "200 OK" if healthy else "503 Service Unavailable"
        return _json(start_response, environ, status, payload)
