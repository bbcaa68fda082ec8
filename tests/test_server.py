"""The hardened waitress server ``serve`` builds: request framing (smuggling), over-limit
bodies, lingering close — raw sockets against the shipped gateway and a recording upstream."""
from __future__ import annotations

import http.client
import json
import logging
import time

import pytest

from tests.conftest import wait_until
from tests.rawkit import RawClient, json_error
from tests.servers import WaitressServer

SMUGGLED = b"GET /api/auth/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


def refused(gateway, upstream, raw: bytes, code: int = 400) -> dict:
    """Send ``raw`` (+ a smuggled request); the answer is ``code`` in the JSON shape, the
    connection closes, and nothing reaches the upstream."""
    with RawClient(gateway.url) as client:
        client.send(raw + SMUGGLED)
        data, closed = client.read_until_close()
    assert closed, f"connection kept open after {raw!r}"
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % code) or head.startswith(b"HTTP/1.0 %d " % code), \
        (raw, data)
    assert b"connection: close" in head.lower()
    assert b"content-type: application/json" in head.lower()
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert len(body) == length, "more than one answer came back"
    error = json_error(body)
    assert error["code"] == code and error["request_id"]
    time.sleep(0.05)
    assert not any("smuggled" in target for _, target, _ in upstream.requests)
    assert upstream.requests == [], upstream.requests
    return error


def post(headers: bytes, body: bytes = b"0\r\n\r\n", version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST /api/auth/x " + version + b"\r\n" + headers + b"\r\n" + body


# -- CL + TE, every spelling ------------------------------------------------------------------

TE_SPELLINGS = [b"chunked", b"Chunked", b"CHUNKED", b"chunked ", b" chunked", b"\tchunked",
                b"gzip, chunked", b"chunked\t", b"identity, chunked"]


@pytest.mark.parametrize("coding", TE_SPELLINGS)
def test_content_length_with_transfer_encoding_is_refused(gateway, upstream, coding):
    raw = post(b"Host: a\r\nContent-Length: 5\r\nTransfer-Encoding: " + coding + b"\r\n")
    error = refused(gateway, upstream, raw)
    assert "Content-Length and Transfer-Encoding" in error["message"]


def test_te_before_content_length_is_refused_too(gateway, upstream):
    refused(gateway, upstream, post(b"Host: a\r\nTransfer-Encoding: chunked\r\n"
                                    b"Content-Length: 5\r\n"))


@pytest.mark.parametrize("headers", [
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\ntransfer-encoding: identity\r\n",
])
def test_duplicated_transfer_encoding_is_refused(gateway, upstream, headers):
    refused(gateway, upstream, post(b"Host: a\r\n" + headers))


@pytest.mark.parametrize("version", [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9",
                                     b"HTTP/3.0"])
def test_transfer_encoding_outside_http_1_1_is_refused(gateway, upstream, version):
    raw = post(b"Host: a\r\nTransfer-Encoding: chunked\r\n", version=version)
    error = refused(gateway, upstream, raw)
    assert "HTTP/1.1" in error["message"]


@pytest.mark.parametrize("coding", [b"gzip", b"identity", b"chunked, gzip", b"chunked, chunked",
                                    b"chunked,", b", chunked", b"x-chunked", b"chunked;q=1",
                                    b'"chunked"', b"chunked\x0b"])
def test_final_coding_other_than_one_chunked_is_refused(gateway, upstream, coding):
    refused(gateway, upstream, post(b"Host: a\r\nTransfer-Encoding: " + coding + b"\r\n"))


def test_a_coding_before_chunked_is_refused(gateway, upstream):
    # RFC 9112 allows 501 here; client garbage never gets a 5xx from the gateway.
    refused(gateway, upstream, post(b"Host: a\r\nTransfer-Encoding: gzip, chunked\r\n"), 400)


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9"])
def test_other_http_versions_are_not_supported(gateway, upstream, version):
    refused(gateway, upstream, b"GET /api/auth/x " + version + b"\r\nHost: a\r\n\r\n", 400)


# -- Content-Length ---------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    b"Content-Length: 1\r\nContent-Length: 1\r\n",
    b"Content-Length: 1\r\nContent-Length: 2\r\n",
    b"Content-Length: 1, 1\r\n",
    b"Content-Length: +5\r\n",
    b"Content-Length: 0x5\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: 5 5\r\n",
    b"Content-Length: 1e3\r\n",
    b"Content-Length: \r\n",
    b"Content-Length: " + b"9" * 40 + b"\r\n",
    b"Content-Length: 0000000000000000005\r\n",  # 19 digits (the upstream reader's limit too)
    b"Content-Length: \xd9\xa5\r\n",  # an Arabic-Indic digit five
])
def test_bad_or_duplicated_content_length_is_refused(gateway, upstream, headers):
    refused(gateway, upstream, post(b"Host: a\r\n" + headers, body=b"hello"))


# -- Host, folding, stray CR/LF, request line ------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"GET /api/auth/x HTTP/1.1\r\n\r\n",
    b"GET /api/auth/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /api/auth/x HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
    b"GET /api/auth/x HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /api/auth/x HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET /api/auth/x HTTP/1.1\r\nHost: a/b\r\n\r\n",
    b"GET /api/auth/x HTTP/1.1\r\nHost: user@a\r\n\r\n",
])
def test_missing_duplicated_or_invalid_host_is_refused(gateway, upstream, raw):
    refused(gateway, upstream, raw)


@pytest.mark.parametrize("raw", [
    # obs-fold hides a header from one parser and not the other
    b"GET /api/auth/x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n",
    b"GET /api/auth/x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\tfolded\r\n\r\n",
    # whitespace between name and colon
    b"POST /api/auth/x HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\nhello",
    b"POST /api/auth/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n",
    # bare CR or LF inside the header block
    b"GET /api/auth/x HTTP/1.1\r\nHost: a\r\nX-A: 1\rTransfer-Encoding: chunked\r\n\r\n",
    b"GET /api/auth/x HTTP/1.1\r\nHost: a\r\nX-A: 1\nContent-Length: 5\r\n\r\n",
    b"GET /api/auth/x HTTP/1.1\nHost: a\r\n\r\n",
    b"GET /api/auth/x\rHTTP/1.1\r\nHost: a\r\n\r\n",
    # request-line oddities
    b"GET /api/auth/x HTTP/1.1 \r\nHost: a\r\n\r\n",
    b"GET  /api/auth/x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /api/auth/x http/1.1\r\nHost: a\r\n\r\n",
    b"GET /api/auth/x\r\nHost: a\r\n\r\n",
    b"get /api/auth/x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /api/auth/x HTTP/1.1\r\n: nameless\r\nHost: a\r\n\r\n",
    b"GET /api/auth/x HTTP/1.1\r\nHost: a\r\nX-\x00: 1\r\n\r\n",
    b"GET /api/auth/x HTTP/1.1\r\nHost: a\r\nX-A: 1\x00\r\n\r\n",
])
def test_folding_whitespace_and_stray_line_ends_are_refused(gateway, upstream, raw):
    refused(gateway, upstream, raw)


CHUNK_HEAD = b"POST /api/auth/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("body", [
    b"5\nhello\r\n0\r\n\r\n",                 # bare LF ends a size line
    b"\r\n5\r\nhello\r\n0\r\n\r\n",           # empty line before a size
    b"5\r\nhello\r\n\r\n0\r\n\r\n",           # empty line between chunks
    b"5 \r\nhello\r\n0\r\n\r\n",              # whitespace after the size
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhelloXX0\r\n\r\n",                 # data longer than its size
    b"5;a b\r\nhello\r\n0\r\n\r\n",           # malformed extension
    b"5\r\nhello\r\n0\r\nX-T: 1\nX-U: 2\r\n\r\n",  # bare LF in a trailer
    b"5\r\nhello\r\n0\r\n folded\r\n\r\n",    # folded trailer
    b"11111111111111111\r\n",                 # 17 hex digits
    # The same rules as the upstream reader's (tests/test_wire.py, issue 23):
    b" 5\r\nhello\r\n0\r\n\r\n",              # whitespace before the size
    b"0_5\r\nhello\r\n0\r\n\r\n",
    b"5 ;a=b\r\nhello\r\n0\r\n\r\n",           # whitespace before an extension
    b"5;" + b"a" * 5000 + b"\r\nhello\r\n0\r\n\r\n",  # chunk line too long, CRLF and all
    b"5\r\nhello\r\n0\r\nX-T: a\x00b\r\n\r\n",  # control byte in a trailer
    b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
])
def test_sloppy_chunked_bodies_are_refused(gateway, upstream, body):
    refused(gateway, upstream, CHUNK_HEAD + body)


def test_refusals_are_json_even_for_head(gateway, upstream):
    with RawClient(gateway.url) as client:
        client.send(b"HEAD /api/auth/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        data, closed = client.read_until_close()
    assert closed and data.startswith(b"HTTP/1.1 400 ") and data.endswith(b"\r\n\r\n")


# -- what must still work ---------------------------------------------------------------------

@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b"chunked ", b"\tCHUNKED"])
def test_valid_chunked_requests_are_proxied_on_a_kept_alive_connection(gateway, upstream, coding):
    body = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n"
    with RawClient(gateway.url) as client:
        for _ in range(2):
            client.send(b"POST /api/auth/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + coding
                        + b"\r\n\r\n" + body)
            answer = client.read_response()
            status, headers, payload = answer.status, answer.fields, answer.body
            assert status == 200, payload
            assert json.loads(payload)["body_length"] == 11
            assert headers.get("connection") != "close"
    assert len(upstream.requests) == 2


def test_valid_requests_of_both_versions_are_proxied(gateway, upstream):
    with RawClient(gateway.url) as client:
        client.send(b"POST /api/auth/x HTTP/1.1\r\nHost: [::1]:8080\r\nContent-Length: 5\r\n\r\n"
                    b"helloGET /api/auth/y HTTP/1.1\r\nHost: example.com\r\n\r\n")
        assert client.read_response().status == 200
        assert client.read_response().status == 200
    with RawClient(gateway.url) as client:
        client.send(b"GET /api/auth/z HTTP/1.0\r\n\r\n")
        data, closed = client.read_until_close()
        assert closed and data.startswith(b"HTTP/1.0 200 ")
    assert [target for _, target, _ in upstream.requests] == ["/auth/x", "/auth/y", "/auth/z"]


# -- over-limit bodies --------------------------------------------------------------------------

@pytest.fixture
def small_limit_gateway(gateway_factory):
    return gateway_factory(MAX_BODY_SIZE="64k")


def _access(caplog):
    caplog.set_level(logging.INFO, logger="meetinity_gateway.access")
    return lambda: [json.loads(r.msg.to_json()) for r in caplog.records
                    if r.name == "meetinity_gateway.access"]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("factor", [1.5, 3, 8])
def test_over_limit_body_written_before_reading_gets_the_json_413(
        small_limit_gateway, upstream, caplog, chunked, factor):
    access = _access(caplog)
    size = int(64 * 1024 * factor)
    conn = http.client.HTTPConnection("127.0.0.1", small_limit_gateway.port, timeout=20)
    try:
        if chunked:
            pieces = (b"x" * 8192 for _ in range(size // 8192))
            conn.request("POST", "/api/auth/upload", body=pieces, encode_chunked=True)
        else:
            conn.request("POST", "/api/auth/upload", body=b"x" * size)
        response = conn.getresponse()  # no ConnectionResetError: the gateway read the body
        body = response.read()
    finally:
        conn.close()
    assert response.status == 413
    assert json_error(body)["code"] == 413
    assert upstream.requests == []
    wait_until(lambda: any(line["status"] == 413 for line in access()), 5)
    assert [line["status"] for line in access()] == [413]


def test_over_limit_body_closes_the_connection(small_limit_gateway, upstream):
    size = 5 * 64 * 1024
    with RawClient(small_limit_gateway.url) as client:
        client.send(b"POST /api/auth/x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        client.send(b"y" * size + SMUGGLED)
        data, closed = client.read_until_close()
    assert closed
    assert data.startswith(b"HTTP/1.1 413 ") and data.count(b"HTTP/1.1") == 1
    assert b"connection: close" in data.lower()
    assert upstream.requests == []


def test_over_limit_declared_length_is_answered_before_the_body(small_limit_gateway, upstream):
    """A client that waits for 100 Continue (or just for an answer) gets the 413 without
    sending anything."""
    with RawClient(small_limit_gateway.url) as client:
        client.send(b"POST /api/auth/x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                    b"Content-Length: 100000000\r\n\r\n")
        answer = client.read_response()
        status, headers = answer.status, answer.fields
    assert not answer.interim  # the first thing read is the 413 (the old reader's view)
    assert status == 413 and headers["connection"] == "close"


def test_waitress_server_answers_huge_headers_with_json(gateway):
    with RawClient(gateway.url) as client:
        big = b"a" * 270000
        client.send(b"GET /api/auth/x HTTP/1.1\r\nHost: a\r\nX-Big: " + big + b"\r\n\r\n")
        data, closed = client.read_until_close()
    assert closed and data.startswith((b"HTTP/1.0 431 ", b"HTTP/1.1 431 "))
    assert json_error(data.partition(b"\r\n\r\n")[2])["code"] == 431


def test_a_crashing_app_still_gets_json_and_a_clean_close():
    def app(environ, start_response):
        raise RuntimeError("boom")

    logging.getLogger("waitress").setLevel(logging.CRITICAL)
    with WaitressServer(app) as server:
        with RawClient(server.url) as client:
            client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            data, closed = client.read_until_close()
    assert data.startswith(b"HTTP/1.1 500 ") and closed
    assert json_error(data.partition(b"\r\n\r\n")[2])["code"] == 500


# -- the class: generated framings ------------------------------------------------------------

def _framings():
    from hypothesis import strategies as st

    spacing = st.sampled_from(["", " ", "\t", "  "])
    te_word = st.sampled_from(["chunked", "Chunked", "CHUNKED", "gzip", "identity", "x",
                               "chunked\x0b", "chunk", ""])
    te_value = st.builds(lambda words, pad: pad + ", ".join(words) + pad,
                         st.lists(te_word, min_size=1, max_size=3), spacing)
    cl_value = st.sampled_from(["0", "5", "11", "+5", "0x5", "5, 5", " 5", "05", "-1", "1e1"])
    header = st.one_of(
        st.tuples(st.sampled_from(["Transfer-Encoding", "transfer-encoding",
                                   "Transfer-Encoding ", " Transfer-Encoding"]), te_value),
        st.tuples(st.sampled_from(["Content-Length", "content-length", "Content-Length "]),
                  cl_value),
        st.tuples(st.just("Host"), st.sampled_from(["a", "", "a b", "[::1]:80"])),
        st.tuples(st.just("X-Other"), st.sampled_from(["1", "chunked"])),
    )
    version = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0"])
    body = st.sampled_from([b"", b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"hello",
                            b"5\nhello\r\n0\r\n\r\n", b"hello world"])
    return st.tuples(version, st.lists(header, max_size=5), body)


def ambiguous(version: str, headers: list[tuple[str, str]]) -> bool:
    """The test's own reading of RFC 9112: framing a server must refuse with 400."""
    names = [name.lower() for name, _ in headers]
    te = [value for name, value in headers if name.lower() == "transfer-encoding"]
    cl = [value.strip(" \t") for name, value in headers if name.lower() == "content-length"]
    hosts = names.count("host")
    return bool(
        any(name != name.strip() for name in names)  # space before the colon, or a fold
        or (te and (cl or version != "HTTP/1.1" or len(te) > 1))
        or len(cl) > 1 or (cl and not cl[0].isdigit())
        or (version == "HTTP/1.1" and hosts != 1) or hosts > 1)


def test_generated_framings_never_smuggle_a_request(monkeypatch):
    """Whatever framing a client chooses: an ambiguous one is a JSON 400 that closes the
    connection with nothing forwarded; otherwise the upstream sees at most the request and
    the one pipelined after it, each once."""
    from hypothesis import HealthCheck, given, settings

    from tests.servers import TEST_JWT_SECRET, shipped_gateway
    from tests.upstream import Upstream

    with Upstream() as upstream:
        gateway = shipped_gateway(monkeypatch, {
            "USER_SERVICE_URL": upstream.url, "JWT_SECRET": TEST_JWT_SECRET,
            "RATE_LIMIT_AUTH": "100000/minute"})
        try:
            @settings(max_examples=150, deadline=None, print_blob=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])
            @given(_framings())
            def check(framing):
                version, headers, body = framing
                upstream.requests.clear()
                head = f"POST /api/auth/framed {version}\r\n" + "".join(
                    f"{name}: {value}\r\n" for name, value in headers)
                with RawClient(gateway.url, timeout=5) as client:
                    client.send(head.encode("latin-1") + b"\r\n" + body + SMUGGLED)
                    data, _ = client.read_until_close(timeout=2)
                time.sleep(0.02)
                targets = [target for _, target, _ in upstream.requests]
                assert targets.count("/auth/framed") <= 1 and len(targets) <= 2, targets
                if ambiguous(version, headers):
                    assert targets == [], (framing, targets)
                    head_bytes, _, payload = data.partition(b"\r\n\r\n")
                    assert head_bytes.split(b" ")[1] == b"400", (framing, data)
                    assert b"connection: close" in head_bytes.lower(), data
                    json_error(payload)

            check()
        finally:
            gateway.stop()
