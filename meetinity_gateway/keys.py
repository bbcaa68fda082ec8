"""Every namespaced WSGI environ key of the gateway, named once: written by one layer and read
by others (logs, metrics, the proxy).

Each producer documents the keys it sets; this module only names them, so a reader (the
observability layer, the proxy) needs no import of the producer, and no module spells a
key itself (the modules that set a key still export its name, for callers that imported it
there). The proxy's single-value keys describe the last attempt of a request;
``UPSTREAM_ATTEMPTS_KEY`` lists them all.
"""
from __future__ import annotations

__all__ = [
    "ADDED_HEADERS_KEY",
    "RATELIMIT_KEY",
    "REQUEST_ID_KEY",
    "AUTH_ERROR_KEY",
    "AUTHZ_DENIED_KEY",
    "CLAIMS_KEY",
    "CUT_KEY",
    "PATH_MATCHES_KEY",
    "PATH_PARAMS_KEY",
    "ROUTE_KEY",
    "TRACE_ID_KEY",
    "TRACE_KEY",
    "UPSTREAM_ATTEMPTS_KEY",
    "UPSTREAM_ERROR_KEY",
    "UPSTREAM_KEY",
    "UPSTREAM_LIMIT_KEY",
    "UPSTREAM_MS_KEY",
    "UPSTREAM_REJECTED_KEY",
    "TARGET_KEY",
    "UPSTREAM_PATH_KEY",
]

#: Lower-case names of request headers a layer of the gateway put in the environ itself (an
#: identity header, a per-route header rule): a set, added to by each such layer. The proxy
#: never removes them because the client's ``Connection`` header names them.
ADDED_HEADERS_KEY = "meetinity_gateway.added_headers"
#: The upstream's name (``user_service``), set by the proxy before it forwards.
UPSTREAM_KEY = "meetinity_gateway.upstream"
#: The upstream's cap on requests in flight (``max_in_flight``; ``None``: no cap), set by the
#: proxy with ``UPSTREAM_KEY``.
UPSTREAM_LIMIT_KEY = "meetinity_gateway.upstream_max_in_flight"
#: Why the proxy refused the request without calling the upstream at its ``max_in_flight``
#: cap (``queue_full``, ``queue_timeout`` or ``stalled``: see proxy.bulkhead.BUSY_REASONS),
#: set by the proxy.
UPSTREAM_REJECTED_KEY = "meetinity_gateway.upstream_rejected"
#: The upstream target actually called (``host:port``), set by the proxy.
TARGET_KEY = "meetinity_gateway.target"
#: Milliseconds (float) from sending the request upstream to its response headers (or to the
#: failure), set by the proxy.
UPSTREAM_MS_KEY = "meetinity_gateway.upstream_ms"
#: Why the last upstream attempt failed (``timeout`` or ``unavailable``; ``None`` when it got
#: an answer), set by the proxy.
UPSTREAM_ERROR_KEY = "meetinity_gateway.upstream_error"
#: Every attempt of the request (retries included), in order: a list of ``(target,
#: milliseconds, error or None)``, appended to by the proxy.
UPSTREAM_ATTEMPTS_KEY = "meetinity_gateway.upstream_attempts"
#: Why authentication refused the request (the 401/503 message), set by the auth layer.
AUTH_ERROR_KEY = "meetinity_gateway.auth_error"
#: The W3C trace id (32 hex digits) of the request, set by the observability layer.
TRACE_ID_KEY = "meetinity_gateway.trace_id"
#: The verified claims of the request's token (a dict), set by the auth layer.
CLAIMS_KEY = "meetinity_gateway.claims"
#: The name of the authorization rule that refused the request, set by the authorize layer.
AUTHZ_DENIED_KEY = "meetinity_gateway.authz_denied"
#: Set by the server when it cut the request's connection at stop (a second stop signal or
#: the drain deadline): ``{"reason": …, "answered": whether the status line had been sent}``.
CUT_KEY = "meetinity_gateway.cut"
#: The request's OpenTelemetry spans (a :class:`meetinity_gateway.tracing.RequestTrace`), set
#: by the observability layer only when OpenTelemetry tracing is on; the proxy starts a
#: client span per upstream attempt through it (``attempt`` / ``end_attempt``).
TRACE_KEY = "meetinity_gateway.trace"
#: What path tables (:class:`meetinity_gateway.pathrules.PathTable`) answered for this
#: request: ``{(table, path, method): PathMatch}``, added to by each table asked with the
#: environ, so a later layer holding the same table reads the answer instead of matching again.
PATH_MATCHES_KEY = "meetinity_gateway.path_matches"
#: The matched route's name (``users``), set by the router.
ROUTE_KEY = "meetinity_gateway.route"
#: The matched route's path parameters (``{"id": 7}``), set by the router for a route that
#: has some.
PATH_PARAMS_KEY = "meetinity_gateway.path_params"
#: The path (and no query) the proxy sends upstream, set by the router from the route's
#: rewrite; without it the proxy sends ``PATH_INFO``.
UPSTREAM_PATH_KEY = "meetinity_gateway.upstream_path"
#: The rate-limit layer's decision for inner layers and logs (an inner instance overwrites an
#: outer one's), set by the ratelimit layer.
RATELIMIT_KEY = "meetinity_gateway.ratelimit"
#: The request's id, set by the error edge (or the observability layer) first thing.
REQUEST_ID_KEY = "meetinity_gateway.request_id"
