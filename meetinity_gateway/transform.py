"""Header transformation rules per route: request headers before forwarding, response headers
before answering.

One rule per ini value (keys cannot hold ``:``, values can), in ``[app:gateway]``::

    transform.NAME = ROUTES request|response set|append|remove HEADER [VALUE]

* ``ROUTES``: route names (the ``NAME`` of ``route.NAME``), comma-separated, or ``*`` for
  every route.
* ``request set H V`` replaces any client copy of ``H`` by ``V``; ``request append H V``
  adds ``V`` to the client's value as one more list item (``a, V``), or sets it;
  ``request remove H1, H2`` deletes them. Request rules run after authentication, just before
  the proxy: they see (and can remove) the identity headers.
* ``response set H V`` replaces every ``H`` of the answer by one ``H: V``; ``response append
  H V`` adds one more ``H: V`` line; ``response remove H1, H2`` deletes them. They apply to
  whatever the route's endpoint answers: the upstream's response, or the proxy's own
  502/504/413.
* ``VALUE`` is the rest of the line (spaces kept inside, ``${VAR}`` expanded when loaded).
  A request value may hold ``{claim:NAME}``: the verified claim ``NAME`` of the caller's
  token (``meetinity_gateway.claims``, set by auth), never anything the client sent. A
  claim the request lacks, or one that is not a string or an integer fit for a header
  (no control characters, latin-1), refuses the request with a JSON 403: a service never
  gets an empty or forged identity. Example, for a service that reads the caller from
  ``Authorization: Bearer user:<id>``::

      transform.messaging_identity = conversations request set Authorization Bearer user:{claim:sub}

Rules apply in the order of their keys in the file. Every name must be an HTTP token, every
value free of control characters (CR, LF, NUL…) and latin-1 encodable, so a rule can never
inject a header line; connection-level headers (``Connection``, ``Transfer-Encoding``…),
``Content-Length`` and, on requests, ``Host`` cannot be touched, nor can a request header
name hold ``_`` (WSGI could not tell it from ``-``). Any problem is a ConfigError at start.

Example::

    transform.hide_server = * response remove Server, X-Powered-By
    transform.auth_no_store = auth response set Cache-Control no-store
    transform.users_tenant = users, profile request set X-Tenant ${TENANT:-meetinity}

The router applies the rules (:meth:`meetinity_gateway.routing.Router.wrap_route`), through a
:class:`HeaderRules` WSGI wrapper per route, usable alone around any WSGI app.
"""
from __future__ import annotations

import dataclasses
import re
import typing as t

from meetinity_gateway.config import ConfigError
from meetinity_gateway.http11 import is_field_value, is_token
from meetinity_gateway.keys import ADDED_HEADERS_KEY, CLAIMS_KEY
from meetinity_gateway.problems import error_response
from meetinity_gateway.proxy.headers import HOP_BY_HOP

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["HeaderRule", "HeaderRules", "apply_transforms", "parse_transform"]

_ROUTE_NAME = r"[A-Za-z0-9_.@-]+"
_SPEC = re.compile(
    rf"^\s*(?P<routes>\*|{_ROUTE_NAME}(?:\s*,\s*{_ROUTE_NAME})*)"
    r"\s+(?P<direction>\S+)\s+(?P<action>\S+)(?:\s+(?P<rest>.*?))?\s*$",
    re.DOTALL,
)
_DIRECTIONS = ("request", "response")
_ACTIONS = ("set", "append", "remove")
_FORBIDDEN = HOP_BY_HOP | {"content-length"}
_FORBIDDEN_REQUEST = _FORBIDDEN | {"host"}
_CLAIM = re.compile(r"\{claim:([A-Za-z_][A-Za-z0-9_.-]*)\}")


class _MissingClaim(Exception):
    pass


def _claim_value(claims: t.Any, name: str) -> str:
    value = claims.get(name) if isinstance(claims, dict) else None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _MissingClaim(name)
    text = str(value)
    if not text or not is_field_value(text):
        raise _MissingClaim(name)
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        raise _MissingClaim(name) from None
    return text


@dataclasses.dataclass(frozen=True)
class HeaderRule:
    """One validated rule (``names`` holds one name except for ``remove``)."""

    direction: str
    action: str
    names: tuple[str, ...]
    value: str | None = None

    def describe(self) -> str:
        value = f" {self.value}" if self.value is not None else ""
        return f"{self.direction} {self.action} {', '.join(self.names)}{value}"


def _check_name(name: str, direction: str) -> str:
    if not is_token(name):
        raise ValueError(f"{name!r} is not a valid header name")
    lowered = name.lower()
    if lowered in (_FORBIDDEN_REQUEST if direction == "request" else _FORBIDDEN):
        raise ValueError(f"{name} cannot be transformed (the gateway and server manage it)")
    if direction == "request" and "_" in name:
        raise ValueError(f"{name}: a request header name cannot hold '_' (WSGI maps it to '-')")
    return name


def _check_value(value: str) -> str:
    if not is_field_value(value):
        raise ValueError("a header value cannot hold control characters (CR, LF, NUL…)")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("a header value must be latin-1 text") from None
    return value


def parse_transform(spec: str) -> tuple[tuple[str, ...] | None, HeaderRule]:
    """``(route names or None for every route, rule)``; raises ValueError with the reason."""
    # Checked before anything else: a CR/LF anywhere is refused, whatever the field.
    _check_value(spec.strip())
    match = _SPEC.match(spec)
    if not match:
        raise ValueError("expected 'ROUTES request|response set|append|remove HEADER [VALUE]'")
    routes_text = match.group("routes")
    routes = None if routes_text == "*" else tuple(
        name.strip() for name in routes_text.split(","))
    direction = match.group("direction").lower()
    action = match.group("action").lower()
    rest = (match.group("rest") or "").strip()
    if direction not in _DIRECTIONS:
        raise ValueError(f"expected request or response, not {match.group('direction')!r}")
    if action not in _ACTIONS:
        raise ValueError(f"expected set, append or remove, not {match.group('action')!r}")
    if not rest:
        raise ValueError(f"{action} needs a header name")
    if action == "remove":
        names = tuple(_check_name(name.strip(), direction) for name in rest.split(","))
        return routes, HeaderRule(direction, action, names)
    name, _, value = rest.replace("\t", " ").partition(" ")
    value = value.strip()
    if not value:
        raise ValueError(f"{action} {name} needs a value")
    if direction == "response" and _CLAIM.search(value):
        raise ValueError("{claim:NAME} is for request rules only")
    return routes, HeaderRule(direction, action, (_check_name(name, direction),),
                              _check_value(value))


def _environ_key(name: str) -> str:
    upper = name.upper().replace("-", "_")
    return upper if upper in ("CONTENT_TYPE",) else "HTTP_" + upper


class HeaderRules:
    """Apply header rules around one WSGI app (the endpoint of a route).

    :param app: the WSGI application to wrap.
    :param rules: :class:`HeaderRule` objects, applied in order.
    """

    def __init__(self, app: WSGIApplication, rules: t.Iterable[HeaderRule]) -> None:
        self.app = app
        self.rules = list(rules)
        # Precomputed: (action, environ keys, value) for requests; (action, lower-case names,
        # name, value) for responses.
        self._request = [
            (rule.action, tuple(_environ_key(n) for n in rule.names), rule.value,
             bool(rule.value and _CLAIM.search(rule.value)))
            for rule in self.rules if rule.direction == "request"
        ]
        self._response = [
            (rule.action, frozenset(n.lower() for n in rule.names), rule.names[0], rule.value)
            for rule in self.rules if rule.direction == "response"
        ]
        # Request headers these rules set: the gateway's own (see ADDED_HEADERS_KEY).
        self._added = frozenset(
            rule.names[0].lower() for rule in self.rules
            if rule.direction == "request" and rule.action != "remove"
        )

    def __repr__(self) -> str:
        return f"HeaderRules({[rule.describe() for rule in self.rules]!r})"

    def _transform_response(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for action, lowered, name, value in self._response:
            if action == "append":
                headers.append((name, value))
                continue
            headers = [h for h in headers if h[0].lower() not in lowered]
            if action == "set":
                headers.append((name, value))
        return headers

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        for action, keys, value, uses_claims in self._request:
            if uses_claims:
                claims = environ.get(CLAIMS_KEY)
                try:
                    value = _CLAIM.sub(lambda m: _claim_value(claims, m.group(1)), value)
                except _MissingClaim as exc:
                    return error_response(
                        environ, start_response, 403,
                        f"this route needs the token claim {exc.args[0]} to name the caller")
            if action == "remove":
                for key in keys:
                    environ.pop(key, None)
            elif action == "set":
                environ[keys[0]] = value
            else:
                current = environ.get(keys[0])
                environ[keys[0]] = f"{current}, {value}" if current else value
        if self._added:
            environ.setdefault(ADDED_HEADERS_KEY, set()).update(self._added)
        if not self._response:
            return self.app(environ, start_response)

        def start_transformed(status, headers, exc_info=None):
            headers = self._transform_response(list(headers))
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        return self.app(environ, start_transformed)


def apply_transforms(router, specs: t.Mapping[str, str]) -> None:
    """Parse ``{NAME: spec}`` (the ``transform.NAME`` keys) and wrap the router's routes.

    Raises a ConfigError naming the ``transform.NAME`` key for a bad rule or unknown route.
    """
    route_names = [route.name for route in router.routes]
    per_route: dict[str, list[HeaderRule]] = {name: [] for name in route_names}
    for name, spec in specs.items():
        key = f"transform.{name}"
        try:
            routes, rule = parse_transform(spec)
        except ValueError as exc:
            raise ConfigError(str(exc), key=key, value=spec) from None
        for route in routes if routes is not None else route_names:
            if route not in per_route:
                raise ConfigError(
                    f"unknown route {route!r} (known: {', '.join(route_names)})",
                    key=key, value=spec)
            per_route[route].append(rule)
    for route, rules in per_route.items():
        if rules:
            router.wrap_route(route, lambda app, rules=rules: HeaderRules(app, rules))
