"""CORS: preflights answered here, CORS headers on every response to an allowed origin.

Browsers let a page on one origin (``https://app.meetinity.com``) read the gateway's answers
only when the gateway says so. This layer sorts every request into one of three kinds:

* **not CORS** — no ``Origin`` header, or an origin that is not allowed: nothing is added
  but ``Vary: Origin``; the request goes on to the app. CORS is enforced by browsers, not by
  the gateway: a non-browser client is unaffected, and a browser page from a foreign origin
  is blocked by the browser because the answer carries no ``Access-Control-Allow-Origin``.
* **preflight** — ``OPTIONS`` with ``Origin`` *and* ``Access-Control-Request-Method``, no
  body and no method override (the one definition, :mod:`meetinity_gateway.preflight`):
  answered here, never forwarded (so it never meets authentication or rate limits). An
  allowed origin asking for an allowed method and allowed headers gets ``204 No Content``
  with ``Access-Control-Allow-Origin``, ``-Allow-Methods``, ``-Allow-Headers``, ``-Max-Age``
  (and ``-Allow-Credentials`` when configured). Anything else gets ``403`` in the standard
  JSON error shape *without* any CORS header: the browser then refuses the real request,
  and a developer looking at the network tab reads why. A plain ``OPTIONS`` without
  ``Origin`` or ``Access-Control-Request-Method`` is not a preflight: it goes to the app
  (and meets authentication there). One with both but also a body or an
  ``X-HTTP-Method-Override`` is no browser's: ``400``, never forwarded.
* **actual request from an allowed origin** — passes through; its response, whoever made it
  (the upstream, or the gateway's own 401/404/429/502/504), gets
  ``Access-Control-Allow-Origin``, ``Access-Control-Expose-Headers``, ``Vary: Origin`` and
  ``Access-Control-Allow-Credentials`` when configured. Any ``Access-Control-*`` header the
  inner app set is replaced, so the answer never carries two conflicting copies.

``Vary: Origin`` is merged into an existing ``Vary`` (never duplicated; ``Vary: *`` is left
alone) on *every* response, allowed or not: a cache must not hand the answer made for one
origin (or for none) to another.

The header values themselves are produced by :class:`wsgi_cors_middleware.CorsMiddleware`
(one static origin per instance); this layer adds what it lacks: an allow-list with anchored
sub-domain patterns, origin echo, ``Vary``, refused preflights, header replacement, and
``exc_info`` pass-through.

Use alone around any WSGI app::

    from meetinity_gateway.middleware.cors import CorsMiddleware
    app = CorsMiddleware(
        app,
        origins=["https://meetinity.com", "https://*.meetinity.com"],
        allow_credentials=True,
    )

:param app: the WSGI application to wrap.
:param origins: allowed origins. Each is an exact origin ``scheme://host[:port]``
    (lower-cased, default port dropped: ``https://Meetinity.com:443`` is
    ``https://meetinity.com``), a sub-domain pattern ``scheme://*.domain[:port]`` where ``*``
    stands for one or more whole DNS labels and the pattern is anchored at both ends
    (``https://*.meetinity.com`` admits ``https://a.b.meetinity.com`` but neither
    ``https://meetinity.com`` nor ``https://x.meetinity.com.evil.com``), or ``*`` alone:
    any origin. Default ``["*"]``. An empty list allows no origin. ``null`` is refused: it
    is what sandboxed frames and local files send, and anyone can produce it.
:param allow_credentials: send ``Access-Control-Allow-Credentials: true`` (cookies or HTTP
    authentication from the browser). Default ``False``. Not allowed with ``*``.
:param allow_methods: methods a preflight may ask for. Default
    ``GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS``.
:param allow_headers: request headers a preflight may ask for (case-insensitive). Default
    ``None``: echo whatever well-formed header names the preflight asks for (the Meetinity
    mobile app sends ``Authorization``, ``Content-Type``, ``X-Client-Version``,
    ``X-Client-Platform``).
:param expose_headers: response headers browser code may read, *in addition to*
    :data:`EXPOSED_ALWAYS` (``X-Request-ID``, the rate-limit headers, ``Retry-After``).
:param max_age: seconds a browser may cache a preflight answer (default 600; 0 = none).

Every argument is checked when the middleware is built; a bad one raises
:class:`~meetinity_gateway.config.ConfigError` naming it.

In gateway.ini::

    [filter:cors]
    use = egg:meetinity_gateway#cors
    origins = ${CORS_ORIGINS:-*}
    allow_credentials = ${CORS_ALLOW_CREDENTIALS:-false}

Security: an allowed origin can make the browsers of your users call the API *as them*
(with their token or cookies) and read the answers, so list only origins you control. ``*``
is meant for public, token-authenticated APIs (the browser never attaches a bearer token by
itself); with cookies or ``allow_credentials`` list origins explicitly. A sub-domain pattern
trusts every host anyone can create under that domain (user sites, forgotten DNS records).
CORS does not protect the API from non-browser clients: authentication and rate limits do.
"""
from __future__ import annotations

import functools
import re
import typing as t

from wsgi_cors_middleware import CorsMiddleware as _HeaderEmitter

from meetinity_gateway.config import (
    ConfigError,
    as_bool,
    as_list,
    as_non_negative_int,
    as_optional_list,
    cast_settings,
)
from meetinity_gateway.http11 import is_token
from meetinity_gateway.preflight import looks_like_preflight, why_not_preflight
from meetinity_gateway.problems import error_response

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "DEFAULT_METHODS",
    "EXPOSED_ALWAYS",
    "CorsMiddleware",
    "OriginMatcher",
    "filter_factory",
    "parse_origin",
]

DEFAULT_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

#: Response headers browser code may always read: the request id (to quote in a bug report)
#: and what the rate limiter says (to back off politely).
EXPOSED_ALWAYS = (
    "X-Request-ID",
    "RateLimit",
    "RateLimit-Policy",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
)

# RFC 9110 token: what a header name or a method may be made of.
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Preflight answers depend on these request headers too.
_PREFLIGHT_VARY = ("Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers")
_CORS_PREFIX = "access-control-"
# A preflight asking for more headers than this is not from a real client.
_MAX_REQUESTED_HEADERS = 64


def parse_origin(origin: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of a configured origin, normalized; ValueError if malformed.

    ``host`` may start with ``*.`` (a sub-domain pattern); the default port of http/https is
    dropped (``None``), as browsers drop it when they serialize an origin.
    """
    text = origin.strip()
    if text.lower() == "null":
        raise ValueError("the 'null' origin cannot be allowed (anyone can send it)")
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME.match(scheme.lower()):
        raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
    scheme = scheme.lower()
    if any(char in rest for char in "/?#@\\"):
        raise ValueError(
            f"{origin!r}: an origin is scheme://host[:port] only (no path, query, user or "
            "trailing '/')"
        )
    if rest.count(":") > 1 or "[" in rest:
        raise ValueError(f"{origin!r}: IPv6 literal origins are not supported")
    host, colon, port_text = rest.partition(":")
    port: int | None = None
    if colon:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{origin!r}: bad port {port_text!r}")
        port = int(port_text)
    host = host.lower()
    if not host:
        raise ValueError(f"{origin!r}: missing host")
    labels = host[2:] if host.startswith("*.") else host
    if "*" in labels or not _HOST.match(labels):
        raise ValueError(
            f"{origin!r}: bad host (a pattern is scheme://*.domain, with '*' as the whole "
            "leftmost label)"
        )
    if host.startswith("*.") and labels.count(".") < 1:
        raise ValueError(f"{origin!r}: a pattern needs at least two labels after '*.'")
    if port == _DEFAULT_PORTS.get(scheme):
        port = None
    return scheme, host, port


def _serialize(scheme: str, host: str, port: int | None) -> str:
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


class OriginMatcher:
    """Decides whether a request's ``Origin`` is allowed.

    >>> m = OriginMatcher(["https://meetinity.com", "https://*.meetinity.com"])
    >>> [m.allows(o) for o in ("https://meetinity.com", "https://a.meetinity.com",
    ...                        "https://a.meetinity.com.evil.com", "http://a.meetinity.com")]
    [True, True, False, False]
    """

    def __init__(self, origins: t.Iterable[str]) -> None:
        origins = [o.strip() for o in origins if o.strip()]
        self.any = "*" in origins
        if self.any and len(origins) > 1:
            raise ValueError("'*' (any origin) cannot be combined with other origins")
        self.exact: frozenset[str] = frozenset()
        self.patterns: tuple[re.Pattern[str], ...] = ()
        if self.any:
            return
        exact, patterns = set(), []
        for origin in origins:
            scheme, host, port = parse_origin(origin)
            if host.startswith("*."):
                suffix = re.escape(host[1:] + ("" if port is None else f":{port}"))
                # Anchored at both ends; "*" is one or more whole DNS labels.
                patterns.append(re.compile(
                    rf"{re.escape(scheme)}://{_LABEL}(?:\.{_LABEL})*{suffix}"
                ))
            else:
                exact.add(_serialize(scheme, host, port))
        self.exact = frozenset(exact)
        self.patterns = tuple(patterns)

    def allows(self, origin: str) -> bool:
        if self.any:
            return True
        # Browsers send the serialized origin (lower-case, no default port): compared as is.
        return origin in self.exact or any(p.fullmatch(origin) for p in self.patterns)


def _tokens(values: t.Iterable[str], what: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in values if v.strip())
    for item in items:
        if not is_token(item):
            raise ValueError(f"{item!r} is not a valid {what}")
    return items


def _as_items(value: t.Iterable[str] | str) -> list[str]:
    # A plain string is a comma-separated list, not an iterable of characters.
    return as_list(value) if isinstance(value, str) else list(value)


_VARY_ORIGIN = ("Vary", "Origin")


def _merge_vary(headers: list[tuple[str, str]], names: t.Iterable[str]) -> list[tuple[str, str]]:
    """``headers`` with one ``Vary`` holding its old values plus ``names`` (no duplicates)."""
    values: list[str] = []
    rest = []
    for name, value in headers:
        if name.lower() == "vary":
            values.extend(v.strip() for v in value.split(",") if v.strip())
        else:
            rest.append((name, value))
    if "*" in values:  # varies on everything already: adding names changes nothing
        return rest + [("Vary", "*")]
    seen = {v.lower() for v in values}
    for name in names:
        if name.lower() not in seen:
            values.append(name)
            seen.add(name.lower())
    return rest + [("Vary", ", ".join(values))]


def _emitted(headers: t.Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    # wsgi_cors_middleware emits a header even when its list is empty: drop those.
    return [(name, value) for name, value in headers if value]


class CorsMiddleware:
    """Allow-listed CORS with preflights answered in place (see the module docstring)."""

    #: What this layer is, for the pipeline model (meetinity_gateway.pipeline).
    kind = "cors"

    def __init__(
        self,
        app: WSGIApplication,
        *,
        origins: t.Iterable[str] | str = ("*",),
        allow_credentials: bool = False,
        allow_methods: t.Iterable[str] | str = DEFAULT_METHODS,
        allow_headers: t.Iterable[str] | str | None = None,
        expose_headers: t.Iterable[str] | str = (),
        max_age: int = 600,
    ) -> None:
        self.app = app
        origin_list = _as_items(origins)
        self.origin_list = tuple(o.strip() for o in origin_list if o.strip())
        try:
            self.origins = OriginMatcher(origin_list)
        except ValueError as exc:
            raise ConfigError(str(exc), key="origins", value=", ".join(origin_list)) from None
        self.allow_credentials = bool(allow_credentials)
        if self.origins.any and self.allow_credentials:
            raise ConfigError(
                "'*' (any origin) cannot be combined with credentials: list the origins",
                key="allow_credentials", value="true",
            )
        try:
            methods = _tokens(_as_items(allow_methods), "method")
        except ValueError as exc:
            raise ConfigError(str(exc), key="allow_methods") from None
        if not methods:
            raise ConfigError("at least one method is needed", key="allow_methods")
        self.allow_methods = tuple(dict.fromkeys(m.upper() for m in methods))
        self._methods = frozenset(self.allow_methods)
        if allow_headers is None:
            self.allow_headers: tuple[str, ...] | None = None
        else:
            try:
                self.allow_headers = _tokens(_as_items(allow_headers), "header name")
            except ValueError as exc:
                raise ConfigError(str(exc), key="allow_headers") from None
        self._headers = (
            None if self.allow_headers is None
            else frozenset(h.lower() for h in self.allow_headers)
        )
        try:
            extra = _tokens(_as_items(expose_headers), "header name")
        except ValueError as exc:
            raise ConfigError(str(exc), key="expose_headers") from None
        known = {h.lower() for h in EXPOSED_ALWAYS}
        self.expose_headers = EXPOSED_ALWAYS + tuple(
            h for h in dict.fromkeys(extra) if h.lower() not in known
        )
        if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 0:
            raise ConfigError("expected a whole number of seconds, at least 0",
                              key="max_age", value=str(max_age))
        self.max_age = max_age
        # The answer for "*" and for each exact origin is fixed: computed once. Pattern
        # matches are computed on first sight (bounded cache: they match a closed pattern).
        self._simple_fixed = {
            origin: self._simple_headers(origin)
            for origin in (("*",) if self.origins.any else self.origins.exact)
        }
        self._simple_for_pattern = functools.lru_cache(maxsize=1024)(self._simple_headers)

    # -- header sets ---------------------------------------------------------------------------

    def _emitter(self, origin: str, allow_headers: t.Sequence[str] = ()) -> _HeaderEmitter:
        # The package's instance is one origin's header set; its own __call__ is not used (it
        # answers every preflight 200, appends rather than replaces, and drops exc_info).
        return _HeaderEmitter(
            None,
            origin=origin,
            credentials=self.allow_credentials,
            headers=list(allow_headers),
            methods=list(self.allow_methods),
            expose_headers=list(self.expose_headers),
            max_age=self.max_age,
        )

    def _simple_headers(self, allow_origin: str) -> tuple[tuple[str, str], ...]:
        emitter = self._emitter(allow_origin)
        return tuple(_emitted(emitter.cors_headers + emitter.cors_non_preflight_headers))

    def _allow_origin_value(self, origin: str) -> str:
        return "*" if self.origins.any else origin

    def _simple_for(self, origin: str) -> tuple[tuple[str, str], ...]:
        allow_origin = self._allow_origin_value(origin)
        fixed = self._simple_fixed.get(allow_origin)
        return fixed if fixed is not None else self._simple_for_pattern(allow_origin)

    # -- requests ------------------------------------------------------------------------------

    def _refuse_preflight(self, environ, start_response, reason: str):
        # No CORS header at all: the browser blocks the real request; the JSON says why.
        return error_response(
            environ, start_response, 403, f"CORS preflight refused: {reason}",
            headers=[("Vary", ", ".join(_PREFLIGHT_VARY))],
        )

    def _preflight(self, environ: WSGIEnvironment, start_response: StartResponse, origin: str):
        if not self.origins.allows(origin):
            return self._refuse_preflight(environ, start_response, "origin not allowed")
        method = environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD", "").strip()
        if method.upper() not in self._methods:
            return self._refuse_preflight(environ, start_response,
                                          f"method {method!r} not allowed")
        requested = [
            h.strip() for h in environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "").split(",")
            if h.strip()
        ]
        if len(requested) > _MAX_REQUESTED_HEADERS:
            return self._refuse_preflight(environ, start_response, "too many headers requested")
        for name in requested:
            if not is_token(name):
                return self._refuse_preflight(environ, start_response,
                                              f"malformed header name {name!r}")
            if self._headers is not None and name.lower() not in self._headers:
                return self._refuse_preflight(environ, start_response,
                                              f"header {name!r} not allowed")
        granted = requested if self.allow_headers is None else self.allow_headers
        emitter = self._emitter(self._allow_origin_value(origin), granted)
        headers = _emitted(emitter.cors_headers + emitter.cors_preflight_headers)
        headers.append(("Vary", ", ".join(_PREFLIGHT_VARY)))
        start_response("204 No Content", headers)
        return []

    def describe(self) -> list[str]:
        """Its settings, one line each (``check``, ``/status``)."""
        headers = ("as the preflight asks" if self.allow_headers is None
                   else ", ".join(self.allow_headers) or "none")
        return [f"origins: {', '.join(self.origin_list) or 'none'}",
                f"credentials: {'allowed' if self.allow_credentials else 'no'}",
                f"methods: {', '.join(self.allow_methods)}", f"request headers: {headers}",
                f"exposed headers: {', '.join(self.expose_headers)}",
                f"preflight cached: {self.max_age}s"]

    def policy_for(self, path: str, method: str = "GET") -> None:
        """No say per path: the same CORS answer on every path."""
        return None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        origin = environ.get("HTTP_ORIGIN")
        if looks_like_preflight(environ):
            # Never forwarded, real or not: a request shaped like a preflight but carrying a
            # body or a method override is refused here, so no layer further in can take it
            # for one (meetinity_gateway.preflight holds the one definition).
            reason = why_not_preflight(environ)
            if reason is not None:
                return error_response(
                    environ, start_response, 400, f"malformed CORS preflight: {reason}",
                    headers=[("Vary", ", ".join(_PREFLIGHT_VARY))],
                )
            return self._preflight(environ, start_response, origin)

        cors: t.Sequence[tuple[str, str]] = ()
        if origin is not None and self.origins.allows(origin):
            cors = self._simple_for(origin)

        def start_with_cors(status, headers, exc_info=None):
            # One pass: ours replace whatever the inner app said about CORS; a Vary of its
            # own is merged (rare), else Vary: Origin is appended.
            kept = []
            has_vary = False
            for header in headers:
                lowered = header[0].lower()
                if cors and lowered.startswith(_CORS_PREFIX):
                    continue
                if lowered == "vary":
                    has_vary = True
                kept.append(header)
            kept.extend(cors)
            if has_vary:
                headers = _merge_vary(kept, ("Origin",))
            else:
                kept.append(_VARY_ORIGIN)
                headers = kept
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        return self.app(environ, start_with_cors)


_PARAMS = {
    "origins": as_list,
    "allow_credentials": as_bool,
    "allow_methods": as_list,
    "allow_headers": as_optional_list,  # empty: echo the requested headers
    "expose_headers": as_list,
    "max_age": as_non_negative_int,
}


def filter_factory(global_conf, **local_conf):
    """``paste.filter_factory`` for ``egg:meetinity_gateway#cors``.

    Settings are checked here, when the gateway starts: a bad origin, ``*`` with
    credentials or an unknown key is a ConfigError naming the key.
    """
    kwargs = cast_settings(local_conf, _PARAMS, global_conf)
    # Build once now so a bad combination fails at start, not when the pipeline is wrapped.
    CorsMiddleware(_NoApp(), **kwargs)

    def make_filter(app):
        return CorsMiddleware(app, **kwargs)

    return make_filter


class _NoApp:
    """Placeholder app used only to validate settings in :func:`filter_factory`."""

    def __call__(self, environ, start_response):  # pragma: no cover - never called
        raise RuntimeError("settings check only")
