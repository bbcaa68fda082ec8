"""Builds the gateway from ``gateway.ini``, with no PasteDeploy needed at run time.

The file has PasteDeploy's layout, so PasteDeploy-aware servers (``gunicorn --paste``,
``pserve``) load it too and get the same pipeline::

    [pipeline:main]
    pipeline = errors cors ratelimit auth gateway     ; outermost first

    [filter:errors]
    use = egg:meetinity_gateway#errors

    [app:gateway]
    use = egg:meetinity_gateway#main
    upstream.user_service = ${USER_SERVICE_URL:-http://127.0.0.1:5001}
    upstream.event_service = ${EVENT_SERVICE_URL:-}      ; empty: not mounted
    route.users = /api/users/* -> user_service /users
    policy.users = read_timeout=10, max_body_size=2M    ; this route's upstream policy

``use = egg:DIST#NAME`` resolves through the distribution's ``paste.filter_factory`` /
``paste.app_factory`` entry points; ``use = call:module:function`` names a factory directly.
As in PasteDeploy, ``[DEFAULT]`` values go to ``global_conf`` only, and ``%(here)s`` is the
ini file's folder. ``${VAR}`` expansion is the factories' job (:mod:`meetinity_gateway.config`).
"""
from __future__ import annotations

import configparser
import dataclasses
import importlib
import typing as t
from importlib import metadata
from pathlib import Path

from meetinity_gateway.config import (
    ConfigError,
    as_list,
    as_non_negative_float,
    as_non_negative_int,
    as_positive_float,
    as_positive_int,
    as_size,
    config_fingerprint,
    prepare,
    split_named,
)
from meetinity_gateway.health import HealthApp, LiveApp
from meetinity_gateway.net import DEFAULT_ALLOW, parse_networks
from meetinity_gateway.pipeline import (
    Layer,
    Pipeline,
    layers_of,
    mounted_summary,
    startup_line,
    upstream_list,
)
from meetinity_gateway.proxy.app import ProxyApp
from meetinity_gateway.proxy.bulkhead import default_max_in_flight, default_queue_size
from meetinity_gateway.proxy.upstream import BALANCERS, parse_failure_statuses
from meetinity_gateway.routing import Route, Router, parse_route
from meetinity_gateway.settings import DEFAULT_THREADS
from meetinity_gateway.shared import shared
from meetinity_gateway.status import StatusApp
from meetinity_gateway.transform import apply_transforms

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import WSGIApplication

# Pipeline, mounted_summary, startup_line and upstream_list live in meetinity_gateway.pipeline;
# named here too for the callers that imported them from the loader.
__all__ = ["Pipeline", "adopt", "app_factory", "load_app", "load_pipeline", "mounted_summary",
           "startup_line", "upstream_list"]


# -- the app factory ------------------------------------------------------------------------

def _as_balance(value: str) -> str:
    value = value.strip().lower().replace("-", "_")
    if value not in BALANCERS:
        raise ValueError(f"expected one of {', '.join(BALANCERS)}")
    return value


def _as_seconds_or_off(value: str) -> float:
    """``0`` or ``off`` (off), or a number of seconds."""
    if value.strip().lower() in ("off", ""):
        return 0.0
    return as_non_negative_float(value)


def _as_percent(value: str) -> int:
    number = as_non_negative_int(value)
    if number > 100:
        raise ValueError("expected a percentage between 0 and 100")
    return number


def _as_max_in_flight(value: str) -> int | str | None:
    """``auto`` (derived from ``server_threads``), ``off`` (no cap) or a positive number."""
    lowered = value.strip().lower()
    if lowered in ("auto", ""):
        return "auto"
    if lowered in ("off", "none", "0"):
        return None
    return as_positive_int(value)


def _as_queue_size(value: str) -> int | str:
    """``auto`` (the threads the cap leaves, see default_queue_size) or a number (0: none)."""
    if value.strip().lower() in ("auto", ""):
        return "auto"
    return as_non_negative_int(value)


#: Seconds a request over an upstream's cap waits for a slot when the ini does not say.
DEFAULT_QUEUE_TIMEOUT = 0.5

_APP_PARAMS = {
    "connect_timeout": as_positive_float,
    "read_timeout": as_positive_float,
    "max_body_size": as_size,
    "trusted_proxies": as_non_negative_int,
    "pool_size": as_positive_int,
    "health_timeout": as_positive_float,
    # Upstream pools (meetinity_gateway.proxy.upstream, proxy.bulkhead) and retries
    # (proxy.app).
    "balance": _as_balance,
    "max_fails": as_positive_int,
    "eject_time": as_positive_float,
    "failure_statuses": parse_failure_statuses,
    "max_eject_percent": _as_percent,
    "eject_recheck": _as_seconds_or_off,
    "max_in_flight": _as_max_in_flight,
    "queue_size": _as_queue_size,
    "queue_timeout": _as_seconds_or_off,
    "server_threads": as_positive_int,
    "health_interval": _as_seconds_or_off,
    "dns_interval": _as_seconds_or_off,
    "idle_timeout": as_positive_float,
    "retries": as_non_negative_int,
    "retry_budget": _as_seconds_or_off,
    "replay_size": as_size,
    # Networks that see /health's per-target detail and /status (as METRICS_ALLOW).
    "detail_allow": as_list,
}
_BUILTIN_ENDPOINTS = {"@health", "@live", "@status"}

# What a route may set for itself (policy.ROUTE = key=value, …); the globals are defaults.
# idle_timeout is a property of the connection pool: a route changing it gets its own pool.
_ROUTE_POLICY = {
    "connect_timeout": as_positive_float,
    "read_timeout": as_positive_float,
    "max_body_size": as_size,
    "retries": as_non_negative_int,
    "retry_budget": _as_seconds_or_off,
    "replay_size": as_size,
    "idle_timeout": as_positive_float,
}
_DEFAULTS = {"connect_timeout": 3.0, "read_timeout": 30.0, "max_body_size": 10 * 1024 * 1024,
             "retries": 2, "retry_budget": 10.0, "replay_size": 64 * 1024, "idle_timeout": 4.0}


def _parse_policy(spec: str) -> dict[str, t.Any]:
    """``read_timeout=60, max_body_size=50M`` → typed values; ValueError with the reason."""
    policy: dict[str, t.Any] = {}
    for item in [part.strip() for part in spec.split(",") if part.strip()]:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _ROUTE_POLICY:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(_ROUTE_POLICY)}")
        try:
            policy[key] = _ROUTE_POLICY[key](value)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    if not policy:
        raise ValueError(f"expected KEY=VALUE pairs, KEY one of {', '.join(_ROUTE_POLICY)}")
    return policy


def _size_text(size: int) -> str:
    for unit, factor in (("G", 1024 ** 3), ("M", 1024 ** 2), ("k", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _seconds_text(value: float) -> str:
    return f"{value:g}s"


def _policy_note(policy: t.Mapping[str, t.Any]) -> str:
    return (f"connect {_seconds_text(policy['connect_timeout'])}, "
            f"read {_seconds_text(policy['read_timeout'])}, "
            f"body {_size_text(policy['max_body_size'])}, retries {policy['retries']}, "
            f"idle {_seconds_text(policy['idle_timeout'])}")


@dataclasses.dataclass(frozen=True)
class RoutePolicy:
    """A proxied route's effective upstream policy: the globals, then its ``policy.ROUTE``.

    The one value the route's proxy app is built from and that ``check`` and ``/status``
    show (``describe``): what is shown is what serves.
    """

    route: str
    upstream: str
    connect_timeout: float
    read_timeout: float
    max_body_size: int
    retries: int
    retry_budget: float
    replay_size: int
    idle_timeout: float
    own: bool = False  # set by a policy.ROUTE key

    def values(self) -> dict[str, t.Any]:
        return {key: getattr(self, key) for key in _ROUTE_POLICY}

    def describe(self) -> str:
        return _policy_note(self.values())


def app_factory(global_conf, **local_conf):
    """``paste.app_factory`` for ``egg:meetinity_gateway#main``: the router and its endpoints.

    Keys: ``upstream.NAME = URL [weight=N], …`` (see :mod:`meetinity_gateway.proxy.upstream`;
    an empty value leaves the upstream *unmounted*: its routes are listed but never matched,
    so their paths get the JSON 404), ``route.NAME = SPEC`` (see
    :mod:`meetinity_gateway.routing`), ``policy.ROUTE = KEY=VALUE, …`` (that route's
    ``connect_timeout``, ``read_timeout``, ``max_body_size``, ``retries``, ``retry_budget``,
    ``replay_size``, ``idle_timeout``; the globals are the defaults), ``transform.NAME`` and
    the settings in ``_APP_PARAMS``.
    """
    file = global_conf.get("__file__")
    values = prepare(local_conf, global_conf)

    def error(message, key):
        return ConfigError(message, file=file, key=key, value=values.get(key))

    named, rest = split_named(values, "upstream", "route", "policy", "transform")
    upstream_urls = {name: url.strip() for name, url in named["upstream"].items()}
    route_specs = named["route"]
    policy_specs = named["policy"]
    transform_specs = named["transform"]  # header rules (transform.py)
    settings: dict[str, t.Any] = {}
    for key, value in rest.items():
        if key in _APP_PARAMS:
            try:
                settings[key] = _APP_PARAMS[key](value)
            except ValueError as exc:
                raise error(str(exc), key) from None
        else:
            keys = ["upstream.NAME", "route.NAME", "policy.ROUTE", "transform.NAME"]
            known = ", ".join(sorted(_APP_PARAMS) + keys)
            raise error(f"unknown key (known keys: {known})", key)

    health_timeout = settings.pop("health_timeout", 2.0)
    # The bulkhead: by default each upstream may hold all threads but a few (see
    # default_max_in_flight), so one slow service cannot starve the others or /health/live;
    # a burst over it waits briefly in a queue as long as the few threads left.
    threads = settings.pop("server_threads", DEFAULT_THREADS)  # the server's
    if settings.get("max_in_flight", "auto") == "auto":
        settings["max_in_flight"] = default_max_in_flight(threads)
    if settings.get("queue_size", "auto") == "auto":
        settings["queue_size"] = default_queue_size(threads, settings["max_in_flight"])
    settings.setdefault("queue_timeout", DEFAULT_QUEUE_TIMEOUT)
    mounted = {name: url for name, url in upstream_urls.items() if url}
    unmounted_names = [name for name, url in upstream_urls.items() if not url]
    detail_allow = settings.pop("detail_allow", list(DEFAULT_ALLOW))
    try:
        parse_networks(detail_allow)
    except ValueError as exc:
        raise error(str(exc), "detail_allow") from None
    # The loader names the exact version it read; PasteDeploy does not, so read it here.
    fingerprint = global_conf.get("__fingerprint__") or (
        config_fingerprint(file) if file else None)
    endpoints: dict[str, WSGIApplication] = {}
    for name, url in mounted.items():
        try:
            # Across a reload, an upstream whose URL and settings stay keeps its pool: the
            # targets' health, in-flight counts and keep-alive connections (shared.py).
            identity = (name, url, health_timeout, tuple(sorted(settings.items())))
            endpoints[name] = shared(
                "upstream", identity,
                lambda url=url, name=name: ProxyApp(url, name=name,
                                                    health_timeout=health_timeout, **settings))
        except ValueError as exc:
            raise error(str(exc), f"upstream.{name}") from None
    endpoints["@health"] = HealthApp(
        {name: endpoints[name].pool for name in mounted}, timeout=health_timeout,
        detail_allow=detail_allow, trusted_proxies=settings.get("trusted_proxies", 0),
        fingerprint=fingerprint,
    )
    endpoints["@live"] = LiveApp()
    endpoints["@status"] = StatusApp(
        {name: endpoints[name] for name in mounted}, detail_allow=detail_allow,
        trusted_proxies=settings.get("trusted_proxies", 0), fingerprint=fingerprint, file=file,
    )

    routes: list[Route] = []
    unmounted: list[Route] = []
    for name, spec in route_specs.items():
        try:
            route = parse_route(name, spec)
        except ValueError as exc:
            raise error(str(exc), f"route.{name}") from None
        if route.target in unmounted_names:
            unmounted.append(route)
            continue
        if route.target not in endpoints:
            known = ", ".join(sorted(endpoints))
            raise error(f"unknown target {route.target!r} (known: {known})", f"route.{name}")
        routes.append(route)
    if not routes and not unmounted:
        raise ConfigError("no routes: add route.NAME = PATH -> TARGET keys", file=file)

    route_apps, notes, route_policies = _route_policies(
        routes, unmounted, policy_specs, endpoints, mounted, settings, health_timeout, error)
    try:
        # Ties among the unmounted routes fail now too, not on the day their URL is set.
        router = Router(routes, endpoints, route_apps=route_apps, notes=notes,
                        unmounted=unmounted)
    except ValueError as exc:
        raise ConfigError(str(exc), file=file) from None
    router.upstreams = dict(mounted)
    router.policies = route_policies
    router.unmounted_upstreams = list(unmounted_names)
    try:
        apply_transforms(_AllRoutes(router), transform_specs)
    except ConfigError as exc:
        raise exc.locate(file=file) from None
    return router


def adopt(app: t.Any, file: str | None = None, name: str = "main") -> Pipeline | None:
    """The :class:`Pipeline` of ``app`` when another loader built it from the ini file
    (PasteDeploy, under ``gunicorn --paste`` and ``pserve``): the layers are found by
    following each one's ``app`` down to the router, their names read from
    ``[pipeline:NAME]``; the built-in endpoints (``/status``, ``/health``) get it as under
    :func:`load_pipeline`. ``None`` when ``app`` does not lead to a gateway router.
    """
    inner = getattr(app, "pipeline", None)  # a ReloadingApp: its current pipeline
    if isinstance(inner, Pipeline):
        return inner
    layers = layers_of(app)
    inner = [layer for layer in layers if isinstance(layer, Router)]
    if not inner:
        return None
    router = inner[0]
    layers = layers[:layers.index(router)]
    for endpoint in router.endpoints.values():  # built by load_pipeline: already known
        known = getattr(endpoint, "pipeline", None)
        if isinstance(known, Pipeline) and known.app is app:
            return known
    names: list[str] = []
    if file:
        parser = configparser.RawConfigParser()
        try:
            parser.read(file, encoding="utf-8")
            names = parser.get(f"pipeline:{name}", "pipeline").split()
        except (configparser.Error, OSError):
            names = []
    if len(names) != len(layers) + 1:  # not the file's pipeline: name the layers by class
        names = [type(layer).__name__ for layer in layers] + ["gateway"]
    pipeline = Pipeline(app=app, names=names, router=router, file=file or "unknown",
                        layers=dict(zip(names[:-1], layers)),
                        fingerprint=config_fingerprint(file) if file else None)
    _attach(pipeline)
    return pipeline


def _attach(pipeline: Pipeline) -> None:
    """Hand the built pipeline to the endpoints that show it (status page, health) and to
    the metrics of the process and configuration (build info, per-target state)."""
    from meetinity_gateway.runtime_metrics import watch_pipeline

    router = pipeline.router
    for endpoint in (router.endpoints.values() if router is not None else ()):
        attach = getattr(endpoint, "attach_pipeline", None)
        if attach is not None:
            attach(pipeline)
    watch_pipeline(pipeline)


class _AllRoutes:
    """The router as the header rules see it: unmounted routes may be named too (their
    rules apply the day the service is mounted), only mounted ones are wrapped."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self.routes = router.routes + router.unmounted
        self._mounted = {route.name for route in router.routes}

    def wrap_route(self, name, wrapper) -> None:
        if name in self._mounted:
            self._router.wrap_route(name, wrapper)


def _route_policies(routes, unmounted, policy_specs, endpoints, mounted, settings,
                    health_timeout, error):
    """Per-route proxy apps for ``policy.ROUTE`` keys, and each proxied route's effective
    policy as a note for ``check``."""
    route_apps: dict[str, WSGIApplication] = {}
    notes: dict[str, str] = {}
    route_policies: dict[str, RoutePolicy] = {}
    by_name = {route.name: route for route in routes + unmounted}
    globals_ = {key: settings.get(key, default) for key, default in _DEFAULTS.items()}
    policies: dict[str, dict[str, t.Any]] = {}
    for name, spec in policy_specs.items():
        key = f"policy.{name}"
        route = by_name.get(name)
        if route is None:
            raise error(f"no route named {name!r} (routes: {', '.join(by_name)})", key)
        if route.target in _BUILTIN_ENDPOINTS:
            raise error(f"route {name} goes to {route.target}, not to an upstream", key)
        try:
            policies[name] = _parse_policy(spec)
        except ValueError as exc:
            raise error(str(exc), key) from None
    # Routes with the same idle timeout on the same upstream share one connection pool; it
    # and the route's proxy app live in the state a reload keeps (shared.py), like the
    # upstream's own pool: a reload resets no route's health, connections or retry budget.
    for route in routes:
        if route.target in _BUILTIN_ENDPOINTS:
            continue
        policy = RoutePolicy(route=route.name, upstream=route.target,
                             own=route.name in policies,
                             **{**globals_, **policies.get(route.name, {})})
        route_policies[route.name] = policy
        notes[route.name] = policy.describe()
        if not policy.own:
            continue
        shared_app = endpoints[route.target]
        proxy_settings = {k: v for k, v in policy.values().items() if k != "idle_timeout"}
        proxy_settings["trusted_proxies"] = settings.get("trusted_proxies", 0)
        try:
            if policy.idle_timeout == globals_["idle_timeout"]:
                pool = shared_app.pool
            else:
                pool_settings = {k: v for k, v in settings.items()
                                 if k not in _ROUTE_POLICY and k != "trusted_proxies"}
                url = mounted[route.target]
                pool = shared(
                    "route-pool",
                    (route.target, url, policy.idle_timeout, policy.connect_timeout,
                     policy.read_timeout, health_timeout, tuple(sorted(pool_settings.items()))),
                    lambda url=url, route=route, pool_settings=pool_settings, policy=policy:
                        ProxyApp(url, name=route.target, health_timeout=health_timeout,
                                 idle_timeout=policy.idle_timeout,
                                 connect_timeout=policy.connect_timeout,
                                 read_timeout=policy.read_timeout, **pool_settings).pool,
                )
            route_apps[route.name] = shared(
                "route-proxy", (route.name, id(pool), tuple(sorted(proxy_settings.items()))),
                lambda pool=pool, route=route, proxy_settings=proxy_settings:
                    ProxyApp(pool, name=route.target, **proxy_settings),
            )
        except ValueError as exc:
            raise error(str(exc), f"policy.{route.name}") from None
    return route_apps, notes, route_policies


# -- the loader -----------------------------------------------------------------------------

def _read(path: Path) -> configparser.ConfigParser:
    if not path.is_file():
        raise ConfigError("configuration file not found", file=str(path))
    parser = configparser.ConfigParser(
        defaults={"here": str(path.parent), "__file__": str(path),
                  "__fingerprint__": config_fingerprint(path)},
        interpolation=configparser.BasicInterpolation(),
    )
    parser.optionxform = str  # keys keep their case, as PasteDeploy does
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except configparser.Error as exc:
        # configparser's messages span lines; a configuration error is one line.
        reason = " ".join(str(exc).split())
        raise ConfigError(f"not a valid ini file: {reason}", file=str(path)) from None
    return parser


def _section_conf(parser, section: str, file: str) -> tuple[dict[str, str], dict[str, str]]:
    """(local_conf, global_conf) for one section, split as PasteDeploy splits them."""
    defaults = parser.defaults()
    try:
        items = {key: parser.get(section, key) for key in parser.options(section)}
    except configparser.Error as exc:
        raise ConfigError(str(exc), file=file, section=section) from None
    local = {key: value for key, value in items.items() if key not in defaults}
    return local, dict(defaults)


def _resolve(use: str, group: str, file: str, section: str) -> t.Callable:
    """``egg:DIST#NAME`` through entry points, or ``call:module:function``."""
    if use.startswith("call:"):
        module_name, _, attr = use[5:].partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot import {use}: {exc}", file=file, section=section,
                              key="use", value=use) from None
    if not use.startswith("egg:"):
        raise ConfigError("expected egg:DIST#NAME or call:module:function",
                          file=file, section=section, key="use", value=use)
    dist, _, name = use[4:].partition("#")
    name = name or "main"
    try:
        entry_points = metadata.distribution(dist).entry_points
    except metadata.PackageNotFoundError:
        raise ConfigError(f"distribution {dist!r} is not installed (pip install it)",
                          file=file, section=section, key="use", value=use) from None
    for entry_point in entry_points:
        if entry_point.group == group and entry_point.name == name:
            return entry_point.load()
    raise ConfigError(f"{dist} has no {group} entry point named {name!r}",
                      file=file, section=section, key="use", value=use)


def _build(parser, kind: str, name: str, file: str):
    section = f"{kind}:{name}"
    if not parser.has_section(section):
        raise ConfigError(f"no section [{section}]", file=file)
    local, global_conf = _section_conf(parser, section, file)
    use = local.pop("use", None)
    if not use:
        raise ConfigError("missing 'use = egg:…'", file=file, section=section)
    group = "paste.filter_factory" if kind == "filter" else "paste.app_factory"
    factory = _resolve(use, group, file, section)
    try:
        return factory(global_conf, **local)
    except ConfigError as exc:
        raise exc.locate(file=file, section=section)


def load_pipeline(config_path: str | Path = "gateway.ini", name: str = "main") -> Pipeline:
    """Load ``[pipeline:NAME]`` (or ``[app:NAME]``) from ``config_path``."""
    path = Path(config_path).resolve()
    file = str(path)
    parser = _read(path)
    if parser.has_section(f"pipeline:{name}"):
        local, _ = _section_conf(parser, f"pipeline:{name}", file)
        names = local.get("pipeline", "").split()
        if not names:
            raise ConfigError("empty pipeline", file=file, section=f"pipeline:{name}",
                              key="pipeline")
        filter_names, app_name = names[:-1], names[-1]
    elif parser.has_section(f"app:{name}"):
        filter_names, app_name = [], name
    else:
        raise ConfigError(f"no [pipeline:{name}] or [app:{name}] section", file=file)

    app = _build(parser, "app", app_name, file)
    router = app if isinstance(app, Router) else None
    layers: dict[str, t.Any] = {}
    # Wrap innermost first, so the first name in the list ends up outermost.
    for filter_name in reversed(filter_names):
        make_filter = _build(parser, "filter", filter_name, file)
        try:
            app = make_filter(app)
        except ConfigError as exc:
            raise exc.locate(file=file, section=f"filter:{filter_name}")
        layers[filter_name] = app
        if router is not None:
            _check_rules_against_routes(Layer.of(filter_name, app), router, file,
                                        f"filter:{filter_name}")
    layers = {name: layers[name] for name in filter_names}
    pipeline = Pipeline(app=app, names=filter_names + [app_name], router=router, file=file,
                        layers=layers, fingerprint=parser.defaults()["__fingerprint__"])
    _attach(pipeline)  # the status page shows the layers, /health the limiters' storage
    return pipeline


def _check_rules_against_routes(layer: Layer, router: Router, file: str, section: str) -> None:
    """The authorization layer's rules and field filters (``route_checks()``) may only name
    paths and methods some route serves — mounted or not: a rule for a route that does not
    exist is a typo that would silently never apply."""
    if layer.kind != "authorize":
        return
    checks = layer.app.route_checks
    table = router.every_route
    samples = [(route, route.template.sample()) for route in table.entries]
    for key, value, sample, prefix, methods in checks():
        below = "/" if sample == "/" else sample + "/"
        for method in methods or [None]:
            if prefix and any(
                (path == sample or path.startswith(below))
                and (method is None or route.methods is None or method in route.methods)
                for route, path in samples
            ):
                continue  # a route lives below the rule's prefix
            found = table.lookup(sample, method or "GET")
            if found.entry is None and not found.allowed:
                raise ConfigError(f"no route serves {sample}", file=file, section=section,
                                  key=key, value=value)
            if found.entry is None and method is not None:
                raise ConfigError(f"no route serves {method} {sample}", file=file,
                                  section=section, key=key, value=value)


def load_app(config_path: str | Path = "gateway.ini", name: str = "main") -> WSGIApplication:
    """The WSGI application of ``[pipeline:NAME]`` in ``config_path``."""
    return load_pipeline(config_path, name).app
