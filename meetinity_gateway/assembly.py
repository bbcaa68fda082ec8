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
    route.users = /api/users/* -> user_service /users

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
    as_non_negative_int,
    as_positive_float,
    as_positive_int,
    as_size,
    config_fingerprint,
    prepare,
)
from meetinity_gateway.health import HealthApp, LiveApp
from meetinity_gateway.net import DEFAULT_ALLOW, parse_networks
from meetinity_gateway.proxy.app import ProxyApp
from meetinity_gateway.proxy.upstream import BALANCERS
from meetinity_gateway.routing import Router, parse_route
from meetinity_gateway.shared import shared
from meetinity_gateway.status import StatusApp
from meetinity_gateway.transform import apply_transforms

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import WSGIApplication

__all__ = ["Pipeline", "app_factory", "load_app", "load_pipeline"]


@dataclasses.dataclass
class Pipeline:
    """A loaded gateway: the WSGI app, its layers by name (outermost first), the router."""

    app: WSGIApplication
    names: list[str]
    router: Router | None
    file: str
    #: 12 hex digits naming the ini file and .env contents it was built from.
    fingerprint: str | None = None

    @property
    def max_body_size(self) -> int | None:
        """The largest request body any proxy endpoint accepts (None: no proxy endpoint)."""
        sizes = [
            endpoint.max_body_size
            for endpoint in (self.router.endpoints.values() if self.router else ())
            if isinstance(endpoint, ProxyApp)
        ]
        return max(sizes) if sizes else None


# -- the app factory ------------------------------------------------------------------------

def _as_balance(value: str) -> str:
    value = value.strip().lower().replace("-", "_")
    if value not in BALANCERS:
        raise ValueError(f"expected one of {', '.join(BALANCERS)}")
    return value


def _as_seconds_or_off(value: str) -> float:
    """``0`` (off) or a positive number of seconds."""
    if value.strip() in ("0", "0.0", "off", ""):
        return 0.0
    return as_positive_float(value)


_APP_PARAMS = {
    "connect_timeout": as_positive_float,
    "read_timeout": as_positive_float,
    "max_body_size": as_size,
    "trusted_proxies": as_non_negative_int,
    "pool_size": as_positive_int,
    "health_timeout": as_positive_float,
    # Upstream pools (meetinity_gateway.proxy.upstream) and retries (proxy.app).
    "balance": _as_balance,
    "max_fails": as_positive_int,
    "eject_time": as_positive_float,
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


def app_factory(global_conf, **local_conf):
    """``paste.app_factory`` for ``egg:meetinity_gateway#main``: the router and its endpoints.

    Keys: ``upstream.NAME = URL [weight=N], …`` (see :mod:`meetinity_gateway.proxy.upstream`),
    ``route.NAME = SPEC`` (see :mod:`meetinity_gateway.routing`) and the settings in
    ``_APP_PARAMS``.
    """
    file = global_conf.get("__file__")
    values = prepare(local_conf, global_conf)

    def error(message, key):
        return ConfigError(message, file=file, key=key, value=values.get(key))

    upstream_urls: dict[str, str] = {}
    route_specs: dict[str, str] = {}
    transform_specs: dict[str, str] = {}  # transform.NAME: header rules (transform.py)
    settings: dict[str, t.Any] = {}
    for key, value in values.items():
        kind, _, name = key.partition(".")
        if kind == "upstream" and name:
            upstream_urls[name] = value.strip()
        elif kind == "route" and name:
            route_specs[name] = value
        elif kind == "transform" and name:
            transform_specs[name] = value
        elif key in _APP_PARAMS:
            try:
                settings[key] = _APP_PARAMS[key](value)
            except ValueError as exc:
                raise error(str(exc), key) from None
        else:
            keys = ["upstream.NAME", "route.NAME", "transform.NAME"]
            known = ", ".join(sorted(_APP_PARAMS) + keys)
            raise error(f"unknown key (known keys: {known})", key)

    health_timeout = settings.pop("health_timeout", 2.0)
    detail_allow = settings.pop("detail_allow", list(DEFAULT_ALLOW))
    try:
        parse_networks(detail_allow)
    except ValueError as exc:
        raise error(str(exc), "detail_allow") from None
    # The loader names the exact version it read; PasteDeploy does not, so read it here.
    fingerprint = global_conf.get("__fingerprint__") or (
        config_fingerprint(file) if file else None)
    endpoints: dict[str, WSGIApplication] = {}
    for name, url in upstream_urls.items():
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
        {name: endpoints[name].pool for name in upstream_urls}, timeout=health_timeout,
        detail_allow=detail_allow, trusted_proxies=settings.get("trusted_proxies", 0),
        fingerprint=fingerprint,
    )
    endpoints["@live"] = LiveApp()
    endpoints["@status"] = StatusApp(
        {name: endpoints[name] for name in upstream_urls}, detail_allow=detail_allow,
        trusted_proxies=settings.get("trusted_proxies", 0), fingerprint=fingerprint, file=file,
    )

    routes = []
    for name, spec in route_specs.items():
        try:
            route = parse_route(name, spec)
        except ValueError as exc:
            raise error(str(exc), f"route.{name}") from None
        if route.target not in endpoints:
            known = ", ".join(sorted(endpoints))
            raise error(f"unknown target {route.target!r} (known: {known})", f"route.{name}")
        routes.append(route)
    if not routes:
        raise ConfigError("no routes: add route.NAME = PATH -> TARGET keys", file=file)
    try:
        router = Router(routes, endpoints)
    except ValueError as exc:
        raise ConfigError(str(exc), file=file) from None
    try:
        apply_transforms(router, transform_specs)
    except ConfigError as exc:
        raise exc.locate(file=file) from None
    return router


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
    # Wrap innermost first, so the first name in the list ends up outermost.
    for filter_name in reversed(filter_names):
        make_filter = _build(parser, "filter", filter_name, file)
        try:
            app = make_filter(app)
        except ConfigError as exc:
            raise exc.locate(file=file, section=f"filter:{filter_name}")
    pipeline = Pipeline(app=app, names=filter_names + [app_name], router=router, file=file,
                        fingerprint=parser.defaults()["__fingerprint__"])
    for endpoint in (router.endpoints.values() if router is not None else ()):
        attach = getattr(endpoint, "attach_pipeline", None)
        if attach is not None:  # the status page shows the layers
            attach(pipeline)
    return pipeline


def load_app(config_path: str | Path = "gateway.ini", name: str = "main") -> WSGIApplication:
    """The WSGI application of ``[pipeline:NAME]`` in ``config_path``."""
    return load_pipeline(config_path, name).app
