"""The lean upstream client (:mod:`meetinity_gateway.proxy.client`) against real sockets.

A raw-socket upstream (:class:`tests.rawkit.ScriptedUpstream`) that numbers its connections
shows whether a connection was reused; TLS against a loopback server with a certificate from
a throw-away CA; streaming latency through a real waitress in lock-step with the upstream.
"""
from __future__ import annotations

import datetime
import http.client
import socket
import ssl
import sys
import threading
import time

import pytest

from meetinity_gateway.proxy.app import ProxyApp
from meetinity_gateway.proxy.client import (
    ConnectFailed,
    ConnectionPool,
    ConnectTimeout,
    ReadTimeout,
    release,
)
from meetinity_gateway.proxy.targets import parse_targets
from meetinity_gateway.proxy.upstream import UpstreamPool
from tests.rawkit import ScriptedUpstream, response
from tests.servers import WaitressServer

LEAKED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nleaked"


def _pool(upstream: ScriptedUpstream, **kwargs) -> ConnectionPool:
    return ConnectionPool("http", upstream.host, upstream.port, **kwargs)


def _get(pool: ConnectionPool, path: str, **kwargs) -> tuple[int, bytes]:
    answer = pool.request("GET", path, {"Host": "upstream.test"}, **kwargs)
    parts = []
    try:
        while True:
            piece = answer.read1(65536)
            if not piece:
                break
            parts.append(piece)
    finally:
        release(answer)
    return answer.status, b"".join(parts)


def _chunked(body: bytes) -> bytes:
    return (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"


# -- a connection is reused only after an answer read to its exact end -----------------------

@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("when", ["none", "same-write", "later"])
def test_bytes_after_a_complete_answer_keep_the_connection_from_reuse(framing, when):
    def handler(request, conn):
        if request.path != "/first":
            conn.send(response(body=request.path.encode()))
            return
        if framing == "length":
            answer = response(body=b"hello")
        else:
            answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + _chunked(b"hello"))
        if when == "same-write":
            conn.send(answer + LEAKED)
        else:
            conn.send(answer)
        if when == "later":
            conn.pause(0.2)  # the client has read its answer and pooled the connection
            conn.send(LEAKED)

    with ScriptedUpstream(handler) as upstream:
        pool = _pool(upstream)
        try:
            assert _get(pool, "/first") == (200, b"hello")
            time.sleep(0.5)
            assert _get(pool, "/second") == (200, b"/second")  # never "leaked"
        finally:
            pool.close()
    first, second = upstream.requests
    if when == "none":
        assert second.conn == first.conn  # a clean answer: the connection is kept
    else:
        assert second.conn != first.conn


def test_a_body_cut_short_is_an_error_and_the_connection_closed():
    def handler(request, conn):
        if request.path == "/short":
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            conn.close()
        else:
            conn.send(response(body=b"ok"))

    with ScriptedUpstream(handler) as upstream:
        pool = _pool(upstream)
        try:
            with pytest.raises(http.client.IncompleteRead):
                _get(pool, "/short")
            assert pool.idle == 0
            assert _get(pool, "/next") == (200, b"ok")
        finally:
            pool.close()
    assert [r.conn for r in upstream.requests] == [1, 2]


def test_idle_connections_older_than_idle_timeout_are_not_reused():
    with ScriptedUpstream() as upstream:
        recycling, keeping = _pool(upstream, idle_timeout=0.2), _pool(upstream, idle_timeout=30)
        try:
            for pool in (recycling, keeping):
                _get(pool, "/a")
            time.sleep(0.4)
            for pool in (recycling, keeping):
                _get(pool, "/b")
        finally:
            recycling.close()
            keeping.close()
    conns = {r.target: [] for r in upstream.requests}
    for request in upstream.requests:
        conns[request.target].append(request.conn)
    (a_recycling, a_keeping), (b_recycling, b_keeping) = conns["/a"], conns["/b"]
    assert b_recycling not in (a_recycling, a_keeping)  # a new connection
    assert b_keeping == a_keeping


def test_the_pool_keeps_at_most_maxsize_idle_connections():
    with ScriptedUpstream() as upstream:
        pool = _pool(upstream, maxsize=2)
        try:
            answers = [pool.request("GET", f"/{n}", {"Host": "x"}) for n in range(4)]
            for answer in answers:
                assert answer.read1(100)
                release(answer)
            assert pool.idle == 2
        finally:
            pool.close()
        assert pool.idle == 0


# -- bodies sent ------------------------------------------------------------------------------

def test_streamed_bodies_go_as_sized_or_chunked():
    pieces = [b"a" * 70000, b"", b"b" * 10, b"c" * 5000]
    whole = b"".join(pieces)
    with ScriptedUpstream() as upstream:
        pool = _pool(upstream)
        try:
            _get_with = pool.request("PUT", "/sized", {"Host": "x", "Content-Length":
                                                       str(len(whole))}, iter(pieces))
            release(_get_with)
            chunked = pool.request("POST", "/chunked", {"Host": "x"}, iter(pieces),
                                   chunked=True)
            release(chunked)
            big = pool.request("POST", "/bytes", {"Host": "x", "Content-Length":
                                                  str(len(whole))}, whole)
            release(big)
        finally:
            pool.close()
    sized, chunked_request, raw = upstream.requests
    assert sized.body == chunked_request.body == raw.body == whole
    assert chunked_request.header("Transfer-Encoding") == ["chunked"]
    assert not chunked_request.header("Content-Length")
    assert sized.header("Content-Length") == [str(len(whole))]


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\0b"])
def test_a_header_that_would_split_the_request_is_refused_before_sending(value):
    with ScriptedUpstream() as upstream:
        pool = _pool(upstream)
        try:
            with pytest.raises(ValueError):
                pool.request("GET", "/", {"Host": "x", "X-Bad": value})
            with pytest.raises(ValueError):
                pool.request("GET", "/a b\r\nX: 1", {"Host": "x"})
        finally:
            pool.close()
        time.sleep(0.1)
    assert upstream.requests == []


# -- errors ------------------------------------------------------------------------------------

def test_refused_is_connect_failed_and_silence_a_read_timeout():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(ConnectFailed):
        ConnectionPool("http", "127.0.0.1", port).request("GET", "/", {"Host": "x"})

    with ScriptedUpstream(lambda request, conn: conn.pause(2)) as upstream:
        pool = _pool(upstream, read_timeout=0.3)
        try:
            with pytest.raises(ReadTimeout):
                pool.request("GET", "/", {"Host": "x"})
            assert pool.idle == 0
        finally:
            pool.close()


def test_a_reused_connection_still_times_out_with_each_requests_own_timeout():
    # The timeout lives on the socket (the kernel's on plain TCP): a kept connection must
    # still time out, and with the timeout of the request that uses it.
    def handler(request, conn):
        if request.path == "/slow":
            conn.pause(2)
        conn.send(response(body=request.path.encode()))

    with ScriptedUpstream(handler) as upstream:
        pool = _pool(upstream, read_timeout=5)
        try:
            assert _get(pool, "/a") == (200, b"/a")
            assert _get(pool, "/b", read_timeout=3) == (200, b"/b")
            with pytest.raises(ReadTimeout):
                pool.request("GET", "/slow", {"Host": "x"}, read_timeout=0.3)
            assert pool.idle == 0
            assert _get(pool, "/c") == (200, b"/c")
        finally:
            pool.close()
    first, second, slow, last = upstream.requests
    assert first.conn == second.conn == slow.conn != last.conn


def test_a_body_that_stalls_mid_stream_times_out():
    def handler(request, conn):
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf-")
        conn.pause(2)

    with ScriptedUpstream(handler) as upstream:
        pool = _pool(upstream, read_timeout=0.3)
        try:
            answer = pool.request("GET", "/", {"Host": "x"})
            assert answer.read1(65536) == b"half-"
            with pytest.raises(TimeoutError):
                answer.read1(65536)
            release(answer)
            assert pool.idle == 0
        finally:
            pool.close()


def test_a_pooled_connection_the_upstream_closed_is_not_reused():
    # Checked when taken from the pool: a request sent on it could not be retried safely.
    def handler(request, conn):
        conn.send(response(body=request.path.encode()))
        if request.path == "/then-close":
            conn.pause(0.1)
            conn.close()

    with ScriptedUpstream(handler) as upstream:
        pool = _pool(upstream)
        try:
            assert _get(pool, "/then-close") == (200, b"/then-close")
            time.sleep(0.5)
            assert _get(pool, "/next") == (200, b"/next")
        finally:
            pool.close()
    first, second = upstream.requests
    assert first.conn != second.conn


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="Linux leaves SYNs to a full backlog unanswered; others refuse")
def test_no_handshake_within_connect_timeout_is_a_connect_timeout():
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(0)
        port = blocker.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            pool = ConnectionPool("http", "127.0.0.1", port, connect_timeout=0.3)
            started = time.monotonic()
            with pytest.raises(ConnectTimeout):
                pool.request("GET", "/", {"Host": "x"})
            assert time.monotonic() - started < 5
        finally:
            for filler in fillers:
                filler.close()


# -- HTTPS: certificate verification, SNI of the configured name -----------------------------

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        "users.upstream.test")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("users.upstream.test")]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return folder


class _TLSUpstream:
    """Answers every request on a TLS connection with 200 and the SNI name it was given."""

    def __init__(self, folder, keep_alive: bool = False) -> None:
        self.keep_alive = keep_alive
        self.connections = 0
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
        self.names: list[str | None] = []
        self.context.sni_callback = lambda sock, name, context: self.names.append(name)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            raw.settimeout(5)
            self.connections += 1
            try:
                with self.context.wrap_socket(raw, server_side=True) as sock:
                    while True:  # requests without a body, one after the other
                        head = b""
                        while b"\r\n\r\n" not in head:
                            data = sock.recv(65536)
                            if not data:
                                return
                            head += data
                        body = (self.names[-1] or "").encode()
                        headers = [] if self.keep_alive else [("Connection", "close")]
                        sock.sendall(response(body=body, headers=headers))
                        if not self.keep_alive:
                            break
            except (OSError, ssl.SSLError):
                pass  # a client that refused our certificate
            finally:
                raw.close()

    def __enter__(self) -> _TLSUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


def test_https_verifies_the_certificate_for_the_configured_name(tls_files):
    trusting = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
    with _TLSUpstream(tls_files) as upstream:
        right = ConnectionPool("https", "127.0.0.1", upstream.port,
                               server_hostname="users.upstream.test", ssl_context=trusting)
        assert _get(right, "/") == (200, b"users.upstream.test")
        wrong_name = ConnectionPool("https", "127.0.0.1", upstream.port,
                                    server_hostname="other.upstream.test",
                                    ssl_context=trusting)
        with pytest.raises(ConnectFailed, match="certificate|hostname"):
            _get(wrong_name, "/")
        # The default context trusts the system's CAs only: a self-made CA is refused.
        untrusted = ConnectionPool("https", "127.0.0.1", upstream.port,
                                   server_hostname="users.upstream.test")
        assert untrusted.ssl_context.verify_mode == ssl.CERT_REQUIRED
        with pytest.raises(ConnectFailed, match="certificate"):
            _get(untrusted, "/")


def test_https_connections_are_kept_alive(tls_files):
    trusting = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
    with _TLSUpstream(tls_files, keep_alive=True) as upstream:
        pool = ConnectionPool("https", "127.0.0.1", upstream.port,
                              server_hostname="users.upstream.test", ssl_context=trusting)
        try:
            for _ in range(5):
                assert _get(pool, "/") == (200, b"users.upstream.test")
                time.sleep(0.05)
        finally:
            pool.close()
    assert upstream.connections == 1


def test_an_https_target_by_name_connects_to_its_address_with_the_name_as_sni(tls_files):
    trusting = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
    with _TLSUpstream(tls_files) as upstream:
        pool = UpstreamPool(
            parse_targets(f"https://users.upstream.test:{upstream.port}"),
            resolver=lambda host, port: ["127.0.0.1"], ssl_context=trusting,
        )
        app = ProxyApp(pool)
        try:
            with WaitressServer(app) as server:
                with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                    sock.sendall(b"GET /x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
                    data = b""
                    while True:
                        piece = sock.recv(65536)
                        if not piece:
                            break
                        data += piece
        finally:
            app.close()
    assert data.startswith(b"HTTP/1.1 200 ")
    assert data.endswith(b"users.upstream.test")
    assert pool.targets[0].address == "127.0.0.1"


# -- streaming latency: pieces go on as they come -----------------------------------------------

PIECES = 10


@pytest.mark.parametrize("framing", ["length", "close", "chunked"])
def test_an_answer_written_in_small_pieces_reaches_the_client_piece_by_piece(framing):
    """The upstream writes ten small pieces 200 ms apart and writes the next one only once
    the client has received the previous one (at most 5 s each): a proxy that waited for a
    fuller buffer (64 KiB, or the end) would stall the exchange."""
    pieces = [b"event %02d;" % n for n in range(PIECES)]
    seen = [threading.Event() for _ in pieces]
    delays: list[float] = []
    timely: list[bool] = []

    def handler(request, conn):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        if framing == "length":
            head += b"Content-Length: %d\r\n" % sum(map(len, pieces))
        elif framing == "chunked":
            head += b"Transfer-Encoding: chunked\r\n"
        else:
            head += b"Connection: close\r\n"
        conn.send(head + b"\r\n")
        for piece, event in zip(pieces, seen):
            conn.pause(0.2)
            sent = time.monotonic()
            conn.send(b"%x\r\n%b\r\n" % (len(piece), piece) if framing == "chunked" else piece)
            timely.append(event.wait(5))
            delays.append(time.monotonic() - sent)
        if framing == "chunked":
            conn.send(b"0\r\n\r\n")
        if framing == "close":
            conn.close()

    with ScriptedUpstream(handler) as upstream:
        app = ProxyApp(upstream.url, read_timeout=10)
        try:
            with WaitressServer(app) as server:
                received = b""
                with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                    sock.sendall(b"GET /events HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
                    while True:
                        data = sock.recv(65536)
                        if not data:
                            break
                        received += data
                        for piece, event in zip(pieces, seen):
                            if piece in received:
                                event.set()
        finally:
            app.close()
    assert received.startswith(b"HTTP/1.1 200 ")
    assert all(piece in received for piece in pieces)
    assert timely == [True] * PIECES, f"pieces held back; delays {delays}"


def test_an_answer_sent_before_the_whole_body_was_read_is_passed_on():
    """An upstream refusing an upload early (413) and closing: the client gets the 413, not
    a 502 for the body it could not finish sending."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            conn.sendall(response(413, b"too big", [("Connection", "close")],
                                  reason="Content Too Large"))
            conn.shutdown(socket.SHUT_WR)
            time.sleep(0.3)  # then close with the body unread: the client's writes fail

    thread = threading.Thread(target=serve)
    thread.start()
    pool = ConnectionPool("http", "127.0.0.1", listener.getsockname()[1])
    size = 32 * 1024 * 1024
    try:
        answer = pool.request("PUT", "/upload", {"Host": "x", "Content-Length": str(size)},
                              iter([b"x" * 65536] * (size // 65536)))
        assert (answer.status, answer.read1(100)) == (413, b"too big")
        assert answer.will_close
        release(answer)
        assert pool.idle == 0
    finally:
        pool.close()
        thread.join(5)
        listener.close()
