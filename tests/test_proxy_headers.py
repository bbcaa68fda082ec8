"""Request header rules of the proxy (:mod:`meetinity_gateway.proxy.headers`) and the trusted
address reader (:mod:`meetinity_gateway.net`), as units: the client's ``Connection`` names only
the client's headers; client-asserted addresses follow the trusted-hops rule.
End-to-end versions through waitress are in ``tests/test_proxy_hostile.py``.
"""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

from meetinity_gateway.keys import ADDED_HEADERS_KEY
from meetinity_gateway.middleware.auth import AuthMiddleware
from meetinity_gateway.net import (
    ADDRESS_HEADERS,
    is_address_header,
    is_path_override_header,
    trusted_address,
)
from meetinity_gateway.proxy.headers import GATEWAY_HEADERS, request_headers
from meetinity_gateway.transform import HeaderRules, parse_transform
from tests.servers import TEST_JWT_SECRET, make_token


def environ_with(headers: dict[str, str], **extra) -> dict:
    environ = {"REQUEST_METHOD": "GET", "REMOTE_ADDR": "192.0.2.1", "wsgi.url_scheme": "http"}
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    environ.update(extra)
    return environ


def forwarded(environ, trusted_hops: int = 0) -> dict[str, str]:
    return {name.lower(): value for name, value in request_headers(environ, trusted_hops).items()}


def headers_app(environ, start_response):
    """A terminal app answering the headers the proxy would send upstream."""
    body = json.dumps(forwarded(environ)).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def test_connection_named_client_header_goes_gateway_names_stay():
    environ = environ_with({
        "Connection": "X-Hop, X-Request-ID, Traceparent, Tracestate, X-Real-IP, Via, X-Set",
        "X-Hop": "1", "X-Request-ID": "rid", "Traceparent": "tp", "Tracestate": "ts",
        "X-Set": "by-a-layer",
    }, **{ADDED_HEADERS_KEY: {"x-set"}})
    got = forwarded(environ)
    assert "x-hop" not in got and "connection" not in got
    assert got["x-request-id"] == "rid" and got["traceparent"] == "tp"
    assert got["tracestate"] == "ts" and got["x-set"] == "by-a-layer"
    assert got["x-real-ip"] == "192.0.2.1" and got["via"] == "1.1 meetinity-gateway"


def test_auth_alone_protects_its_configured_identity_headers():
    app = AuthMiddleware(LintMiddleware(headers_app), secret=TEST_JWT_SECRET,
                         identity_headers={"sub": "X-Account", "email": "X-Mail"})
    response = Client(LintMiddleware(app)).get("/", headers={
        "Authorization": f"Bearer {make_token()}",
        "Connection": "X-Account, X-Mail, X-Hop", "X-Hop": "1",
    })
    got = response.json
    response.close()
    assert got["x-account"] == "42" and got["x-mail"] == "ada@example.com"
    assert "x-hop" not in got


def test_header_rules_alone_protect_what_they_set():
    rules = [parse_transform(spec)[1] for spec in (
        "* request set X-Service-Key internal", "* request append X-Tags gw",
        "* request remove X-Drop")]
    app = HeaderRules(LintMiddleware(headers_app), rules)
    response = Client(LintMiddleware(app)).get("/", headers={
        "Connection": "X-Service-Key, X-Tags, X-Other", "X-Other": "1", "X-Tags": "client",
    })
    got = response.json
    response.close()
    assert got["x-service-key"] == "internal" and got["x-tags"] == "client, gw"
    assert "x-other" not in got


token = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
gateway_names = st.sampled_from(sorted(GATEWAY_HEADERS | {"x-user-id", "x-user-email"}))


@settings(max_examples=200, deadline=None, print_blob=True)
@given(st.lists(token | gateway_names, max_size=8), st.dictionaries(
    token.map(lambda name: "x-c-" + name), st.text("abc 123", max_size=5), max_size=5),
    st.sampled_from([", ", ",", " , "]))
def test_connection_never_strips_gateway_headers(named, client_headers, separator):
    added = {"x-user-id": "42", "x-user-email": "a@b"}
    own = {"x-request-id": "rid", "traceparent": "tp", "tracestate": "ts"}
    # Names of the address and path-override classes are dropped whatever Connection says.
    client_headers = {name: value for name, value in client_headers.items()
                      if not is_address_header(name) and not is_path_override_header(name)}
    headers = dict(client_headers, **added, **own)
    headers["Connection"] = separator.join(name.upper() if i % 2 else name
                                           for i, name in enumerate(named))
    environ = environ_with(headers, **{ADDED_HEADERS_KEY: set(added)})
    got = forwarded(environ)
    for name, value in {**added, **own}.items():
        assert got[name] == value
    lowered = {name.lower() for name in named}
    for name, value in client_headers.items():
        assert (name not in got) if name in lowered else got[name] == value
    assert got["x-real-ip"] == "192.0.2.1"


def test_every_address_header_spelling_is_dropped_without_trusted_hops():
    headers = {name.title(): "203.0.113.50" for name in ADDRESS_HEADERS}
    headers.update({"Forwarded": "for=203.0.113.50", "X-Forwarded-Port": "1",
                    "X-Forwarded-Prefix": "/x", "X-Forwarded": "for=203.0.113.50"})
    got = forwarded(environ_with(headers))
    assert not [name for name, value in got.items() if "203.0.113.50" in value]
    assert got["x-real-ip"] == "192.0.2.1"
    assert "x-forwarded-port" not in got and "x-forwarded-prefix" not in got


def test_trusted_hops_vouch_for_the_value_their_outermost_proxy_set():
    environ = environ_with({
        "X-Forwarded-For": "198.51.100.1, 203.0.113.7", "X-Real-IP": "198.51.100.9",
        "True-Client-IP": "198.51.100.1, 2001:DB8::1", "X-Client-IP": "garbage",
        "X-Forwarded-Port": "8443, 443",
    })
    got = forwarded(environ, trusted_hops=1)
    assert got["x-real-ip"] == "203.0.113.7"  # from X-Forwarded-For, like everyone else
    assert got["true-client-ip"] == "2001:db8::1"
    assert "x-client-ip" not in got
    assert got["x-forwarded-port"] == "443"
    got = forwarded(environ, trusted_hops=2)
    assert got["x-real-ip"] == "198.51.100.1"
    assert got["true-client-ip"] == "198.51.100.1"


def test_trusted_address():
    assert trusted_address("1.2.3.4", 0) is None
    assert trusted_address("1.2.3.4", 1) == "1.2.3.4"
    assert trusted_address(" 1.2.3.4 , 5.6.7.8 ", 1) == "5.6.7.8"
    assert trusted_address("1.2.3.4, 5.6.7.8", 3) == "1.2.3.4"
    assert trusted_address("2001:DB8:0::1", 1) == "2001:db8::1"
    for bad in ("", "unknown", "1.2.3.4:80", "1.2.3.4\x00", "[::1]", None):
        assert trusted_address(bad, 1) is None


_NAME_PIECES = st.sampled_from(["x", "real", "ip", "client", "forwarded", "for", "original",
                                "url", "host", "connection", "via", "user", "id", "agent",
                                "remote", "addr", "te", "port"])
_NAMES = st.lists(_NAME_PIECES, min_size=1, max_size=4).map("-".join)


@settings(max_examples=60, deadline=None, print_blob=True)
@given(st.dictionaries(_NAMES, st.sampled_from(["203.0.113.9", "v", "198.51.100.1, 10.0.0.1"]),
                       max_size=8),
       st.integers(0, 2))
def test_what_a_header_name_is_worked_out_once_and_always_the_same(client_headers, hops):
    """The per-name facts are remembered; the headers sent upstream are the same cold
    (nothing remembered) and warm, and as the address and path-override classes say."""
    from meetinity_gateway.proxy import headers as module

    environ = environ_with(client_headers)
    module._facts.clear()
    cold = forwarded(environ, hops)
    warm = forwarded(environ, hops)
    assert cold == warm
    for name, value in client_headers.items():
        if is_path_override_header(name):
            assert name not in cold
        elif is_address_header(name) and not hops:
            assert cold.get(name) != value  # the gateway's own value, or nothing


def test_the_names_remembered_are_bounded():
    """A client inventing header names costs a miss each, never memory."""
    from meetinity_gateway.proxy import headers as module

    module._facts.clear()
    for batch in range(3):
        names = {f"X-Invented-{batch}-{i}": "v" for i in range(module._FACTS_ENTRIES)}
        got = forwarded(environ_with(names))
        assert all(got[name.lower()] == "v" for name in names)
        assert len(module._facts) <= module._FACTS_ENTRIES
    long_name = "X-" + "a" * 200
    assert forwarded(environ_with({long_name: "v"}))[long_name.lower()] == "v"
    assert "HTTP_" + long_name.upper().replace("-", "_") not in module._facts
