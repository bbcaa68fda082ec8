"""The server ``meetinity-gateway serve`` builds: waitress, hardened, with a graceful stop.

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
* **Graceful stop** (:func:`run`): on SIGTERM / SIGINT (Ctrl+C, and Ctrl+Break where
  ``signal.SIGBREAK`` exists, i.e. Windows) the server stops accepting, lets the requests in
  flight finish for up to ``drain_seconds``, answers any further request on a kept-alive
  connection with ``Connection: close``, then exits. A second signal stops at once.

Settings come from ``gateway.ini``'s ``[server:main]`` through :data:`SETTINGS` (the same table
serves ``meetinity-gateway serve``, the PasteDeploy server runner and the tests)::

    [server:main]
    use = egg:meetinity_gateway#main
    listen = ${GATEWAY_LISTEN:-127.0.0.1:8080}
    threads = ${GATEWAY_THREADS:-8}

Embedding::

    from meetinity_gateway.server import create_server, run
    server = create_server(app, listen="127.0.0.1:8080", threads=8)
    run(server, drain_seconds=20)
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import typing as t
import uuid
from pathlib import Path

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
from meetinity_gateway.config import (
    ConfigError,
    as_non_negative_int,
    as_positive_float,
    as_positive_int,
    as_size,
    as_str,
    cast_settings,
)
from meetinity_gateway.keys import CUT_KEY
from meetinity_gateway.problems import error_body, status_line

log = logging.getLogger("meetinity_gateway.server")

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_THREADS = 8
#: Seconds a refused request's connection keeps reading (and discarding) what its client still
#: sends after the answer, so that client reads the answer rather than a reset.
LINGER_SECONDS = 10.0
SERVERS = ("waitress", "granian", "gunicorn")


def _as_non_negative_float(value: str) -> float:
    if value.strip() in ("0", "0.0"):
        return 0.0
    return as_positive_float(value)


def _as_server(value: str) -> str:
    name = value.strip().lower()
    if name not in SERVERS:
        raise ValueError("expected one of " + ", ".join(SERVERS))
    return name


def parse_listen(value: str) -> list[tuple[str, int]]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6), several separated by spaces; port 1-65535.

    Raises ``ValueError`` with a one-line reason (waitress itself would take port 99999 as
    "any free port" or print a traceback).
    """
    out = []
    for item in value.split():
        if item.startswith("["):
            host, sep, port = item[1:].partition("]:")
        else:
            host, sep, port = item.rpartition(":")
        if not sep or not host or ":" in host and not item.startswith("["):
            raise ValueError(f"expected HOST:PORT (or [IPv6]:PORT), got {item!r}")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"port must be a number from 1 to 65535, got {port!r}")
        out.append((host, int(port)))
    if not out:
        raise ValueError("expected HOST:PORT")
    return out


def _as_listen(value: str) -> str:
    parse_listen(value)
    return " ".join(value.split())


#: ``[server:main]`` keys: name -> caster. ``use`` is PasteDeploy's, ignored here.
SETTINGS: dict[str, t.Callable[[str], t.Any]] = {
    "use": as_str,
    "server": _as_server,
    "listen": _as_listen,
    "threads": as_positive_int,
    "workers": as_positive_int,
    "connection_limit": as_positive_int,
    "backlog": as_positive_int,
    "channel_timeout": as_positive_float,
    "header_timeout": as_positive_float,
    "send_timeout": as_positive_float,
    "drain_seconds": _as_non_negative_float,
    "outbuf_overflow": as_size,
    "outbuf_high_watermark": as_size,
    "recv_bytes": as_positive_int,
    "max_request_header_size": as_size,
    "cleanup_interval": as_non_negative_int,
}

#: Defaults of the hardened server (waitress' own in comments).
DEFAULTS: dict[str, t.Any] = {
    "server": "waitress",
    "listen": DEFAULT_LISTEN,
    "threads": DEFAULT_THREADS,
    "workers": 1,
    # waitress: 100 — a hundred idle sockets took the gateway off the air.
    "connection_limit": 2000,
    # waitress: 1024; the kernel caps it at net.core.somaxconn.
    "backlog": 2048,
    # waitress: 120 s of silence before an idle connection is closed.
    "channel_timeout": 60.0,
    # not in waitress: seconds from a request's first byte to the end of its headers.
    "header_timeout": 10.0,
    # not in waitress: seconds one response may keep a worker thread waiting on its client.
    "send_timeout": 60.0,
    # not in waitress (it gives in-flight requests 5 s): seconds a stop waits for them.
    "drain_seconds": 20.0,
    # waitress: 1 MiB in memory per connection before spooling to a temporary file.
    # 64 KiB: the proxy's chunk size. Larger, waitress grows an in-memory buffer per answer
    # before spooling, and a 1 GiB download left ~25 MiB more resident memory (measured).
    "outbuf_overflow": 64 * 1024,
    # waitress: 16 MiB; how far (on disk) an answer may run ahead of a slow client before
    # the worker thread waits.
    "outbuf_high_watermark": 24 * 1024 * 1024,
    "recv_bytes": 65536,
    "max_request_header_size": 256 * 1024,  # waitress default
    # waitress: 30 s between idle sweeps; 1 s makes channel_timeout accurate.
    "cleanup_interval": 1,
}


def server_settings(
    local_conf: t.Mapping[str, str], global_conf: t.Mapping[str, str] | None = None
) -> dict[str, t.Any]:
    """``[server:main]`` strings expanded (``${VAR:-default}``, ``.env``) and cast; defaults
    filled in. Unknown keys and bad values are a :class:`ConfigError` naming the key."""
    values = dict(DEFAULTS)
    values.update(cast_settings(local_conf, SETTINGS, global_conf, section="server:main"))
    values.pop("use", None)
    return values


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
        request_id = uuid.uuid4().hex
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


def _listeners(server) -> list[BaseWSGIServer]:
    if isinstance(server, BaseWSGIServer):
        return [server]
    return [obj for obj in server.map.values() if isinstance(obj, BaseWSGIServer)]


def _socket_map(server) -> dict:
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
    for listener in _listeners(server):
        listener.channel_class = GatewayChannel
        listener.gateway = state
    return server


def _install_signals(state: ServingState, socket_map: dict) -> t.Callable[[], None]:
    """Stop signals set a flag the loop checks; ``signal.set_wakeup_fd`` on a socket pair in
    the loop's map wakes the loop at once (a handler must not take the trigger's lock). Only
    possible in the main thread; elsewhere (tests) the caller uses :func:`stop`."""
    import waitress.wasyncore as wasyncore

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum, frame):
        state.stops += 1

    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):  # SIGBREAK: Ctrl+Break on Windows
        number = getattr(signal, name, None)
        if number is not None:
            try:
                previous[number] = signal.signal(number, handler)
            except (OSError, ValueError):
                pass

    class Wakeup(wasyncore.dispatcher):
        def readable(self) -> bool:
            return True

        def writable(self) -> bool:
            return False

        def handle_read(self) -> None:
            try:
                self.recv(512)
            except OSError:
                pass

    reader, writer = socket.socketpair()
    writer.setblocking(False)
    wakeup = Wakeup(reader, map=socket_map)
    old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def restore() -> None:
        signal.set_wakeup_fd(old_fd)
        for number, old in previous.items():
            signal.signal(number, old)
        wakeup.close()
        writer.close()

    return restore


def stop(server) -> None:
    """Ask a server running in :func:`run` to stop gracefully (thread-safe)."""
    server.gateway.stops += 1


def run(server, *, drain_seconds: float = DEFAULTS["drain_seconds"]) -> int:
    """Serve until a stop signal (or :func:`stop`), then drain and close. Returns the number
    of requests cut at stop (0: every request was answered)."""
    import waitress.wasyncore as wasyncore

    state: ServingState = server.gateway
    adj = _listeners(server)[0].adj
    socket_map = _socket_map(server)
    restore = _install_signals(state, socket_map)
    try:
        while not state.stops and socket_map:
            wasyncore.loop(timeout=adj.asyncore_loop_timeout, map=socket_map,
                           use_poll=adj.asyncore_use_poll, count=1)
        return _drain(server, drain_seconds, wasyncore)
    finally:
        restore()


def _drain(server, drain_seconds: float, wasyncore) -> int:
    state: ServingState = server.gateway
    adj = _listeners(server)[0].adj
    socket_map = _socket_map(server)
    state.draining = True
    began = time.monotonic()
    for listener in _listeners(server):  # stop accepting; keep the triggers
        listener.accepting = False
        wasyncore.dispatcher.close(listener)

    def channels() -> list[GatewayChannel]:
        return [obj for obj in list(socket_map.values()) if isinstance(obj, HTTPChannel)]

    busy = sum(1 for ch in channels() if ch.busy())
    log.info("stopping: %d request(s) in flight, waiting up to %g s", busy, drain_seconds)
    deadline = began + drain_seconds
    while (state.stops < 2 and time.monotonic() < deadline
           and any(ch.busy() for ch in channels())):
        wasyncore.loop(timeout=min(0.2, adj.asyncore_loop_timeout), map=socket_map,
                       use_poll=adj.asyncore_use_poll, count=1)
    left = [ch for ch in channels() if ch.busy()]
    elapsed = time.monotonic() - began
    why = ("a second stop signal" if state.stops >= 2
           else f"the drain deadline of {drain_seconds:g} s")
    for channel in left:
        # Its access-log line comes only if its thread ends within the grace below (one
        # waiting on an upstream may not): this line says what was cut, in any case.
        request = channel.requests[0] if channel.requests else channel.request
        task = channel.current_task
        environ = getattr(task, "environ", None) if task is not None else None
        if environ is not None and task.request is request:
            environ[CUT_KEY] = {"reason": f"cut at stop ({why})",
                                "answered": bool(task.wrote_header)}
        log.warning("stopping: request still in flight after %.1f s, cut by %s: %s %s from %s",
                    elapsed, why, getattr(request, "command", "-"),
                    getattr(request, "path", "-"), channel.addr[0] if channel.addr else "-")
    for channel in channels():
        channel._close_now()
    # Threads still writing notice the closed connection and end their request (its access
    # log line included); one blocked on an upstream gets a few seconds more.
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=5 if left else 1)
    wasyncore.close_all(socket_map)
    if left:
        log.warning("stopped after %.1f s: %d request(s) cut", time.monotonic() - began,
                    len(left))
    else:
        log.info("stopped")
    return len(left)


def serve_paste(wsgi_app, global_conf, **local_conf) -> int:
    """PasteDeploy ``paste.server_runner`` (``use = egg:meetinity_gateway#main`` in
    ``[server:main]``, for ``pserve gateway.ini``): the same settings and server as ``serve``.
    """
    import configparser

    from meetinity_gateway.assembly import adopt
    from meetinity_gateway.logs import configure_logging

    file = (global_conf or {}).get("__file__")
    # pserve calls logging.basicConfig() unless the ini has a [loggers] section: replace that
    # default with the gateway's logging; an operator's own [loggers] setup is kept.
    parser = configparser.RawConfigParser()
    if file:
        parser.read(file, encoding="utf-8")
    configure_logging(os.environ.get("LOG_LEVEL") or "INFO",
                      os.environ.get("LOG_FORMAT") or "json",
                      force=not parser.has_section("loggers"))
    settings = server_settings(local_conf, global_conf)
    _refuse_waitress_workers(settings, file)
    # PasteDeploy built the pipeline: find its layers so /status, /health and the start-up
    # line say what `serve` would.
    pipeline = adopt(wsgi_app, file)
    server = build(wsgi_app, settings, file=file,
                   max_body_size=max_body_size_of(file) if file else None)
    announce(pipeline, where=_where(server), server="waitress")  # pserve prints its own
    cut = run(server, drain_seconds=settings["drain_seconds"])
    logging.shutdown()
    return 1 if cut else 0


def announce(pipeline, *, where: str = "", server: str = "") -> None:
    """Log the start-up line once per loaded pipeline: version, pipeline, configuration
    fingerprint, upstreams and where it serves. At WARNING, so that it shows at every
    ``LOG_LEVEL`` but ERROR: an operator always sees that (and what) the gateway serves."""
    if pipeline is None or pipeline.announced:
        return
    from meetinity_gateway.assembly import startup_line

    pipeline.announced = True
    text = startup_line(pipeline)
    if server:
        text += f"; server {server}, pid {os.getpid()}"
    if where:
        text = f"serving on {where}: {text}"
    logging.getLogger("meetinity_gateway").warning("%s", text)


def _where(server) -> str:
    out = []
    for listener in _listeners(server):
        host, port = listener.effective_host, listener.effective_port
        out.append(f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}")
    return " ".join(out)


def _refuse_waitress_workers(settings: t.Mapping[str, t.Any], file: str | None) -> None:
    if settings.get("server", "waitress") == "waitress" and settings["workers"] > 1:
        raise ConfigError("waitress serves from one process (threads = its concurrency): "
                          "use --server gunicorn or granian for several worker processes",
                          file=file, section="server:main", key="workers",
                          value=str(settings["workers"]))


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


def read_settings(config, **overrides) -> dict[str, t.Any]:
    """``[server:main]`` of the ini file at ``config``, cast, with command-line ``overrides``
    (``None`` values ignored) validated by the same table."""
    import configparser
    from pathlib import Path

    path = Path(config)
    parser = configparser.RawConfigParser()
    parser.optionxform = str  # keys as written
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error:
        parser = configparser.RawConfigParser()  # load_pipeline reports the file's problems
    local = dict(parser.items("server:main")) if parser.has_section("server:main") else {}
    global_conf = {"here": str(path.resolve().parent), "__file__": str(path)}
    settings = server_settings(local, global_conf)
    for key, value in overrides.items():
        if value is None:
            continue
        try:
            settings[key] = SETTINGS[key](str(value))
        except ValueError as exc:
            raise ConfigError(str(exc), key="--" + key.replace("_", "-"),
                              value=str(value)) from None
    return settings


def serve(pipeline, settings: t.Mapping[str, t.Any], *, config=None, app=None) -> int:
    """Serve a loaded pipeline with the server ``settings["server"]`` names, until stopped.

    The start-up line (:func:`announce`) is logged once the server listens (so a bind error
    is the only line); ``app`` replaces ``pipeline.app`` under waitress (a
    :class:`~meetinity_gateway.reload.ReloadingApp`). granian and gunicorn run worker
    processes that each load ``config`` themselves (threads and sockets do not survive a
    fork); ``pipeline`` has validated it already. Returns the exit status: 1 when requests
    were cut at stop."""
    name = settings["server"]
    file = str(config) if config else None
    _refuse_waitress_workers(settings, file)
    if name == "waitress":
        server = build(app or pipeline.app, settings, max_body_size=pipeline.max_body_size,
                       file=file)
        announce(pipeline, where=_where(server), server=name)
        return 1 if run(server, drain_seconds=settings["drain_seconds"]) else 0
    if config is None:
        raise ConfigError(f"server {name!r} needs the ini file's path")
    check_shared_state(pipeline, settings, file)
    os.environ["GATEWAY_CONFIG"] = str(Path(config).resolve())
    _check_bind(settings, file)
    announce(pipeline, where=" ".join(f"http://{item}" for item in
                                      _bind_strings(settings["listen"])), server=name)
    logging.shutdown()  # flush; each worker process sets its logging up again
    if name == "gunicorn":
        return _serve_gunicorn(settings, file)
    return _serve_granian(settings, file)


# -- several worker processes: one budget, one set of counters -----------------------------

def several_workers(settings: t.Mapping[str, t.Any]) -> bool:
    """Whether ``settings`` start more than one worker process (granian, gunicorn)."""
    return settings["server"] != "waitress" and settings["workers"] > 1


_METRIC_FILE = re.compile(r"^[a-z_]+_\d+\.db$")  # prometheus-client's: counter_123.db, ...


def prepare_metrics_directory(settings: t.Mapping[str, t.Any]) -> t.Callable[[], None]:
    """Prometheus' multiprocess mode for several workers, set up before anything imports
    prometheus-client; returns what to do once the server has stopped.

    With one process nothing changes. With several, ``PROMETHEUS_MULTIPROC_DIR`` names the
    directory where every worker keeps its values and from which any worker's ``/metrics``
    adds them all up: the operator's directory, emptied of a previous run's files (stale
    values would be added to the new run's), else a private temporary one, removed after
    the stop."""
    if not several_workers(settings):
        return lambda: None
    import shutil
    import tempfile

    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        folder = Path(given)
        if not folder.is_dir():
            raise ConfigError("PROMETHEUS_MULTIPROC_DIR is not a directory",
                              key="PROMETHEUS_MULTIPROC_DIR", value=given)
        for stale in folder.iterdir():
            if _METRIC_FILE.match(stale.name):
                stale.unlink()
        return lambda: None
    folder = Path(tempfile.mkdtemp(prefix="meetinity-gateway-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return lambda: shutil.rmtree(folder, ignore_errors=True)


def mark_worker_dead(server, worker) -> None:
    """gunicorn's ``child_exit`` hook: a dead worker's live gauges (requests in flight) stop
    counting in the multiprocess sum."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def check_shared_state(pipeline, settings: t.Mapping[str, t.Any], file: str | None) -> None:
    """Several workers must share their rate-limit counters: refuse ``memory://`` (each
    worker would allow the whole budget, N workers N times it), and warn when ``processes``
    (each one's share while the shared storage fails) is below the number of workers."""
    if not several_workers(settings):
        return
    from meetinity_gateway.middleware.ratelimit import RateLimitMiddleware

    workers = settings["workers"]
    for name, layer in pipeline.layers.items():
        if not isinstance(layer, RateLimitMiddleware) or not (layer.rules or layer.default):
            continue
        uri = layer.storage_uri or ""
        if uri.split(":", 1)[0].lower() == "memory":
            raise ConfigError(
                f"memory:// counts in each process: with {workers} workers every client would "
                f"get {workers} times each budget; share the counters in Redis "
                "(RATELIMIT_STORAGE_URI=redis://…) or serve with workers = 1",
                file=file, section=f"filter:{name}", key="storage_uri", value=uri)
        if layer.processes < workers:
            logging.getLogger("meetinity_gateway").warning(
                "[filter:%s] processes = %d but %d workers share the storage: while it "
                "fails each worker allows 1/%d of every limit, %d times the budget in all; "
                "set RATELIMIT_PROCESSES to the number of gateway processes", name,
                layer.processes, workers, layer.processes, workers // layer.processes)


def _missing(name: str, file: str | None) -> ConfigError:
    return ConfigError(f"{name} is not installed (pip install meetinity_gateway[{name}])",
                       file=file, section="server:main", key="server", value=name)


def _check_bind(settings: t.Mapping[str, t.Any], file: str | None) -> None:
    """Bind each address once, as the server will, so a taken port or an unknown host is a
    one-line error here rather than the server's retries and tracebacks."""
    for host, port in parse_listen(settings["listen"]):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, kind, proto, _, address = infos[0]
            with socket.socket(family, kind, proto) as probe:
                if os.name == "posix":
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(f"cannot listen there: {reason}", file=file,
                              section="server:main", key="listen",
                              value=settings["listen"]) from None


def worker_logging() -> None:
    """Logging in a worker process: a log handler inherited through fork has lost its writer
    thread, so it is replaced; a handler someone else configured is kept."""
    from meetinity_gateway.logs import BufferedStreamHandler, configure_logging

    inherited = any(isinstance(h, BufferedStreamHandler) for h in logging.getLogger().handlers)
    configure_logging(os.environ.get("LOG_LEVEL") or "INFO",
                      os.environ.get("LOG_FORMAT") or "json", force=inherited)
    # A worker started by multiprocessing (granian's) ends with os._exit: the interpreter's
    # exit handlers never run, so the lines still buffered (the access lines of the requests
    # that finished during the drain) would be lost. multiprocessing's own exit hook runs.
    from multiprocessing import util

    util.Finalize(None, logging.shutdown, exitpriority=-100)
    util.Finalize(None, _end_tracing, exitpriority=-50)  # queued spans, at most 2 s


def _end_tracing() -> None:
    tracing = sys.modules.get("meetinity_gateway.tracing")  # loaded only when it is on
    current = getattr(tracing, "_tracing", None) if tracing is not None else None
    if current is not None:
        current.processor.shutdown()


def worker_app(target: str | None = None):
    """The pipeline of ``GATEWAY_CONFIG``, loaded in a worker process (granian's and
    gunicorn's loader)."""
    from meetinity_gateway.reload import serving_app

    worker_logging()
    # With RELOAD on, each worker watches the files itself (a thread does not survive fork).
    return serving_app(Path(os.environ.get("GATEWAY_CONFIG") or "gateway.ini"))[1]


def _serve_gunicorn(settings: t.Mapping[str, t.Any], file: str | None) -> int:
    if sys.platform == "win32":
        raise ConfigError("gunicorn does not run on Windows (use waitress)", file=file,
                          section="server:main", key="server", value="gunicorn")
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError:
        raise _missing("gunicorn", file) from None
    options = gunicorn_options(settings)

    class GatewayGunicorn(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            return worker_app()

    GatewayGunicorn().run()
    return 0


def _serve_granian(settings: t.Mapping[str, t.Any], file: str | None) -> int:
    try:
        from granian import Granian
        from granian.constants import HTTPModes, Interfaces
        from granian.http import HTTP1Settings
    except ImportError:
        raise _missing("granian", file) from None
    addresses = parse_listen(settings["listen"])
    if len(addresses) > 1:
        raise ConfigError("granian listens on one address", file=file, section="server:main",
                          key="listen", value=settings["listen"])
    [(host, port)] = addresses
    server = Granian(
        "meetinity_gateway.wsgi:application",  # named for granian's logs; worker_app loads
        address=host, port=port, interface=Interfaces.WSGI, http=HTTPModes.http1,
        workers=settings["workers"], blocking_threads=settings["threads"],
        backlog=settings["backlog"], websockets=False,
        # at most `threads` requests in the interpreter at once, as under waitress
        backpressure=settings["threads"],
        http1_settings=HTTP1Settings(
            header_read_timeout=int(settings["header_timeout"] * 1000), keep_alive=True),
        workers_kill_timeout=max(1, round(settings["drain_seconds"])),
        log_access=False,  # the gateway's observe layer writes the access log
        # granian's own lines in the gateway's format, on stderr with the others
        log_dictconfig=granian_log_config(os.environ.get("LOG_FORMAT") or "json"),
    )
    server.serve(target_loader=worker_app)
    return 0


def granian_log_config(log_format: str) -> dict[str, t.Any]:
    """granian's ``log_dictconfig``: its loggers write to stderr through the gateway's
    formatter (JSON lines under ``LOG_FORMAT=json``)."""
    from meetinity_gateway.logs import TEXT_FORMAT

    if (log_format or "json").strip().lower() == "json":
        formatter = {"()": "meetinity_gateway.logs.JsonFormatter"}
    else:
        formatter = {"()": "logging.Formatter", "fmt": TEXT_FORMAT}
    handler = {"formatter": "gateway", "class": "logging.StreamHandler",
               "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"gateway": formatter},
        "handlers": {"gateway": handler},
        "loggers": {
            "_granian": {"handlers": ["gateway"], "level": "INFO", "propagate": False},
            "granian.access": {"handlers": ["gateway"], "level": "INFO", "propagate": False},
        },
    }


def _bind_strings(listen: str) -> list[str]:
    return [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            for host, port in parse_listen(listen)]


def gunicorn_options(settings: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """gunicorn settings equivalent to ``[server:main]``: ``gthread`` workers, same address,
    threads, connection limit, keep-alive and drain period."""
    return {
        "bind": _bind_strings(settings["listen"]),
        "workers": settings["workers"],
        "threads": settings["threads"],
        "worker_class": "gthread",
        "worker_connections": settings["connection_limit"],
        "backlog": settings["backlog"],
        "keepalive": max(1, int(settings["channel_timeout"])),
        "graceful_timeout": max(1, round(settings["drain_seconds"])),
        # gunicorn's own lines in the gateway's format (JSON under LOG_FORMAT=json)
        "logger_class": "meetinity_gateway.gunicorn_log.GatewayLogger",
        "child_exit": mark_worker_dead,
    }


def max_body_size_of(config) -> int | None:
    """``[app:gateway] max_body_size`` of the ini file, expanded (for servers that get only
    the WSGI app, such as ``pserve``)."""
    import configparser

    from meetinity_gateway.config import expand

    parser = configparser.RawConfigParser()
    try:
        parser.read(config, encoding="utf-8")
        value = parser.get("app:gateway", "max_body_size")
        return as_size(expand(value, key="max_body_size"))
    except (configparser.Error, ValueError):
        return None
