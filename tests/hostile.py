"""Raw-socket tools for the hostile-input suite: a scripted upstream and a strict client.

:class:`ScriptedUpstream` is an HTTP/1.1 server on loopback that parses requests itself
(request line, headers, ``Content-Length`` or chunked body), records every request with the
number of the connection it came on, and answers with whatever raw bytes its ``script``
returns: a correct response, or any garbage a broken or hostile service could send.

:func:`read_response` is the client side: a strict HTTP/1.1 response reader over a raw
socket that reports how the answer was framed and whether the connection was cut, so a test
can tell a well-framed answer from a truncated one (something an HTTP library tidies away).
"""
from __future__ import annotations

import json
import re
import socket
import threading
import typing as t
from dataclasses import dataclass, field

__all__ = [
    "Answer",
    "Recorded",
    "Response",
    "ScriptedUpstream",
    "json_answer",
    "raw_exchange",
    "read_response",
]

# Field names are tokens (RFC 9110 §5.6.2); values hold no CR, LF, NUL or other control
# character but HTAB (RFC 9110 §5.5).
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass
class Recorded:
    """One request as the upstream received it."""

    connection: int
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]


@dataclass
class Answer:
    """What the scripted upstream sends back: raw bytes, then keep the connection or close."""

    data: bytes
    close: bool = False


def json_answer(payload: dict, status: int = 200, extra: bytes = b"") -> Answer:
    body = json.dumps(payload).encode()
    head = (
        f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    ).encode()
    return Answer(head + extra + b"\r\n" + body)


def _default_script(request: Recorded) -> Answer:
    tag = (request.header("X-Probe") or [""])[0]
    return json_answer({"connection": request.connection, "target": request.target,
                        "probe": tag})


class ScriptedUpstream:
    """A loopback upstream that records every request and answers what ``script`` says.

    ``script(request) -> Answer`` is called for each request; replace it between test
    examples. ``requests`` lists every request received, ``connections`` counts accepted
    connections. Use as a context manager.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.script: t.Callable[[Recorded], Answer] = _default_script
        self.requests: list[Recorded] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                _close(sock)

    def reset(self) -> None:
        """Forget recorded requests and restore the default answer."""
        with self._lock:
            self.requests = []
        self.script = _default_script

    def since(self, count: int) -> list[Recorded]:
        with self._lock:
            return list(self.requests[count:])

    # -- serving ----------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self._sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        sock.settimeout(30)
        reader = _Reader(sock)
        try:
            while not self._stopping.is_set():
                request = _read_request(reader, number)
                if request is None:
                    return
                with self._lock:
                    self.requests.append(request)
                answer = self.script(request)
                if answer.data:
                    sock.sendall(answer.data)
                if answer.close:
                    return
        except (OSError, ValueError):
            return
        finally:
            _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class _Reader:
    """Buffered reads from a socket: lines and exact byte counts."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.eof = False

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def line(self, limit: int = 65536) -> bytes | None:
        while b"\n" not in self.buffer:
            if len(self.buffer) > limit or not self._fill():
                return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def exact(self, size: int) -> bytes | None:
        while len(self.buffer) < size:
            if not self._fill():
                return None
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def rest(self) -> bytes:
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data


def _read_head(reader: _Reader) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    start = reader.line()
    if start is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    while True:
        line = reader.line()
        if line is None:
            return None
        if line in (b"\r\n", b"\n"):
            return start.rstrip(b"\r\n"), headers
        name, colon, value = line.rstrip(b"\r\n").partition(b":")
        if not colon:
            raise ValueError(f"malformed header line {line!r}")
        headers.append((name, value.strip(b" \t")))


def _chunked_body(reader: _Reader) -> bytes | None:
    body = b""
    while True:
        size_line = reader.line()
        if size_line is None:
            return None
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                line = reader.line()
                if line is None:
                    return None
                if line in (b"\r\n", b"\n"):
                    return body
        data = reader.exact(size)
        if data is None or reader.line() is None:
            return None
        body += data


def _read_request(reader: _Reader, number: int) -> Recorded | None:
    head = _read_head(reader)
    if head is None:
        return None
    start, raw_headers = head
    method, target, version = start.decode("latin-1").split(" ", 2)
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers]
    lowered = {k.lower(): v for k, v in headers}
    if "chunked" in lowered.get("transfer-encoding", "").lower():
        body = _chunked_body(reader)
    else:
        body = reader.exact(int(lowered.get("content-length") or 0))
    if body is None:
        return None
    return Recorded(number, method, target, version, headers, body)


# -- the client side -------------------------------------------------------------------------

@dataclass
class Response:
    """One final response as read off the wire, with how it was framed."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: "length", "chunked", "close" (read to EOF), "none" (no body by status or method)
    framing: str
    #: the body ended before its framing said it would (connection cut)
    truncated: bool = False
    interim: list[int] = field(default_factory=list)

    def header(self, name: str) -> list[bytes]:
        lowered = name.lower().encode()
        return [value for key, value in self.headers if key.lower() == lowered]

    def json(self) -> t.Any:
        return json.loads(self.body)

    @property
    def closes(self) -> bool:
        return any(b"close" in v.lower() for v in self.header("Connection"))

    def violations(self) -> list[str]:
        """What makes this response's head malformed (RFC 9110 §5.5, §5.6.2)."""
        problems = []
        for name, value in self.headers:
            if not _TOKEN.match(name):
                problems.append(f"bad header name {name!r}")
            if _BAD_VALUE.search(value):
                problems.append(f"control character in {name!r}: {value!r}")
        lengths = self.header("Content-Length")
        if len(set(lengths)) > 1:
            problems.append(f"conflicting Content-Length {lengths!r}")
        if lengths and self.header("Transfer-Encoding"):
            problems.append("both Content-Length and Transfer-Encoding")
        return problems


def read_response(reader: _Reader, method: str = "GET") -> Response | None:
    """The next final response on the connection (interim 1xx skipped); None at EOF."""
    interim: list[int] = []
    while True:
        head = _read_head(reader)
        if head is None:
            return None
        start, headers = head
        parts = start.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"malformed status line {start!r}")
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else b""
        if 100 <= status < 200 and status != 101:
            interim.append(status)
            continue
        break
    response = Response(status, reason, headers, b"", "none", interim=interim)
    lowered = {k.lower(): v for k, v in headers}
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return response
    if b"chunked" in lowered.get(b"transfer-encoding", b"").lower():
        response.framing = "chunked"
        body = _chunked_body(reader)
        if body is None:
            response.truncated = True
            response.body = reader.rest()
        else:
            response.body = body
    elif b"content-length" in lowered:
        response.framing = "length"
        size = int(lowered[b"content-length"])
        body = reader.exact(size)
        if body is None:
            response.truncated = True
            response.body = reader.rest()
        else:
            response.body = body
    else:
        response.framing = "close"
        response.body = reader.rest()
    return response


def raw_exchange(port: int, data: bytes, *, method: str = "GET", timeout: float = 10.0,
                 host: str = "127.0.0.1") -> tuple[Response | None, _Reader]:
    """Send raw bytes on a new connection and read the first final response.

    Returns the response (None when the server closed without one) and the reader, whose
    socket the caller closes (``reader.sock.close()``).
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    reader = _Reader(sock)
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server may refuse early and close: read what it said
    try:
        return read_response(reader, method), reader
    except OSError:
        return None, reader  # reset: no answer (a malformed one raises ValueError)
