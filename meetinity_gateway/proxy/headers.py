"""Header rules of an HTTP proxy (RFC 9110 §7.6): hop-by-hop removal, X-Forwarded-*, Via.

Request headers (:func:`request_headers`):

* hop-by-hop headers go, and so does every header the *client's* ``Connection`` names — but
  never one the gateway itself puts on the request: the request id, ``traceparent`` and
  ``tracestate``, the ``X-Forwarded-*`` family, ``X-Real-IP``, ``Via``, and whatever inner
  layers list in ``environ["meetinity_gateway.added_headers"]`` (the identity headers set by
  ``auth``, the per-route header rules). ``Connection: X-User-ID`` cannot strip an identity;
* client-asserted addresses are worth what :mod:`meetinity_gateway.net` says: ``X-Forwarded-*``
  and the whole class of address headers (:func:`~meetinity_gateway.net.is_address_header`:
  ``X-Real-IP``, ``True-Client-IP``, ``Client-IP``, ``WL-Proxy-Client-IP``, ``Remote-Addr``,
  over a hundred listed spellings plus the patterns they follow) are dropped unless
  ``trusted_hops`` proxies vouch for them, ``Forwarded`` always; the gateway sets
  ``X-Forwarded-For``/``-Proto``/``-Host`` and ``X-Real-IP`` (the client address it trusts)
  itself;
* path-override headers (``X-Original-URL``, ``X-Rewrite-URL`` and kin:
  :func:`~meetinity_gateway.net.is_path_override_header`) are always dropped.

Response headers (:func:`response_headers`): hop-by-hop and ``Connection``-named headers and
the upstream's ``Access-Control-*`` go. (Header bytes themselves were checked when the response
was read: :mod:`meetinity_gateway.proxy.wire`.)
"""
from __future__ import annotations

import typing as t

from meetinity_gateway.keys import ADDED_HEADERS_KEY
from meetinity_gateway.net import (
    client_address,
    is_address_header,
    is_path_override_header,
    trusted_address,
    trusted_chain,
    trusted_value,
)

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import WSGIEnvironment

__all__ = [
    "GATEWAY_HEADERS",
    "HOP_BY_HOP",
    "VIA",
    "request_headers",
    "response_headers",
]

#: Headers that describe one connection, never the message: removed in both directions,
#: together with every header named in ``Connection``. (WSGI servers refuse an application
#: response carrying them: the old gateway answered 500 to every proxied request for this.)
HOP_BY_HOP = frozenset({
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
})

#: Request headers the gateway's own layers set (by their default names): a client's
#: ``Connection`` naming them removes nothing. Layers with configurable names add theirs to
#: ``environ[ADDED_HEADERS_KEY]``.
GATEWAY_HEADERS = frozenset({
    "x-request-id",
    "traceparent",
    "tracestate",
})

#: Request headers the gateway sets itself (or must not forward): the client's copies go.
#: ``Host`` is the upstream's; ``Expect`` was already answered by the WSGI server, which has
#: read the body; ``Forwarded`` is replaced by the X-Forwarded-* family.
_REQUEST_OWN = frozenset({
    "host",
    "expect",
    "forwarded",
    "x-forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "content-length",
    "via",
})

#: Address headers the gateway sets itself from the trusted chain: never a client's copy.
_ADDRESS_OWN = frozenset({"x-forwarded-for", "x-real-ip"})

#: The gateway owns CORS: whatever an upstream says about it is dropped.
_CORS_PREFIX = "access-control-"
_FORWARDED_PREFIX = "x-forwarded-"

VIA = "1.1 meetinity-gateway"


def _connection_named(value: str | None) -> set[str]:
    if not value:
        return set()
    return {token.strip().lower() for token in value.split(",") if token.strip()}


def _header_name(environ_key: str) -> str:
    return environ_key[5:].replace("_", "-").title()


# What a request header is, by its environ key: a pure function of the name, worked out once
# per name rather than once per request (matching a name against the address and
# path-override classes is a few µs, and every request repeats the same dozen names).
_PASS, _DROP, _ADDRESS, _FORWARDED = 0, 1, 2, 3
_FACTS_ENTRIES = 2048  # names remembered; a client inventing names costs a miss, not memory
_facts: dict[str, tuple[str, str, int]] = {}


def _header_facts(key: str) -> tuple[str, str, int]:
    """``(name, lower-case name, kind)`` for the environ key ``HTTP_…``: ``_DROP`` (a
    path override, or a header the gateway sets itself / a hop-by-hop one, and no address),
    ``_ADDRESS`` (an address header a client may not choose: kept only as trusted proxies
    say, never one the gateway sets itself), ``_FORWARDED`` (another ``X-Forwarded-*``: a
    trusted proxy's word or nothing), ``_PASS``."""
    facts = _facts.get(key)
    if facts is not None:
        return facts
    name = _header_name(key)
    lowered = name.lower()
    if is_path_override_header(lowered):
        kind = _DROP  # the router chose the path; no client re-chooses it behind its back
    elif is_address_header(lowered):
        kind = _DROP if lowered in _ADDRESS_OWN else _ADDRESS
    elif lowered in HOP_BY_HOP or lowered in _REQUEST_OWN:
        kind = _DROP
    elif lowered.startswith(_FORWARDED_PREFIX):
        kind = _FORWARDED
    else:
        kind = _PASS
    facts = (name, lowered, kind)
    if len(key) <= 128:
        if len(_facts) >= _FACTS_ENTRIES:
            _facts.clear()
        _facts[key] = facts
    return facts


def request_headers(
    environ: WSGIEnvironment,
    trusted_hops: int = 0,
    drop: t.Container[str] = (),
) -> dict[str, str]:
    """The headers to send upstream for this WSGI request.

    ``drop`` holds extra lower-case header names to leave out.
    """
    named = _connection_named(environ.get("HTTP_CONNECTION"))
    if named:
        # The client's Connection speaks for the client's headers only.
        named -= GATEWAY_HEADERS
        added = environ.get(ADDED_HEADERS_KEY)
        if added:
            named.difference_update(name.lower() for name in added)
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if not key.startswith("HTTP_"):
            continue
        name, lowered, kind = _header_facts(key)
        if kind == _DROP:
            continue
        if named and lowered in named:
            continue
        if kind == _ADDRESS:
            if trusted_hops:
                # Vouched for by the trusted proxies in front: one address, as they set it.
                address = trusted_address(value, trusted_hops)
                if address is not None:
                    headers[name] = address
            continue
        if kind == _FORWARDED:
            # X-Forwarded-Port, -Prefix, -Server, -Ssl…: a trusted proxy's word or nothing.
            value = trusted_value(value, trusted_hops)
            if value is None:
                continue
        if lowered in drop:
            continue
        headers[name] = value
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        headers["Content-Type"] = content_type

    chain = trusted_chain(environ, trusted_hops)
    headers["X-Forwarded-For"] = ", ".join(address for address in chain if address)
    headers["X-Forwarded-Proto"] = (
        trusted_value(environ.get("HTTP_X_FORWARDED_PROTO"), trusted_hops)
        or environ.get("wsgi.url_scheme", "http")
    )
    host = trusted_value(environ.get("HTTP_X_FORWARDED_HOST"), trusted_hops) or environ.get(
        "HTTP_HOST"
    )
    if host:
        headers["X-Forwarded-Host"] = host
    address = client_address(environ, trusted_hops)
    if address:
        headers["X-Real-IP"] = address
    via = environ.get("HTTP_VIA")
    headers["Via"] = f"{via}, {VIA}" if via else VIA
    return headers


def response_headers(items: t.Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Filter an upstream's response headers (order and duplicates kept) for the client."""
    items = list(items)
    named: set[str] = set()
    for name, value in items:
        if name.lower() == "connection":
            named |= _connection_named(value)
    # No Via of ours on the way back: waitress adds "Via: <ident>" itself whenever the
    # upstream's Server header is kept, and a second one would only repeat it.
    return [
        (name, value)
        for name, value in items
        if not (
            (lowered := name.lower()) in HOP_BY_HOP
            or lowered in named
            or lowered.startswith(_CORS_PREFIX)
        )
    ]
