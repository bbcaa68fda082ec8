"""The upstream HTTP/1.1 client: stdlib sockets, a small LIFO keep-alive pool per target.

One :class:`ConnectionPool` per target address. :meth:`ConnectionPool.request` writes one
request (head and body) on a kept-alive or a new connection and reads the answer's head with
:class:`~meetinity_gateway.proxy.wire.GuardedResponse` (strict framing, interim ``1xx`` read
past); the caller streams the body with ``response.read1(chunk_size)`` — what is available,
up to ``chunk_size``, so that an answer written in small pieces (events, chunks) goes on
piece by piece; only a body read that way to its end counts as complete — and gives the
connection back with :func:`release`.

Why not urllib3's ``urlopen``: its retry, timeout and response wrappers cost about a third
of a minimal pass-through's throughput (issue 15; the numbers are in bench/README.md), and none
of them is needed: the proxy does its own retries and streaming.

* **Connections.** ``socket.create_connection`` to the target's *address* with
  ``connect_timeout``; for ``https`` targets TLS with certificate verification
  (``ssl.create_default_context()`` unless an ``ssl_context`` is given) and SNI / hostname
  check against the configured host name. Every read and write then waits at most
  ``read_timeout``.
* **Errors.** :class:`ConnectTimeout` (no TCP or TLS connection within the time: 504),
  :class:`ConnectFailed` (refused, unreachable, TLS refused: 502) — in both cases nothing
  was sent; :class:`ReadTimeout` (a read or write waited too long once connected: 504);
  :class:`~meetinity_gateway.proxy.wire.InvalidUpstreamResponse` (502); any other
  ``OSError`` or :class:`http.client.HTTPException` is the connection failing (502).
* **Bodies.** ``bytes`` are sent with the head in one write; a sized stream (``__len__`` and
  iteration) as it is, an unsized one (``chunked=True``) with chunked framing, each in the
  pieces its iterator yields (bounded by the proxy's ``chunk_size``).
* **Reuse.** A connection goes back to the pool only when its answer was read to its exact
  end, the answer allows keep-alive, and *nothing else* came with it: a byte left in the
  read buffer or waiting on the socket after a complete response is an upstream that sent
  more than it framed, and the next request on that connection — another client's — would
  read it as its answer. Such a connection is closed. A connection taken from the pool is
  dropped (and another taken or made) if it was idle longer than ``idle_timeout`` (many
  servers close idle keep-alive connections after about 5 s; a request written just as they
  do fails with a spurious 502) or if anything arrived on it while idle (the upstream closed
  it, or sent bytes nobody asked for).
* **The pool** is a ``collections.deque`` of idle connections used last-in first-out
  (``append`` and ``pop`` are atomic: no lock on the hot path), at most ``maxsize`` kept;
  more connections than that may be open at once, the extra ones close when given back.
"""
from __future__ import annotations

import collections
import io
import select
import socket
import ssl
import struct
import time
import typing as t

from meetinity_gateway.proxy.wire import GuardedResponse

__all__ = [
    "ConnectFailed",
    "ConnectTimeout",
    "ConnectionPool",
    "ReadTimeout",
    "UpstreamTimeout",
    "read_body",
    "release",
]

#: Read buffer per connection: a response head usually arrives whole in one read.
_BUFFER = 16 * 1024
_CHUNK_END = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class UpstreamTimeout(TimeoutError):
    """The upstream did not answer in time (504)."""


class ConnectTimeout(UpstreamTimeout):
    """No connection (TCP or TLS) within ``connect_timeout``: nothing was sent."""


class ReadTimeout(UpstreamTimeout):
    """Connected, but a read or write waited longer than ``read_timeout``."""


class ConnectFailed(ConnectionError):
    """No connection (refused, unreachable, TLS handshake refused): nothing was sent."""


_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)  # not on Windows


class _SocketIO(socket.SocketIO):
    """``SocketIO`` over a socket in blocking mode whose timeouts the kernel enforces
    (``SO_RCVTIMEO``/``SO_SNDTIMEO``). CPython's own timeouts put the socket in non-blocking
    mode: every request then costs two ``ioctl`` calls (switching modes to look for
    leftover bytes and back) and a ``poll`` before each read, each one a release of the GIL
    that under load hands the interpreter to another thread. Here a read is one ``recv``,
    and the leftover check one ``recv`` with ``MSG_DONTWAIT`` (which on a CPython timeout
    socket would still wait in ``poll``). Plain TCP on POSIX only; TLS and Windows keep
    CPython's timeouts."""

    dontwait = False

    def readinto(self, b):  # type: ignore[override]
        if self.dontwait:
            return self._sock.recv_into(b, 0, _DONTWAIT)
        try:
            return self._sock.recv_into(b)
        except BlockingIOError as exc:  # SO_RCVTIMEO expired
            raise TimeoutError("timed out") from exc


def _kernel_timeouts(sock: socket.socket, seconds: float | None) -> None:
    """Receive and send timeouts enforced by the kernel (0 = never, as for ``None``)."""
    seconds = seconds or 0.0
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class _Reader(io.BufferedReader):
    """The connection's read buffer; it lives as long as the connection.

    ``http.client`` closes the file it reads a response from once the body is complete;
    here that must not drop the buffer (bytes in it after a response are what tells a
    poisoned connection), so ``close()`` does nothing and :meth:`Connection.close` closes
    for real.
    """

    def close(self) -> None:
        pass


class Connection:
    """One socket to a target, with its persistent read buffer."""

    __slots__ = ("sock", "reader", "idle_since", "pool", "timeout", "raw")

    def __init__(self, sock: socket.socket, pool: ConnectionPool) -> None:
        self.sock = sock
        self.timeout: float | None = sock.gettimeout()
        plain = bool(_DONTWAIT) and not isinstance(sock, ssl.SSLSocket)
        self.raw = _SocketIO(sock, "rb") if plain else None
        if self.raw is not None:
            sock.settimeout(None)  # blocking; the kernel times out (see _SocketIO)
            self.timeout = None
        self.reader = _Reader(self.raw or socket.SocketIO(sock, "rb"), _BUFFER)
        self.idle_since = 0.0
        self.pool = pool

    def makefile(self, mode: str, *args: t.Any, **kwargs: t.Any) -> _Reader:
        # What http.client.HTTPResponse reads from: the same buffer for every response.
        return self.reader

    def close(self) -> None:
        try:
            io.BufferedReader.close(self.reader)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def leftover(self) -> bool:
        """Are bytes waiting, in the buffer or on the socket, or has the peer closed?
        (Never blocks.)"""
        raw = self.raw
        try:
            if raw is not None:
                raw.dontwait = True
            else:
                self.sock.settimeout(0)
                self.timeout = 0
            # Buffered bytes come back without a system call; else one non-blocking read.
            extra = self.reader.peek(1)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError:
            return True
        finally:
            if raw is not None:
                raw.dontwait = False
        return bool(extra)

    def set_timeout(self, seconds: float | None) -> None:
        """The read (and send) timeout, changed only when it differs: each change is a
        system call."""
        if self.timeout != seconds:
            if self.raw is not None:
                _kernel_timeouts(self.sock, seconds)
            else:
                self.sock.settimeout(seconds)
            self.timeout = seconds


if hasattr(select, "poll"):
    def _readable(sock: socket.socket) -> bool:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
else:  # Windows: select() has no descriptor-number limit there
    def _readable(sock: socket.socket) -> bool:
        return bool(select.select([sock], [], [], 0)[0])


class ConnectionPool:
    """Keep-alive connections to one target address (see the module docstring).

    :param scheme: ``http`` or ``https``.
    :param address: the IP address (or host name) to connect to.
    :param port: the TCP port.
    :param server_hostname: the name TLS verifies the certificate for (and sends as SNI);
        default ``address``.
    :param maxsize: idle connections kept at most.
    :param idle_timeout: seconds after which an idle connection is not reused.
    :param connect_timeout: default seconds to wait for a connection.
    :param read_timeout: default seconds to wait for each read or write.
    :param ssl_context: for ``https``; default ``ssl.create_default_context()``
        (certificates verified against the system's CAs, host name checked).
    """

    def __init__(
        self,
        scheme: str,
        address: str,
        port: int,
        *,
        server_hostname: str | None = None,
        maxsize: int = 8,
        idle_timeout: float = 4.0,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        self.scheme = scheme
        self.address = address
        self.port = port
        self.server_hostname = server_hostname or address
        self.maxsize = maxsize
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl_context = None
        if scheme == "https":
            self.ssl_context = ssl_context or ssl.create_default_context()
        self._idle: collections.deque[Connection] = collections.deque()
        self._closed = False

    def __repr__(self) -> str:
        return f"ConnectionPool({self.scheme}://{self.address}:{self.port})"

    @property
    def idle(self) -> int:
        """Connections waiting in the pool."""
        return len(self._idle)

    # -- connections -------------------------------------------------------------------------

    def _connect(self, timeout: float) -> Connection:
        try:
            sock = socket.create_connection((self.address, self.port), timeout=timeout)
        except TimeoutError as exc:
            raise ConnectTimeout(f"no connection to {self.address}:{self.port} within "
                                 f"{timeout}s") from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.address}:{self.port}: {exc}"
                                ) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                # The handshake shares the connect timeout (the socket's, still set).
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_hostname)
        except TimeoutError as exc:
            sock.close()
            raise ConnectTimeout(f"no TLS connection to {self.address}:{self.port} within "
                                 f"{timeout}s") from exc
        except OSError as exc:  # ssl.SSLError (certificate refused…) is an OSError
            sock.close()
            raise ConnectFailed(f"TLS with {self.address}:{self.port} failed: {exc}"
                                ) from exc
        return Connection(sock, self)

    def _take(self) -> Connection | None:
        """The most recently used idle connection still fit for a request, or ``None``."""
        idle = self._idle
        while True:
            try:
                conn = idle.pop()
            except IndexError:
                return None
            if (time.monotonic() - conn.idle_since > self.idle_timeout
                    or _readable(conn.sock)):
                conn.close()  # too old, closed by the peer, or bytes nobody asked for
                continue
            return conn

    def put(self, conn: Connection) -> None:
        """Keep ``conn`` for another request (the caller checked it is clean)."""
        if self._closed:
            conn.close()
            return
        idle = self._idle
        now = time.monotonic()
        conn.idle_since = now
        idle.append(conn)
        if self._closed:  # closed meanwhile: close() may have drained the deque already
            self.close()
            return
        # Drop what can no longer be used: the oldest past idle_timeout, then any beyond
        # maxsize (the least recently used ones: LIFO keeps the hot ones on the right).
        try:
            while len(idle) > self.maxsize or now - idle[0].idle_since > self.idle_timeout:
                idle.popleft().close()
        except IndexError:
            pass  # another thread took the last one meanwhile

    def close(self) -> None:
        """Close every idle connection; ones in use close when given back."""
        self._closed = True
        while True:
            try:
                self._idle.pop().close()
            except IndexError:
                return

    # -- one exchange ------------------------------------------------------------------------

    def request(
        self,
        method: str,
        target: str,
        headers: t.Mapping[str, str],
        body: t.Any = None,
        *,
        chunked: bool = False,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> GuardedResponse:
        """Send one request and read the answer's head; the caller reads the body
        (``read1``) and calls :func:`release`. On any error the connection is closed."""
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        count = len(lines)
        # Exactly one CRLF per line and no NUL: a value holding CR or LF would split the
        # head (header injection into the upstream request).
        if head.count("\n") != count or head.count("\r") != count or "\0" in head:
            raise ValueError("invalid character in the request line or a header")
        data = head.encode("latin-1")
        if read_timeout is None:
            read_timeout = self.read_timeout
        conn = self._take()
        if conn is None:
            conn = self._connect(self.connect_timeout if connect_timeout is None
                                 else connect_timeout)
        cut = False
        try:
            sock = conn.sock
            conn.set_timeout(read_timeout)
            if body is None:
                sock.sendall(data)
            elif isinstance(body, (bytes, bytearray)) and len(body) < 65536:
                sock.sendall(data + body)  # one write for a small request
            else:
                sock.sendall(data)
                try:
                    _send_body(sock, body, chunked)
                except (BrokenPipeError, ConnectionResetError):
                    # The upstream may answer before reading the whole body (a 413, a
                    # 401) and close: its answer, if it sent one, is still the one to pass
                    # on (and if it did not, reading it fails as it would have).
                    cut = True
            response = GuardedResponse(conn, method=method)
            response.begin()
            if cut:
                response.will_close = True  # the body was not sent whole
        except (TimeoutError, BlockingIOError) as exc:  # BlockingIOError: SO_SNDTIMEO
            conn.close()
            raise ReadTimeout(f"{self.address}:{self.port}: no answer within "
                              f"{read_timeout}s") from exc
        except BaseException:
            conn.close()
            raise
        response.connection = conn
        return response


def _send_body(sock: socket.socket, body: t.Any, chunked: bool) -> None:
    if isinstance(body, (bytes, bytearray)):
        sock.sendall(body)
    elif chunked:
        for piece in body:
            if piece:
                sock.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
        sock.sendall(_LAST_CHUNK)
    else:
        for piece in body:
            sock.sendall(piece)


def release(response: GuardedResponse) -> None:
    """Done with ``response``: its connection back to its pool if the body was read to its
    exact end, the answer allows keep-alive and nothing came after it; else closed."""
    conn = getattr(response, "connection", None)
    if conn is None:
        return
    response.connection = None
    if response.complete and not response.will_close and not conn.leftover():
        conn.pool.put(conn)
        return
    response.close()
    conn.close()


def read_body(response: GuardedResponse, limit: int, chunk_size: int = 65536) -> bytes:
    """Up to ``limit`` bytes of ``response``'s body (the health checks' reader); the
    connection is released (closed when more was left)."""
    parts: list[bytes] = []
    size = 0
    try:
        while size <= limit:
            piece = response.read1(chunk_size)
            if not piece:
                break
            parts.append(piece)
            size += len(piece)
    finally:
        release(response)
    return b"".join(parts)[:limit]
