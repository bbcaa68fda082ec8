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
    "DEFAULT_ALLOW",
    "address_allowed",
    "client_address",
    "client_allowed",
    "forwarded_chain",
    "parse_networks",
    "trusted_address",
    "trusted_chain",
    "trusted_value",
]

#: Lower-case names of the headers in which a client (or a CDN, load balancer or proxy in
#: front) states the client's address, besides ``X-Forwarded-For`` and ``Forwarded``.
ADDRESS_HEADERS = frozenset({
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "fastly-client-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
})

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
