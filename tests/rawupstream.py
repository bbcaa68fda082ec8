"""A loopback upstream that writes whatever bytes a test tells it to: a misbehaving service.

:class:`RawUpstream` accepts connections, reads each request (request line, headers, a body
framed by ``Content-Length`` or chunked) from the raw socket, records it exactly
(:class:`RawRequest`: connection number, method, target, header lines as sent, body) and
hands it to the test's ``handler(request, conn)``, which answers by writing raw bytes with
:meth:`RawConnection.send` — interim responses, control characters in headers, bad framing,
a body cut short — and may :meth:`~RawConnection.reset` (RST) or
:meth:`~RawConnection.close` (FIN) the connection, or :meth:`~RawConnection.pause`. Several
requests on one kept-alive connection are served in turn, so a test can see whether the
gateway reused a connection (``request.conn``) and what the next request on it received.

Every socket has a timeout; :meth:`RawUpstream.stop` closes them all and joins every thread.

The client side: :func:`exchange` writes raw request bytes to the gateway and reads one
response as a strict client would (:class:`RawResponse`: whether its body was complete by
its own framing, whether the connection was closed after it).
"""
from __future__ import annotations

import socket
import struct
import threading
import time
import typing as t
from dataclasses import dataclass, field

__all__ = ["RawConnection", "RawRequest", "RawResponse", "RawUpstream", "exchange", "response"]

_TIMEOUT = 10.0


def response(status: int = 200, body: bytes = b"", headers: t.Iterable[tuple[str, str]] = (),
             reason: str = "OK", length: bool = True) -> bytes:
    """A complete HTTP/1.1 response (``Content-Length`` added unless ``length`` is False)."""
    lines = [f"HTTP/1.1 {status} {reason}".encode()]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass
class RawRequest:
    """One request as the upstream received it."""

    conn: int
    method: str
    target: str
    version: str
    #: Header lines as sent: (name, value), latin-1, in order, duplicates kept.
    headers: list[tuple[str, str]]
    body: bytes = b""
    #: The raw request head (request line and header lines).
    head: bytes = b""

    def header(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class RawConnection:
    """The upstream's side of one connection, for the handler to answer on."""

    number: int
    sock: socket.socket
    closed: bool = False
    _buffer: bytearray = field(default_factory=bytearray)

    def send(self, data: bytes) -> None:
        """Write bytes (ignoring a gateway that has already hung up)."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

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
        # struct linger: two ints on POSIX, two unsigned shorts on Windows.
        for layout in ("ii", "HH"):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack(layout, 1, 0))
                break
            except OSError:
                continue
        try:
            self.sock.close()
        except OSError:
            pass

    # -- reading ---------------------------------------------------------------------------

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self._buffer += data
        return True

    def _line(self) -> bytes | None:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if not self._fill():
                return None

    def _exactly(self, size: int) -> bytes | None:
        while len(self._buffer) < size:
            if not self._fill():
                return None
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read_request(self) -> RawRequest | None:
        """The next request on this connection; ``None`` when the gateway closed it."""
        line = self._line()
        while line in (b"\r\n", b"\n"):
            line = self._line()
        if not line:
            return None
        head = [line]
        method, target, version = line.decode("latin-1").strip().split(" ", 2)
        headers = []
        while True:
            line = self._line()
            if line is None:
                return None
            head.append(line)
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("latin-1").rstrip("\r\n").partition(":")
            headers.append((name, value.strip()))
        request = RawRequest(self.number, method, target, version, headers, head=b"".join(head))
        lengths = request.header("content-length")
        if "chunked" in ",".join(request.header("transfer-encoding")).lower():
            body = bytearray()
            while True:
                size_line = self._line()
                if size_line is None:
                    return None
                size = int(size_line.split(b";")[0], 16)
                if not size:
                    while self._line() not in (b"\r\n", b"\n", None):
                        pass
                    break
                body += self._exactly(size) or b""
                self._line()
            request.body = bytes(body)
        elif lengths:
            request.body = self._exactly(int(lengths[0])) or b""
        return request


Handler = t.Callable[[RawRequest, RawConnection], None]


def ok_handler(request: RawRequest, conn: RawConnection) -> None:
    """The default answer: 200 with the request target as body."""
    conn.send(response(body=request.target.encode("latin-1")))


class RawUpstream:
    """A threaded raw-socket upstream on loopback (see the module docstring)."""

    def __init__(self, handler: Handler = ok_handler, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self._listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.host, self.port = self._listener.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.requests: list[RawRequest] = []
        self.connections = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> RawUpstream:
        self._acceptor.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(_TIMEOUT)
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
                self.handler(request, conn)
        except (OSError, ValueError):
            pass  # the gateway hung up, or sent what this helper cannot parse
        except BaseException as exc:  # a test's handler failed: let the test see it
            self.errors.append(exc)
        finally:
            if not conn.closed:
                try:
                    conn.sock.close()
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        self._acceptor.join(5)
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> RawUpstream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- the client side --------------------------------------------------------------------------

@dataclass
class RawResponse:
    """One response as a client received it."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    #: The body ended as its framing said (Content-Length reached, last chunk read, or a
    #: close-delimited body); False: the connection ended first (a truncated answer).
    complete: bool
    #: The gateway closed the connection after this response.
    closed: bool
    head: bytes = b""

    def header(self, name: str) -> list[str]:
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]

    def json(self) -> t.Any:
        import json

        return json.loads(self.body)


class _Reader(RawConnection):
    """Reads a response off a client socket (reuses the upstream side's buffering)."""

    def read_response(self, head_only: bool = False) -> RawResponse | None:
        line = self._line()
        if not line:
            return None
        head = [line]
        _, status, reason = (line.decode("latin-1").rstrip("\r\n").split(" ", 2) + [""])[:3]
        headers = []
        while True:
            line = self._line()
            if line is None:
                raise ConnectionError("connection closed inside a response head")
            head.append(line)
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("latin-1").rstrip("\r\n").partition(":")
            headers.append((name, value.strip()))
        result = RawResponse(int(status), reason, headers, b"", True, False, b"".join(head))
        codes = ",".join(result.header("transfer-encoding")).lower()
        lengths = result.header("content-length")
        if head_only or result.status in (204, 304) or 100 <= result.status < 200:
            return result
        try:
            if "chunked" in codes:
                body = bytearray()
                while True:
                    size_line = self._line()
                    if not size_line:
                        result.complete = False
                        break
                    size = int(size_line.split(b";")[0], 16)
                    if not size:
                        self._line()
                        break
                    data = self._exactly(size + 2)
                    if data is None:
                        body += self._buffer
                        result.complete = False
                        break
                    body += data[:-2]
                result.body = bytes(body)
            elif lengths:
                size = int(lengths[0])
                data = self._exactly(size)
                if data is None:
                    result.body, result.complete = bytes(self._buffer), False
                else:
                    result.body = data
            else:
                while self._fill():
                    pass
                result.body, result.closed = bytes(self._buffer), True
                self._buffer.clear()
        except (ConnectionResetError, socket.timeout):
            result.body, result.complete = result.body or bytes(self._buffer), False
        if not result.complete:
            result.closed = True  # the body ended with the connection
        elif not result.closed:
            result.closed = _peer_closed(self.sock)
        return result


def _peer_closed(sock: socket.socket, wait: float = 0.05) -> bool:
    """Whether the peer closed (EOF or reset) within ``wait`` seconds; data left unread."""
    previous = sock.gettimeout()
    sock.settimeout(wait)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except socket.timeout:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(previous)


def exchange(url: str, data: bytes, timeout: float = _TIMEOUT,
             responses: int = 1, head_only: bool = False) -> list[RawResponse]:
    """Send raw ``data`` to the server at ``url``; read up to ``responses`` answers."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        reader = _Reader(0, sock)
        answers = []
        for _ in range(responses):
            answer = reader.read_response(head_only)
            if answer is None:
                break
            answers.append(answer)
            if answer.closed or not answer.complete:
                break
        return answers


def get(url: str, target: str, headers: t.Iterable[tuple[str, str]] = (),
        method: str = "GET", body: bytes | None = None) -> RawResponse:
    """One request written byte for byte (``Host`` added unless given), its answer."""
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1")]
    names = set()
    for name, value in headers:
        names.add(name.lower())
        lines.append(f"{name}: {value}".encode("latin-1"))
    if "host" not in names:
        lines.append(b"Host: gateway.test")
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    data = b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")
    answers = exchange(url, data, head_only=method == "HEAD")
    if not answers:
        raise ConnectionError("no answer")
    return answers[0]
