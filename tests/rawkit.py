"""The raw-HTTP test kit: bytes go out exactly as written, and every byte that comes back is seen.

An HTTP client library tidies exactly what these tests are about (a header with a control
character, a body cut short, a second response after the first), so they talk over sockets:

* :class:`RawClient` — one client connection: :meth:`~RawClient.send` bytes as written,
  :meth:`~RawClient.read_response` one response with its framing, or
  :meth:`~RawClient.read_until_close`; close (or half-close) whenever the test says.
  :func:`exchange` is one request on a new connection, :func:`get` builds that request.
* :class:`RawResponse` — one response as read off the wire: status, headers as sent, body,
  how it was framed (``length``, ``chunked``, ``close``, ``none``), whether the body was
  complete by its own framing, whether the connection closed after it, the interim (1xx)
  answers skipped on the way, and the head's :meth:`~RawResponse.violations` of RFC 9110.
* :class:`ScriptedUpstream` — a loopback upstream that reads each request itself, records it
  (:class:`RawRequest`, with the connection it came on and its head's raw bytes) and answers
  what the test's ``script(request, conn)`` writes on :class:`RawConnection`: a correct
  response (:func:`response`), an interim 1xx first, control characters, bad or
  close-delimited framing, a body trickled or cut, a hang (:meth:`~RawConnection.pause`),
  a reset (:meth:`~RawConnection.reset`, RST) or a close (:meth:`~RawConnection.close`, FIN).
  :attr:`~ScriptedUpstream.forwarded` is what it received without the gateway's own health
  probes (the re-checks of an ejected target, :attr:`RawRequest.gateway_probe`).

Every socket has a timeout; a read timeout or a reset counts as the end of the stream.
"""
from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
import typing as t
from dataclasses import dataclass, field

__all__ = [
    "GATEWAY_PROBE_PATH", "RawClient", "RawConnection", "RawRequest", "RawResponse",
    "ScriptedUpstream", "exchange", "get", "json_error", "json_response", "request_bytes",
    "reset_on_close", "response",
]

TIMEOUT = 10.0
#: How long an upstream connection waits for the gateway's next request.
_UPSTREAM_IDLE = 30.0

# Field names are tokens (RFC 9110 §5.6.2); values hold no CR, LF, NUL or other control
# character but HTAB (RFC 9110 §5.5).
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


# -- bytes to send ----------------------------------------------------------------------------

def request_bytes(method: str, target: bytes | str, headers: t.Iterable[tuple[str, str]] = (),
                  body: bytes | None = None, host: str = "gateway.test",
                  close: bool = False) -> bytes:
    """``METHOD target HTTP/1.1``, ``headers`` as given, ``Host`` unless among them,
    ``Content-Length`` when there is a ``body`` (``None``: no body), ``Connection: close``
    when ``close``."""
    if isinstance(target, str):
        target = target.encode("latin-1")
    lines = [method.encode("latin-1") + b" " + target + b" HTTP/1.1"]
    names = set()
    for name, value in headers:
        names.add(name.lower())
        lines.append(f"{name}: {value}".encode("latin-1"))
    if "host" not in names:
        lines.insert(1, b"Host: " + host.encode("latin-1"))
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def response(status: int = 200, body: bytes = b"", headers: t.Iterable[tuple[str, str]] = (),
             reason: str = "OK", length: bool = True, extra: bytes = b"") -> bytes:
    """An HTTP/1.1 response: ``headers``, raw ``extra`` header bytes, ``Content-Length``
    unless ``length`` is False (then the body is close-delimited), the body."""
    lines = [f"HTTP/1.1 {status} {reason}".encode()]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n" + body


def json_response(payload: t.Any, status: int = 200, extra: bytes = b"") -> bytes:
    return response(status, json.dumps(payload).encode(),
                    [("Content-Type", "application/json")], extra=extra)


# -- buffered reading, both sides ---------------------------------------------------------------

class _Wire:
    """Lines and exact byte counts off a socket; a timeout or reset is the end of the stream."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False

    def fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def line(self, limit: int = 1 << 20) -> bytes | None:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > limit or not self.fill():
                return None

    def exactly(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if not self.fill():
                return None
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def rest(self) -> bytes:
        while self.fill():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def head(self) -> tuple[bytes, list[tuple[str, str]], bytes] | None:
        """(start line, header fields, raw head); None at the end of the stream."""
        start = self.line()
        while start in (b"\r\n", b"\n"):  # a stray empty line before a message is allowed
            start = self.line()
        if not start:
            return None
        raw = [start]
        fields = []
        while True:
            line = self.line()
            if line is None:
                return None
            raw.append(line)
            if line in (b"\r\n", b"\n"):
                return start.rstrip(b"\r\n"), fields, b"".join(raw)
            name, _, value = line.decode("latin-1").rstrip("\r\n").partition(":")
            fields.append((name, value.strip(" \t")))

    def chunked(self) -> tuple[bytes, bool]:
        """A chunked body and whether its last chunk came (trailers skipped)."""
        body = bytearray()
        while True:
            size_line = self.line()
            if not size_line:
                return bytes(body) + self.rest(), False
            size = int(size_line.split(b";")[0].strip(), 16)
            if not size:
                while True:
                    line = self.line()
                    if line is None:
                        return bytes(body), False
                    if line in (b"\r\n", b"\n"):
                        return bytes(body), True
            data = self.exactly(size + 2)
            if data is None:
                return bytes(body) + self.rest(), False
            body += data[:-2]


def _values(fields: list[tuple[str, str]], name: str) -> list[str]:
    lowered = name.lower()
    return [value for key, value in fields if key.lower() == lowered]


# -- the client side ----------------------------------------------------------------------------

@dataclass
class RawResponse:
    """One final response as a client received it."""

    status: int
    reason: str
    #: Header fields as sent: (name, value), latin-1, in order, duplicates kept.
    headers: list[tuple[str, str]]
    body: bytes = b""
    #: "length", "chunked", "close" (read to the end of the stream), "none" (no body by
    #: status or method)
    framing: str = "none"
    #: The body ended as its framing said; False: the connection ended first (truncated).
    complete: bool = True
    #: The server closed the connection after this response.
    closed: bool = False
    #: Interim (1xx) statuses received before this response.
    interim: list[int] = field(default_factory=list)
    #: The raw head (status line and header lines).
    head: bytes = b""

    def header(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        return _values(self.headers, name)

    @property
    def fields(self) -> dict[str, str]:
        """Header names lowercased, the last value of each."""
        return {name.lower(): value for name, value in self.headers}

    def json(self) -> t.Any:
        return json.loads(self.body)

    @property
    def truncated(self) -> bool:
        return not self.complete

    @property
    def closes(self) -> bool:
        """The response says ``Connection: close``."""
        return any("close" in value.lower() for value in self.header("Connection"))

    def violations(self) -> list[str]:
        """What makes this response's head malformed (RFC 9110 §5.5, §5.6.2)."""
        problems = []
        for name, value in self.headers:
            raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
            if not _TOKEN.match(raw_name):
                problems.append(f"bad header name {raw_name!r}")
            if _BAD_VALUE.search(raw_value):
                problems.append(f"control character in {raw_name!r}: {raw_value!r}")
        lengths = self.header("Content-Length")
        if len(set(lengths)) > 1:
            problems.append(f"conflicting Content-Length {lengths!r}")
        if lengths and self.header("Transfer-Encoding"):
            problems.append("both Content-Length and Transfer-Encoding")
        return problems


def json_error(body: bytes) -> dict:
    """The gateway's error shape, checked: ``{"error": {"code", "message", "request_id"}}``;
    the inner object."""
    payload = json.loads(body)
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"code", "message", "request_id"}
    return payload["error"]


def _address(where: str | int, host: str) -> tuple[str, int]:
    if isinstance(where, int) or where.isdigit():  # a port (waitress may give a string)
        return host, int(where)
    netloc = where.split("//", 1)[-1].split("/", 1)[0]
    name, _, port = netloc.rpartition(":")
    return name.strip("[]"), int(port)


class RawClient:
    """One client connection to ``where`` (a URL or a loopback port); a context manager."""

    def __init__(self, where: str | int, timeout: float = TIMEOUT,
                 host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(_address(where, host), timeout=timeout)
        self._wire = _Wire(self.sock)

    @property
    def eof(self) -> bool:
        """The server ended the stream (as far as this client has read)."""
        return self._wire.eof

    def send(self, data: bytes) -> bool:
        """Write bytes as they are; False when the server has already hung up."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def settimeout(self, seconds: float) -> None:
        self.sock.settimeout(seconds)

    def read_response(self, method: str = "GET") -> RawResponse | None:
        """The next final response (interim 1xx recorded and skipped); None when the
        connection ended first. A malformed status line raises ValueError."""
        wire = self._wire
        interim: list[int] = []
        while True:
            head = wire.head()
            if head is None:
                return None
            start, fields, raw = head
            parts = start.split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise ValueError(f"malformed status line {start!r}")
            status = int(parts[1])
            if 100 <= status < 200 and status != 101:
                interim.append(status)
                continue
            break
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        answer = RawResponse(status, reason, fields, interim=interim, head=raw)
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return answer
        lengths = answer.header("Content-Length")
        if "chunked" in ",".join(answer.header("Transfer-Encoding")).lower():
            answer.framing = "chunked"
            answer.body, answer.complete = wire.chunked()
        elif lengths:
            answer.framing = "length"
            body = wire.exactly(int(lengths[0]))
            if body is None:
                answer.body, answer.complete = wire.rest(), False
            else:
                answer.body = body
        else:
            answer.framing = "close"
            answer.body = wire.rest()
        if wire.eof:
            answer.closed = True  # the body ended with the connection
        else:
            answer.closed = self.peer_closed()
        return answer

    def read_head(self) -> bytes | None:
        """The raw bytes of the next message head (up to its empty line), nothing of its
        body; None when the connection ended first."""
        head = self._wire.head()
        return head[2] if head else None

    def read_responses(self, count: int, method: str = "GET") -> list[RawResponse]:
        """Up to ``count`` responses, fewer when the connection ends or a body is cut."""
        answers: list[RawResponse] = []
        for _ in range(count):
            answer = self.read_response(method)
            if answer is None:
                break
            answers.append(answer)
            if answer.closed or not answer.complete:
                break
        return answers

    def read_until_close(self, timeout: float = TIMEOUT) -> tuple[bytes, bool]:
        """Every byte until the server closes; ``closed`` is False when it kept the
        connection open past ``timeout`` seconds of silence."""
        self.sock.settimeout(timeout)
        data = bytes(self._wire.buffer)
        self._wire.buffer.clear()
        while True:
            try:
                piece = self.sock.recv(65536)
            except socket.timeout:
                return data, False
            except ConnectionResetError:
                return data, True
            if not piece:
                return data, True
            data += piece

    def peer_closed(self, wait: float = 0.05) -> bool:
        """Whether the server closed (EOF or reset) within ``wait`` seconds; nothing is
        consumed."""
        previous = self.sock.gettimeout()
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except socket.timeout:
            return False
        except OSError:
            return True
        finally:
            self.sock.settimeout(previous)

    def shutdown_write(self) -> None:
        """Half-close: the server reads the end of the stream, this side can still read."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self, reset: bool = False) -> None:
        """Close (FIN), or with ``reset`` abort the connection (RST)."""
        if reset:
            _abort(self.sock)
        else:
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def exchange(where: str | int, data: bytes, *, method: str = "GET",
             timeout: float = TIMEOUT, host: str = "127.0.0.1") -> RawResponse | None:
    """``data`` on a new connection; the first final response (None: closed without one)."""
    with RawClient(where, timeout, host) as client:
        client.send(data)  # a server may refuse early and close: read what it said
        return client.read_response(method)


def get(where: str | int, target: str, headers: t.Iterable[tuple[str, str]] = (),
        method: str = "GET", body: bytes | None = None) -> RawResponse:
    """One request written byte for byte (see :func:`request_bytes`), its answer."""
    answer = exchange(where, request_bytes(method, target, headers, body), method=method)
    if answer is None:
        raise ConnectionError("no answer")
    return answer


# -- the upstream side --------------------------------------------------------------------------

@dataclass
class RawRequest:
    """One request as the upstream received it."""

    #: The number of the connection it came on (1 for the first accepted).
    conn: int
    method: str
    target: str
    version: str
    #: Header fields as sent: (name, value), latin-1, in order, duplicates kept.
    headers: list[tuple[str, str]]
    body: bytes = b""
    #: The raw request head (request line and header lines).
    head: bytes = b""

    def header(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        return _values(self.headers, name)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def gateway_probe(self) -> bool:
        """Is this the gateway's own health probe rather than a request it forwarded?

        ``UpstreamPool.ask`` (the background re-check of an ejected target, active health
        checks, ``/health``'s per-target detail) sends exactly ``GET <health_path>`` with
        ``Host`` and ``User-Agent: meetinity-gateway``, no other field and no body. A
        forwarded request always carries the gateway's ``Via``, ``X-Forwarded-For`` and
        ``X-Request-ID``, and the gateway invents no ``User-Agent`` for it: the two cannot
        be mistaken for each other (tests/test_proxy_hostile.py checks both against the
        real gateway).
        """
        names = sorted(name.lower() for name, _ in self.headers)
        return (self.method == "GET" and self.target == GATEWAY_PROBE_PATH
                and names == ["host", "user-agent"]
                and self.header("User-Agent") == ["meetinity-gateway"] and not self.body)


#: The path of the gateway's health probes on a target without a base path: the pools'
#: ``health_path``, which the shipped gateway.ini leaves at its default.
GATEWAY_PROBE_PATH = "/health"


class RawConnection:
    """The upstream's side of one connection, for the script to answer on."""

    def __init__(self, number: int, sock: socket.socket) -> None:
        self.number = number
        self.sock = sock
        self.closed = False
        self._wire = _Wire(sock)

    def send(self, data: bytes) -> None:
        """Write bytes (ignoring a gateway that has already hung up)."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def trickle(self, data: bytes, size: int, pause: float) -> None:
        """Write ``data`` ``size`` bytes at a time, ``pause`` seconds apart."""
        for start in range(0, len(data), size):
            if start:
                self.pause(pause)
            self.send(data[start:start + size])

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        """Close gracefully (FIN) after what was sent."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def reset(self) -> None:
        """Abort the connection: the peer gets an RST (SO_LINGER with a zero timeout)."""
        self.closed = True
        _abort(self.sock)

    def read_request(self) -> RawRequest | None:
        """The next request on this connection; None when the gateway closed it."""
        head = self._wire.head()
        if head is None:
            return None
        start, fields, raw = head
        method, target, version = start.decode("latin-1").split(" ", 2)
        request = RawRequest(self.number, method, target, version, fields, head=raw)
        if "chunked" in ",".join(request.header("Transfer-Encoding")).lower():
            body, complete = self._wire.chunked()
            if not complete:
                return None
            request.body = body
        else:
            body = self._wire.exactly(int((request.header("Content-Length") or ["0"])[0]))
            if body is None:
                return None
            request.body = body
        return request


Script = t.Callable[[RawRequest, RawConnection], None]


def echo_target(request: RawRequest, conn: RawConnection) -> None:
    """The default answer: 200 with the request target as body."""
    conn.send(response(body=request.target.encode("latin-1")))


class ScriptedUpstream:
    """A threaded raw-socket upstream on loopback that answers what ``script`` writes.

    ``script(request, conn)`` is called for every request, in turn on each kept-alive
    connection; it may be replaced between requests, :meth:`reset` puts back the one given
    at construction. ``requests`` lists every request received (the gateway's own health
    probes too: :attr:`forwarded` leaves them out), ``connections`` counts the accepted
    connections, ``errors`` holds what a script raised. A context manager.
    """

    def __init__(self, script: Script = echo_target, host: str = "127.0.0.1") -> None:
        self.script = self._default = script
        self._listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.host, self.port = self._listener.getsockname()[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}"
        self.requests: list[RawRequest] = []
        self.connections = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> ScriptedUpstream:
        self._acceptor.start()
        return self

    @property
    def forwarded(self) -> list[RawRequest]:
        """``requests`` without the gateway's own health probes
        (:attr:`RawRequest.gateway_probe`): what the clients' requests became."""
        with self._lock:
            return [request for request in self.requests if not request.gateway_probe]

    def since(self, count: int) -> list[RawRequest]:
        """The requests received from the ``count``-th on."""
        with self._lock:
            return list(self.requests[count:])

    def reset(self) -> None:
        """Forget the recorded requests and put back the first script."""
        with self._lock:
            self.requests = []
        self.script = self._default

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(_UPSTREAM_IDLE)
            with self._lock:
                self.connections += 1
                conn = RawConnection(self.connections, sock)
                self._socks.append(sock)
                thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: RawConnection) -> None:
        try:
            while not self._stop.is_set() and not conn.closed:
                request = conn.read_request()
                if request is None:
                    return
                with self._lock:
                    self.requests.append(request)
                self.script(request, conn)
        except (OSError, ValueError):
            pass  # the gateway hung up, or sent what this kit cannot parse
        except BaseException as exc:  # a test's script failed: let the test see it
            self.errors.append(exc)
        finally:
            if not conn.closed:
                _close(conn.sock)

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        self._acceptor.join(5)
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            _close(sock)
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> ScriptedUpstream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def reset_on_close(sock: socket.socket) -> None:
    """Make closing ``sock`` send an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    # struct linger: two ints on POSIX, two unsigned shorts on Windows.
    for layout in ("ii", "HH"):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack(layout, 1, 0))
            return
        except OSError:
            continue


def _abort(sock: socket.socket) -> None:
    reset_on_close(sock)
    try:
        sock.close()
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
