"""The pipeline model: a loaded gateway, its layers outermost first, and what each one says.

:func:`meetinity_gateway.assembly.load_pipeline` (or :func:`~meetinity_gateway.assembly.adopt`
under another loader) builds a :class:`Pipeline`; ``check``, the ``/status`` page, ``/health``
and the start-up line read it from here, so none of them imports the loader and the loader
imports none of them back.

Every middleware of the gateway answers the same three questions, so nothing guesses what a
layer is from the attributes it happens to have:

* ``kind`` (a class attribute): ``observe``, ``errors``, ``cors``, ``ratelimit``, ``auth`` or
  ``authorize`` (``userlimit`` is a ``ratelimit``);
* ``describe()``: its settings or rules, one line each (printed by ``check``, shown by
  ``/status``);
* ``policy_for(path, method)``: its part of a route's policy as text, or ``None`` when it
  decides nothing per path (the per-route view, :mod:`meetinity_gateway.routeview`).

A filter of your own in the pipeline (``use = call:module:function``) need not: it is a
``foreign`` layer, shown by its class name, with no lines and no say per route.
"""
from __future__ import annotations

import dataclasses
import typing as t

from meetinity_gateway.logs import redact_uri

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import WSGIApplication

    from meetinity_gateway.routing import Router

__all__ = ["FOREIGN", "Layer", "Pipeline", "layers_of", "mounted_summary", "startup_line",
           "upstream_list"]

#: The kind of a layer that is not one of the gateway's middlewares.
FOREIGN = "foreign"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer of a pipeline: its name there, the middleware object and its kind."""

    name: str
    app: t.Any
    kind: str

    @classmethod
    def of(cls, name: str, app: t.Any) -> Layer:
        # The one place a layer is looked at: a gateway middleware declares its kind.
        kind = getattr(type(app), "kind", None)
        return cls(name, app, kind if isinstance(kind, str) else FOREIGN)

    def describe(self) -> list[str]:
        """Its settings or rules, one line each (none for a foreign layer)."""
        return [] if self.kind == FOREIGN else list(self.app.describe())

    def policy_for(self, path: str, method: str) -> str | None:
        """Its part of the policy of ``method path``; ``None``: no say per path."""
        return None if self.kind == FOREIGN else self.app.policy_for(path, method)


def layers_of(app: t.Any, stop: t.Any = None) -> list[t.Any]:
    """The middleware objects from ``app`` inwards, outermost first, following each one's
    ``app`` (the WSGI convention of every middleware here) until ``stop`` or the end."""
    layers, seen = [], set()
    while app is not None and id(app) not in seen and app is not stop:
        seen.add(id(app))
        layers.append(app)
        app = getattr(app, "app", None)
    return layers


@dataclasses.dataclass
class Pipeline:
    """A loaded gateway: the WSGI app, its layers by name (outermost first), the router."""

    app: WSGIApplication
    names: list[str]
    router: Router | None
    file: str
    #: The built filters by pipeline name (the middleware objects), outermost first.
    layers: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    #: 12 hex digits naming the ini file, .env and environment values it was built from.
    fingerprint: str | None = None
    #: Its start-up line was logged (:func:`meetinity_gateway.serving.lifecycle.announce`).
    announced: bool = False

    def described(self) -> list[Layer]:
        """Every layer, outermost first, with its kind (see the module docstring)."""
        return described(self)

    def of_kind(self, kind: str) -> list[Layer]:
        """The layers of one kind (``ratelimit`` gives the address and the user limits)."""
        return [layer for layer in self.described() if layer.kind == kind]

    @property
    def max_body_size(self) -> int | None:
        """The largest request body any proxy endpoint accepts (None: no proxy endpoint)."""
        from meetinity_gateway.proxy.app import ProxyApp

        apps = []
        if self.router:
            apps = list(self.router.endpoints.values()) + list(self.router.route_apps.values())
        sizes = [app.max_body_size for app in apps if isinstance(app, ProxyApp)]
        return max(sizes) if sizes else None


def described(pipeline: t.Any) -> list[Layer]:
    """The layers of ``pipeline`` (a :class:`Pipeline`, or any object with ``app``, ``router``
    and maybe ``layers``): by their pipeline names when it has them, else found by following
    each one's ``app`` down to the router and named by class."""
    named = getattr(pipeline, "layers", None)
    if named:
        return [Layer.of(name, app) for name, app in named.items()]
    return [Layer.of(type(app).__name__, app)
            for app in layers_of(getattr(pipeline, "app", None), getattr(pipeline, "router", None))]


# -- the lines every way of serving prints ----------------------------------------------------

def upstream_list(router: Router | None) -> str:
    """``user_service=http://10.0.0.5:5001, …`` (passwords masked), or ``none``."""
    mounted = getattr(router, "upstreams", None) or {}
    return ", ".join(f"{name}={redact_uri(url)}" for name, url in mounted.items()) or "none"


def mounted_summary(router: Router | None) -> str:
    """Which upstreams serve (with their URLs) and which are unmounted (an empty URL): for the
    start-up line."""
    unmounted = getattr(router, "unmounted_upstreams", None) or []
    return (f"upstreams mounted: {upstream_list(router)}; "
            f"not mounted (empty URL): {', '.join(unmounted) or 'none'}")


def startup_line(pipeline: Pipeline) -> str:
    """The one line every way of serving logs when a process has loaded the gateway: version,
    pipeline, configuration fingerprint, upstreams."""
    from meetinity_gateway import __version__

    return (f"meetinity-gateway {__version__}: " + " -> ".join(pipeline.names)
            + f" (config {pipeline.fingerprint}); {mounted_summary(pipeline.router)}")
