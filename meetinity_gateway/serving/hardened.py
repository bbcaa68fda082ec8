"""The hardened waitress: the server ``meetinity-gateway serve`` runs by default.

waitress stays the HTTP/1.1 engine (Windows and Linux); this module plugs into its own
extension points — a request parser, a channel and two task classes set on the listening
server's ``channel_class`` — so nothing of waitress is forked:

* **Framing** (RFC 9112 §3.2, §6; the rules are :mod:`meetinity_gateway.http11`'s, shared with
  the upstream reader): a request whose body length is ambiguous is never
  processed. ``Content-Length`` together with ``Transfer-Encoding``, ``Transfer-Encoding`` on
  anything but HTTP/1.1, a transfer coding list that does not end in exactly one ``chunked``,
  duplicated ``Transfer-Encoding`` / ``Content-Length`` / ``Host``, a ``Content-Length`` that is
  not plain digits, a missing ``Host`` on HTTP/1.1, obsolete line folding, whitespace before a
  colon, bare CR or LF, a sloppy chunked body (waitress skips empty chunk-size lines and lets
  a bare LF end one), a transfer coding other than chunked, an HTTP version other than
  1.0/1.1 — each gets a 400 in the gateway's JSON error shape (never a 5xx: the client's bytes
  are at fault, not the gateway) and the connection is closed. Nothing the client sent after
  such a request is ever parsed.
* **Over-limit bodies**: waitress refuses a body over its own cap (twice the gateway's largest
  ``max_body_size``) before the application sees it. Here that refusal becomes an ordinary
  request whose body is withheld: the application sees the declared ``Content-Length`` (for a
  chunked body: the bytes received so far, already over the limit) and an empty
  ``wsgi.input``, so the proxy answers its JSON 413 and the access log has the line.
* **Closing gracefully**: every connection the server closes because of a refused request
  lingers: the answer is sent, the sending side shut down, and whatever the client is still
  writing is read and thrown away for at most ``LINGER_SECONDS``, so a client that writes its
  whole body before reading (``http.client``, browsers' ``fetch``) reads the answer instead of
  a connection reset.
* **Slow and idle clients**: a request must finish its headers within ``header_timeout``
  seconds of its first byte (slowloris); an idle connection is closed after
  ``channel_timeout``; ``connection_limit`` connections are accepted (the file-descriptor
  limit is raised to match where the platform allows it) and polled with ``poll()`` rather
  than ``select()`` (which stops at 1,024 descriptors on Linux).
* **Slow readers**: an answer waiting for its client is held in ``outbuf_overflow`` bytes of
  memory per connection and spooled to a temporary file beyond that, so a worker thread is
  free as soon as the answer is produced (up to ``outbuf_high_watermark`` bytes ahead of the
  client). Beyond the watermark a worker thread has to wait for its client — waitress cannot
  park a WSGI response — so the total time one response may keep a thread waiting is capped
  at ``send_timeout`` seconds, then the connection is closed.
* **Streaming**: each piece the application yields is sent at once (waitress 3's
  ``send_bytes`` is 1), so server-sent events reach the client as they are written
  (``tests/test_server_smoke.py`` checks it under every server).

Stopping (signals, drain) is :mod:`meetinity_gateway.serving.lifecycle`'s; the settings and
their defaults are :mod:`meetinity_gateway.settings`'.

Embedding::

    from meetinity_gateway.serving.hardened import create_server
    from meetinity_gateway.serving.lifecycle import run
    server = create_server(app, listen="127.0.0.1:8080", threads=8)
    run(server, drain_seconds=20)
"""
from __future__ import annotations

import logging
import re
import socket
import sys
import time
import typing as t

from waitress.buffers import OverflowableBuffer
from waitress.channel import ClientDisconnected, HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask, WSGITask
from waitress.utilities import (
    InternalServerError,
    RequestEntityTooLarge,
    RequestHeaderFieldsTooLarge,
    ServerNotImplemented,
)

from meetinity_gateway import http11
from meetinity_gateway.config import ConfigError
from meetinity_gateway.problems import error_body, random_hex, status_line
from meetinity_gateway.settings import DEFAULT_LISTEN, DEFAULT_THREADS, DEFAULTS

# The logger's name is the one operators filter on since the server was one module.
log = logging.getLogger("meetinity_gateway.server")

#: Seconds a refused request's connection keeps reading (and discarding) what its client still
#: sends after the answer, so that client reads the answer rather than a reset.
LINGER_SECONDS = 10.0


# -- request parsing ----------------------------------------------------------------------

_REQUEST_LINE = re.compile(rb"[^ ]+ [^ ]+ HTTP/([0-9])\.([0-9])")
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")


class _Refused(ParsingError):
    """A request the server answers itself; ``code`` and a message safe to show."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StrictChunkedReceiver:
    """A chunked body decoder that accepts only RFC 9112 §7.1 (waitress' own skips empty
    chunk-size lines, lets a bare LF end one and never looks at trailers)."""

    completed = False
    error = None

    def __init__(self, buf: OverflowableBuffer) -> None:
        self.buf = buf
        self._state = "size"
        self._remain = 0
        self._pending = b""
        self._trailer_bytes = 0

    def __len__(self) -> int:
        return self.buf.__len__()

    def _fail(self, message: str) -> None:
        self.error = _Refused(400, message)

    def received(self, data: bytes) -> int:
        if self.completed or self.error is not None:
            return 0
        held = len(self._pending)
        buf = self._pending + data
        self._pending = b""
        i = 0
        while i < len(buf) and not self.completed and self.error is None:
            if self._state == "data":
                piece = buf[i:i + self._remain]
                self.buf.append(piece)
                i += len(piece)
                self._remain -= len(piece)
                if not self._remain:
                    self._state = "crlf"
                continue
            if self._state == "crlf":
                if len(buf) - i < 2:
                    break
                if buf[i:i + 2] != b"\r\n":
                    self._fail("chunk data not followed by CRLF")
                    break
                i += 2
                self._state = "size"
                continue
            end = buf.find(b"\r\n", i)
            if end < 0:
                if len(buf) - i > http11.MAX_CHUNK_LINE:
                    self._fail("chunk line too long")
                break
            line = buf[i:end]
            i = end + 2
            try:
                if self._state == "size":
                    self._remain = http11.chunk_size(line)
                    self._state = "data" if self._remain else "trailer"
                elif not line:  # the trailer section's end
                    self.completed = True
                else:  # trailer fields
                    self._trailer_bytes += len(line)
                    if self._trailer_bytes > http11.MAX_CHUNK_LINE:
                        raise http11.FramingError("chunked trailer too long")
                    http11.check_field_line(line)
            except http11.FramingError as exc:
                self._fail(str(exc))
        if self.completed:
            return i - held
        if self.error is None:
            self._pending = buf[i:]
        return len(data)

    def getfile(self):
        return self.buf.getfile()

    def getbuf(self):
        return self.buf


class GatewayParser(HTTPRequestParser):
    """waitress' parser with strict framing (see the module docstring).

    ``refusal``: ``(code, message)`` of a request the server answers itself.
    ``body_refused``: the body is over waitress' cap; the request goes on without it.
    """

    refusal: tuple[int, str] | None = None
    body_refused = False
    #: waitress names ``request.path`` when the client leaves while a request is answered;
    #: one refused at its request line never got a path, and the log line would become an
    #: AttributeError traceback (any client could write them at will).
    path = "(unparsed request)"

    def __init__(self, adj) -> None:
        super().__init__(adj)
        self.started = time.monotonic()

    def received(self, data: bytes) -> int:
        if self.completed:
            return 0
        try:
            consumed = super().received(data)
        except Exception:  # never a traceback from the event loop: refuse the request
            log.exception("request parser failed")
            self.refusal = (400, "malformed request")
            self.error = InternalServerError("parser")
            self.completed = True
            consumed = len(data)
        if self.completed:
            if type(self.error) is RequestEntityTooLarge and hasattr(self, "command"):
                self._withhold_body()
            if self.error is not None or self.body_refused:
                # Never parse what follows a refused request, and never send it a
                # 100 Continue: the client is not to send the body.
                self.expect_continue = False
                return len(data)
        return consumed

    def _withhold_body(self) -> None:
        self.error = None
        self.body_refused = True
        self.connection_close = True
        if self.chunked:
            self.headers["CONTENT_LENGTH"] = str(self.body_bytes_received)
        if self.body_rcv is not None:
            self.body_rcv.getbuf().close()
            self.body_rcv = None

    def parse_header(self, header_plus: bytes) -> None:
        try:
            self._check_framing(header_plus)
        except _Refused as exc:
            self.refusal = (exc.code, str(exc))
            raise
        super().parse_header(header_plus)
        if self.chunked:
            self.body_rcv.getbuf().close()
            self.body_rcv = StrictChunkedReceiver(OverflowableBuffer(self.adj.inbuf_overflow))

    def _check_framing(self, header_plus: bytes) -> None:
        first, _, rest = header_plus.partition(b"\r\n")
        if b"\r" in first or b"\n" in first:
            raise _Refused(400, "bare CR or LF in the request line")
        match = _REQUEST_LINE.fullmatch(first)
        if match is None:
            raise _Refused(400, "malformed request line")
        version = (int(match.group(1)), int(match.group(2)))
        if version in ((1, 0), (1, 1)):  # so a refusal is answered in the client's version
            self.version = "%d.%d" % version
            self.command = first.split(b" ", 1)[0].decode("latin-1")
        lengths, codings, hosts = [], [], []
        try:
            for line in rest.split(b"\r\n"):
                if not line:
                    continue
                name, value = http11.field_line(line)
                name = name.lower()
                if name == b"content-length":
                    lengths.append(value)
                elif name == b"transfer-encoding":
                    codings.append(value)
                elif name == b"host":
                    hosts.append(value)
            # A coding other than chunked too is a 400 (RFC 9112 allows 501, but a client's
            # choice never earns a 5xx here).
            http11.body_framing(version, lengths, codings)
        except http11.FramingError as exc:
            raise _Refused(400, str(exc)) from None
        if version not in ((1, 0), (1, 1)):
            # 400, not 505: client garbage never gets a 5xx (a 5xx says "the gateway failed")
            raise _Refused(400, "HTTP version not supported")
        if len(hosts) > 1:
            raise _Refused(400, "duplicated Host")
        if version == (1, 1) and not hosts:
            raise _Refused(400, "missing Host")
        if hosts and not _HOST.fullmatch(hosts[0]):
            raise _Refused(400, "invalid Host")


# -- tasks --------------------------------------------------------------------------------

_GENERIC = {
    RequestHeaderFieldsTooLarge: (431, "request header fields too large"),
    RequestEntityTooLarge: (413, "request body too large"),
    ServerNotImplemented: (400, "transfer coding not supported"),
    InternalServerError: (500, "internal error"),
}


class JsonErrorTask(ErrorTask):
    """A request the server refuses itself: the gateway's JSON error shape, then close."""

    def execute(self) -> None:
        request = self.request
        refusal = request.refusal
        if refusal is None:
            error = request.error
            if isinstance(error, RequestEntityTooLarge) and not hasattr(request, "command"):
                refusal = (413, "request body too large")
            else:
                refusal = next(
                    (value for cls, value in _GENERIC.items() if type(error) is cls),
                    (400, "malformed request"),
                )
        code, message = refusal
        request_id = random_hex(32)  # the shape of every request id (problems.random_hex)
        log.info("refused a request from %s: %s (%d, request_id=%s)",
                 self.channel.addr[0] if self.channel.addr else "?", message, code, request_id,
                 extra={"request_id": request_id})
        body = error_body(code, message, request_id)
        self.status = status_line(code)
        self.response_headers.extend([
            ("Content-Type", "application/json"),
            ("Cache-Control", "no-store"),
            ("X-Request-ID", request_id),
        ])
        self.channel.linger_wanted = True
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(b"" if getattr(request, "command", "") == "HEAD" else body)


class GatewayTask(WSGITask):
    """waitress' WSGI task; closes after a withheld body, and while the server drains."""

    def start(self) -> None:
        super().start()
        self.channel.waited = 0.0
        self.channel.current_task = self  # a cut at stop marks its environ (CUT_KEY)

    def execute(self) -> None:
        if self.request.body_refused:
            self.channel.linger_wanted = True
            self.set_close_on_finish()
        super().execute()

    def build_response_header(self) -> bytes:
        if self.channel.server.gateway.draining and not self.close_on_finish:
            self.set_close_on_finish()
        return super().build_response_header()


# -- channel ------------------------------------------------------------------------------

class GatewayChannel(HTTPChannel):
    """One client connection: header deadline, per-response send timeout, lingering close."""

    parser_class = GatewayParser
    task_class = GatewayTask
    error_task_class = JsonErrorTask

    linger_wanted = False  # a refused request: linger when closing
    force_close = False  # set by a worker thread: the event loop closes the connection
    closed = False
    _linger_until: float | None = None
    waited = 0.0  # seconds the current response has kept its thread waiting on this client
    current_task: GatewayTask | None = None

    @property
    def lingering(self) -> bool:
        return self._linger_until is not None

    def busy(self) -> bool:
        """A request is being received, processed or sent (a graceful stop waits for it)."""
        if self.lingering:
            return False
        request = self.request
        return bool(self.requests or self.total_outbufs_len
                    or (request is not None and not request.empty))

    # readable() and writable() run for every connection on every turn of the event loop:
    # the common case is inlined (waitress' own tests, without a super() call).
    def readable(self) -> bool:
        if self.force_close or self._linger_until is not None or self.request is not None:
            return self._readable_rarely()
        return not (self.will_close or self.close_when_flushed or self.total_outbufs_len
                    or len(self.requests) > self.adj.channel_request_lookahead)

    def _readable_rarely(self) -> bool:
        # Closing here, not through will_close: waitress closes a channel in handle_write,
        # which never runs while a stalled client keeps the socket unwritable.
        if self.force_close:
            self._close_now()
            return False
        if self._linger_until is not None:
            return True
        request = self.request
        if (not request.headers_finished
                and time.monotonic() - request.started > self.server.gateway.header_timeout):
            # Headers this slow are an attack (slowloris) or a dead client: no answer.
            self._close_now()
            return False
        return HTTPChannel.readable(self)

    def writable(self) -> bool:
        if self._linger_until is not None:
            return time.monotonic() >= self._linger_until
        if self.closed:
            return False
        return bool(self.total_outbufs_len or self.will_close or self.close_when_flushed)

    def handle_read(self) -> None:
        if self._linger_until is None:
            return super().handle_read()
        try:
            self.recv(65536)  # thrown away; an EOF or a reset closes (wasyncore's recv)
        except OSError:
            self._close_now()

    def handle_write(self) -> None:
        if self._linger_until is not None:  # linger time over
            return self._close_now()
        return super().handle_write()

    def received(self, data: bytes) -> bool:
        if self.linger_wanted:  # nothing after a refused request is parsed
            return False
        return super().received(data)

    def handle_close(self) -> None:
        if self.lingering or not (self.linger_wanted and self.will_close
                                  and not self.total_outbufs_len and self.socket is not None):
            return self._close_now()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            return self._close_now()
        self._linger_until = time.monotonic() + LINGER_SECONDS
        self.will_close = self.close_when_flushed = False

    def _close_now(self) -> None:
        self._linger_until = None
        self.linger_wanted = self.force_close = False
        if not self.closed:
            self.closed = True
            HTTPChannel.handle_close(self)

    def _flush_outbufs_below_high_watermark(self) -> None:
        # waitress' version waits as long as the client takes; this one charges the wait to
        # the response and gives up after send_timeout seconds in total.
        if self.total_outbufs_len <= self.adj.outbuf_high_watermark:
            return
        limit = self.server.gateway.send_timeout
        with self.outbuf_lock:
            _, failed = self._flush_exception(self._flush_some, do_close=False)
            if failed:
                self.server.pull_trigger()
                self.outbuf_lock.wait(1.0)
                return
            while self.connected and self.total_outbufs_len > self.adj.outbuf_high_watermark:
                if self.waited >= limit:
                    log.warning("client %s reads too slowly: connection closed after %.0f s "
                                "of waiting", self.addr[0] if self.addr else "?", limit)
                    self.connected = False
                    self.force_close = True
                    self.server.pull_trigger()
                    raise ClientDisconnected
                self.server.pull_trigger()
                began = time.monotonic()
                self.outbuf_lock.wait(min(1.0, limit - self.waited))
                self.waited += time.monotonic() - began


# -- server -------------------------------------------------------------------------------

class ServingState:
    """What every channel of one server shares."""

    def __init__(self, header_timeout: float, send_timeout: float) -> None:
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout
        self.draining = False
        self.stops = 0  # stop signals received


def listeners(server) -> list[BaseWSGIServer]:
    if isinstance(server, BaseWSGIServer):
        return [server]
    return [obj for obj in server.map.values() if isinstance(obj, BaseWSGIServer)]


def socket_map_of(server) -> dict:
    return server._map if isinstance(server, BaseWSGIServer) else server.map


def raise_fd_limit(wanted: int) -> int:
    """Raise this process' open-file limit towards ``wanted`` (POSIX); return the limit."""
    try:
        import resource
    except ImportError:  # Windows: no such limit (select() has its own, see create_server)
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


def create_server(
    app,
    *,
    listen: str = DEFAULT_LISTEN,
    threads: int = DEFAULT_THREADS,
    max_body_size: int | None = None,
    header_timeout: float = DEFAULTS["header_timeout"],
    send_timeout: float = DEFAULTS["send_timeout"],
    **kw,
):
    """A hardened waitress server for ``app`` (not started: call :func:`run`).

    ``kw`` are waitress adjustments; the gateway's defaults (:data:`DEFAULTS`) fill the rest.
    waitress reads (and spools to disk) a whole request body before the app sees it; its cap
    is twice the gateway's ``max_body_size``: a body somewhat over the limit still reaches the
    proxy whole, a larger one is withheld (see the module docstring) — both get the JSON 413.
    Raises ``OSError`` when the address cannot be bound, ``ValueError`` for a bad adjustment.
    """
    import waitress

    for key in ("connection_limit", "backlog", "channel_timeout", "outbuf_overflow",
                "outbuf_high_watermark", "recv_bytes", "max_request_header_size",
                "cleanup_interval"):
        kw.setdefault(key, DEFAULTS[key])
    kw.setdefault("asyncore_use_poll", True)
    if max_body_size is not None:
        kw.setdefault("max_request_body_size", 2 * max_body_size + 1)
    # Every connection holds a socket and, when its answer spools, a temporary file.
    limit = kw["connection_limit"]
    if sys.platform == "win32":
        # select() on Windows watches at most 512 sockets (CPython's FD_SETSIZE).
        kw["connection_limit"] = min(limit, 500)
    else:
        available = raise_fd_limit(2 * limit + 256)
        if available < 2 * limit + 256:
            kw["connection_limit"] = max(16, (available - 256) // 2)
            log.warning("open-file limit %d: connection_limit lowered from %d to %d",
                        available, limit, kw["connection_limit"])
    server = waitress.create_server(
        app,
        listen=listen,
        threads=threads,
        ident="meetinity-gateway",
        # waitress would strip X-Forwarded-* from every peer it does not trust; the gateway
        # applies its own TRUSTED_PROXIES rule, which needs to see them.
        clear_untrusted_proxy_headers=False,
        **kw,
    )
    state = ServingState(header_timeout, send_timeout)
    server.gateway = state
    for listener in listeners(server):
        listener.channel_class = GatewayChannel
        listener.gateway = state
    return server


def build(app, settings: t.Mapping[str, t.Any], *, max_body_size: int | None = None,
          file: str | None = None):
    """:func:`create_server` from :func:`server_settings`; binding problems become a
    one-line :class:`ConfigError` naming ``listen``."""
    extra = {key: settings[key] for key in (
        "connection_limit", "backlog", "channel_timeout", "outbuf_overflow",
        "outbuf_high_watermark", "recv_bytes", "max_request_header_size", "cleanup_interval")}
    try:
        return create_server(
            app, listen=settings["listen"], threads=settings["threads"],
            max_body_size=max_body_size, header_timeout=settings["header_timeout"],
            send_timeout=settings["send_timeout"], **extra)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot listen there: {reason}", file=file, section="server:main",
                          key="listen", value=settings["listen"]) from None
