"""Each route's whole policy in one view, assembled from the layers that enforce it.

No layer knows the others: each one answers ``policy_for(path, method)`` (its part, as text:
``auth`` token or public, ``authorize`` the deciding rule, a ``ratelimit`` instance the rule
that counts; ``None`` from a layer with no say per path, see :mod:`meetinity_gateway.pipeline`),
and the router carries each proxied route's :class:`~meetinity_gateway.assembly.RoutePolicy`.
:func:`route_policies` asks every layer about a path each route serves, for each method it
serves; ``check`` and ``/status`` print what it returns, so what they show is what the serving
objects decide.
"""
from __future__ import annotations

import dataclasses
import typing as t

from meetinity_gateway.pipeline import Layer

__all__ = ["RouteView", "route_policies"]

#: The methods asked about for a route that serves every method.
ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@dataclasses.dataclass(frozen=True)
class RouteView:
    route: str
    methods: str
    path: str
    sample: str  # the path the layers were asked about
    layers: tuple[tuple[str, str], ...]  # (layer name, its policy text; per method if differs)
    upstream: str


def _layer_text(layer: Layer, path: str, methods: t.Sequence[str]) -> str | None:
    """Its policy for ``path``, per method when they differ; ``None``: no say per path."""
    answers: dict[str | None, list[str]] = {}
    for method in methods:
        answers.setdefault(layer.policy_for(path, method), []).append(method)
    if list(answers) == [None]:
        return None
    if len(answers) == 1:
        return next(iter(answers))
    return "; ".join(f"{','.join(ms)}: {text}" for text, ms in answers.items())


def route_policies(router: t.Any, layers: t.Iterable[tuple[str, t.Any]]) -> list[RouteView]:
    """For every mounted route: what each named layer (``(name, layer)`` pairs, outermost
    first; those with no say per path are left out) and the upstream policy say."""
    described = [Layer.of(name, layer) for name, layer in layers]
    policies = getattr(router, "policies", {}) or {}
    views = []
    for route in router.routes:
        methods = sorted(route.methods) if route.methods else list(ALL_METHODS)
        policy = policies.get(route.name)
        upstream = policy.describe() if policy is not None else "built in"
        path = route.path + ("/*" if route.prefix and route.path != "/" else "")
        shown = ",".join(sorted(route.methods)) if route.methods else "*"
        sample = route.template.sample()
        # A prefix route: the path itself and a path below it (rules often differ).
        samples = [sample, sample.rstrip("/") + "/x"] if route.prefix else [sample]
        for probe in samples:
            answers = ((layer.name, _layer_text(layer, probe, methods)) for layer in described)
            texts = tuple((name, text) for name, text in answers if text is not None)
            views.append(RouteView(route.name, shown, path, probe, texts, upstream))
    return views
