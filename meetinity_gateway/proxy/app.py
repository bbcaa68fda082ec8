"""ProxyApp: one request in, one upstream request out, one streamed response back.

A plain WSGI application forwarding to one upstream base URL through a pooled keep-alive
:class:`requests.Session`:

* bodies stream both ways in bounded chunks (``chunk_size``), bytes untouched (no gzip
  decoding, duplicate query parameters and repeated ``Set-Cookie`` preserved);
* hop-by-hop headers and those named in ``Connection`` are removed both ways, upstream
  ``Access-Control-*`` headers dropped, ``X-Forwarded-*`` and ``Via`` set (see
  :mod:`meetinity_gateway.proxy.headers`);
* a refused or unreachable upstream is a JSON 502, a connect or read timeout a JSON 504, a
  request body over ``max_body_size`` a JSON 413 — responses, never exceptions;
* the returned iterable's ``close()`` hands the connection back to the pool (or discards it
  when the body was not read to its end).

The path forwarded is ``environ["meetinity_gateway.upstream_path"]`` when the router set it
(the rewritten path), else ``PATH_INFO``.

Use alone::

    from meetinity_gateway.proxy.app import ProxyApp
    app = ProxyApp("http://127.0.0.1:5001", read_timeout=10)

:param base_url: ``http://host:port[/base]`` of the upstream.
:param connect_timeout: seconds to wait for the TCP connection (→ 504 after).
:param read_timeout: seconds to wait for each read from the upstream (→ 504 after).
:param max_body_size: largest request body accepted, in bytes (→ 413 above).
:param trusted_proxies: how many proxies in front of the gateway are trusted to set
    ``X-Forwarded-*`` (0: the client's copies are ignored and replaced).
:param pool_size: keep-alive connections kept per upstream; size it to the server's threads.
:param chunk_size: bytes read and written per step while streaming.
:param name: the upstream's name, for logs.
"""
from __future__ import annotations

import logging
import time
import typing as t
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter

from meetinity_gateway.keys import TARGET_KEY, UPSTREAM_ERROR_KEY, UPSTREAM_KEY, UPSTREAM_MS_KEY
from meetinity_gateway.logs import without_query
from meetinity_gateway.problems import (
    BadGateway,
    BadRequest,
    GatewayError,
    GatewayTimeout,
    PayloadTooLarge,
)
from meetinity_gateway.proxy.headers import request_headers, response_headers

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["ProxyApp", "UPSTREAM_PATH_KEY"]

log = logging.getLogger("meetinity_gateway.proxy")

#: environ key: the path to request from the upstream (set by the router's rewrite).
UPSTREAM_PATH_KEY = "meetinity_gateway.upstream_path"

# Characters left as they are when re-encoding the decoded PATH_INFO (RFC 3986 pchar + "/").
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


class _RequestBody:
    """``wsgi.input`` limited to the declared length, read in bounded chunks.

    ``requests`` sends an object with ``__len__`` and ``read`` as a ``Content-Length``
    body, reading it block by block: the upload never sits whole in memory.
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
        data = self._stream.read(size)
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
            chunk = self._stream.read(self._chunk_size)
            if not chunk:
                return
            seen += len(chunk)
            if seen > self._limit:
                raise PayloadTooLarge()
            yield chunk


class _ClientDisconnected(BadRequest):
    message = "request body ended before its Content-Length"


class _UpstreamBody:
    """The response iterable: streams the upstream body, ``close()`` releases the connection."""

    __slots__ = ("_response", "_chunk_size", "_upstream")

    def __init__(self, response: requests.Response, chunk_size: int, upstream: str) -> None:
        self._response = response
        self._chunk_size = chunk_size
        self._upstream = upstream

    def __iter__(self):
        try:
            yield from self._response.raw.stream(self._chunk_size, decode_content=False)
        except Exception as exc:
            # Headers are gone already: the status cannot change any more. Re-raising makes
            # the server abort the connection, so the client sees a truncated body.
            raise BadGateway(
                f"upstream {self._upstream} failed while streaming the response"
            ) from exc

    def close(self) -> None:
        # requests: returns a fully read connection to the pool, closes a half-read one.
        self._response.close()


class ProxyApp:
    """Forward every request to one upstream (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        max_body_size: int = 10 * 1024 * 1024,
        trusted_proxies: int = 0,
        pool_size: int = 8,
        chunk_size: int = 64 * 1024,
        name: str | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL {base_url!r} must be http(s)://host[:port][/path]")
        if parts.query or parts.fragment:
            raise ValueError(f"upstream URL {base_url!r} must not have a query or fragment")
        self.base_url = base_url.rstrip("/")
        self.name = name or parts.netloc
        self.target = parts.netloc
        self.timeout = (connect_timeout, read_timeout)
        self.max_body_size = max_body_size
        self.trusted_proxies = trusted_proxies
        self.chunk_size = chunk_size
        self.session = requests.Session()
        # No proxies, .netrc or CA bundle from the environment: the gateway talks to its
        # upstreams directly, and reading these per request is slow.
        self.session.trust_env = False
        # No default User-Agent / Accept-Encoding of requests' own: only the client's.
        self.session.headers.clear()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def __repr__(self) -> str:
        return f"ProxyApp({self.base_url!r})"

    def close(self) -> None:
        self.session.close()

    def upstream_url(self, environ: WSGIEnvironment) -> str:
        path = environ.get(UPSTREAM_PATH_KEY)
        if path is None:
            path = environ.get("PATH_INFO", "") or "/"
        # PATH_INFO is decoded and latin-1 mapped (PEP 3333): back to bytes, then encode.
        url = self.base_url + quote(path.encode("latin-1"), safe=_PATH_SAFE)
        query = environ.get("QUERY_STRING")
        if query:
            url += "?" + query
        return url

    def _body(self, environ: WSGIEnvironment):
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
            return _RequestBody(stream, size, self.chunk_size) if size else None
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if chunked and environ.get("wsgi.input_terminated") and stream is not None:
            # A server streaming a chunked upload to us (waitress de-chunks and sets
            # CONTENT_LENGTH instead): stream it on, chunked.
            return _UnsizedBody(stream, self.max_body_size, self.chunk_size)
        return None

    def forward(self, environ: WSGIEnvironment) -> requests.Response:
        """Send the request upstream; raises a :class:`GatewayError` when that fails."""
        body = self._body(environ)
        # For the access log and metrics (meetinity_gateway.keys): who was called, how long.
        environ[UPSTREAM_KEY] = self.name
        environ[TARGET_KEY] = self.target
        started = time.perf_counter()
        try:
            return self.session.request(
                environ["REQUEST_METHOD"],
                self.upstream_url(environ),
                headers=request_headers(environ, self.trusted_proxies),
                data=body,
                stream=True,
                allow_redirects=False,
                timeout=self.timeout,
            )
        except requests.Timeout as exc:
            environ[UPSTREAM_ERROR_KEY] = "timeout"
            log.warning("upstream %s timed out: %s", self.name, without_query(str(exc)))
            raise GatewayTimeout(f"upstream {self.name} timed out") from exc
        except requests.RequestException as exc:
            environ[UPSTREAM_ERROR_KEY] = "unavailable"
            log.warning("upstream %s unavailable: %s", self.name, without_query(str(exc)))
            raise BadGateway(f"upstream {self.name} unavailable") from exc
        finally:
            environ[UPSTREAM_MS_KEY] = (time.perf_counter() - started) * 1000.0

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        try:
            response = self.forward(environ)
        except GatewayError as exc:
            return exc(environ, start_response)
        status = f"{response.status_code} {response.reason or ''}".rstrip()
        start_response(status, response_headers(response.raw.headers.items()))
        return _UpstreamBody(response, self.chunk_size, self.name)
