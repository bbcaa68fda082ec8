"""The router: a Werkzeug ``Map`` from paths to endpoint apps.

A route is written in one ini value (keys cannot hold ``:``, values can)::

    route.NAME = [METHODS] PATH -> TARGET [REWRITE]

* ``PATH`` matches exactly; ``PATH/*`` matches ``PATH`` and everything below it on segment
  boundaries (``/api/users/*`` covers ``/api/users`` and ``/api/users/7``, not
  ``/api/usersX``).
* ``METHODS``: comma-separated (``GET,POST``); left out, every method. ``HEAD`` comes with
  ``GET``.
* ``TARGET``: an endpoint name (an upstream, or the built-in ``@health`` / ``@live``).
* ``REWRITE``: for a prefix route, the path that replaces ``PATH`` upstream
  (``/api/users/* -> user_service /users`` sends ``/api/users/7`` to ``/users/7``).

No slash redirects, no merged slashes: the gateway never answers 3xx by itself. Unmatched
paths get the JSON 404, a wrong method the JSON 405 with ``Allow``. The matched route's name
and the upstream path go into the environ (``meetinity_gateway.route``,
``meetinity_gateway.upstream_path``).
"""
from __future__ import annotations

import dataclasses
import re
import typing as t

from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound
from werkzeug.routing import BaseConverter, Map, RequestRedirect, Rule

from meetinity_gateway.paths import normalize_prefix
from meetinity_gateway.problems import MethodNotAllowed, NotFound
from meetinity_gateway.proxy.app import UPSTREAM_PATH_KEY

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ROUTE_KEY", "Route", "Router", "parse_route"]

ROUTE_KEY = "meetinity_gateway.route"

_METHOD = re.compile(r"^[A-Z]+$")
_SPEC = re.compile(
    r"^\s*(?:(?P<methods>[A-Za-z]+(?:\s*,\s*[A-Za-z]+)*)\s+)?"
    r"(?P<path>/\S*)\s*->\s*(?P<target>@?[A-Za-z_][A-Za-z0-9_.-]*)"
    r"(?:\s+(?P<rewrite>/\S*))?\s*$"
)


@dataclasses.dataclass(frozen=True)
class Route:
    """One line of the route table."""

    name: str
    path: str
    target: str
    prefix: bool = True
    rewrite: str | None = None
    methods: frozenset[str] | None = None

    def describe(self) -> str:
        methods = ",".join(sorted(self.methods)) if self.methods else "*"
        path = self.path + ("/*" if self.prefix and self.path != "/" else "")
        if self.prefix and self.path == "/":
            path = "/*"
        rewrite = f" {self.rewrite}" if self.rewrite is not None else ""
        return f"{self.name}: {methods} {path} -> {self.target}{rewrite}"

    def upstream_path(self, path_info: str) -> str:
        if self.rewrite is None:
            return path_info
        rest = path_info[len(self.path):] if self.path != "/" else path_info
        base = self.rewrite.rstrip("/")
        path = base + rest
        if not path.startswith("/"):
            path = "/" + path
        return path


def parse_route(name: str, spec: str) -> Route:
    """Parse ``[METHODS] PATH[/*] -> TARGET [REWRITE]``; raises ValueError with the reason."""
    match = _SPEC.match(spec)
    if not match:
        raise ValueError("expected '[METHODS] PATH[/*] -> TARGET [REWRITE]'")
    raw_path = match.group("path")
    prefix = raw_path == "/*" or raw_path.endswith("/*")
    path = normalize_prefix(raw_path[:-2] or "/" if prefix else raw_path)
    rewrite = match.group("rewrite")
    if rewrite is not None:
        if not prefix:
            raise ValueError("a rewrite needs a prefix route (PATH/*)")
        rewrite = normalize_prefix(rewrite)
    methods = None
    if match.group("methods"):
        methods = frozenset(m.strip().upper() for m in match.group("methods").split(","))
        if "*" in methods:
            methods = None
    return Route(
        name=name,
        path=path,
        target=match.group("target"),
        prefix=prefix,
        rewrite=rewrite,
        methods=methods,
    )


class _RestConverter(BaseConverter):
    """The rest of a path below a prefix: may be empty, may hold slashes."""

    regex = ".*"
    part_isolating = False


class Router:
    """Dispatches to endpoint apps by route (see the module docstring).

    :param routes: the route table.
    :param endpoints: WSGI apps by target name; every route's target must be there.
    """

    def __init__(self, routes: t.Sequence[Route], endpoints: t.Mapping[str, WSGIApplication]):
        self.routes = list(routes)
        self.endpoints = dict(endpoints)
        seen: dict[str, str] = {}
        rules = []
        for route in self.routes:
            if route.target not in self.endpoints:
                raise ValueError(f"route {route.name}: unknown target {route.target!r}")
            # A prefix route covers its own path too: the same path twice is ambiguous.
            if route.path in seen:
                raise ValueError(
                    f"route {route.name}: {route.path} already routed by {seen[route.path]}"
                )
            seen[route.path] = route.name
            methods = sorted(route.methods) if route.methods else None
            rules.append(Rule(route.path, endpoint=route, methods=methods))
            if route.prefix:
                below = "/<rest:rest>" if route.path == "/" else route.path + "/<rest:rest>"
                rules.append(Rule(below, endpoint=route, methods=methods))
        self.map = Map(
            rules,
            strict_slashes=False,
            merge_slashes=False,
            redirect_defaults=False,
            converters={"rest": _RestConverter},
        )
        # Matching needs no per-request binding: the gateway routes on the path alone.
        self._adapter = self.map.bind("gateway", "/")
        # The app answering each route: its target's endpoint, maybe wrapped (wrap_route).
        self._apps = {route.name: self.endpoints[route.target] for route in self.routes}

    def wrap_route(self, name: str, wrapper: t.Callable[[WSGIApplication], WSGIApplication]):
        """Answer route ``name`` with ``wrapper(current app)`` (e.g. its header rules)."""
        self._apps[name] = wrapper(self._apps[name])

    def describe(self) -> list[str]:
        return [route.describe() for route in self.routes]

    def match(self, path_info: str, method: str) -> Route:
        """The route for this request; raises the gateway's NotFound / MethodNotAllowed."""
        try:
            route, _ = self._adapter.match(path_info or "/", method)
        except WerkzeugMethodNotAllowed as exc:
            raise MethodNotAllowed(exc.valid_methods or ()) from None
        except (WerkzeugNotFound, RequestRedirect):
            raise NotFound(f"no route for {path_info or '/'}") from None
        return route

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        path_info = environ.get("PATH_INFO", "")
        try:
            route = self.match(path_info, environ.get("REQUEST_METHOD", "GET"))
        except (NotFound, MethodNotAllowed) as exc:
            return exc(environ, start_response)
        environ[ROUTE_KEY] = route.name
        environ[UPSTREAM_PATH_KEY] = route.upstream_path(path_info or "/")
        return self._apps[route.name](environ, start_response)
