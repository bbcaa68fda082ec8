"""The hostile-input suite: Hypothesis drives raw sockets against the real gateway.

The shipped ``gateway.ini`` runs under a real waitress (as ``serve`` builds it) in front of
a :class:`~tests.rawkit.ScriptedUpstream` that records every byte it receives. Hypothesis
generates whole requests (request line, header set, framing, body, smuggled bytes) and
whole upstream answers (interim responses, status line, header bytes, framing), and these
invariants must hold for every one of them:

* the upstream never receives a protected request the gateway did not authorise, never
  more requests than the client sent, never a client-chosen identity or address header;
* client garbage never gets a 5xx, and every answer the gateway makes itself is the JSON
  error shape; upstream garbage gets a well-framed answer (or a visibly cut one) or a JSON
  502, never an interim response as the final answer;
* a pooled upstream connection is never reused after a response that was not read to its
  exact end: the next client always gets its own answer;
* ``/health/live`` answers throughout.

Bounded: a few hundred examples in all. On failure Hypothesis prints the falsifying example
and a ``@reproduce_failure`` blob (``print_blob``); ``--hypothesis-seed=N`` replays a run.
"""
from __future__ import annotations

import itertools
import json
import logging
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rawkit import (RawClient, RawConnection, RawRequest, ScriptedUpstream, exchange,
                          json_response)
from tests.servers import make_token, module_gateway

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

VALID = make_token(lifetime=3600)  # sub=42
FORGED = "forged-identity"
FORGED_IP = "203.0.113.9"
#: Upstream paths that only a verified caller may reach (after the routes' rewrites).
PROTECTED_UPSTREAM = ("/users", "/profile", "/events", "/registrations", "/event-categories",
                      "/matches", "/swipe", "/algorithm", "/conversations")

_probes = itertools.count(1)


@pytest.fixture(scope="module")
def rig():
    """The shipped gateway under waitress, in front of one scripted upstream.

    Outlier ejection is on, as shipped. Every upstream failure here (a garbage answer, a
    reset) is followed by an answered request (the follow-up client), so no three come in
    a row; if the one target were ejected anyway, panic routing would still send it every
    request, and the gateway's own re-checks (``GET /health``, RawRequest.gateway_probe)
    carry no ``X-Probe`` tag: never taken for a copy of a client's request.
    """
    with ScriptedUpstream(_default_answer) as upstream:
        env = {"UPSTREAM_READ_TIMEOUT": "2"}
        for name in ("USER", "EVENT", "MATCHING", "MESSAGING"):
            env[f"{name}_SERVICE_URL"] = upstream.url
        for name in ("AUTH", "USERS", "EVENTS", "MATCHING", "MESSAGING"):
            env[f"RATE_LIMIT_{name}"] = "1000000/minute"
        with module_gateway(env) as server:
            yield server, upstream


def assert_alive(port: int) -> None:
    response = exchange(
        port, b"GET /health/live HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert response is not None and response.status == 200, "/health/live stopped answering"


def assert_gateway_error_shape(response) -> None:
    """A 4xx/5xx the gateway made itself is the one JSON error shape."""
    payload = response.json()
    assert set(payload) == {"error"}, payload
    assert payload["error"]["code"] == response.status
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]


# -- client-side garbage ---------------------------------------------------------------------

METHODS = st.sampled_from(["GET", "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD",
                           "get", "Options", "TRACE", "CONNECT", "PROPFIND"])
BASES = st.sampled_from(["/api/users/7", "/api/users/42", "/api/users", "/api/profile",
                         "/api/profile/photo", "/api/auth/login", "/api/events",
                         "/api/conversations/3", "/api/usersX", "/health/live", "/nope"])
SEGMENTS = st.sampled_from(["x", "7", "..", ".", "..;", ".;x", "..;x=1", "%2e%2e", "%2E%2e;x",
                            "%2e", "%2F", "%5c", "a%2fb", "%00", "%0a", "%09x", "%7f",
                            "\t", "\x00", "\x7f", "\x1b", "a\x0bb", "%25", "%", "~user", ";"])
QUERIES = st.one_of(
    st.just(""),
    st.sampled_from(["?a=1", "?tag=a&tag=b", "?x=java\tscript:", "?q=\x00", "?q=%00",
                     "?q=\x7f", "?q=a b", "?q=\x0b"]),
    st.text(alphabet=st.characters(max_codepoint=0x7f), max_size=12).map(lambda s: "?" + s),
)
VERSIONS = st.sampled_from(
    ["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/1.2", "HTTP/2.0", "HTTP/0.9", "http/1.1"])
AUTHS = st.sampled_from([
    ("Authorization", "Bearer " + VALID),
    ("Authorization", "Bearer " + VALID),
    ("authorization", "bearer " + VALID),
    ("Authorization", "Bearer not.a.token"),
    ("Authorization", "Bearer " + VALID + "x"),
    ("Authorization", "Basic dXNlcjpwYXNz"),
    ("Authorization", "Bearer"),
    ("Authorization", "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOjQyfQ."),
])
EXTRA_HEADERS = st.sampled_from([
    ("X-User-ID", FORGED), ("X-User-Id", FORGED), ("x-user-id", FORGED),
    ("X-User-Email", FORGED), ("X_User_ID", FORGED), ("X-User_ID", FORGED),
    ("X-Real-IP", FORGED_IP), ("True-Client-IP", FORGED_IP), ("CF-Connecting-IP", FORGED_IP),
    ("X-Client-IP", FORGED_IP), ("X-Cluster-Client-IP", FORGED_IP),
    ("X-Forwarded-For", FORGED_IP), ("Forwarded", f"for={FORGED_IP}"),
    ("Origin", "https://app.meetinity.test"), ("Origin", "null"),
    ("Access-Control-Request-Method", "DELETE"), ("X-HTTP-Method-Override", "DELETE"),
    ("Connection", "X-User-ID, X-User-Email, X-Request-ID, Traceparent"),
    ("Connection", "close"), ("Connection", "keep-alive"),
    ("Expect", "100-continue"), ("X-Request-ID", "ok-id-1"), ("X-Request-ID", "bad\x01id"),
    ("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ("Host", "second.example"), ("Content-Type", "application/json"),
    ("Transfer-Encoding", "gzip"), ("Content-Length", "abc"), ("Content-Length", "-1"),
    ("X-Bad\x01Name", "v"), ("X-Bad-Value", "a\x00b"), ("Bad Header", "v"),
])
FRAMINGS = st.sampled_from(["none", "length", "chunked", "cl+te", "te-spelling",
                            "double-length", "te-http10"])
TE_SPELLINGS = st.sampled_from(["chunked", "Chunked", "chunked ", " chunked", "CHUNKED",
                                "gzip, chunked", "chunked, identity", "chunked\t", "x-chunked"])


def _chunked(body: bytes) -> bytes:
    return (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"


def _smuggled(tag: str) -> bytes:
    return (f"GET /api/users/42 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {VALID}\r\n"
            f"X-Probe: {tag}\r\nContent-Length: 0\r\n\r\n").encode()


@st.composite
def hostile_requests(draw):
    method = draw(METHODS)
    target = draw(BASES)
    for segment in draw(st.lists(SEGMENTS, max_size=3)):
        target += "/" + segment
    target += draw(QUERIES)
    version = draw(VERSIONS)
    headers = []
    host = draw(st.sampled_from(["one", "one", "one", "none", "two", "empty"]))
    if host == "one":
        headers.append(("Host", "gw.example"))
    elif host == "two":
        headers += [("Host", "gw.example"), ("Host", "evil.example")]
    elif host == "empty":
        headers.append(("Host", ""))
    if draw(st.booleans()):
        headers.append(draw(AUTHS))
    headers += draw(st.lists(EXTRA_HEADERS, max_size=4))
    body = draw(st.binary(max_size=48))
    framing = draw(FRAMINGS)
    smuggle = f"smuggled-{next(_probes)}"
    tail = b""
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
        payload = body
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        payload = _chunked(body)
    elif framing == "cl+te":  # CL.TE / TE.CL desync attempts
        headers.append(("Transfer-Encoding", draw(TE_SPELLINGS)))
        payload = _chunked(body)
        tail = _smuggled(smuggle)
        headers.append(("Content-Length", str(len(payload) + len(tail))))
    elif framing == "te-spelling":
        coding = draw(TE_SPELLINGS)
        headers.append(("Transfer-Encoding", coding))
        payload = _chunked(body)
        # Coding names are case-insensitive and OWS is trimmed (RFC 9112 §7, RFC 9110 §5.5):
        # "Chunked " frames the body like "chunked", and what follows is an ordinary
        # pipelined request. Any other coding list leaves the length unknown.
        tail = _smuggled(smuggle if coding.strip(" \t").lower() != "chunked" else
                         f"pipelined-{next(_probes)}")
    elif framing == "double-length":
        headers += [("Content-Length", str(len(body))), ("Content-Length", "0")]
        payload = body
        tail = _smuggled(smuggle)
    elif framing == "te-http10":
        version = "HTTP/1.0"
        headers.append(("Transfer-Encoding", "chunked"))
        payload = _chunked(body)
        tail = _smuggled(smuggle)
    else:
        payload = b""
    headers = draw(st.permutations(headers))
    tag = f"probe-{next(_probes)}"
    head = f"{method} {target} {version}\r\nX-Probe: {tag}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    data = head.encode("latin-1", "replace") + b"\r\n" + payload + tail
    sent_valid_token = any(
        name.lower() == "authorization" and value.lower() == "bearer " + VALID.lower()
        for name, value in headers
    )
    return {"data": data, "method": method, "tag": tag, "smuggle": smuggle,
            "valid_token": sent_valid_token}


def _check_upstream_saw(records: list[RawRequest], request: dict) -> None:
    probes = [r for r in records if request["tag"] in r.header("X-Probe")]
    assert len(probes) <= 1, f"the upstream got {len(probes)} copies of one request"
    for record in records:
        assert request["smuggle"] not in record.header("X-Probe"), (
            "bytes after an ambiguously framed body reached the upstream as a request")
        for name, value in record.headers:
            assert FORGED not in value, f"client-chosen {name}: {value!r} reached the upstream"
            assert FORGED_IP not in value, f"client-asserted address in {name}: {value!r}"
        path = record.target.split("?", 1)[0]
        if path.startswith(PROTECTED_UPSTREAM):
            # Only auth sets X-User-ID, after verifying a token; a pipelined request (tagged
            # otherwise) carries a valid token by construction, the probe itself may not.
            if request["tag"] in record.header("X-Probe"):
                assert request["valid_token"], f"{record.method} {record.target} reached " \
                    "the upstream without a valid token"
            assert record.header("X-User-Id") == ["42"], record.headers


@SETTINGS
@given(request=hostile_requests())
def test_client_garbage_is_refused_cleanly(rig, request):
    server, upstream = rig
    seen = len(upstream.since(0))
    with RawClient(server.port) as client:
        client.send(request["data"])
        response = client.read_response(request["method"])
        if response is not None and not response.closes and not client.eof:
            # Whatever the gateway made of the bytes after the first request is processed
            # before it answers the next one: ask for /health/live on the same connection.
            try:
                client.sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
                client.read_response()
            except (OSError, ValueError):
                pass
    if response is not None:
        assert not response.violations(), response.violations()
        assert response.status < 500, f"client garbage got {response.status}: {response.body!r}"
        # A 100 Continue is the server's answer to the client's own Expect: 100-continue;
        # any other interim answer could only be an upstream's, which must never pass.
        expected = [100] if b"expect: 100-continue" in request["data"].lower() else []
        assert response.interim in ([], expected), (
            "an upstream's interim answer reached the client")
        is_upstream_answer = response.status == 200 and b'"probe"' in response.body
        if response.status >= 400 and request["method"] != "HEAD" and response.body:
            assert_gateway_error_shape(response)
        elif is_upstream_answer:
            assert json.loads(response.body)["probe"] == request["tag"]
    _check_upstream_saw(upstream.since(seen), request)
    assert_alive(server.port)


# -- upstream-side garbage -------------------------------------------------------------------

_VALID_NAMES = st.sampled_from([b"X-Custom", b"Content-Type", b"Set-Cookie", b"Link",
                                b"X-Trace", b"Cache-Control", b"Vary"])
_BAD_BYTES = st.sampled_from([b"\r", b"\n", b"\x00", b"\x01", b"\x0b", b"\x7f", b"\r\n ",
                              b"\r\n\t", b"\x1b"])


@st.composite
def header_lines(draw):
    """(line bytes, clean?) for one upstream header."""
    name = draw(_VALID_NAMES)
    value = draw(st.sampled_from([b"ok", b"a=1; Path=/", b"text/plain", b"v1"]))
    kind = draw(st.sampled_from(["clean", "clean", "clean", "value", "name", "space-colon"]))
    if kind == "value":
        bad = draw(_BAD_BYTES)
        cut = draw(st.integers(0, len(value)))
        value = value[:cut] + bad + value[cut:] + (b"X-Injected: yes" if b"\n" in bad else b"")
        return name + b": " + value, False
    if kind == "name":
        bad = draw(_BAD_BYTES)
        return name + bad + b"x: v", False
    if kind == "space-colon":
        return name + b" : v", False
    return name + b": " + value, True


@st.composite
def upstream_answers(draw):
    """(raw bytes, closes, well_framed, final status or None) for one upstream answer."""
    out = b""
    clean = True
    for code in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)):
        out += b"HTTP/1.1 %d Interim\r\n" % code
        if code == 103:
            out += b"Link: </app.css>; rel=preload; as=style\r\n"
        out += b"\r\n"
    status_kind = draw(st.sampled_from(["ok"] * 8 + ["101", "bogus", "huge"]))
    status = draw(st.sampled_from([200, 201, 204, 304, 400, 404, 500, 502, 503]))
    if status_kind == "101":
        status, clean = 101, False
        out += b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    elif status_kind == "bogus":
        status, clean = None, False
        out += draw(st.sampled_from([b"HTTP/1.1 abc Nope\r\n", b"garbage\r\n",
                                     b"HTTP/9.9 200 OK\r\n", b"HTTP/1.1 2000 OK\r\n"]))
    elif status_kind == "huge":
        status, clean = None, False
        out += b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n"
    else:
        out += b"HTTP/1.1 %d Answer\r\n" % status
    for line, ok in draw(st.lists(header_lines(), max_size=3)):
        out += line + b"\r\n"
        clean = clean and ok
    body = b"" if status in (204, 304) else draw(st.binary(min_size=0, max_size=40))
    framing = draw(st.sampled_from(["length", "length", "chunked", "short", "long",
                                    "close", "bad-chunk", "cl+te", "double-length"]))
    closes = draw(st.booleans()) or framing in ("close", "short")
    if status in (204, 304) and framing not in ("cl+te", "double-length"):
        framing = "length"
    if framing == "length":
        out += b"Content-Length: %d\r\n" % len(body)
        payload = body
    elif framing == "chunked":
        out += b"Transfer-Encoding: chunked\r\n"
        payload = _chunked(body)
    elif framing == "short":  # announces more than it sends, then closes
        out += b"Content-Length: %d\r\n" % (len(body) + 10)
        payload, clean = body, False
    elif framing == "long":  # sends more than it announces: the rest poisons the connection
        out += b"Content-Length: %d\r\n" % len(body)
        payload, clean = body + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nleaked", False
    elif framing == "close":
        payload, clean = body, False
    elif framing == "bad-chunk":
        out += b"Transfer-Encoding: chunked\r\n"
        payload, clean = b"zz\r\n" + body + b"\r\n0\r\n\r\n", False
    elif framing == "cl+te":
        out += b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"
        payload, clean = _chunked(body), False
    else:
        out += b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(body), len(body) + 1)
        payload, clean = body, False
    if closes:
        out += b"Connection: close\r\n"
    out += b"\r\n" + payload
    if status in (204, 304) and framing == "length":
        out = out[: len(out) - len(payload)]  # no body at all
    return out, closes, clean, status


def _get(tag: str) -> bytes:
    return (f"GET /api/users/42 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {VALID}\r\n"
            f"X-Probe: {tag}\r\n\r\n").encode()


@SETTINGS
@given(answer=upstream_answers())
def test_upstream_garbage_never_crosses_to_another_client(rig, answer):
    server, upstream = rig
    raw, closes, clean, status = answer
    tag, follow = f"garbage-{next(_probes)}", f"follow-{next(_probes)}"

    def script(request: RawRequest, conn: RawConnection) -> None:
        if tag not in request.header("X-Probe"):
            return _default_answer(request, conn)
        conn.send(raw)
        if closes:
            conn.close()

    upstream.script = script
    seen = len(upstream.since(0))
    try:
        first = exchange(server.port, _get(tag))
        # A second client, on a new connection: the gateway may give it the same pooled
        # upstream connection, which is only allowed if the first answer was read to its end.
        second = exchange(server.port, _get(follow))
    finally:
        records = upstream.since(seen)
        upstream.reset()

    assert first is not None, "the gateway closed without any answer"
    assert not first.interim, "an interim (1xx) response reached the client"
    assert not first.violations(), first.violations()
    if first.status == 502 and b'"error"' in first.body:
        assert_gateway_error_shape(first)
    else:
        assert status is not None and first.status == status, (
            f"upstream said {status}, client got {first.status}")
    assert second is not None and second.status == 200, second
    assert json.loads(second.body)["probe"] == follow, "a client received another's answer"

    first_conn = [r.conn for r in records if tag in r.header("X-Probe")]
    follow_conn = [r.conn for r in records if follow in r.header("X-Probe")]
    assert len(first_conn) == 1 and len(follow_conn) == 1, "a request was sent twice"
    if not clean or closes:
        assert follow_conn[0] != first_conn[0], (
            "a connection was reused after an answer that was not read to its exact end")
    assert_alive(server.port)


def _default_answer(request: RawRequest, conn: RawConnection) -> None:
    tag = (request.header("X-Probe") or [""])[0]
    conn.send(json_response({"connection": request.conn, "probe": tag}))


def test_hostile_tools_detect_what_they_must():
    """The suite's own yardsticks: a cut body is truncated, control bytes are violations."""
    with ScriptedUpstream() as upstream:
        def script(request: RawRequest, conn: RawConnection) -> None:
            conn.send(b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 10\r\n\r\nabc")
            conn.close()

        upstream.script = script
        response = exchange(upstream.port, _get("x"))
    assert response.truncated and response.body == b"abc"
    assert response.violations() == ["control character in b'X-A': b'a\\x01b'"]
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        port = listener.getsockname()[1]
        response = exchange(port, b"GET / HTTP/1.1\r\n\r\n", timeout=0.5)
    finally:
        listener.close()
    assert response is None


# -- garbage, then the client leaves ---------------------------------------------------------

#: A request whose body framing leaves bytes behind (the issue's exact bytes first): the
#: server answers the request, then refuses the leftover at its request line, by which time
#: the client may be gone.
LEFTOVERS = st.sampled_from([
    b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n1\r\nZ\r\n0\r\n\r\n",
    b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nZZ\r\n\r\n",
    b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01garbage\r\n\r\n",
    b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/9.9\r\n\r\n",
    b"GET /api/users/42 HTTP/1.1\r\nHost: x\r\n\r\n \r\nHost: y\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"1\r\nZ\r\n0\r\n\r\nZ\r\n\r\n",
])
#: When the client closes: before reading anything, after a few bytes of the answer, after
#: the first answer; with a FIN or a reset (SO_LINGER 0).
CLOSE_AFTER = st.sampled_from(["sent", "some", "answer"])


class _Exceptions(logging.Handler):
    """Every log record that carries a traceback (any logger of this process)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.tries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


@pytest.fixture(scope="module")
def exceptions():
    handler = _Exceptions()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
    # The issue saw the traceback in 4-6 % of tries: 400 make a miss practically impossible.
    assert handler.tries == 0 or handler.tries >= 400, handler.tries


@settings(SETTINGS, max_examples=400)
@given(data=LEFTOVERS, tail=st.binary(max_size=6), close=CLOSE_AFTER, reset=st.booleans())
def test_garbage_then_disconnect_logs_no_exception(rig, exceptions, data, tail, close, reset):
    server, _ = rig
    data += tail  # more garbage: a space too large for Hypothesis to exhaust before 400 tries
    exceptions.tries += 1
    client = RawClient(server.port, timeout=5)
    try:
        client.sock.sendall(data)
        if close == "some":
            client.sock.recv(16)
        elif close == "answer":
            client.read_head()
    except OSError:
        pass  # refused and closed first: the server's side of the story is what counts
    finally:
        client.close(reset=reset)  # with a reset: an RST instead of a FIN
    assert_alive(server.port)  # also lets the server finish with the closed connection
    formatted = [logging.Formatter().format(record) for record in exceptions.records]
    assert not formatted, formatted[0]


# -- client-chosen address and path headers --------------------------------------------------

#: Header names that proxies, CDNs and application servers read as the client's address,
#: written down here independently of the gateway's own list (net.ADDRESS_HEADERS), so a
#: spelling the gateway forgets fails this test.
ADDRESS_SPELLINGS = """
X-Real-IP X-Real-Client-IP Real-IP X-RealIP True-Client-IP X-True-Client-IP X-True-IP
CF-Connecting-IP CF-Connecting-IPv6 Fastly-Client-IP Akamai-Client-IP X-Akamai-Client-IP
X-Client-IP Client-IP X-ClientIP ClientIP X-Client-Addr X-Client-Address X-Cluster-Client-IP
Cluster-Client-IP X-Originating-IP Originating-IP X-Remote-IP X-Remote-Addr Remote-Addr
Remote-IP X-RemoteAddr RemoteAddr X-Remote-Address Proxy-Client-IP WL-Proxy-Client-IP
X-Proxy-Client-IP X-ProxyUser-IP X-Azure-ClientIP X-Azure-SocketIP X-AppEngine-User-IP
X-AppEngine-Remote-Addr X-User-IP User-IP X-UserIP X-End-User-IP X-EndUser-IP X-Source-IP
Source-IP X-Src-IP X-SourceIP X-Host-IP X-IP X-IP-Address X-Custom-IP-Authorization
X-Original-Remote-Addr X-Original-Client-IP X-Orig-Client-IP X-Connecting-IP Connecting-IP
X-Envoy-External-Address X-Envoy-Peer-IP X-Amzn-Source-IP X-AWS-Client-IP X-GCP-Client-IP
X-Client-Public-IP X-Public-IP X-Device-IP X-WAP-Client-IP X-Nokia-IPAddress X-IMForwards
Forwarded-For X-Forward-For X-Forwarder-For X-Forwarded-For-Original X-Original-Forwarded-For
X-Forwarded-For-IP Forwarded-For-IP X-Forwarded X-Forwarded-IP X-Forwarded-Client-IP
X-Forwarded-By X-Forwarded-Server Forward-For X-ForwardedFor ForwardedFor X-Fwd-For
X-Coming-From Coming-From X-HTTP-Client-IP HTTP-Client-IP HTTP-X-Real-IP HTTP-X-Forwarded-For
HTTP-Forwarded-For X-Client-Real-IP X-Client-True-IP X-Real-Forwarded-For X-CDN-Client-IP
X-Edge-Client-IP X-LB-Client-IP X-NF-Client-Connection-IP X-Vercel-Forwarded-For X-Vercel-IP
DO-Connecting-IP Incap-Client-IP X-Sucuri-ClientIP X-Varnish-Client-IP X-WAF-Client-IP
Z-Forwarded-For X-Cluster-IP X-ARR-ClientIP X-SP-Forwarded-IP X-Peer-IP X-Socket-IP
X-Client-Peer-Addr My-Real-IP X-Origin-Client-IP X-Gateway-Client-IP
""".split()
PATH_SPELLINGS = """
X-Original-URL X-Rewrite-URL X-Original-URI X-Rewrite-URI X-Override-URL X-Original-Path
X-Envoy-Original-Path X-HTTP-DestinationURL X-Request-URI Request-URI X-Forwarded-URI
X-Forwarded-Path X-Unencoded-URL X-Replaced-Path X-IIS-Original-URL X-My-Original-Url
""".split()


def test_the_spelling_list_is_large_enough():
    assert len(set(name.lower() for name in ADDRESS_SPELLINGS)) >= 100


def _case(name: str, flips: list[bool]) -> str:
    return "".join(c.swapcase() if flip else c for c, flip in zip(name, flips + [False] * 99))


def _send_spellings(rig, names: list[str]) -> RawRequest:
    server, upstream = rig
    probe = f"spelling-{next(_probes)}"
    seen = len(upstream.since(0))
    lines = "".join(f"{name}: {FORGED_IP}\r\n" if name not in PATH_SPELLINGS
                    and name.lower() not in {p.lower() for p in PATH_SPELLINGS}
                    else f"{name}: /api/users/7/export\r\n" for name in names)
    data = (f"GET /api/auth/{probe} HTTP/1.1\r\nHost: gw\r\n{lines}"
            f"Connection: close\r\n\r\n").encode("latin-1")
    response = exchange(server.port, data)
    assert response is not None and response.status == 200, response
    recorded = [r for r in upstream.since(seen) if probe in r.target]
    assert len(recorded) == 1
    return recorded[0]


def _leaks(recorded: RawRequest) -> list[tuple[str, str]]:
    return [(name, value) for name, value in recorded.headers
            if FORGED_IP in value or "/api/users/7" in value]


def test_no_client_address_or_path_header_reaches_a_service_in_any_spelling(rig):
    names = ADDRESS_SPELLINGS + PATH_SPELLINGS
    leaks = []
    for start in range(0, len(names), 20):
        leaks += _leaks(_send_spellings(rig, names[start:start + 20]))
    assert not leaks, f"{len(leaks)} of {len(names)} reached the upstream: {leaks}"


@settings(SETTINGS, max_examples=60)
@given(names=st.lists(st.sampled_from(ADDRESS_SPELLINGS + PATH_SPELLINGS), min_size=1,
                      max_size=8, unique=True),
       flips=st.lists(st.booleans(), max_size=40))
def test_address_and_path_headers_are_dropped_in_any_case(rig, names, flips):
    recorded = _send_spellings(rig, [_case(name, flips) for name in names])
    assert not _leaks(recorded)
    # The gateway's own word on the address is the peer's.
    assert recorded.header("X-Real-IP") == ["127.0.0.1"]
