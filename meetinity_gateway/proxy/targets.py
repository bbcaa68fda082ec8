"""Upstream targets as written, ``URL [weight=N], …``, and the resolver of their host names.

An upstream is written in one string (one ini value, or ``USER_SERVICE_URL``)::

    http://10.0.0.5:5001, http://10.0.0.6:5001 weight=3, http://users.internal:5001

Comma- (or newline-) separated base URLs, each with an optional ``weight=N`` (default 1).
:func:`parse_targets` reads it into :class:`TargetSpec` records, or raises ValueError with
the reason. A target given by host name is resolved with ``resolver`` (default: the
system's ``getaddrinfo``, :func:`system_resolver`) and every A/AAAA address becomes a
target of its own, re-resolved every ``dns_interval`` seconds (by the
:class:`~meetinity_gateway.proxy.upstream.UpstreamPool`), so DNS-based discovery (Docker or
Kubernetes service names, round-robin DNS) follows changes without a restart. The
connection goes to the address, the ``Host`` header (and TLS SNI) stay the configured
name. ``dns_interval = 0`` connects by name instead (the OS resolves at each new
connection; one target per URL).

Security note: targets are trusted infrastructure. A resolver that returns addresses from
an untrusted source can send user traffic (with its credentials) anywhere.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import typing as t
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Resolver", "TargetSpec", "parse_target", "parse_targets", "system_resolver"]

#: ``resolve(host, port) -> list of IP strings``.
Resolver = t.Callable[[str, int], t.List[str]]


@dataclass(frozen=True)
class TargetSpec:
    """One configured target: a base URL and its weight."""

    url: str
    scheme: str
    host: str
    port: int
    base_path: str
    weight: int
    #: The ``Host`` header value: the URL's host[:port] as written.
    host_header: str

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


_WEIGHT = re.compile(r"^weight=(\d+)$")


def parse_target(item: str) -> TargetSpec:
    """``URL [weight=N]``; raises ValueError with the reason."""
    words = item.split()
    if not words:
        raise ValueError("empty target")
    url, options = words[0], words[1:]
    weight = 1
    for option in options:
        match = _WEIGHT.match(option)
        if not match:
            raise ValueError(f"target {url!r}: unknown option {option!r} (expected weight=N)")
        weight = int(match.group(1))
        if not 1 <= weight <= 1000:
            raise ValueError(f"target {url!r}: weight must be between 1 and 1000")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream URL {url!r} must be http(s)://host[:port][/path]")
    if parts.query or parts.fragment:
        raise ValueError(f"upstream URL {url!r} must not have a query or fragment")
    if parts.username or parts.password:
        raise ValueError(f"upstream URL {url!r} must not hold credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"upstream URL {url!r} has a bad port") from None
    return TargetSpec(
        url=url.rstrip("/"),
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        base_path=parts.path.rstrip("/"),
        weight=weight,
        host_header=parts.netloc,
    )


def parse_targets(spec: str) -> list[TargetSpec]:
    """``URL [weight=N], URL [weight=N], …`` (commas or newlines); raises ValueError."""
    items = [item.strip() for item in re.split(r"[,\n]", spec) if item.strip()]
    if not items:
        raise ValueError("no target: expected URL [weight=N], URL [weight=N], …")
    specs = [parse_target(item) for item in items]
    if len({(s.scheme, s.host, s.port, s.base_path) for s in specs}) != len(specs):
        raise ValueError("the same target is listed twice (use weight=N instead)")
    return specs


def system_resolver(host: str, port: int) -> list[str]:
    """Every address of ``host`` (A and AAAA), in the resolver's order, without repeats."""
    seen: dict[str, None] = {}
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        seen.setdefault(sockaddr[0], None)
    return list(seen)
