"""The strict upstream response reader (:mod:`meetinity_gateway.proxy.wire`), alone.

Responses are read from bytes through the real :class:`http.client.HTTPResponse` machinery
(a socket stand-in that only hands out its bytes). Hypothesis generates header lines, status
lines and interim sequences; the expected verdict comes from a reference written
independently of the module's regular expressions. End-to-end cases are in
``tests/test_proxy_hostile.py``.
"""
from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meetinity_gateway.proxy.wire import MAX_INTERIM, GuardedResponse, InvalidUpstreamResponse

TCHAR = set(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
PROPERTY = settings(max_examples=300, deadline=None, print_blob=True)


class _Sock:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode, *args, **kwargs):
        return io.BufferedReader(io.BytesIO(self._data))


def read(data: bytes, method: str = "GET") -> GuardedResponse:
    response = GuardedResponse(_Sock(data), method=method)
    response.begin()
    return response


def final(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def valid_field(name: bytes, value: bytes) -> bool:
    return (bool(name) and all(byte in TCHAR for byte in name)
            and not any(byte < 0x20 and byte != 0x09 or byte == 0x7f for byte in value))


# -- interim responses --------------------------------------------------------------------

interim_status = st.integers(100, 199).filter(lambda code: code != 101)
interim_head = st.builds(
    lambda code, links: b"HTTP/1.1 %d Interim\r\n" % code
    + b"".join(b"Link: </%d>; rel=preload\r\n" % n for n in range(links)) + b"\r\n",
    interim_status, st.integers(0, 3))


@PROPERTY
@given(st.lists(interim_head, max_size=MAX_INTERIM), st.binary(max_size=300))
def test_any_interim_sequence_is_read_past_to_the_final_answer(heads, body):
    response = read(b"".join(heads) + final(body))
    assert response.status == 200
    assert response.interim == len(heads)
    assert response.read() == body
    assert response.isclosed()  # read to its exact end: the connection may be reused


def test_too_many_interim_responses_are_refused():
    with pytest.raises(InvalidUpstreamResponse, match="interim"):
        read(b"HTTP/1.1 102 Processing\r\n\r\n" * (MAX_INTERIM + 1) + final())


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n\r\n",
])
def test_unrequested_101_is_refused(head):
    with pytest.raises(InvalidUpstreamResponse, match="101"):
        read(head + final())


def test_bad_interim_head_is_refused():
    with pytest.raises(InvalidUpstreamResponse):
        read(b"HTTP/1.1 103 Early Hints\r\nLink: a\rb\r\n\r\n" + final())


def test_hundred_continue_and_head_request():
    response = read(b"HTTP/1.1 100 Continue\r\n\r\n" + final(b"ignored"), method="HEAD")
    assert response.status == 200 and response.read() == b"" and response.isclosed()


# -- header bytes ----------------------------------------------------------------------------

name_bytes = st.binary(max_size=12) | st.text(
    "abcXYZ-_!#$%&'*+.^`|~ \t:()<>@,;\\\"/[]?={}\x00\x7f", max_size=12).map(
        lambda text: text.encode("latin-1"))
# No LF: on the wire an LF ends the line (bare-LF lines are tested on their own below).
value_bytes = (st.binary(max_size=30) | st.text(
    "ab c\t\r\x00\x01\x0b\x1f\x7f\x80\xe9\xff:;=", max_size=30).map(
        lambda text: text.encode("latin-1"))).map(lambda value: value.replace(b"\n", b""))


@PROPERTY
@given(name_bytes, value_bytes)
def test_a_header_line_passes_exactly_or_is_refused(name, value):
    line = b"X-" + name + b":" + value + b"\r\n"
    name, _, value = line[:-2].partition(b":")  # the field name ends at the first colon
    try:
        response = read(final(extra=line))
    except InvalidUpstreamResponse:
        assert not valid_field(name, value), line
        return
    assert valid_field(name, value), line
    got = response.msg.get_all(name.decode("latin-1"))
    assert got == [value.decode("latin-1").lstrip(" \t")]
    assert response.read() == b"hello"


@pytest.mark.parametrize("line", [
    b"X-A: b\nX-Injected: 1\r\n",  # bare LF ending a line
    b"X-A: b\r\n continued\r\n",  # obs-fold
    b"X-A: b\r\n\tcontinued\r\n",
    b"garbage\r\n",
    b": empty-name\r\n",
])
def test_structural_header_faults_are_refused(line):
    with pytest.raises(InvalidUpstreamResponse):
        read(final(extra=line))


@PROPERTY
@given(st.integers(200, 999), st.binary(max_size=20).map(lambda r: r.replace(b"\n", b"")))
def test_a_status_line_passes_exactly_or_is_refused(code, reason):
    head = b"HTTP/1.1 %d %s\r\n" % (code, reason)
    valid = (200 <= code <= 599
             and not any(byte < 0x20 and byte != 0x09 or byte == 0x7f for byte in reason))
    try:
        response = read(head + b"Content-Length: 0\r\n\r\n")
    except InvalidUpstreamResponse:
        assert not valid
        return
    assert valid
    assert response.status == code
    assert response.reason == reason.decode("latin-1").strip()


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n",  # cut short
    b"HTTP/1.1 200 OK\nContent-Length: 5\r\n\r\n",  # status line ended by a bare LF
    b"HTTP/2 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"ICY 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\n",  # blank line a bare LF
])
def test_bad_heads_are_refused(head):
    with pytest.raises(InvalidUpstreamResponse):
        read(head + b"hello")


def test_remote_closing_before_a_status_line_stays_a_disconnect():
    import http.client

    with pytest.raises(http.client.RemoteDisconnected):
        read(b"")


# -- framing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Content-Length: 5, 6\r\n",
    b"Content-Length: 5, 5\r\n",  # legal, but forwarded as is a client may misread it
    # Equal repeated lines: refused like the server refuses them in a request (issue 23: one
    # grammar for both directions); accepted before.
    b"Content-Length: 5\r\nContent-Length: 5\r\n",
    b"Content-Length: 0000000000000000005\r\n",  # 19 digits: the server's limit too
    b"Content-Length: +5\r\n",
    b"Content-Length: 5_0\r\n",
    b"Content-Length: -5\r\n",
    b"Content-Length: 0x5\r\n",
    b"Content-Length: \r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked, chunked\r\n",
])
def test_ambiguous_framing_is_refused(headers):
    with pytest.raises(InvalidUpstreamResponse):
        read(b"HTTP/1.1 200 OK\r\n" + headers + b"\r\n5\r\nhello\r\n0\r\n\r\n")


# -- chunked bodies: the server's rules (issue 23); the stdlib's reader accepted them all ------

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("body", [
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"-0\r\n\r\n",
    b" 5\r\nhello\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",
    b"0_5\r\nhello\r\n0\r\n\r\n",
    b"\r\n5\r\nhello\r\n0\r\n\r\n",  # empty chunk-size line
    b"5\nhello\r\n0\r\n\r\n",  # bare LF ends the size line
    b"5\r\nhelloXX0\r\n\r\n",  # chunk data not followed by CRLF
    b"5;a b\r\nhello\r\n0\r\n\r\n",  # malformed extension
    b"5 ;a=b\r\nhello\r\n0\r\n\r\n",
    b"%x\r\n" % (1 << 64) + b"hello\r\n0\r\n\r\n",  # 17 hex digits
    b"5;" + b"a" * 5000 + b"\r\nhello\r\n0\r\n\r\n",  # chunk line too long
    b"5\r\nhello\r\n0\r\nX-T: a\x00b\r\n\r\n",  # control byte in a trailer
    b"5\r\nhello\r\n0\r\nX-T: a\r\n folded\r\n\r\n",  # obs-fold in a trailer
    b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\n",  # bare LF ends the trailer section
])
def test_sloppy_chunked_bodies_are_refused(body):
    response = read(CHUNKED_HEAD + body)
    with pytest.raises(InvalidUpstreamResponse):
        response.read()
    assert not response.complete


@pytest.mark.parametrize("body", [
    b"5\r\nhello\r\n0\r\n\r\n",
    b"05;a=b;c=\"d e\"\r\nhello\r\n000\r\n\r\n",
    b"5\r\nhello\r\n0\r\nX-Trailer: a\tb\r\nX-Other: c\r\n\r\n",
    b"000000000000000A\r\nhellohello\r\n0\r\n\r\n",  # 16 hex digits
])
def test_strict_chunked_bodies_pass(body):
    response = read(CHUNKED_HEAD + body)
    assert response.read() in (b"hello", b"hellohello") and response.isclosed()


def test_chunked_body_cut_short_is_incomplete():
    import http.client

    for body in (b"5\r\nhel", b"5\r\nhello", b"5\r\nhello\r", b"5\r\nhello\r\n",
                 b"5\r\nhello\r\n0", b"5\r\nhello\r\n0\r\n", b"5\r\nhello\r\n0\r\nX-T: 1\r\n"):
        response = read(CHUNKED_HEAD + body)
        with pytest.raises(http.client.IncompleteRead):
            response.read()


def test_transfer_encoding_in_http10_is_refused():
    with pytest.raises(InvalidUpstreamResponse, match="HTTP/1.0"):
        read(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")


@pytest.mark.parametrize("head, body, method", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     b"hello", "GET"),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", b"", "GET"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", b"", "HEAD"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello", "GET"),
])
def test_well_framed_answers_pass(head, body, method):
    response = read(head, method=method)
    assert response.read() == body
    assert response.isclosed()


@pytest.mark.parametrize("head, method", [
    (b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", "GET"),
    (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "HEAD"),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", "GET"),
])
def test_bodyless_answers_framed_as_having_a_body_read_nothing_and_close(head, method):
    # Nothing follows the head: reading a body would wait for the read timeout.
    response = read(head, method=method)
    assert response.isclosed() and response.read() == b""
    assert response.will_close


def test_bodyless_answers_keep_the_connection_when_plain():
    response = read(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\n\r\n")
    assert response.isclosed() and not response.will_close


def test_every_upstream_pool_reads_with_the_guarded_response():
    import socket
    import ssl
    import threading

    from meetinity_gateway.proxy.client import ConnectionPool, release
    from meetinity_gateway.proxy.targets import parse_targets
    from meetinity_gateway.proxy.upstream import UpstreamPool

    pool = UpstreamPool(parse_targets("http://127.0.0.1:9, https://127.0.0.1:10"))
    try:
        plain, tls = (target.pool for target in pool.targets)
        assert isinstance(plain, ConnectionPool) and isinstance(tls, ConnectionPool)
        assert plain.ssl_context is None
        assert tls.ssl_context.verify_mode == ssl.CERT_REQUIRED
        assert tls.ssl_context.check_hostname
    finally:
        pool.close()
    # And on a real socket: the interim answer is read past by the guarded reader.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + final())

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = ConnectionPool("http", "127.0.0.1", listener.getsockname()[1])
        response = client.request("GET", "/", {"Host": "x"})
        assert isinstance(response, GuardedResponse)
        assert (response.status, response.interim, response.read1(100)) == (200, 1, b"hello")
        release(response)
        client.close()
    finally:
        thread.join(5)
        listener.close()
