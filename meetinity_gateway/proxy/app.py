"""ProxyApp: one request in, one upstream attempt (or a safe retry) out, one streamed answer.

A plain WSGI application forwarding to one upstream *pool*
(:class:`~meetinity_gateway.proxy.upstream.UpstreamPool`: one or more weighted targets,
balancing, outlier ejection, DNS re-resolution, per-target keep-alive pools of the lean
client :mod:`meetinity_gateway.proxy.client`):

* bodies stream both ways in bounded chunks (``chunk_size``; an answer is passed on as it
  arrives, piece by piece, never held back to fill a chunk), bytes untouched (no gzip
  decoding, duplicate query parameters and repeated ``Set-Cookie`` preserved);
* hop-by-hop headers and those named in ``Connection`` are removed both ways, upstream
  ``Access-Control-*`` headers dropped, ``X-Forwarded-*`` and ``Via`` set (see
  :mod:`meetinity_gateway.proxy.headers`); ``Host`` is the target's configured host[:port];
  no ``User-Agent`` or ``Accept-Encoding`` is invented;
* retries only when safe: a connect failure (nothing sent) is retried on another target for
  any method; after the request was sent (read error, timeout, or a 502/503/504 answer), only
  idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE) with a replayable body (none, or at
  most ``replay_size`` bytes, buffered) are; a POST or PATCH that reached a target never is.
  At most ``retries`` extra attempts, none started after ``retry_budget`` seconds;
* a refused or unreachable upstream is a JSON 502, a connect or read timeout a JSON 504, a
  request body over ``max_body_size`` a JSON 413, one the server fails to read (cut short,
  a malformed chunk) a JSON 400 that is never the target's failure, a request over the
  upstream's ``max_in_flight`` cap (counted until the response head arrives) that cannot
  wait for a slot (``queue_size``, ``queue_timeout``: see
  :mod:`~meetinity_gateway.proxy.bulkhead`) a JSON 503 with ``Retry-After`` (a retry never
  waits) — responses, never exceptions
  (every target ejected is no error: the pool then routes to all of them);
* the returned iterable's ``close()`` hands the connection back to its pool (or closes it
  when the body was not read to its end).

More precisely:

* responses are read strictly (:mod:`meetinity_gateway.proxy.wire`): interim ``1xx`` read
  past and dropped; an unrequested ``101``, control characters in the head, obs-fold or
  ambiguous framing are a JSON 502 "sent an invalid response" (reason ``invalid``);
* a connection goes back to its pool only when its response was read to its exact end;
* an upstream failing while the body streams: one warning line with the request id, the
  attempt noted as failed (``timeout``/``unavailable``) for the access log and metrics, the
  target's health told, and the client's connection aborted (the body stays visibly
  truncated) — or a clean JSON 502 when no body byte was sent yet.

The path forwarded is ``environ["meetinity_gateway.upstream_path"]`` when the router set it
(the rewritten path), else ``PATH_INFO``, below the target's base path.

Use alone::

    from meetinity_gateway.proxy.app import ProxyApp
    app = ProxyApp("http://127.0.0.1:5001 weight=2, http://127.0.0.1:5002", read_timeout=10)

:param base_url: the targets, ``http://host:port[/base] [weight=N], …`` (see
    :func:`~meetinity_gateway.proxy.targets.parse_targets`), or a ready ``UpstreamPool``.
:param connect_timeout: seconds to wait for the TCP connection (→ 504 after).
:param read_timeout: seconds to wait for each read from the upstream (→ 504 after).
:param max_body_size: largest request body accepted, in bytes (→ 413 above).
:param trusted_proxies: how many proxies in front of the gateway are trusted to set
    ``X-Forwarded-*`` (0: the client's copies are ignored and replaced).
:param pool_size: keep-alive connections kept per target; size it to the server's threads.
:param chunk_size: bytes read and written per step while streaming.
:param name: the upstream's name, for logs and error messages.
:param retries: extra attempts on other targets, when safe (0: none).
:param retry_budget: seconds after the first attempt when no new attempt starts.
:param replay_size: largest body of an idempotent request buffered so it can be retried.
:param pool_options: passed to :class:`~meetinity_gateway.proxy.upstream.UpstreamPool`
    (``balance``, ``max_fails``, ``eject_time``, ``failure_statuses``, ``max_eject_percent``,
    ``eject_recheck``, ``max_in_flight``, ``queue_size``, ``queue_timeout``,
    ``health_interval``, ``health_timeout``,
    ``dns_interval``, ``resolver``, ``idle_timeout``).

Security note: a retried request reaches a second target; that is why only idempotent
requests are retried once sent. Targets are trusted: they receive the client's headers.
"""
from __future__ import annotations

import logging
import sys
import time
import typing as t
from urllib.parse import quote

from meetinity_gateway.keys import (
    REQUEST_ID_KEY,
    TARGET_KEY,
    TRACE_KEY,
    UPSTREAM_ATTEMPTS_KEY,
    UPSTREAM_ERROR_KEY,
    UPSTREAM_KEY,
    UPSTREAM_LIMIT_KEY,
    UPSTREAM_MS_KEY,
    UPSTREAM_PATH_KEY,
    UPSTREAM_REJECTED_KEY,
)
from meetinity_gateway.logs import without_query
from meetinity_gateway.problems import (
    BadGateway,
    BadRequest,
    GatewayError,
    GatewayTimeout,
    PayloadTooLarge,
    ResponseAborted,
    error_response,
)
from meetinity_gateway.proxy.bulkhead import UpstreamBusy
from meetinity_gateway.proxy.client import ConnectFailed, ConnectTimeout, release
from meetinity_gateway.proxy.headers import request_headers, response_headers
from meetinity_gateway.proxy.targets import parse_targets
from meetinity_gateway.proxy.upstream import Target, UpstreamPool
from meetinity_gateway.proxy.wire import InvalidUpstreamResponse

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["IDEMPOTENT_METHODS", "ProxyApp", "UPSTREAM_PATH_KEY"]

log = logging.getLogger("meetinity_gateway.proxy")


#: Methods whose request may be sent twice (RFC 9110 §9.2.2) and so retried once sent.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: An answer with one of these counts as the target's failure (and may be retried).
_FAILURE_STATUSES = frozenset({502, 503, 504})
#: Methods sent without ``Content-Length: 0`` when the client sent no body.
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE", "CONNECT"})

# Characters left as they are when re-encoding the decoded PATH_INFO (RFC 3986 pchar + "/").
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


class _RequestBody:
    """``wsgi.input`` limited to the declared length, read in bounded chunks.

    The client sends it (with its ``Content-Length``) piece by piece as iterated: the upload
    never sits whole in memory.
    """

    def __init__(self, stream: t.BinaryIO, length: int, chunk_size: int) -> None:
        self._stream = stream
        self._remaining = length
        self._length = length
        self._chunk_size = chunk_size

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        if size is None or size < 0 or size > self._remaining:
            size = min(self._remaining, self._chunk_size)
        data = _read_client(self._stream, size)
        self._remaining -= len(data)
        if not data:
            # The client went away before sending the announced body.
            raise _ClientDisconnected()
        return data

    def __iter__(self):
        while True:
            chunk = self.read(self._chunk_size)
            if not chunk:
                return
            yield chunk


class _UnsizedBody:
    """A body without ``Content-Length`` (``wsgi.input_terminated``), sent chunked.

    Counts bytes as they pass and stops with 413 once ``limit`` is exceeded.
    """

    def __init__(self, stream: t.BinaryIO, limit: int, chunk_size: int) -> None:
        self._stream = stream
        self._limit = limit
        self._chunk_size = chunk_size

    def __iter__(self):
        seen = 0
        while True:
            chunk = _read_client(self._stream, self._chunk_size)
            if not chunk:
                return
            seen += len(chunk)
            if seen > self._limit:
                raise PayloadTooLarge()
            yield chunk


class _ClientDisconnected(BadRequest):
    message = "request body ended before its Content-Length"


class _UnreadableBody(BadRequest):
    message = "the request body could not be read"


def _read_client(stream: t.BinaryIO, size: int) -> bytes:
    """``stream.read(size)`` from the server's ``wsgi.input``. What that raises is the
    client's doing, never the target's: servers that stream a chunked upload (gunicorn)
    raise from ``read`` for a malformed chunk or a body cut short. A 400 then, and
    :meth:`ProxyApp.forward` does not count it toward the target's ejection (as any other
    exception there would: three such uploads ejected the service)."""
    try:
        return stream.read(size)
    except GatewayError:
        raise
    except Exception as exc:
        raise _UnreadableBody() from exc


class _UpstreamBody:
    """The response iterable: streams the upstream body; ``close()`` releases the connection
    (back to its pool only when the body was read to its exact end, else closed) and the
    target.

    If the upstream fails while the body streams (reset, read timeout, bad chunk framing):
    one warning line with the request id, the attempt noted as an upstream failure for the
    access log and metrics, the target's health told, and the response replaced by a JSON 502
    through ``start_response(…, exc_info)`` — which, once the headers went out, makes the
    server raise :class:`~meetinity_gateway.problems.ResponseAborted` and abort the client's
    connection, so that a truncated body never looks complete.
    """

    __slots__ = ("_response", "_chunk_size", "_upstream", "_pool", "_target", "_environ",
                 "_start_response", "_sent", "_began")

    def __init__(self, response, chunk_size: int, upstream: str, pool: UpstreamPool,
                 target: Target, environ: WSGIEnvironment, start_response: StartResponse,
                 began: float | None = None) -> None:
        self._began = began  # the attempt's start (pool clock): its outcome counts there
        self._response = response
        self._chunk_size = chunk_size
        self._upstream = upstream
        self._pool = pool
        self._target = target
        self._environ = environ
        self._start_response = start_response
        self._sent = 0

    def __iter__(self):
        try:
            read1 = self._response.read1
            size = self._chunk_size
            while True:
                # What has arrived, up to chunk_size: small pieces are not held back.
                chunk = read1(size)
                if not chunk:
                    return
                self._sent += len(chunk)
                yield chunk
        except Exception as exc:
            yield from self._failed(exc)

    def _failed(self, exc: Exception):
        environ = self._environ
        reason = _note_failure(environ, exc)
        self._pool.record(self._target, False, since=self._began)
        message = (f"upstream {self._upstream} timed out" if reason == "timeout"
                   else f"upstream {self._upstream} failed while answering")
        try:
            raise ResponseAborted(message) from exc
        except ResponseAborted:
            try:
                # Nothing sent yet: the server takes the JSON 502 instead. Headers already
                # sent: the server re-raises the ResponseAborted and aborts the connection.
                body = error_response(environ, self._start_response, 502, message,
                                      exc_info=sys.exc_info())
            except Exception:
                self._log(exc, reason, "response aborted")
                raise
        self._log(exc, reason, "answered 502 instead")
        yield from body

    def _log(self, exc: Exception, reason: str, outcome: str) -> None:
        request_id = self._environ.get(REQUEST_ID_KEY)
        log.warning(
            "upstream %s target %s failed after %d body bytes (%s: %s); %s (request_id=%s)",
            self._upstream, self._target.host_header, self._sent, reason, _short(exc),
            outcome, request_id, extra={"request_id": request_id},
        )

    def close(self) -> None:
        response, self._response = self._response, None
        if response is None:
            return
        release(response)  # back to its pool only when read to its exact end, else closed
        self._pool.done(self._target, holding=False)  # its slot was freed at the head


class ProxyApp:
    """Forward every request to one upstream pool (see the module docstring)."""

    def __init__(
        self,
        base_url: str | UpstreamPool,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        max_body_size: int = 10 * 1024 * 1024,
        trusted_proxies: int = 0,
        pool_size: int = 8,
        chunk_size: int = 64 * 1024,
        name: str | None = None,
        retries: int = 2,
        retry_budget: float = 10.0,
        replay_size: int = 64 * 1024,
        **pool_options: t.Any,
    ) -> None:
        if retries < 0 or retry_budget < 0 or replay_size < 0:
            raise ValueError("retries, retry_budget and replay_size must not be negative")
        if replay_size > max_body_size:
            replay_size = max_body_size
        if isinstance(base_url, UpstreamPool):
            self.pool = base_url
            self.base_url = ", ".join(spec.url for spec in base_url.specs)
        else:
            specs = parse_targets(base_url)
            self.base_url = ", ".join(
                spec.url + (f" weight={spec.weight}" if spec.weight != 1 else "")
                for spec in specs
            )
            self.pool = UpstreamPool(
                specs, name=name or specs[0].host_header, pool_size=pool_size,
                connect_timeout=connect_timeout, read_timeout=read_timeout, **pool_options,
            )
        self.name = name or self.pool.name
        self.timeout = (connect_timeout, read_timeout)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_body_size = max_body_size
        self.trusted_proxies = trusted_proxies
        self.chunk_size = chunk_size
        self.retries = retries
        self.retry_budget = retry_budget
        self.replay_size = replay_size

    def __repr__(self) -> str:
        return f"ProxyApp({self.base_url!r})"

    def close(self) -> None:
        self.pool.close()

    @staticmethod
    def upstream_target(environ: WSGIEnvironment) -> str:
        """The request target below the upstream's base path: path and query."""
        path = environ.get(UPSTREAM_PATH_KEY)
        if path is None:
            path = environ.get("PATH_INFO", "") or "/"
        # PATH_INFO is decoded and latin-1 mapped (PEP 3333): back to bytes, then encode.
        target = quote(path.encode("latin-1"), safe=_PATH_SAFE)
        query = environ.get("QUERY_STRING")
        if query:
            target += "?" + query
        return target

    def _body(self, environ: WSGIEnvironment, replay: bool):
        """(body, size): bytes when small enough to replay, else a one-shot stream."""
        length = environ.get("CONTENT_LENGTH")
        stream = environ.get("wsgi.input")
        if length:
            try:
                size = int(length)
            except ValueError:
                raise BadRequest("bad Content-Length") from None
            if size < 0:
                raise BadRequest("bad Content-Length")
            if size > self.max_body_size:
                raise PayloadTooLarge(
                    f"request body of {size} bytes is over the limit of {self.max_body_size}"
                )
            if not size:
                return None, 0
            body = _RequestBody(stream, size, self.chunk_size)
            if replay and size <= self.replay_size:
                # Small enough to keep: a retry can send the same bytes again.
                return b"".join(body), size
            return body, size
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if chunked and environ.get("wsgi.input_terminated") and stream is not None:
            # A server streaming a chunked upload to us (waitress de-chunks and sets
            # CONTENT_LENGTH instead): stream it on, chunked.
            return _UnsizedBody(stream, self.max_body_size, self.chunk_size), None
        return None, None

    def forward(self, environ: WSGIEnvironment):
        """Send the request to a target, retrying when safe; raises a :class:`GatewayError`.

        Returns ``(target, response, began)``, ``began`` being the pool-clock start of the
        attempt that answered; the caller must close the response and call
        ``pool.done(target)``.
        """
        method = environ["REQUEST_METHOD"]
        idempotent = method in IDEMPOTENT_METHODS
        body, size = self._body(environ, replay=idempotent and self.retries > 0)
        replayable = body is None or isinstance(body, bytes)
        headers = request_headers(environ, self.trusted_proxies)
        if size is not None and (size or method not in _NO_BODY_METHODS):
            headers["Content-Length"] = str(size)
        # The client adds no header of its own (no User-Agent, no Accept-Encoding).
        target_path = self.upstream_target(environ)
        pool = self.pool
        tried: list[Target] = []
        started = time.monotonic()
        environ[UPSTREAM_KEY] = self.name
        environ[UPSTREAM_LIMIT_KEY] = pool.max_in_flight
        try:
            target = pool.acquire()
        except UpstreamBusy as exc:
            environ[UPSTREAM_REJECTED_KEY] = exc.reason
            raise
        spans = environ.get(TRACE_KEY)  # OpenTelemetry on: a client span per attempt
        span = None
        while True:
            headers["Host"] = target.host_header
            if spans is not None:
                span = spans.attempt(headers, method, self.name, target.host_header, len(tried))
            sent = time.perf_counter()
            began = pool.clock()  # outcomes count toward the target state they started in
            try:
                response = target.pool.request(
                    method, target.base_path + target_path, headers, body,
                    chunked=size is None and body is not None,
                    connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                )
            except GatewayError as exc:
                # The client's body failed us (too large, cut short): not the target's fault.
                if span is not None:
                    spans.end_attempt(span, error=exc.message)
                pool.done(target)
                raise
            except (ConnectFailed, ConnectTimeout) as exc:
                # No connection, so nothing was sent: safe to retry for any method.
                _attempted(environ, target, sent, exc, span=span)
                pool.record(target, False, since=began)
                pool.done(target)
                tried.append(target)
                error = _failure(self.name, exc)
                target = self._next(tried, started)
            except Exception as exc:
                _attempted(environ, target, sent, exc, span=span)
                pool.record(target, False, since=began)
                pool.done(target)
                tried.append(target)
                error = _failure(self.name, exc)
                target = self._next(tried, started) if idempotent and replayable else None
            else:
                _attempted(environ, target, sent, span=span, status=response.status)
                # The upstream answered: its slot of the bulkhead is free (the body streams
                # at the client's pace, which is the server's send timeout to bound).
                pool.responded()
                # Whether an answer counts against the target is the pool's policy.
                pool.answered(target, response.status, since=began)
                if response.status not in _FAILURE_STATUSES:
                    return target, response, began
                # The target answered as a failing one: another may do better, if that is
                # safe; when there is none, its own answer goes to the client.
                following = None
                if idempotent and replayable:
                    following = self._next(tried + [target], started)
                if following is None:
                    return target, response, began
                release(response)
                pool.done(target, holding=False)
                tried.append(target)
                target = following
                continue
            if target is None:
                raise error

    def _next(self, tried: list[Target], started: float) -> Target | None:
        """Another target for a retry, if attempts and time budget allow and one is usable."""
        if len(tried) > self.retries or time.monotonic() - started >= self.retry_budget:
            return None
        try:
            # A retry never waits: it would hold a thread a second time for one request.
            return self.pool.acquire(tried, wait=False)
        except UpstreamBusy:
            return None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        try:
            target, response, began = self.forward(environ)
        except GatewayError as exc:
            return exc(environ, start_response)
        body = _UpstreamBody(response, self.chunk_size, self.name, self.pool, target,
                             environ, start_response, began)
        status = f"{response.status} {response.reason or ''}".rstrip()
        try:
            start_response(status, response_headers(response.headers.items()))
        except BaseException:
            body.close()  # a leaked slot would shrink the upstream's max_in_flight for good
            raise
        return body


def _timed_out(exc: BaseException) -> bool:
    # ConnectTimeout, ReadTimeout, or a socket timeout while the body streams.
    return isinstance(exc, TimeoutError)


def _invalid(exc: BaseException) -> InvalidUpstreamResponse | None:
    """The :class:`InvalidUpstreamResponse` this error is, if it is one."""
    return exc if isinstance(exc, InvalidUpstreamResponse) else None


def _reason(exc: Exception) -> str:
    """The failure reason of the access log and metrics: timeout, invalid or unavailable."""
    if _timed_out(exc):
        return "timeout"
    return "invalid" if _invalid(exc) is not None else "unavailable"


def _short(exc: BaseException) -> str:
    # Never a request URL in a log line: its query string may hold secrets.
    return without_query(str(exc))[:300]


def _attempted(environ: WSGIEnvironment, target: Target, sent: float,
               exc: Exception | None = None, *, span=None, status: int | None = None) -> None:
    """Note one attempt for the access log and metrics (:mod:`meetinity_gateway.keys`), and
    end its span (OpenTelemetry on)."""
    ms = (time.perf_counter() - sent) * 1000.0
    error = None if exc is None else _reason(exc)
    environ[TARGET_KEY] = target.host_header
    environ[UPSTREAM_MS_KEY] = ms
    environ[UPSTREAM_ERROR_KEY] = error
    environ.setdefault(UPSTREAM_ATTEMPTS_KEY, []).append((target.host_header, ms, error))
    if span is not None:
        environ[TRACE_KEY].end_attempt(span, status, error)


def _note_failure(environ: WSGIEnvironment, exc: Exception) -> str:
    """The last attempt, which had answered, failed while its body streamed: say so."""
    reason = _reason(exc)
    environ[UPSTREAM_ERROR_KEY] = reason
    attempts = environ.get(UPSTREAM_ATTEMPTS_KEY)
    if attempts:
        target, ms, _ = attempts[-1]
        attempts[-1] = (target, ms, reason)
    return reason


def _failure(upstream: str, exc: Exception) -> GatewayError:
    """The gateway's answer for a failed attempt: 504 for timeouts, else 502."""
    if _timed_out(exc):
        log.warning("upstream %s timed out: %s", upstream, _short(exc))
        return GatewayTimeout(f"upstream {upstream} timed out")
    invalid = _invalid(exc)
    if invalid is not None:
        log.warning("upstream %s sent an invalid response: %s", upstream, _short(invalid))
        return BadGateway(f"upstream {upstream} sent an invalid response")
    log.warning("upstream %s unavailable: %s", upstream, _short(exc))
    return BadGateway(f"upstream {upstream} unavailable")
