"""Who is the client? The one place that reads ``X-Forwarded-For``.

A client can put anything in ``X-Forwarded-For``; only the entries appended by proxies we
run are trustworthy. With ``trusted_hops=N`` the gateway trusts the last N proxies in front
of it: the client is the address N hops back from the peer address (``REMOTE_ADDR``).
``trusted_hops=0`` (the default everywhere) ignores the header completely.

The same rule holds for every other header in which a client can claim an address
(:data:`ADDRESS_HEADERS`: ``X-Real-IP``, ``True-Client-IP``, ``CF-Connecting-IP``, …): worth
nothing unless ``trusted_hops`` proxies vouch for it (:func:`trusted_address`).

Allow-lists of networks (who may read ``/metrics``, the ``/health`` detail, ``/status``) are
parsed by :func:`parse_networks` and checked by :func:`client_allowed`, against that same
trusted client address: a spoofed ``X-Forwarded-For`` never gets a client in.
"""
from __future__ import annotations

import ipaddress
import typing as t

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import WSGIEnvironment

__all__ = [
    "ADDRESS_HEADERS",
    "PATH_OVERRIDE_HEADERS",
    "DEFAULT_ALLOW",
    "address_allowed",
    "client_address",
    "client_allowed",
    "is_address_header",
    "is_path_override_header",
    "forwarded_chain",
    "parse_networks",
    "trusted_address",
    "trusted_chain",
    "trusted_value",
]

#: Lower-case names of the headers in which a client (or a CDN, load balancer, proxy or
#: application server in front) states the client's address, besides ``X-Forwarded-For`` and
#: ``Forwarded``: the spellings seen in the wild. :func:`is_address_header` also catches the
#: ones not listed through the patterns they follow (:data:`_ADDRESS_PARTS`).
ADDRESS_HEADERS = frozenset({
    "x-real-ip", "x-real-client-ip", "real-ip", "x-realip", "x-real-ip-address",
    "true-client-ip", "x-true-client-ip", "x-true-ip", "true-ip",
    "cf-connecting-ip", "cf-connecting-ipv6", "cf-pseudo-ipv4",
    "x-client-ip", "client-ip", "x-clientip", "clientip", "x-client-ip-address",
    "x-client-addr", "x-client-address", "client-address", "x-client",
    "x-cluster-client-ip", "fastly-client-ip", "akamai-client-ip", "x-akamai-client-ip",
    "x-originating-ip", "x-originating-ip-address", "originating-ip",
    "x-remote-ip", "x-remote-addr", "remote-addr", "remote-ip", "x-remoteaddr", "remoteaddr",
    "x-remote-address", "remote-address", "remote-host", "x-remote-host",
    "proxy-client-ip", "wl-proxy-client-ip", "x-proxy-client-ip", "x-proxyuser-ip",
    "x-azure-clientip", "x-azure-socketip", "x-appengine-user-ip", "x-appengine-remote-addr",
    "x-user-ip", "user-ip", "x-userip", "x-end-user-ip", "x-enduser-ip",
    "x-source-ip", "source-ip", "x-src-ip", "x-sourceip", "x-source-address",
    "x-host-ip", "x-ip", "ip", "x-ip-address", "x-ipaddress", "x-custom-ip-authorization",
    "x-original-remote-addr", "x-original-client-ip", "x-orig-client-ip",
    "x-connecting-ip", "connecting-ip", "x-envoy-external-address", "x-envoy-internal",
    "x-envoy-peer-ip", "x-amzn-source-ip", "x-amz-source-ip", "x-aws-client-ip",
    "x-gcp-client-ip", "x-client-public-ip", "x-public-ip", "x-device-ip", "x-wap-client-ip",
    "x-nokia-ipaddress", "x-imforwards", "x-forwarder-for",
    "forwarded-for", "x-forward-for", "x-forwarded-for-original", "x-original-forwarded-for",
    "x-forwarded-for-ip", "forwarded-for-ip", "x-forwarded", "x-forwarded-ip",
    "x-forwarded-client-ip", "x-forwarded-by", "x-forwarded-server", "x-forwarded-host-ip",
    "forward-for", "x-forwardedfor", "forwardedfor", "x-fwd-for", "x-fwded-for",
    "x-coming-from", "coming-from", "x-http-client-ip", "http-client-ip", "http-x-real-ip",
    "http-x-forwarded-for", "http-forwarded-for", "http-forwarded", "http-client-ip-address",
    "x-client-real-ip", "x-client-true-ip", "x-real-forwarded-for", "x-cdn-client-ip",
    "x-edge-client-ip", "x-lb-client-ip", "x-nf-client-connection-ip", "x-vercel-forwarded-for",
    "x-vercel-ip", "do-connecting-ip", "incap-client-ip", "x-sucuri-clientip",
    "x-iinsider-client-ip", "x-varnish-client-ip", "x-cache-client-ip", "x-waf-client-ip",
    "z-forwarded-for", "cluster-client-ip", "x-cluster-ip", "x-ar-client-ip",
    "x-arr-clientip", "x-arr-client-ip", "x-client-ip-original", "x-sp-forwarded-ip",
    "x-sp-edge-host-ip", "x-original-host-ip", "x-leaf-client-ip",
})

#: Separator-free, lower-case pieces that make a header name an address one whatever else
#: it says (``X-Real-Client-IP``, ``WL-Proxy-Client-IP``, ``Remote_Addr``…).
_ADDRESS_PARTS = (
    "clientip", "clientaddr", "realip", "forwardedfor", "forwardfor", "forwarderfor",
    "fwdfor", "remoteaddr", "remoteip", "connectingip", "originatingip", "trueip", "userip",
    "sourceip", "srcip", "socketip", "publicip", "peerip", "peeraddr", "clusterip",
)

#: Headers with which a client would choose the path an application serves, behind the
#: router's back (IIS URL Rewrite, Symfony, Laravel, Zend, Nginx/Envoy conventions): always
#: dropped. :func:`is_path_override_header` adds the patterns.
PATH_OVERRIDE_HEADERS = frozenset({
    "x-original-url", "x-rewrite-url", "x-original-uri", "x-rewrite-uri", "x-override-url",
    "x-override-uri", "x-original-path", "x-rewrite-path", "x-envoy-original-path",
    "x-envoy-original-url", "x-http-destinationurl", "x-destination-url", "x-proxy-url",
    "x-request-uri", "request-uri", "x-request-url", "x-forwarded-uri", "x-forwarded-url",
    "x-forwarded-path", "x-original-request-uri", "x-origin-url", "x-uri", "x-url",
    "x-http-original-url", "x-iis-original-url", "unencoded-url", "x-unencoded-url",
    "x-path-info", "path-info", "x-script-name", "script-name", "x-replaced-path",
})

_PATH_PARTS = (
    "originalurl", "originaluri", "originalpath", "rewriteurl", "rewriteuri", "rewritepath",
    "overrideurl", "overrideuri", "overridepath", "requesturi", "requesturl", "destinationurl",
    "unencodedurl", "replacedpath", "forwardeduri", "forwardedurl", "forwardedpath",
)


def _compact(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def is_address_header(name: str) -> bool:
    """Whether a request header names a client address (any case, ``-`` or ``_``)."""
    lowered = name.lower().replace("_", "-")
    if lowered in ADDRESS_HEADERS:
        return True
    compact = _compact(name)
    return any(part in compact for part in _ADDRESS_PARTS)


def is_path_override_header(name: str) -> bool:
    """Whether a request header would override the request's path or URL."""
    lowered = name.lower().replace("_", "-")
    if lowered in PATH_OVERRIDE_HEADERS:
        return True
    compact = _compact(name)
    return any(part in compact for part in _PATH_PARTS)


Network = t.Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Loopback and private ranges: the default allow-list of the operator-only endpoints.
DEFAULT_ALLOW = (
    "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7",
)


def _split(header: str | None) -> list[str]:
    if not header:
        return []
    return [item.strip() for item in header.split(",") if item.strip()]


def forwarded_chain(environ: WSGIEnvironment) -> list[str]:
    """Every address the request claims to have passed, client first, peer last."""
    return _split(environ.get("HTTP_X_FORWARDED_FOR")) + [environ.get("REMOTE_ADDR") or ""]


def trusted_chain(environ: WSGIEnvironment, trusted_hops: int = 0) -> list[str]:
    """The part of the chain vouched for by us and our ``trusted_hops`` proxies.

    Its first item is the client address; it is what the gateway forwards upstream as
    ``X-Forwarded-For``.
    """
    chain = forwarded_chain(environ)
    return chain[-(trusted_hops + 1):]


def client_address(environ: WSGIEnvironment, trusted_hops: int = 0) -> str:
    """The client's address as far as it can be trusted."""
    if not trusted_hops:
        return environ.get("REMOTE_ADDR") or ""
    return trusted_chain(environ, trusted_hops)[0]


def trusted_value(header: str | None, trusted_hops: int) -> str | None:
    """For ``X-Forwarded-Proto``/``-Host``: the value set by the outermost trusted proxy."""
    if not trusted_hops:
        return None
    values = _split(header)
    if not values:
        return None
    return values[-trusted_hops] if len(values) >= trusted_hops else values[0]


def trusted_address(header: str | None, trusted_hops: int) -> str | None:
    """For an address header (:data:`ADDRESS_HEADERS`): the address the outermost trusted
    proxy put there, if it is an IP address; ``None`` without trusted proxies."""
    value = trusted_value(header, trusted_hops)
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def parse_networks(items: t.Iterable[str]) -> tuple[Network, ...]:
    """``["10.0.0.0/8", "::1", …]`` as networks; ValueError naming the first bad item."""
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ValueError(f"expected networks like 127.0.0.1/32, 10.0.0.0/8, ::1, "
                             f"not {item!r}") from None
    return tuple(networks)


def address_allowed(address: str, networks: t.Sequence[Network]) -> bool:
    """Whether ``address`` (IPv4, IPv6, IPv4-mapped IPv6) is in one of ``networks``."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return any(ip in network for network in networks)


def client_allowed(environ: WSGIEnvironment, networks: t.Sequence[Network],
                   trusted_hops: int = 0) -> bool:
    """Whether the request's trusted client address is in one of ``networks``."""
    return address_allowed(client_address(environ, trusted_hops), networks)
