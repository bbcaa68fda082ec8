"""Observability: the access log, Prometheus metrics and W3C trace context.

The outermost layer of the gateway (``pipeline = observe errors …``): it sees every request
first and every final status last — the error edge's 400 and 500, auth's 401, the rate
limiter's 429, the router's 404, the proxy's 502/504 and the upstream's own answers. For
every request it

1. **trace context**: keeps a valid W3C ``traceparent`` (and its ``tracestate``) as it came,
   or, when there is none or it is malformed, starts a trace — ``00-<trace id>-<parent id>-
   <flags>`` with random non-zero ids — dropping a ``tracestate`` that belonged to nothing.
   Both travel upstream as request headers (the proxy copies them from the environ); the trace
   id is put in ``environ["meetinity_gateway.trace_id"]`` and in the access log line;
2. **metrics**: counts the request in flight, then, once the body is sent and closed,
   records its count and duration by route, method and status class, each upstream attempt
   (duration or failure by upstream and target, from the proxy's environ keys), a 429 by
   rate-limit rule (``meetinity_gateway.ratelimit``) and an authentication failure by reason
   (``meetinity_gateway.auth_error``);
3. **access log**: writes one record on the ``meetinity_gateway.access`` logger (INFO) with
   ``ts`` (request start, UTC), ``request_id``, ``method``, ``path`` (no query string unless
   ``log_query``), ``status``, ``duration_ms`` (until the body was sent and closed),
   ``bytes_out`` (body bytes), ``client`` (the address the rate limiter counts), ``route``,
   ``upstream``, ``target``, ``upstream_ms`` (of the last attempt), ``user`` (the JWT ``sub``)
   and ``trace_id``; ``attempts`` is added when the proxy retried, ``auth_error`` (the
   reason, e.g. ``token expired``) when authentication refused, ``authz_denied`` (the
   refusing rule's name) when the authorization layer refused, ``error`` when the
   response was cut off by an exception or by the server at stop (``cut at stop (…)``;
   ``status`` is then 0 when no status line had reached the client), ``upstream_error``
   (``timeout``, ``unavailable``, ``invalid``) when the last upstream attempt failed, also
   after its headers were relayed, ``upstream_rejected`` (``queue_full``, ``queue_timeout``,
   ``stalled``) when the proxy refused the request at the upstream's concurrency cap.
   Headers are never logged: no token, cookie or ``Authorization`` value can reach a log line;
4. answers ``GET metrics_path`` itself with the Prometheus exposition (OpenMetrics when the
   scraper asks for it), before the rate limiter and authentication, but only to clients in
   ``metrics_allow``; anyone else gets the standard JSON 404, as for a path that does not
   exist. Scrapes are logged, not counted.

Metrics (``namespace`` ``gateway``)::

    gateway_requests_total{route,method,status}                     counter
    gateway_request_duration_seconds{route,method,status}           histogram
    gateway_requests_in_flight                                      gauge
    gateway_upstream_request_duration_seconds{upstream,target}      histogram
    gateway_upstream_failures_total{upstream,target,reason}         counter (see below)
    gateway_upstream_max_in_flight{upstream}                        gauge (the proxy's cap)
    gateway_upstream_rejections_total{upstream,reason}              counter (queue_full,
                                                                    queue_timeout, stalled)
    gateway_ratelimit_rejections_total{rule}                        counter
    gateway_auth_failures_total{reason}                             counter

plus, once a loader has built the pipeline, the process' and configuration's metrics (build
info, per-target state, reloads, ``process_*``: :mod:`meetinity_gateway.runtime_metrics`).

``reason`` is ``timeout``, ``unavailable`` or ``invalid`` (a response the proxy refused).
``status`` is the class (``2xx``…``5xx``), ``route`` the route name (``none`` for a request
answered before or without routing: 400, 401, 404, 429…), ``method`` one of the standard
methods or ``OTHER``: label values never come from free client input. Each middleware
instance has its own registry. With ``PROMETHEUS_MULTIPROC_DIR`` set (before the process
starts: prometheus-client reads it at import) the metrics are kept in that directory and a
scrape of any process reports the sum of all of them — the mode for gunicorn with several
workers.

Use alone around any WSGI app::

    from meetinity_gateway.middleware.observe import ObserveMiddleware
    app = ObserveMiddleware(app, metrics_allow=["127.0.0.1/32", "10.0.0.0/8"])

:param app: the WSGI application to wrap.
:param log_format: ``json`` (default) or ``text`` (``key=value``): how the access record
    reads as a message (with ``meetinity-gateway serve``, ``LOG_FORMAT`` sets both).
:param log_query: log the query string with the path (default ``False``: it may hold
    secrets).
:param metrics: collect metrics (default ``True``); ``False`` also disables the endpoint.
:param metrics_path: where the exposition is served (default ``/metrics``; empty: nowhere,
    e.g. to expose the registry another way).
:param metrics_allow: networks allowed to read the metrics (default loopback and private
    ranges: ``127.0.0.0/8, ::1, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7``).
:param trusted_proxies: proxies in front of the gateway trusted to append to
    ``X-Forwarded-For`` (default 0): decides the logged ``client`` and the allow-list check.
:param trace: handle W3C trace context (default ``True``).
:param trace_sampled: the ``sampled`` flag of traces the gateway starts (default ``True``).
:param namespace: prefix of every metric name (default ``gateway``).
:param buckets: duration histogram buckets in seconds (default prometheus-client's).
:param registry: a ``CollectorRegistry`` to register the metrics in (default: a new one).
:param otel: export spans over OpenTelemetry (default ``False``; needs the ``[otel]`` extra;
    endpoint, sampling and batching by the standard ``OTEL_*`` variables): a server span
    per request, a client span per upstream attempt (see :mod:`meetinity_gateway.tracing`).

In gateway.ini::

    [filter:observe]
    use = egg:meetinity_gateway#observe
    log_format = ${LOG_FORMAT:-json}
    metrics_path = ${METRICS_PATH:-/metrics}
    metrics_allow = ${METRICS_ALLOW:-127.0.0.0/8, ::1/128, 10.0.0.0/8, 172.16.0.0/12, …}

Security: the metrics reveal traffic volumes, route names and upstream addresses: keep
``metrics_allow`` to the scraper's network. Behind a load balancer, set ``trusted_proxies``
to its hop count — with 0 every client seems to be the balancer (often a private address,
hence allowed); with more hops than really exist a client can pick its own address in
``X-Forwarded-For``. ``log_query`` puts query strings (tokens in links…) in the logs.
"""
from __future__ import annotations

import logging
import os
import re
import time
import typing as t
from pathlib import Path

from meetinity_gateway.config import (
    ConfigError,
    as_bool,
    as_list,
    as_non_negative_int,
    as_str,
    cast_settings,
)
from meetinity_gateway.keys import (
    AUTH_ERROR_KEY,
    AUTHZ_DENIED_KEY,
    CLAIMS_KEY,
    CUT_KEY,
    RATELIMIT_KEY,
    REQUEST_ID_KEY,
    ROUTE_KEY,
    TARGET_KEY,
    TRACE_ID_KEY,
    TRACE_KEY,
    UPSTREAM_ATTEMPTS_KEY,
    UPSTREAM_ERROR_KEY,
    UPSTREAM_KEY,
    UPSTREAM_LIMIT_KEY,
    UPSTREAM_MS_KEY,
    UPSTREAM_REJECTED_KEY,
)
from meetinity_gateway.logs import LOG_FORMATS, AccessRecord, make_record
from meetinity_gateway.net import DEFAULT_ALLOW, client_address, client_allowed, parse_networks
from meetinity_gateway.problems import assign_request_id, error_response, random_hex
from meetinity_gateway.shared import shared

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "DEFAULT_METRICS_ALLOW",
    "ObserveMiddleware",
    "filter_factory",
    "new_traceparent",
    "parse_traceparent",
]

log = logging.getLogger("meetinity_gateway.observe")
access_log = logging.getLogger("meetinity_gateway.access")


def _log_access(record: AccessRecord) -> None:
    """``access_log.info(record)`` without ``Logger.findCaller`` (the access record's source
    is always this module; walking the stack back through every layer, for every request,
    was a measurable share of the gateway's own time under load) and without
    ``LogRecord.__init__``'s per-record work (:func:`~meetinity_gateway.logs.make_record`)."""
    access_log.handle(make_record(access_log.name, logging.INFO, record, __file__))


DEFAULT_METRICS_ALLOW = DEFAULT_ALLOW

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
                      "CONNECT"})
_STATUS_CLASSES = {code: f"{code}xx" for code in range(1, 6)}
_METRICS_ROUTE = "@metrics"

# -- W3C trace context ------------------------------------------------------------------------

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\Z")
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16
_TRACESTATE_MAX = 512
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_traceparent(value: str | None) -> str | None:
    """The trace id of a valid ``traceparent``, else ``None`` (W3C Trace Context §3.2).

    Version ``00`` must be exactly ``00-<32 hex>-<16 hex>-<2 hex>``; a later version may carry
    more fields after a ``-``; ``ff`` and all-zero ids are invalid; hex is lower case.
    """
    if not value or len(value) < 55:
        return None
    match = _TRACEPARENT.match(value[:55])
    if match is None:
        return None
    version, trace_id, parent_id, _ = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return None
    if len(value) > 55 and (version == "00" or value[55] != "-"):
        return None
    return trace_id


def new_traceparent(sampled: bool = True) -> tuple[str, str]:
    """A fresh ``(traceparent, trace id)`` with random non-zero ids."""
    while True:
        ids = random_hex(48)  # both ids at once (see random_hex: no system call)
        trace_id, parent_id = ids[:32], ids[32:]
        if trace_id != _ZERO_TRACE and parent_id != _ZERO_PARENT:
            return f"00-{trace_id}-{parent_id}-{'01' if sampled else '00'}", trace_id


# -- metrics ---------------------------------------------------------------------------------

def _multiprocess_dir() -> str | None:
    return (os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            or os.environ.get("prometheus_multiproc_dir") or None)


class _Metrics:
    """The collectors of one middleware instance."""

    def __init__(self, namespace: str, buckets: t.Sequence[float] | None, registry) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

        self.multiprocess_dir = _multiprocess_dir()
        if self.multiprocess_dir:
            if not Path(self.multiprocess_dir).is_dir():
                raise ConfigError("PROMETHEUS_MULTIPROC_DIR is not a directory",
                                  key="PROMETHEUS_MULTIPROC_DIR", value=self.multiprocess_dir)
            if values.ValueClass is values.MutexValue:
                raise ConfigError("PROMETHEUS_MULTIPROC_DIR was set after prometheus-client "
                                  "was imported: set it before the process starts",
                                  key="PROMETHEUS_MULTIPROC_DIR", value=self.multiprocess_dir)
            # The values live in the directory's files; a scrape merges them (see expose).
            self.registry = None
        else:
            self.registry = registry if registry is not None else CollectorRegistry()
        common = {"namespace": namespace, "registry": self.registry}
        duration = {"buckets": tuple(buckets)} if buckets else {}
        labels = ("route", "method", "status")
        self.requests = Counter("requests", "Requests answered, by route, method and status "
                                "class.", labels, **common)
        self.duration = Histogram("request_duration_seconds", "Time from the request to the "
                                  "end of its response body.", labels, **common, **duration)
        self.in_flight = Gauge("requests_in_flight", "Requests being answered.",
                               multiprocess_mode="livesum", **common)
        self.upstream_duration = Histogram(
            "upstream_request_duration_seconds", "Time from sending a request upstream to its "
            "response headers.", ("upstream", "target"), **common, **duration)
        self.upstream_failures = Counter(
            "upstream_failures", "Upstream calls without an answer, by reason "
            "(timeout, unavailable).", ("upstream", "target", "reason"), **common)
        # The proxy's bulkhead, from its environ keys (the pool itself is not ours to see).
        self.upstream_max_in_flight = Gauge(
            "upstream_max_in_flight", "Cap on requests in flight to one upstream.",
            ("upstream",), multiprocess_mode="max", **common)
        self.upstream_rejections = Counter(
            "upstream_rejections", "Requests refused without calling the upstream, by "
            "reason (queue_full, queue_timeout, stalled: at its concurrency cap).",
            ("upstream", "reason"), **common)
        self.upstream_limits: dict[str, int] = {}
        self.ratelimit_rejections = Counter(
            "ratelimit_rejections", "Requests refused with 429, by rate-limit rule.",
            ("rule",), **common)
        self.by_request: dict[tuple[str, str, str], tuple[t.Any, t.Any]] = {}
        # Children of the per-upstream collectors, by label values: labels() validates and
        # takes the collector's lock on every call. Bounded like prometheus' own table (the
        # configured upstreams and their resolved targets, the few failure reasons).
        self.by_upstream: dict[tuple[str, ...], t.Any] = {}
        self.failures_by: dict[tuple[str, ...], t.Any] = {}
        self.auth_failures = Counter(
            "auth_failures", "Requests refused by authentication, by reason.",
            ("reason",), **common)
        #: The process' and configuration's metrics (meetinity_gateway.runtime_metrics),
        #: registered here by the loader.
        self.runtime = None

    def expose(self, accept: str | None) -> tuple[bytes, str]:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder

        registry = self.registry
        if registry is None:
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type


# -- the middleware ---------------------------------------------------------------------------

class _Exchange:
    """What is known about one request while it is answered."""

    __slots__ = ("start", "wall", "status", "bytes_out", "error", "done", "trace_id", "spans")

    def __init__(self, trace_id: str | None, spans=None) -> None:
        self.spans = spans  # the request's OpenTelemetry spans (tracing on)
        self.start = time.perf_counter()
        self.wall = time.time()
        self.status = 0
        self.bytes_out = 0
        self.error: str | None = None
        self.done = False
        self.trace_id = trace_id


class _ObservedBody:
    """The inner body: counts bytes; the request is recorded when the server closes it."""

    __slots__ = ("_inner", "_owner", "_environ", "_exchange")

    def __init__(self, inner, owner: ObserveMiddleware, environ, exchange: _Exchange) -> None:
        self._inner = inner
        self._owner = owner
        self._environ = environ
        self._exchange = exchange

    def __iter__(self):
        exchange = self._exchange
        try:
            for chunk in self._inner:
                exchange.bytes_out += len(chunk)
                yield chunk
        except Exception:
            exchange.error = "response aborted"
            if not exchange.status:
                exchange.status = 500
            raise

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            self._owner.finish(self._environ, self._exchange)


class ObserveMiddleware:
    """Access log, metrics and trace context (see the module docstring)."""

    #: What this layer is, for the pipeline model (meetinity_gateway.pipeline).
    kind = "observe"

    def __init__(
        self,
        app: WSGIApplication,
        *,
        log_format: str = "json",
        log_query: bool = False,
        metrics: bool = True,
        metrics_path: str = "/metrics",
        metrics_allow: t.Iterable[str] = DEFAULT_METRICS_ALLOW,
        trusted_proxies: int = 0,
        trace: bool = True,
        trace_sampled: bool = True,
        namespace: str = "gateway",
        buckets: t.Sequence[float] | None = None,
        registry=None,
        otel: bool = False,
    ) -> None:
        self.app = app
        #: OpenTelemetry export (meetinity_gateway.tracing), imported only when asked for.
        self.tracing = None
        if otel:
            try:
                from meetinity_gateway.tracing import tracing
            except ImportError as exc:
                raise ConfigError(f"OpenTelemetry is not installed ({exc.name}): pip install "
                                  "meetinity_gateway[otel]", key="otel", value="true") from None
            self.tracing = tracing()
        log_format = (log_format or "json").strip().lower()
        if log_format not in LOG_FORMATS:
            raise ConfigError(f"expected one of {', '.join(LOG_FORMATS)}", key="log_format",
                              value=log_format)
        self._as_json = log_format == "json"
        self.log_query = log_query
        metrics_path = (metrics_path or "").strip()
        if metrics_path and (not metrics_path.startswith("/") or _CONTROL.search(metrics_path)
                             or " " in metrics_path):
            raise ConfigError("expected a path like /metrics (or nothing)", key="metrics_path",
                              value=metrics_path)
        self.metrics_path = metrics_path if metrics else ""
        try:
            self.metrics_allow = parse_networks(metrics_allow)
        except ValueError as exc:
            raise ConfigError(str(exc), key="metrics_allow",
                              value=", ".join(map(str, metrics_allow))) from None
        if trusted_proxies < 0:
            raise ConfigError("expected a whole number of at least 0", key="trusted_proxies",
                              value=str(trusted_proxies))
        self.trusted_proxies = trusted_proxies
        self.trace = trace
        self.trace_sampled = trace_sampled
        self.namespace = namespace
        if not re.match(r"^[a-zA-Z_][a-zA-Z0-9_]*$", namespace or ""):
            raise ConfigError("expected a metric name prefix like gateway", key="namespace",
                              value=namespace)
        if buckets is not None:
            buckets = sorted(float(b) for b in buckets)
            if not buckets or buckets[0] <= 0:
                raise ConfigError("expected increasing positive seconds", key="buckets",
                                  value=", ".join(map(str, buckets)))
        self.metrics = None
        if metrics and registry is not None:
            self.metrics = _Metrics(namespace, buckets, registry)
        elif metrics:
            # A configuration reload keeps counting in the same collectors.
            self.metrics = shared("metrics", (namespace, tuple(buckets or ())),
                                  lambda: _Metrics(namespace, buckets, None))

    @property
    def registry(self):
        """The registry holding this instance's metrics (``None`` in multiprocess mode)."""
        return self.metrics.registry if self.metrics is not None else None

    # -- the request --------------------------------------------------------------------------

    def describe(self) -> list[str]:
        """Its settings, one line each (``check``, ``/status``)."""
        networks = ", ".join(map(str, self.metrics_allow)) or "nobody"
        return [
            f"access log: {'json' if self._as_json else 'text'}, query strings "
            + ("logged" if self.log_query else "left out"),
            (f"metrics: {self.metrics_path} for {networks}" if self.metrics_path
             else "metrics: not served"),
            "trace context: " + ("W3C traceparent" if self.trace else "off")
            + (", OpenTelemetry export" if self.tracing is not None else ""),
        ]

    def policy_for(self, path: str, method: str = "GET") -> None:
        """No say per path: every request is logged, counted and traced."""
        return None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        if self.metrics_path and environ.get("PATH_INFO") == self.metrics_path:
            return self._serve_metrics(environ, start_response)

        trace_id = None
        spans = None
        if self.trace or self.tracing is not None:
            trace_id = parse_traceparent(environ.get("HTTP_TRACEPARENT"))
            if trace_id is None:
                environ.pop("HTTP_TRACEPARENT", None)
                # A tracestate belongs to the traceparent it came with.
                environ.pop("HTTP_TRACESTATE", None)
            else:
                state = environ.get("HTTP_TRACESTATE")
                if state is not None and (len(state) > _TRACESTATE_MAX
                                          or _CONTROL.search(state)):
                    del environ["HTTP_TRACESTATE"]
            if self.tracing is not None:
                # The server span, child of the caller's trace if any: its context is what
                # goes on (upstream, in the log).
                spans = self.tracing.start(environ, environ.get("REQUEST_METHOD", ""))
                environ["HTTP_TRACEPARENT"], trace_id = spans.traceparent, spans.trace_id
                environ[TRACE_KEY] = spans
            elif trace_id is None:
                environ["HTTP_TRACEPARENT"], trace_id = new_traceparent(self.trace_sampled)
            environ[TRACE_ID_KEY] = trace_id
        return self._observe(environ, start_response, _Exchange(trace_id, spans))

    def _observe(self, environ, start_response, exchange: _Exchange):
        def start_and_note(status, headers, exc_info=None):
            exchange.status = int(status[:3])
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        if self.metrics is not None:
            self.metrics.in_flight.inc()
        try:
            inner = self.app(environ, start_and_note)
        except BaseException:
            # The server turns it into a 500 (or drops the connection): record it as that.
            exchange.status = exchange.status or 500
            exchange.error = "unhandled exception"
            self.finish(environ, exchange)
            raise
        return _ObservedBody(inner, self, environ, exchange)

    def finish(self, environ: WSGIEnvironment, exchange: _Exchange) -> None:
        """Record a request whose response is over (called once, from ``close``)."""
        if exchange.done:
            return
        exchange.done = True
        duration = time.perf_counter() - exchange.start
        status = exchange.status or 500
        cut = environ.get(CUT_KEY)
        if cut:  # the server cut the connection at stop: say so, and what the client got
            exchange.error = cut.get("reason") or "cut at stop"
            if not cut.get("answered"):
                status = exchange.status = 0  # no status line reached the client
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight.dec()
            self._record(metrics, environ, status, duration)
        if access_log.isEnabledFor(logging.INFO):
            _log_access(self._access_record(environ, exchange, status, duration))
        if exchange.spans is not None:
            self._end_span(environ, exchange, status)

    def _end_span(self, environ, exchange: _Exchange, status: int) -> None:
        """The server span's attributes (never a header, a token or a claim but ``sub``)."""
        claims = environ.get(CLAIMS_KEY)
        user = claims.get("sub") if isinstance(claims, dict) else None
        decision = environ.get(RATELIMIT_KEY)
        attributes: dict[str, t.Any] = {
            "http.request.method": environ.get("REQUEST_METHOD"),
            "url.path": environ.get("PATH_INFO") or "/",
            "url.scheme": environ.get("wsgi.url_scheme"),
            "http.route": environ.get(ROUTE_KEY),
            "client.address": client_address(environ, self.trusted_proxies),
            "gateway.request_id": environ.get(REQUEST_ID_KEY),
            "gateway.auth.error": environ.get(AUTH_ERROR_KEY),
            "gateway.authz.denied": environ.get(AUTHZ_DENIED_KEY),
            "enduser.id": None if user is None else str(user),
            "gateway.error": exchange.error,
        }
        if isinstance(decision, dict) and decision.get("rule") is not None:
            attributes["gateway.ratelimit.rule"] = str(decision.get("rule"))
            attributes["gateway.ratelimit.allowed"] = decision.get("allowed") is not False
        try:
            exchange.spans.finish(status, attributes)
        except Exception:  # tracing never fails a request
            log.debug("ending the server span failed", exc_info=True)

    def _record(self, metrics: _Metrics, environ, status: int, duration: float) -> None:
        method = environ.get("REQUEST_METHOD", "")
        labels = (
            environ.get(ROUTE_KEY) or "none",
            method if method in _METHODS else "OTHER",
            _STATUS_CLASSES.get(status // 100, "other"),
        )
        children = metrics.by_request.get(labels)
        if children is None:
            # labels() validates and locks: resolve each (few) label set once.
            children = (metrics.requests.labels(*labels), metrics.duration.labels(*labels))
            metrics.by_request[labels] = children
        children[0].inc()
        children[1].observe(duration)
        upstream = environ.get(UPSTREAM_KEY)
        if upstream is not None:
            for target, upstream_ms, failure in _attempts(environ):
                if failure:
                    key = (upstream, target, failure)
                    child = metrics.failures_by.get(key)
                    if child is None:
                        child = metrics.failures_by[key] = metrics.upstream_failures.labels(*key)
                    child.inc()
                elif upstream_ms is not None:
                    key = (upstream, target)
                    child = metrics.by_upstream.get(key)
                    if child is None:
                        child = metrics.by_upstream[key] = metrics.upstream_duration.labels(*key)
                    child.observe(upstream_ms / 1000.0)
            limit = environ.get(UPSTREAM_LIMIT_KEY)
            if limit and metrics.upstream_limits.get(upstream) != limit:
                metrics.upstream_limits[upstream] = limit
                metrics.upstream_max_in_flight.labels(upstream).set(limit)
            rejected = environ.get(UPSTREAM_REJECTED_KEY)
            if rejected:
                metrics.upstream_rejections.labels(upstream, rejected).inc()
        if status == 429:
            decision = environ.get(RATELIMIT_KEY)
            if isinstance(decision, dict) and decision.get("allowed") is False:
                metrics.ratelimit_rejections.labels(str(decision.get("rule"))).inc()
        auth_error = environ.get(AUTH_ERROR_KEY)
        if auth_error:
            metrics.auth_failures.labels(auth_error).inc()

    def _access_record(self, environ, exchange: _Exchange, status: int,
                       duration: float) -> AccessRecord:
        path = environ.get("PATH_INFO") or "/"
        try:
            # PEP 3333 hands the path over as latin-1; log the characters the client meant.
            path = path.encode("latin-1").decode("utf-8", "replace")
        except UnicodeEncodeError:
            pass
        if self.log_query and environ.get("QUERY_STRING"):
            path = f"{path}?{environ['QUERY_STRING']}"
        claims = environ.get(CLAIMS_KEY)
        user = claims.get("sub") if isinstance(claims, dict) else None
        upstream_ms = environ.get(UPSTREAM_MS_KEY)
        fields = {
            "ts": exchange.wall,
            "request_id": environ.get(REQUEST_ID_KEY),
            "method": environ.get("REQUEST_METHOD"),
            "path": path,
            "status": status,
            "duration_ms": round(duration * 1000.0, 3),
            "bytes_out": exchange.bytes_out,
            "client": client_address(environ, self.trusted_proxies),
            "route": environ.get(ROUTE_KEY),
            "upstream": environ.get(UPSTREAM_KEY),
            "target": environ.get(TARGET_KEY),
            "upstream_ms": None if upstream_ms is None else round(upstream_ms, 3),
            "user": None if user is None else str(user),
            "trace_id": exchange.trace_id,
        }
        attempts = environ.get(UPSTREAM_ATTEMPTS_KEY)
        if attempts and len(attempts) > 1:
            fields["attempts"] = len(attempts)
        auth_error = environ.get(AUTH_ERROR_KEY)
        if auth_error:
            fields["auth_error"] = auth_error  # why authentication refused (401/503)
        denied_by = environ.get(AUTHZ_DENIED_KEY)
        if denied_by:
            fields["authz_denied"] = denied_by  # the authorization rule that refused
        if exchange.error:
            fields["error"] = exchange.error
        upstream_error = environ.get(UPSTREAM_ERROR_KEY)
        if upstream_error:
            fields["upstream_error"] = upstream_error
        rejected = environ.get(UPSTREAM_REJECTED_KEY)
        if rejected:
            fields["upstream_rejected"] = rejected  # why the bulkhead refused it
        return AccessRecord(fields, self._as_json)

    # -- the metrics endpoint ------------------------------------------------------------------

    def allowed(self, environ: WSGIEnvironment) -> bool:
        """Whether the client may read the metrics."""
        return client_allowed(environ, self.metrics_allow, self.trusted_proxies)

    def _serve_metrics(self, environ, start_response):
        environ[ROUTE_KEY] = _METRICS_ROUTE
        exchange = _Exchange(None)
        # Served outside the error edge, so the request id is given here, the same way.
        id_header = ("X-Request-ID", assign_request_id(environ))

        def start_with_id(status, headers, exc_info=None):
            headers = [h for h in headers if h[0].lower() != "x-request-id"]
            headers.append(id_header)
            return start_response(status, headers, exc_info)

        def endpoint(environ, start_response):
            if not self.allowed(environ):
                # The same answer as for any path without a route: nothing to see here.
                environ.pop(ROUTE_KEY, None)
                return error_response(environ, start_response, 404,
                                      f"no route for {self.metrics_path}")
            if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
                return error_response(environ, start_response, 405, "method not allowed",
                                      [("Allow", "GET, HEAD")])
            body, content_type = self.metrics.expose(environ.get("HTTP_ACCEPT"))
            start_response("200 OK", [("Content-Type", content_type),
                                      ("Content-Length", str(len(body))),
                                      ("Cache-Control", "no-store")])
            return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]

        inner = endpoint(environ, lambda s, h, e=None: _note(exchange, start_with_id, s, h))
        # Not counted in the request metrics (a scrape would change what it reports), but
        # logged like any request.
        return _ObservedBody(inner, _LogOnly(self), environ, exchange)


def _attempts(environ) -> list[tuple[str, float | None, str | None]]:
    """The upstream attempts of a request: the proxy's list, else its last-attempt keys."""
    attempts = environ.get(UPSTREAM_ATTEMPTS_KEY)
    if attempts:
        return attempts
    return [(environ.get(TARGET_KEY) or "", environ.get(UPSTREAM_MS_KEY),
             environ.get(UPSTREAM_ERROR_KEY))]


def _note(exchange: _Exchange, start_response, status, headers):
    exchange.status = int(status[:3])
    return start_response(status, headers)


class _LogOnly:
    """Records a metrics-endpoint request in the access log only."""

    __slots__ = ("_owner",)

    def __init__(self, owner: ObserveMiddleware) -> None:
        self._owner = owner

    def finish(self, environ, exchange: _Exchange) -> None:
        if exchange.done:
            return
        exchange.done = True
        if access_log.isEnabledFor(logging.INFO):
            duration = time.perf_counter() - exchange.start
            _log_access(self._owner._access_record(environ, exchange, exchange.status,
                                                   duration))


# -- ini ------------------------------------------------------------------------------------

def _floats(value: str) -> list[float] | None:
    items = as_list(value)
    if not items:
        return None
    try:
        return [float(item) for item in items]
    except ValueError:
        raise ValueError("expected comma-separated seconds, e.g. 0.01, 0.1, 1, 10") from None


_PARAMS = {
    "log_format": as_str,
    "log_query": as_bool,
    "metrics": as_bool,
    "metrics_path": as_str,
    "metrics_allow": as_list,
    "trusted_proxies": as_non_negative_int,
    "trace": as_bool,
    "trace_sampled": as_bool,
    "namespace": as_str,
    "buckets": _floats,
    "otel": as_bool,
}


def filter_factory(global_conf, **local_conf):
    """``paste.filter_factory`` for ``egg:meetinity_gateway#observe``."""
    kwargs = cast_settings(local_conf, _PARAMS, global_conf)
    file = global_conf.get("__file__")

    def make_filter(app):
        try:
            return ObserveMiddleware(app, **kwargs)
        except ConfigError as exc:
            raise exc.locate(file=file) from None

    return make_filter
