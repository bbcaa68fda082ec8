"""OpenTelemetry tracing: spans exported over OTLP/HTTP (the optional extra ``[otel]``).

Off by default; ``[filter:observe] otel = ${OTEL_ENABLED:-false}`` turns it on, and this
module (hence the OpenTelemetry SDK) is imported only then: with tracing off a request pays
one attribute test. What is traced:

* **one server span per request** (kind SERVER), parented on the incoming ``traceparent``
  when it is valid (the trusted caller's trace goes on), else the root of a new trace; the
  ``traceparent`` the gateway passes on and logs (``trace_id``) is then this span's. Its
  attributes: ``http.request.method``, ``url.path`` (no query string), ``http.route`` (the
  route's name), ``http.response.status_code``, ``client.address`` (the address the rate
  limiter counts: the trusted-hops rule), ``gateway.request_id``, ``gateway.ratelimit.rule``
  and ``gateway.ratelimit.allowed`` when a rate-limit rule applied, ``gateway.auth.error``
  when authentication refused, ``gateway.authz.denied`` (the refusing rule's name),
  ``enduser.id`` (the verified ``sub``; no other claim, never a token or header value);
  ``error.type`` and an error status on a 5xx;
* **one client span per upstream attempt** (kind CLIENT, child of the server span):
  ``server.address``/``server.port`` of the target, ``gateway.upstream``,
  ``http.request.resend_count`` (the retry number, from 1), ``http.response.status_code``
  or ``error.type`` (``timeout``, ``unavailable``); its context is the ``traceparent``
  the upstream receives, so the service's spans are its children.

Configuration is OpenTelemetry's own environment variables: ``OTEL_EXPORTER_OTLP_ENDPOINT``
or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (default ``http://localhost:4318``),
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_SERVICE_NAME``
(default ``meetinity-gateway``), ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG`` (default: follow the caller's sampled flag, sample the traces
the gateway starts), ``OTEL_BSP_MAX_QUEUE_SIZE`` (2048), ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``
(512), ``OTEL_BSP_SCHEDULE_DELAY`` (5000 ms); ``OTEL_SDK_DISABLED=true`` turns it off.

**A collector that is down or hangs costs a counter.** Ended spans go to a bounded queue
(:class:`SpanQueue`) that a request never waits on: when it is full the span is dropped
and counted. One background thread exports batches (its waits bounded by the exporter's
timeout). ``/metrics`` shows ``gateway_otel_spans_exported_total``,
``gateway_otel_spans_dropped_total`` and ``gateway_otel_export_failures_total``
(:mod:`meetinity_gateway.runtime_metrics`). At exit, what is queued gets at most
``SHUTDOWN_SECONDS`` to leave.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import typing as t

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meetinity_gateway import __version__

__all__ = ["RequestTrace", "SpanQueue", "Tracing", "tracing"]

log = logging.getLogger("meetinity_gateway.tracing")

SHUTDOWN_SECONDS = 2.0
_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()
_tracing: Tracing | None = None


def _env_int(name: str, default: int) -> int:
    from meetinity_gateway.config import ConfigError, as_positive_int

    text = os.environ.get(name, "").strip()
    try:
        return as_positive_int(text) if text else default
    except ValueError as exc:
        raise ConfigError(str(exc), key=name, value=text) from None


class SpanQueue(SpanProcessor):
    """A batching span processor whose queue is bounded and never waited on (see the module
    docstring): ``dropped`` spans found it full, ``exported`` left, ``failed`` were refused
    or lost by the exporter."""

    def __init__(self, exporter, *, max_queue: int = 2048, batch: int = 512,
                 delay: float = 5.0) -> None:
        self.exporter = exporter
        self.batch = min(batch, max_queue)
        self.delay = delay
        self.dropped = 0
        self.exported = 0
        self.failed = 0
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._stop = threading.Event()
        self._flush = threading.Event()
        self._counts = threading.Lock()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="otel-export", daemon=True)
        self._thread.start()

    def on_start(self, span, parent_context=None) -> None:
        pass

    def on_end(self, span) -> None:
        if not span.context.trace_flags.sampled:
            return
        try:
            self._queue.put_nowait(span)
        except queue.Full:
            with self._counts:
                self.dropped += 1

    def _export(self, spans: list) -> None:
        self._busy = True
        try:
            ok = self.exporter.export(spans) is SpanExportResult.SUCCESS
        except Exception:  # never let the exporter end the thread
            log.debug("span export raised", exc_info=True)
            ok = False
        finally:
            self._busy = False
        with self._counts:
            if ok:
                self.exported += len(spans)
            else:
                self.failed += len(spans)

    def _run(self) -> None:
        """Collect up to ``batch`` spans or for ``delay`` seconds, export, again; at stop,
        one last export of what is queued."""
        while True:
            deadline = time.monotonic() + self.delay
            spans: list = []
            while (len(spans) < self.batch and not self._stop.is_set()
                   and not self._flush.is_set()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:  # short waits: a stop or a flush is noticed at once
                    spans.append(self._queue.get(timeout=min(left, 0.1)))
                except queue.Empty:
                    continue
            if self._stop.is_set() or self._flush.is_set():
                self._flush.clear()
                try:
                    while True:
                        spans.append(self._queue.get_nowait())
                except queue.Empty:
                    pass
            if spans:
                self._export(spans)
            if self._stop.is_set():
                return

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export what is queued now; ``False`` when not done within ``timeout_millis``
        (the caller never exports itself: a hanging collector holds only the export
        thread)."""
        self._flush.set()
        deadline = time.monotonic() + timeout_millis / 1000.0
        while time.monotonic() < deadline:
            if self._queue.empty() and not self._busy and not self._flush.is_set():
                return True
            time.sleep(0.02)
        return False

    def shutdown(self) -> None:
        """At exit: what is queued gets at most ``SHUTDOWN_SECONDS`` to leave."""
        self._stop.set()
        self._thread.join(SHUTDOWN_SECONDS)


class RequestTrace:
    """The spans of one request (see the module docstring)."""

    __slots__ = ("owner", "span", "context", "traceparent", "trace_id")

    def __init__(self, owner: Tracing, span) -> None:
        self.owner = owner
        self.span = span
        self.context = trace.set_span_in_context(span)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=self.context)
        self.traceparent = carrier.get("traceparent", "")
        self.trace_id = format(span.get_span_context().trace_id, "032x")

    def attempt(self, headers: dict[str, str], method: str, upstream: str, target: str,
                number: int):
        """Start the client span of one upstream attempt and put its context in
        ``headers`` (the request about to be sent)."""
        host, _, port = target.rpartition(":")
        attributes: dict[str, t.Any] = {"gateway.upstream": upstream,
                                        "server.address": host.strip("[]") or target,
                                        "http.request.method": method}
        if port.isdigit():
            attributes["server.port"] = int(port)
        if number:
            attributes["http.request.resend_count"] = number
        span = self.owner.tracer.start_span(method, context=self.context, kind=SpanKind.CLIENT,
                                            attributes=attributes)
        for name in [name for name in headers if name.lower() in ("traceparent", "tracestate")]:
            del headers[name]
        _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))
        return span

    @staticmethod
    def end_attempt(span, status: int | None = None, error: str | None = None) -> None:
        if span is None:
            return
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        if error:
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    def finish(self, status: int, attributes: dict[str, t.Any]) -> None:
        span = self.span
        for key, value in attributes.items():
            if value is not None:
                span.set_attribute(key, value)
        route = attributes.get("http.route")
        if route:
            span.update_name(f"{attributes.get('http.request.method', '')} {route}".strip())
        if status:
            span.set_attribute("http.response.status_code", status)
        if status >= 500 or not status:
            span.set_attribute("error.type", str(status) if status else "cut")
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class Tracing:
    """The process' tracer provider, exporter and span queue."""

    def __init__(self, exporter=None) -> None:
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        attributes = {"service.version": __version__}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = "meetinity-gateway"
        self.processor = SpanQueue(
            exporter, max_queue=_env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
            batch=_env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
            delay=_env_int("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000.0)
        # The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on).
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("meetinity_gateway", __version__)

    def start(self, environ, method: str) -> RequestTrace:
        """The server span of a request, parented on its valid ``traceparent`` if any."""
        carrier = {}
        if environ.get("HTTP_TRACEPARENT"):
            carrier["traceparent"] = environ["HTTP_TRACEPARENT"]
            if environ.get("HTTP_TRACESTATE"):
                carrier["tracestate"] = environ["HTTP_TRACESTATE"]
        parent = _PROPAGATOR.extract(carrier)
        span = self.tracer.start_span(method or "HTTP", context=parent, kind=SpanKind.SERVER)
        return RequestTrace(self, span)


def tracing() -> Tracing | None:
    """The process' :class:`Tracing` (made once; shared by every pipeline and reload), or
    ``None`` when ``OTEL_SDK_DISABLED`` is true."""
    global _tracing
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    with _lock:
        if _tracing is None:
            _tracing = Tracing()
        return _tracing
