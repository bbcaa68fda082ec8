"""The router: a path table (:class:`~meetinity_gateway.pathrules.PathTable`) to endpoint apps.

A route is written in one ini value (keys cannot hold ``:``, values can)::

    route.NAME = [METHODS] PATH -> TARGET [REWRITE]

* ``PATH`` matches exactly; ``PATH/*`` matches ``PATH`` and everything below it on segment
  boundaries (``/api/users/*`` covers ``/api/users`` and ``/api/users/7``, not
  ``/api/usersX``). ``PATH`` may hold Werkzeug converters: ``/api/users/<int:id>/
  recommendations``, ``/api/things/<uuid:key>/*`` (see :mod:`meetinity_gateway.pathrules`).
* The most specific route wins, by Werkzeug's own rule ordering, whatever the file order:
  static segments beat converters (``/api/users/<int:id>/recommendations`` beats
  ``/api/users/*`` for ``/api/users/7/recommendations``, while ``/api/users/x/
  recommendations`` stays with ``/api/users/*``), ``int`` beats ``string``, a longer prefix
  beats a shorter one. Two routes accepting the same paths with overlapping methods are a
  configuration error (the winner would depend on file order).
* ``METHODS``: comma-separated (``GET,POST``); left out, every method. ``HEAD`` comes with
  ``GET``. A route for some methods wins over an all-methods route on the same path, and
  falls through to it (or to a less specific route) for the other methods.
* ``TARGET``: an endpoint name (an upstream, or the built-in ``@health`` / ``@live``).
* ``REWRITE``: the upstream path. For a prefix route it replaces ``PATH`` and the rest is
  appended (``/api/users/* -> user_service /users`` sends ``/api/users/7`` to
  ``/users/7``); for an exact route it is the whole path. It may use the route's parameters:
  ``/api/users/<int:id>/recommendations -> event_service /users/<id>/recommendations``.

No slash redirects, no merged slashes: the gateway never answers 3xx by itself. Unmatched
paths get the JSON 404, a wrong method the JSON 405 with ``Allow``. The matched route's name,
its path parameters and the upstream path go into the environ (``meetinity_gateway.route``,
``meetinity_gateway.path_params``, ``meetinity_gateway.upstream_path``).

A route may have its own endpoint app (``route_apps``: the assembly gives a route with its
own upstream policy its own proxy app) and its own description notes (``notes``, printed by
``check`` and ``routes``).
"""
from __future__ import annotations

import dataclasses
import re
import typing as t

from meetinity_gateway.keys import PATH_PARAMS_KEY, ROUTE_KEY, UPSTREAM_PATH_KEY
from meetinity_gateway.pathrules import (
    REST,
    PathTable,
    PathTemplate,
    PathTie,
    parse_path,
    parse_rewrite,
    substitute,
)
from meetinity_gateway.problems import MethodNotAllowed, NotFound

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["PATH_PARAMS_KEY", "ROUTE_KEY", "Route", "Router", "parse_route"]


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
    template: PathTemplate | None = None

    def __post_init__(self) -> None:
        if self.template is None:
            text = self.path if not self.prefix else (
                "/*" if self.path == "/" else self.path + "/*")
            object.__setattr__(self, "template", parse_path(text))

    @property
    def params(self) -> tuple[tuple[str, str], ...]:
        """The path parameters, ``(name, converter)`` in order."""
        assert self.template is not None
        return self.template.params

    def describe(self) -> str:
        methods = ",".join(sorted(self.methods)) if self.methods else "*"
        path = self.path + ("/*" if self.prefix and self.path != "/" else "")
        if self.prefix and self.path == "/":
            path = "/*"
        rewrite = f" {self.rewrite}" if self.rewrite is not None else ""
        line = f"{self.name}: {methods} {path} -> {self.target}{rewrite}"
        if self.params:
            line += " (parameters: " + ", ".join(f"{n}:{c}" for n, c in self.params) + ")"
        return line

    def upstream_path(self, path_info: str, values: t.Mapping[str, t.Any] | None = None) -> str:
        """The path sent upstream for ``path_info``, matched with ``values`` (the Werkzeug
        match: parameters, and the rest below a prefix)."""
        if self.rewrite is None:
            return path_info
        base = substitute(self.rewrite, values or {})
        if not self.prefix:
            return base
        if values is None:
            # No match at hand (a tool, a test): only a prefix without parameters can say.
            suffix = path_info[len(self.path):] if self.path != "/" else path_info
        elif REST in values:
            suffix = "/" + values[REST]
        else:
            suffix = "/" if path_info.endswith("/") and path_info != "/" else ""
        path = base.rstrip("/") + suffix
        return path if path.startswith("/") else "/" + path


def parse_route(name: str, spec: str) -> Route:
    """Parse ``[METHODS] PATH[/*] -> TARGET [REWRITE]``; raises ValueError with the reason."""
    match = _SPEC.match(spec)
    if not match:
        raise ValueError("expected '[METHODS] PATH[/*] -> TARGET [REWRITE]'")
    template = parse_path(match.group("path"))
    rewrite = match.group("rewrite")
    if rewrite is not None:
        rewrite = parse_rewrite(rewrite, template)
    methods = None
    if match.group("methods"):
        methods = frozenset(m.strip().upper() for m in match.group("methods").split(","))
        if "*" in methods:
            methods = None
    return Route(
        name=name,
        path=template.path,
        target=match.group("target"),
        prefix=template.prefix,
        rewrite=rewrite,
        methods=methods,
        template=template,
    )


class Router:
    """Dispatches to endpoint apps by route (see the module docstring).

    :param routes: the route table.
    :param endpoints: WSGI apps by target name; every route's target must be there.
    :param route_apps: apps answering particular routes instead of their target's endpoint
        (by route name), e.g. a proxy app with the route's own timeouts.
    :param notes: extra text per route name for :meth:`describe` (effective policy).
    :param unmounted: routes left out because their upstream is not configured; listed by
        :meth:`describe`, never matched (their paths get the 404).
    """

    def __init__(
        self,
        routes: t.Sequence[Route],
        endpoints: t.Mapping[str, WSGIApplication],
        *,
        route_apps: t.Mapping[str, WSGIApplication] | None = None,
        notes: t.Mapping[str, str] | None = None,
        unmounted: t.Sequence[Route] = (),
    ):
        self.routes = list(routes)
        self.endpoints = dict(endpoints)
        self.route_apps = dict(route_apps or {})
        self.notes = dict(notes or {})
        self.unmounted = list(unmounted)
        #: Upstream name → URL of the mounted upstreams, and the names left unmounted (an
        #: empty URL); set by the assembly, printed by ``check``.
        self.upstreams: dict[str, str] = {}
        self.unmounted_upstreams: list[str] = []
        #: Route name → its effective upstream policy (assembly.RoutePolicy), set by the
        #: assembly; shown by ``check`` and ``/status`` (routeview.py).
        self.policies: dict[str, t.Any] = {}
        for route in self.routes:
            if route.target not in self.endpoints:
                raise ValueError(f"route {route.name}: unknown target {route.target!r}")
        self.table: PathTable[Route] = _route_table(self.routes)
        # Every route, the unmounted ones too: ties among them fail now, not on the day their
        # URL is set; matched only to name an unmounted service in the 404, and by the
        # assembly to check that other layers' rules name paths some route serves.
        self.every_route: PathTable[Route] = (
            _route_table(self.routes + self.unmounted) if self.unmounted else self.table)
        # The app answering each route: its own, else its target's endpoint; maybe wrapped.
        self._apps = {route.name: self.route_apps.get(route.name, self.endpoints[route.target])
                      for route in self.routes}

    def wrap_route(self, name: str, wrapper: t.Callable[[WSGIApplication], WSGIApplication]):
        """Answer route ``name`` with ``wrapper(current app)`` (e.g. its header rules)."""
        self._apps[name] = wrapper(self._apps[name])

    def describe(self, notes: bool = False) -> list[str]:
        """One line per route (parameters included); with ``notes``, each route's note
        (its effective upstream policy) in brackets."""
        lines = []
        for route in self.routes:
            note = self.notes.get(route.name) if notes else None
            lines.append(route.describe() + (f" [{note}]" if note else ""))
        for route in self.unmounted:
            lines.append(f"{route.describe()} [not mounted: {route.target} has no URL]")
        return lines

    def match_route(self, path_info: str, method: str,
                    environ: WSGIEnvironment | None = None) -> tuple[Route, dict[str, t.Any]]:
        """The route and its match values; raises the gateway's NotFound / MethodNotAllowed.
        With ``environ``, a match another layer made with this router's table is reused."""
        path = path_info or "/"
        found = self.table.lookup(path, method, environ)
        if found.entry is None:
            if found.allowed:
                raise MethodNotAllowed(found.allowed)
            raise NotFound(self._not_found(path, method))
        return found.entry, found.values

    def _not_found(self, path: str, method: str) -> str:
        """The 404's message: names the unmounted service whose route covers ``path``."""
        if self.unmounted:
            # No mounted route takes this path and method: an entry of the whole table that
            # does is an unmounted one.
            found = self.every_route.find(path, method)
            if found is not None:
                route = found[0]
                return (f"no route for {path}: service {route.target} is not mounted "
                        f"(its upstream URL is empty)")
        return f"no route for {path}"

    def match(self, path_info: str, method: str) -> Route:
        """The route for this request; raises the gateway's NotFound / MethodNotAllowed."""
        return self.match_route(path_info, method)[0]

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        path_info = environ.get("PATH_INFO", "")
        try:
            route, values = self.match_route(path_info, environ.get("REQUEST_METHOD", "GET"),
                                             environ)
        except (NotFound, MethodNotAllowed) as exc:
            return exc(environ, start_response)
        environ[ROUTE_KEY] = route.name
        if route.params:
            environ[PATH_PARAMS_KEY] = {name: values[name] for name, _ in route.params}
        environ[UPSTREAM_PATH_KEY] = route.upstream_path(path_info or "/", values)
        return self._apps[route.name](environ, start_response)


def _route_table(routes: t.Sequence[Route]) -> PathTable[Route]:
    """The routes' path table; a tie is a ValueError naming both routes."""
    try:
        return PathTable(routes)
    except PathTie as tie:
        route, other = tie.entry, tie.other
        raise ValueError(f"route {route.name}: {route.template.text} already routed by "
                         f"{other.name} ({other.template.text})") from None
