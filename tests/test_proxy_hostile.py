"""The proxy against misbehaving upstreams and hostile clients, through raw sockets.

The shipped gateway.ini under a real waitress in front of a
:class:`tests.rawkit.ScriptedUpstream`, which answers with exactly the bytes a test scripts
(interim responses, control characters, bad framing, resets), and records every request and
the connection it came on. Clients are raw sockets too, so nothing tidies a response before
the assertions see it.

The invariants checked for every script: the client gets either a well-framed answer or the
JSON 502; the next client on the pooled connection gets *its own* answer; the upstream
receives exactly the requests the clients sent.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meetinity_gateway.proxy.wire import MAX_INTERIM
from tests.conftest import wait_until
from tests.rawkit import ScriptedUpstream, exchange, get, response
from tests.servers import free_port, make_token, session

# -- scripts: what the upstream answers, by the last segment of the request path ---------------

HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"


def _final(request) -> bytes:
    return response(body=b"answer:" + request.target.encode(),
                    headers=[("Content-Type", "text/plain")])


def hints_late(request, conn):
    # The usual Early Hints shape: hints at once, the answer once the work is done.
    conn.send(HINTS)
    conn.pause(0.5)
    conn.send(_final(request))


def interim_together(request, conn):
    conn.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n" + HINTS
              + _final(request))


def interim_with_headers(request, conn):
    conn.send(b"HTTP/1.1 103 Early Hints\r\n"
              + b"".join(b"Link: </r%d.js>; rel=preload\r\n" % i for i in range(40))
              + b"X-Hint: yes\r\nContent-Length: 0\r\n\r\n")
    conn.pause(0.1)
    conn.send(b"HTTP/1.1 199 Whatever\r\nX-Odd: 1\r\n\r\n")
    conn.pause(0.1)
    conn.send(_final(request))


def interim_then_chunked(request, conn):
    conn.send(HINTS)
    conn.pause(0.2)
    body = b"answer:" + request.target.encode()
    conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))


def interim_many(request, conn):
    for _ in range(MAX_INTERIM):
        conn.send(b"HTTP/1.1 102 Processing\r\n\r\n")
    conn.send(_final(request))


def interim_too_many(request, conn):
    for _ in range(MAX_INTERIM + 1):
        conn.send(b"HTTP/1.1 102 Processing\r\n\r\n")
    conn.send(_final(request))


def switching(request, conn):
    conn.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\n\r\n\x81\x05hello")
    conn.pause(0.3)
    conn.send(_final(request))


def hints_then_switching(request, conn):
    conn.send(HINTS + b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
    conn.pause(0.3)
    conn.send(_final(request))


def hints_then_reset(request, conn):
    conn.send(HINTS)
    conn.pause(0.1)
    conn.reset()


def hints_then_close(request, conn):
    conn.send(HINTS)
    conn.close()


def connection_close(request, conn):
    conn.send(response(body=b"answer:" + request.target.encode(),
                       headers=[("Connection", "close")]))
    conn.close()


def http10(request, conn):
    body = b"answer:" + request.target.encode()
    conn.send(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def close_delimited(request, conn):
    conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nanswer:"
              + request.target.encode())
    conn.close()


def smuggled(request, conn):
    # A second, unasked-for response right behind the first one.
    conn.send(_final(request) + response(body=b"secret-of-someone-else"))


def head_with_body(request, conn):
    conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\nsecret-of-someone-else")


def no_content_with_body(request, conn):
    conn.send(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\n"
              b"secret-of-someone-else")


def not_modified_with_body(request, conn):
    conn.send(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 22\r\n\r\n"
              b"secret-of-someone-else")


def no_content_chunked(request, conn):
    # Body-less, yet framed as chunked (and a terminator sent): no body is read, and the
    # connection is not trusted with another request.
    conn.send(b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.pause(0.2)
    conn.send(b"0\r\n\r\n")


def not_modified_chunked(request, conn):
    conn.send(b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\nETag: \"x\"\r\n\r\n")


def big_slow(request, conn):
    conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4194304\r\n\r\n" + b"x" * 65536)
    conn.pause(1.0)
    for _ in range(63):
        if conn.closed:
            return
        conn.send(b"x" * 65536)
        conn.pause(0.05)


SCRIPTS = {name: function for name, function in globals().items()
           if callable(function) and not name.startswith("_") and function.__module__ == __name__}


def dispatch(request, conn):
    name = request.path.rstrip("/").rsplit("/", 1)[-1]
    script = SCRIPTS.get(name) or HEADS.get(name)
    if script is None:
        conn.send(_final(request))
    elif isinstance(script, bytes):
        conn.send(script)
        conn.close()  # and nothing more: a cut-short head must not wait for a timeout
    else:
        script(request, conn)


@pytest.fixture
def raw():
    with ScriptedUpstream(dispatch) as server:
        yield server
    assert not server.errors


@pytest.fixture
def front(gateway_factory, raw):
    """The shipped gateway in front of the raw upstream, retries and outlier ejection as
    shipped. Three hostile answers in a row eject the one target; panic routing (every
    target ejected) still sends it every request, and the first answered one re-admits it.
    Once its ejection time is over (10 s), the gateway's background re-check asks it
    ``GET /health`` too: a request no client sent, so the counts below are of
    ``raw.forwarded``, which leaves those probes out (RawRequest.gateway_probe)."""
    return gateway_factory(USER_SERVICE_URL=raw.url)


def assert_json_502(answer, message: str | None = None) -> dict:
    assert answer.status == 502, answer
    assert answer.header("Content-Type") == ["application/json"]
    assert answer.complete
    error = answer.json()["error"]
    assert error["code"] == 502 and error["request_id"] == answer.header("X-Request-ID")[0]
    if message:
        assert message in error["message"]
    return error


def assert_next_client_gets_its_own_answer(front, raw, first_requests: int = 1) -> None:
    """Client B, after client A: its own answer, and the upstream saw one request each."""
    answer = get(front.url, "/api/auth/plain?who=B")
    assert answer.status == 200 and answer.complete, answer
    assert answer.body == b"answer:/auth/plain?who=B"
    forwarded = raw.forwarded
    assert len(forwarded) == first_requests + 1
    assert forwarded[-1].target == "/auth/plain?who=B"


def test_forwarded_leaves_out_exactly_the_gateways_own_probes(front, raw):
    # The gateway's /health asks each target through UpstreamPool.ask, the very request the
    # background re-check of an ejected target sends.
    assert get(front.url, "/health").status == 200
    # A client's request, even one that names the gateway as its User-Agent, is forwarded
    # with the gateway's Via, X-Forwarded-For and X-Request-ID: never taken for a probe.
    answer = get(front.url, "/api/auth/health", [("User-Agent", "meetinity-gateway")])
    assert answer.status == 200
    probe, forwarded = raw.requests
    assert probe.gateway_probe and probe.target == "/health", probe
    assert not forwarded.gateway_probe and forwarded.target == "/auth/health", forwarded
    assert raw.forwarded == [forwarded]


# -- issue 11.1: interim responses ----------------------------------------------------------

@pytest.mark.parametrize("script", [
    "hints_late", "interim_together", "interim_with_headers", "interim_then_chunked",
    "interim_many",
])
def test_interim_responses_are_read_past_and_the_connection_stays_exact(front, raw, script):
    for _ in range(2):  # twice: the pooled connection must be in order each time
        answer = get(front.url, f"/api/auth/{script}?who=A")
        assert answer.status == 200 and answer.complete
        assert answer.body == b"answer:/auth/" + script.encode() + b"?who=A"
        assert not answer.header("Link") and not answer.header("X-Hint")
        assert_next_client_gets_its_own_answer(front, raw, len(raw.forwarded))
    # The answers were read to their end, so all four requests shared one connection.
    assert {request.conn for request in raw.forwarded} == {1}


@pytest.mark.parametrize("script, message", [
    ("switching", "invalid response"),
    ("hints_then_switching", "invalid response"),
    ("interim_too_many", "invalid response"),
    ("hints_then_reset", "unavailable"),
    ("hints_then_close", "unavailable"),
])
def test_unrequested_101_and_broken_interim_are_json_502_on_a_closed_connection(
        front, raw, script, message):
    # POST: never retried once sent, so exactly one request reaches the upstream.
    answer = get(front.url, f"/api/auth/{script}", method="POST", body=b"{}")
    assert_json_502(answer, message)
    assert_next_client_gets_its_own_answer(front, raw)
    first, second = raw.forwarded
    assert first.conn != second.conn  # the first one was not reused


def test_idempotent_request_is_not_sent_twice_to_one_target(front, raw):
    # A GET may be retried on *another* target; with a single one, nothing is sent twice.
    assert_json_502(get(front.url, "/api/auth/switching"))
    assert len(raw.forwarded) == 1


# -- issue 11.1: a connection is reused only after a response read to its exact end ---------

@pytest.mark.parametrize("script, method, reused", [
    ("connection_close", "GET", False),
    ("http10", "GET", False),
    ("close_delimited", "GET", False),
    ("smuggled", "GET", None),
    ("head_with_body", "HEAD", None),
    ("no_content_with_body", "GET", None),
    ("not_modified_with_body", "GET", None),
    ("no_content_chunked", "GET", False),
    ("not_modified_chunked", "GET", False),
    ("not_modified_chunked", "HEAD", False),
])
def test_no_answer_leaks_to_the_next_client(front, raw, script, method, reused):
    started = time.monotonic()
    answer = get(front.url, f"/api/auth/{script}?who=A", method=method)
    assert time.monotonic() - started < 10  # not after a read timeout (30 s)
    assert answer.complete and b"secret" not in answer.body
    if "chunked" in script:
        assert answer.status == int(script.startswith("no_content") and 204 or 304)
    if script in ("connection_close", "http10", "close_delimited", "smuggled"):
        assert answer.status == 200 and answer.body == f"answer:/auth/{script}?who=A".encode()
    for _ in range(3):
        after = get(front.url, "/api/auth/plain?who=B")
        assert after.body == b"answer:/auth/plain?who=B", after
    forwarded = raw.forwarded
    assert len(forwarded) == 4
    if reused is False:
        assert forwarded[0].conn != forwarded[1].conn


def test_client_leaving_mid_body_closes_the_upstream_connection(front, raw):
    host, port = front.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /api/auth/big_slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    time.sleep(1.5)  # the gateway notices on its next write, after the upstream's pause
    assert_next_client_gets_its_own_answer(front, raw)
    assert raw.forwarded[1].conn != raw.forwarded[0].conn


# -- issue 11.6: upstream header bytes --------------------------------------------------------

HEADS = {
    "cr_in_value": b"HTTP/1.1 200 OK\r\nX-Evil: a\rX-Injected: yes\r\nContent-Length: 2\r\n\r\nok",
    "cr_at_end": b"HTTP/1.1 200 OK\r\nX-Evil: a\r\r\nContent-Length: 2\r\n\r\nok",
    "lf_line_end": b"HTTP/1.1 200 OK\r\nX-Evil: a\nX-Injected: yes\r\nContent-Length: 2\r\n\r\nok",
    "lf_everywhere": b"HTTP/1.1 200 OK\nX-A: b\nContent-Length: 2\n\nok",
    "nul_in_value": b"HTTP/1.1 200 OK\r\nX-Evil: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "obs_fold_space": b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n X-Injected: yes\r\nContent-Length: 2"
                      b"\r\n\r\nok",
    "obs_fold_tab": b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n\tmore\r\nContent-Length: 2\r\n\r\nok",
    "space_in_name": b"HTTP/1.1 200 OK\r\nX Bad: v\r\nContent-Length: 2\r\n\r\nok",
    "space_before_colon": b"HTTP/1.1 200 OK\r\nX-Bad : v\r\nContent-Length: 2\r\n\r\nok",
    "empty_name": b"HTTP/1.1 200 OK\r\n: v\r\nContent-Length: 2\r\n\r\nok",
    "separator_in_name": b"HTTP/1.1 200 OK\r\nX(Bad): v\r\nContent-Length: 2\r\n\r\nok",
    "non_ascii_name": b"HTTP/1.1 200 OK\r\nX-\xe9: v\r\nContent-Length: 2\r\n\r\nok",
    "nul_in_name": b"HTTP/1.1 200 OK\r\nX-Bad\x00: v\r\nContent-Length: 2\r\n\r\nok",
    "no_colon": b"HTTP/1.1 200 OK\r\ngarbage\r\nContent-Length: 2\r\n\r\nok",
    "cr_in_reason": b"HTTP/1.1 200 OK\rX-Injected: yes\r\nContent-Length: 2\r\n\r\nok",
    "nul_in_reason": b"HTTP/1.1 200 O\x00K\r\nContent-Length: 2\r\n\r\nok",
    "status_600": b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok",
    "status_two_digits": b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok",
    "http2_status_line": b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "cl_and_te": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2\r\nok\r\n0\r\n\r\n",
    "cl_conflict": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    "cl_list_conflict": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok!",
    "cl_plus": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    "cl_underscore": b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\nokokokokok",
    "cl_negative": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok",
    "cl_hex": b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok",
    # Issue 23: the server's rules for requests, now for responses too (accepted before).
    "cl_equal_twice": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "cl_19_digits": b"HTTP/1.1 200 OK\r\nContent-Length: 0000000000000000002\r\n\r\nok",
    "te_gzip_chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te_identity": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nok",
    "te_twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
                b"\r\n\r\n0\r\n\r\n",
    "te_http10": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "head_cut_short": b"HTTP/1.1 200 OK\r\nX-A: b\r\n",
}


@pytest.mark.parametrize("script", sorted(HEADS))
def test_upstream_header_bytes_that_cannot_pass_are_json_502(front, raw, script):
    answer = get(front.url, f"/api/auth/{script}", method="POST", body=b"{}")
    error = assert_json_502(answer, "invalid response")
    assert "X-Injected" not in answer.head.decode("latin-1")
    assert not answer.header("X-Evil") and not answer.header("X-Fold")
    assert error["message"] == "upstream user_service sent an invalid response"
    assert_next_client_gets_its_own_answer(front, raw)


# Chunked bodies the stdlib's reader accepted; the server refuses each in a request
# (tests/test_server.py::test_sloppy_chunked_bodies_are_refused), the upstream reader too
# (issue 23). The first chunk is the bad one: nothing was sent yet, so a clean JSON 502.
BAD_CHUNKED = {
    "chunk_hex_prefix": b"0x2\r\nok\r\n0\r\n\r\n",
    "chunk_sign": b"+2\r\nok\r\n0\r\n\r\n",
    "chunk_space": b" 2\r\nok\r\n0\r\n\r\n",
    "chunk_underscore": b"0_2\r\nok\r\n0\r\n\r\n",
    "chunk_bare_lf": b"2\nok\r\n0\r\n\r\n",
    "chunk_empty_line": b"\r\n2\r\nok\r\n0\r\n\r\n",
    "chunk_bad_ext": b"2;a b\r\nok\r\n0\r\n\r\n",
    "chunk_17_digits": b"00000000000000002\r\nok\r\n0\r\n\r\n",
}


def bad_chunked(request, conn):
    name = request.target.rsplit("/", 1)[-1]
    conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Evil: 1\r\n\r\n"
              + BAD_CHUNKED[name])
    conn.close()


SCRIPTS.update(dict.fromkeys(BAD_CHUNKED, bad_chunked))


@pytest.mark.parametrize("script", sorted(BAD_CHUNKED))
def test_sloppy_chunked_upstream_bodies_are_json_502(front, raw, caplog, script):
    caplog.set_level(logging.WARNING)
    answer = get(front.url, f"/api/auth/{script}")
    assert_json_502(answer, "failed while answering")
    # Refused by the grammar ("invalid"), not a connection failure ("unavailable").
    assert any("(invalid: " in r.getMessage() for r in caplog.records), caplog.text
    assert not answer.header("X-Evil")
    assert_next_client_gets_its_own_answer(front, raw)


def test_sloppy_trailer_after_the_body_aborts_the_answer(front, raw):
    # The body went out already: the client's connection is aborted, never a complete answer.
    HEADS["trailer"] = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"2\r\nok\r\n0\r\nX-T: a\x01b\r\n\r\n")
    try:
        answer = get(front.url, "/api/auth/trailer")
    finally:
        del HEADS["trailer"]
    assert answer.status == 200 and answer.body.startswith(b"ok")
    assert not answer.complete and answer.closed, answer
    assert_next_client_gets_its_own_answer(front, raw)


def test_every_control_byte_in_a_header_value_is_json_502(front, raw):
    controls = [byte for byte in range(0x20) if byte not in (0x09, 0x0a)] + [0x7f]
    for byte in controls:
        HEADS["ctl"] = (b"HTTP/1.1 200 OK\r\nX-Evil: a%cb\r\nContent-Length: 2\r\n\r\nok" % byte)
        try:
            answer = get(front.url, "/api/auth/ctl")
        finally:
            del HEADS["ctl"]
        assert_json_502(answer, "invalid response")
        assert not answer.header("X-Evil"), byte
    assert_next_client_gets_its_own_answer(front, raw, len(controls))


def test_tab_and_obs_text_in_values_pass_untouched(front, raw):
    HEADS["fine"] = (b"HTTP/1.1 200 OK\r\nX-Tab: a\tb\r\nX-Latin: caf\xe9\r\n"
                     b"Content-Length: 2\r\n\r\nok")
    try:
        answer = get(front.url, "/api/auth/fine")
    finally:
        del HEADS["fine"]
    assert answer.status == 200 and answer.body == b"ok"
    assert answer.header("X-Tab") == ["a\tb"]
    assert answer.header("X-Latin") == ["caf\xe9"]


# -- issue 11.4: the client's Connection header names only the client's headers ------------

def _raw_to_upstream(gateway, target, headers):
    answer = get(gateway.url, target, headers)
    assert answer.status == 200, answer
    return answer


@pytest.mark.parametrize("connection", [
    ["X-User-ID, X-User-Email, X-Request-ID, Traceparent, Tracestate, X-Client-Hop"],
    ["x-user-id,x-user-email , x-request-id,traceparent,tracestate", "X-CLIENT-HOP"],
    ["close, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Real-IP, Via, "
     "X-User-Id, X-Client-Hop, X-Request-Id, TRACEPARENT"],
])
def test_connection_cannot_strip_what_the_gateway_adds(gateway, upstream, connection):
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = [("Authorization", f"Bearer {make_token()}"), ("X-Request-ID", "rid-4711"),
               ("Traceparent", trace), ("Tracestate", "vendor=1"), ("X-Client-Hop", "bye"),
               ("X-User-ID", "999")]
    headers += [("Connection", value) for value in connection]
    _raw_to_upstream(gateway, "/api/users/42", headers)
    [(_, _, seen)] = upstream.requests
    got = {}
    for name, value in seen:
        got.setdefault(name.lower(), []).append(value)
    assert got["x-user-id"] == ["42"]  # the token's, never the client's 999
    assert got["x-user-email"] == ["ada@example.com"]
    assert got["x-request-id"] == ["rid-4711"]
    assert got["traceparent"] == [trace]
    assert got["tracestate"] == ["vendor=1"]
    assert got["x-forwarded-for"] == ["127.0.0.1"]
    assert got["x-real-ip"] == ["127.0.0.1"]
    assert got["via"] == ["1.1 meetinity-gateway"]
    assert "x-client-hop" not in got  # the client's own header, named: gone
    assert "connection" not in got


# -- issue 11.8: client-asserted addresses --------------------------------------------------

ADDRESS_SPELLINGS = [
    ("X-Real-IP", "6.6.6.1"), ("x-real-ip", "6.6.6.2"), ("X-REAL-IP", "6.6.6.3"),
    ("True-Client-IP", "6.6.6.4"), ("true-client-ip", "6.6.6.5"),
    ("CF-Connecting-IP", "6.6.6.6"), ("Cf-Connecting-Ip", "6.6.6.7"),
    ("X-Client-IP", "6.6.6.8"), ("X-Cluster-Client-IP", "6.6.6.9"),
    ("Fastly-Client-IP", "6.6.6.10"), ("X-Originating-IP", "6.6.6.11"),
    ("X-Remote-IP", "6.6.6.12"), ("X-Remote-Addr", "6.6.6.13"),
    ("Forwarded", "for=6.6.6.14;proto=https"), ("X-Forwarded", "for=6.6.6.15"),
    ("X-Forwarded-For", "6.6.6.16"), ("X-Forwarded-Port", "6666"),
    ("X-Forwarded-Prefix", "/6.6.6.17"), ("X-Forwarded-Server", "6.6.6.18"),
    ("X_Real_IP", "6.6.6.19"), ("X-Real-IP", "6.6.6.20, 6.6.6.21"),
]


def test_client_asserted_addresses_never_reach_the_service(gateway, upstream):
    _raw_to_upstream(gateway, "/api/auth/echo", ADDRESS_SPELLINGS)
    [(_, _, seen)] = upstream.requests
    assert not [(name, value) for name, value in seen if "6.6.6" in value or "6666" in value]
    names = [name.lower() for name, _ in seen]
    assert [value for name, value in seen if name.lower() == "x-real-ip"] == ["127.0.0.1"]
    assert not {"true-client-ip", "cf-connecting-ip", "x-client-ip", "x-cluster-client-ip",
                "forwarded", "x-forwarded", "x-forwarded-port", "x-forwarded-prefix"} & set(names)


def test_trusted_proxy_vouches_for_addresses(gateway_factory, upstream):
    gateway = gateway_factory(TRUSTED_PROXIES="1")
    _raw_to_upstream(gateway, "/api/auth/echo", [
        ("X-Forwarded-For", "6.6.6.6, 203.0.113.9"),  # the trusted hop appended the client
        ("X-Real-IP", "6.6.6.7"),  # the gateway sets its own from X-Forwarded-For
        ("True-Client-IP", "6.6.6.8, 198.51.100.4"),  # the trusted hop's value is the last
        ("CF-Connecting-IP", "not-an-address"),
        ("X-Forwarded-Port", "443"),
    ])
    [(_, _, seen)] = upstream.requests
    got = {name.lower(): value for name, value in seen}
    assert got["x-real-ip"] == "203.0.113.9"
    assert got["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert got["true-client-ip"] == "198.51.100.4"
    assert "cf-connecting-ip" not in got
    assert got["x-forwarded-port"] == "443"


# -- issue 13.6: an upstream reset in the middle of the body -----------------------------------

def reset_mid_body(request, conn):
    conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 200000)
    conn.pause(0.3)
    conn.reset()


def reset_mid_chunked(request, conn):
    conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"10000\r\n" + b"b" * 0x10000 + b"\r\n" + b"10000\r\n" + b"b" * 1000)
    conn.pause(0.3)
    conn.reset()


def reset_after_head(request, conn):
    conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    conn.pause(0.3)
    conn.reset()


def stall_mid_body(request, conn):
    conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    conn.pause(3)


SCRIPTS.update(reset_mid_body=reset_mid_body, reset_mid_chunked=reset_mid_chunked,
               reset_after_head=reset_after_head, stall_mid_body=stall_mid_body)


def _scrape(url):
    text = session().get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.parametrize("script, reason, env", [
    ("reset_mid_body", "unavailable", {}),
    ("reset_mid_chunked", "unavailable", {}),
    ("stall_mid_body", "timeout", {"UPSTREAM_READ_TIMEOUT": "1"}),
])
def test_reset_mid_body_is_one_warning_an_upstream_failure_and_a_truncated_answer(
        gateway_factory, raw, caplog, script, reason, env):
    caplog.set_level(logging.INFO)
    front = gateway_factory(USER_SERVICE_URL=raw.url, **env)
    answer = get(front.url, f"/api/auth/{script}")
    # The status line was the upstream's; the body ends before its framing says: truncated,
    # and the connection is closed — never a well-framed short answer.
    assert answer.status == 200
    assert not answer.complete and answer.closed
    request_id = answer.header("X-Request-ID")[0]

    wait_until(lambda: [r for r in caplog.records if r.name == "meetinity_gateway.access"], 5)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, [r.getMessage() for r in loud]
    [warning] = loud
    assert warning.levelno == logging.WARNING and warning.exc_info is None
    assert request_id in warning.getMessage() and reason in warning.getMessage()
    assert warning.request_id == request_id
    assert not any(r.exc_info for r in caplog.records)

    [access] = [json.loads(r.msg.to_json()) for r in caplog.records
                if r.name == "meetinity_gateway.access"]
    assert access["request_id"] == request_id
    assert access["status"] == 502  # what it ended as; the client saw 200 and a cut body
    assert access["upstream_error"] == reason and access["error"] == "response aborted"

    samples = _scrape(front.url)
    failures = {labels: value for (name, labels), value in samples.items()
                if name == "gateway_upstream_failures_total"}
    assert list(failures.values()) == [1.0]
    assert dict(next(iter(failures)))["reason"] == reason
    statuses = {dict(labels)["status"]: value for (name, labels), value in samples.items()
                if name == "gateway_requests_total" and dict(labels)["route"] == "auth"}
    assert statuses == {"5xx": 1.0}
    assert_next_client_gets_its_own_answer(front, raw)


def test_reset_before_any_body_byte_is_a_clean_json_502(front, raw):
    answer = get(front.url, "/api/auth/reset_after_head")
    assert_json_502(answer, "failed while answering")


def test_reset_mid_body_tells_the_targets_health(raw):
    from meetinity_gateway.proxy.app import ProxyApp
    from tests.servers import WaitressServer

    app = ProxyApp(raw.url, retries=0)
    verdicts = []
    record = app.pool.record

    def spy(target, ok, since=None):
        verdicts.append(ok)
        record(target, ok, since)

    app.pool.record = spy
    try:
        with WaitressServer(app) as server:
            answer = get(server.url, "/reset_mid_body")
            assert not answer.complete
            wait_until(lambda: len(verdicts) >= 2, 5)
    finally:
        app.close()
    assert verdicts == [True, False]  # headers came (ok), then the body failed


def test_gateway_keeps_answering_while_upstreams_misbehave(front, raw):
    """A burst of every hostile script at once: every answer well-framed or a JSON 502."""
    names = sorted(HEADS) + ["switching", "hints_late", "smuggled", "reset_mid_body"]
    results = {}

    def call(name):
        results[name] = get(front.url, f"/api/auth/{name}")

    threads = [threading.Thread(target=call, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for name in names:
        answer = results[name]
        assert answer.status in (200, 502), name
        if answer.status == 502:
            assert_json_502(answer)
        elif name != "reset_mid_body":
            assert answer.complete and b"secret" not in answer.body, name
    assert session().get(front.url + "/health/live").status_code == 200
    assert_next_client_gets_its_own_answer(front, raw, len(raw.forwarded))


def test_nothing_listening_still_502(gateway_factory):
    gateway = gateway_factory(USER_SERVICE_URL=f"http://127.0.0.1:{free_port()}")
    assert_json_502(get(gateway.url, "/api/auth/x"), "unavailable")


# -- a broken upload is the client's failure, never the target's ------------------------------

class _BrokenUpload:
    """``wsgi.input`` as a server that streams the upload (gunicorn) hands it over: the first
    bytes, then ``read`` raises what the server made of the rest (gunicorn raises
    ``InvalidChunkSize``, an OSError, for a malformed chunk and ``NoMoreData`` for a body
    cut short; a client too slow to send, a timeout)."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.started = False

    def read(self, size: int = -1) -> bytes:
        if not self.started:
            self.started = True
            return b'{"name": '
        raise self.error


@pytest.mark.parametrize("method, framing", [
    ("POST", "chunked"),  # streamed on, chunked
    ("POST", "length"),   # streamed on (never retried, so not kept)
    ("PUT", "length"),    # small and idempotent: read whole first, to be replayable
])
def test_a_broken_upload_is_a_400_and_no_failure_of_the_target(raw, method, framing):
    from werkzeug.test import create_environ

    from meetinity_gateway.proxy.app import ProxyApp

    app = ProxyApp(raw.url)  # the pool's own defaults: three failures in a row eject
    try:
        # Three in a row: before, each one was the target's failure (a 502 or a 504) and
        # the third ejected it, though the target never even received a whole request.
        for error in (OSError("No more data"), TimeoutError("timed out"),
                      ValueError("Invalid chunk size: b'zz'")):
            environ = create_environ("/upload", method=method)
            environ["wsgi.input"] = _BrokenUpload(error)
            if framing == "chunked":
                environ["HTTP_TRANSFER_ENCODING"] = "chunked"
                environ["wsgi.input_terminated"] = True
                environ.pop("CONTENT_LENGTH", None)
            else:
                environ["CONTENT_LENGTH"] = "64"
            started = []
            body = b"".join(app(environ, lambda status, headers: started.append(status)))
            assert started == ["400 Bad Request"], (error, started, body)
            assert json.loads(body)["error"]["message"] == "the request body could not be read"
        [row] = app.pool.snapshot()
        assert row["state"] == "healthy" and row["failures"] == 0, row
    finally:
        app.close()
    assert not raw.forwarded  # no whole request reached the target


def test_broken_uploads_under_gunicorn_do_not_eject_the_service(raw):
    # The same through a real gunicorn, which streams chunked uploads to the application.
    from tests.test_server_smoke import Served, require_server

    require_server("gunicorn")
    served = Served("gunicorn", {"USER_SERVICE_URL": raw.url,
                                 "RATE_LIMIT_AUTH": "100000/minute"})
    try:
        head = (b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):  # max_fails as shipped
            answer = exchange(served.port, head + b"2\r\n{}\r\nzz\r\n{}\r\n0\r\n\r\n",
                              method="POST")
            assert answer is not None and answer.status == 400, answer
            assert answer.json()["error"]["message"] == "the request body could not be read"
        health = get(served.url, "/health")
        [row] = health.json()["targets"]["user_service"]
        assert row["state"] == "healthy" and row["failures"] == 0, row
        assert health.json()["status"] == "ok"
        assert_next_client_gets_its_own_answer(served, raw, 0)
    finally:
        served.stop()
