"""The server's settings: ``gateway.ini``'s ``[server:main]``, one table for every way in.

:data:`SETTINGS` (name -> caster, the casters of :mod:`meetinity_gateway.config`) and
:data:`DEFAULTS` serve ``meetinity-gateway serve`` (with its ``--listen`` / ``--threads`` /
``--server`` / ``--workers`` overrides), the PasteDeploy server runner, ``gunicorn_conf`` and
the tests, as waitress' ``adjustments.py`` serves its ini and its command line::

    [server:main]
    use = egg:meetinity_gateway#main
    listen = ${GATEWAY_LISTEN:-127.0.0.1:8080}
    threads = ${GATEWAY_THREADS:-8}

What each setting does to the server: :mod:`meetinity_gateway.serving.hardened` (waitress),
:mod:`meetinity_gateway.serving.lifecycle` (``drain_seconds``) and
:mod:`meetinity_gateway.serving.launchers` (granian, gunicorn).
"""
from __future__ import annotations

import typing as t

from meetinity_gateway.config import (
    ConfigError,
    as_cpu_affinity,
    as_listen,
    as_non_negative_float,
    as_non_negative_int,
    as_positive_float,
    as_positive_int,
    as_size,
    as_str,
    cast_settings,
    expand,
)

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_THREADS = 8
SERVERS = ("waitress", "granian", "gunicorn")


def _as_server(value: str) -> str:
    name = value.strip().lower()
    if name not in SERVERS:
        raise ValueError("expected one of " + ", ".join(SERVERS))
    return name


#: ``[server:main]`` keys: name -> caster. ``use`` is PasteDeploy's, ignored here.
SETTINGS: dict[str, t.Callable[[str], t.Any]] = {
    "use": as_str,
    "server": _as_server,
    "listen": as_listen,
    "threads": as_positive_int,
    "workers": as_positive_int,
    "connection_limit": as_positive_int,
    "backlog": as_positive_int,
    "channel_timeout": as_positive_float,
    "header_timeout": as_positive_float,
    "send_timeout": as_positive_float,
    "drain_seconds": as_non_negative_float,
    "outbuf_overflow": as_size,
    "outbuf_high_watermark": as_size,
    "recv_bytes": as_positive_int,
    "max_request_header_size": as_size,
    "cleanup_interval": as_non_negative_int,
    "cpu_affinity": as_cpu_affinity,
}

#: Defaults of the hardened server (waitress' own in comments).
DEFAULTS: dict[str, t.Any] = {
    "server": "waitress",
    "listen": DEFAULT_LISTEN,
    "threads": DEFAULT_THREADS,
    "workers": 1,
    # waitress: 100 — a hundred idle sockets took the gateway off the air.
    "connection_limit": 2000,
    # waitress: 1024; the kernel caps it at net.core.somaxconn.
    "backlog": 2048,
    # waitress: 120 s of silence before an idle connection is closed.
    "channel_timeout": 60.0,
    # not in waitress: seconds from a request's first byte to the end of its headers.
    "header_timeout": 10.0,
    # not in waitress: seconds one response may keep a worker thread waiting on its client.
    "send_timeout": 60.0,
    # not in waitress (it gives in-flight requests 5 s): seconds a stop waits for them.
    "drain_seconds": 20.0,
    # waitress: 1 MiB in memory per connection before spooling to a temporary file.
    # 64 KiB: the proxy's chunk size. Larger, waitress grows an in-memory buffer per answer
    # before spooling, and a 1 GiB download left ~25 MiB more resident memory (measured).
    "outbuf_overflow": 64 * 1024,
    # waitress: 16 MiB; how far (on disk) an answer may run ahead of a slow client before
    # the worker thread waits.
    "outbuf_high_watermark": 24 * 1024 * 1024,
    "recv_bytes": 65536,
    "max_request_header_size": 256 * 1024,  # waitress default
    # waitress: 30 s between idle sweeps; 1 s makes channel_timeout accurate.
    "cleanup_interval": 1,
    # not in waitress: every thread of the process on one CPU (serving/affinity.py).
    "cpu_affinity": "auto",
}


def server_settings(
    local_conf: t.Mapping[str, str], global_conf: t.Mapping[str, str] | None = None
) -> dict[str, t.Any]:
    """``[server:main]`` strings expanded (``${VAR:-default}``, ``.env``) and cast; defaults
    filled in. Unknown keys and bad values are a :class:`ConfigError` naming the key."""
    values = dict(DEFAULTS)
    values.update(cast_settings(local_conf, SETTINGS, global_conf, section="server:main"))
    values.pop("use", None)
    return values


def read_settings(config, **overrides) -> dict[str, t.Any]:
    """``[server:main]`` of the ini file at ``config``, cast, with command-line ``overrides``
    (``None`` values ignored) validated by the same table."""
    import configparser
    from pathlib import Path

    path = Path(config)
    parser = configparser.RawConfigParser()
    parser.optionxform = str  # keys as written
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error:
        parser = configparser.RawConfigParser()  # load_pipeline reports the file's problems
    local = dict(parser.items("server:main")) if parser.has_section("server:main") else {}
    global_conf = {"here": str(path.resolve().parent), "__file__": str(path)}
    settings = server_settings(local, global_conf)
    for key, value in overrides.items():
        if value is None:
            continue
        try:
            settings[key] = SETTINGS[key](str(value))
        except ValueError as exc:
            raise ConfigError(str(exc), key="--" + key.replace("_", "-"),
                              value=str(value)) from None
    return settings


def refuse_waitress_workers(settings: t.Mapping[str, t.Any], file: str | None) -> None:
    """waitress is one process: several workers under it are a ConfigError naming them."""
    if settings.get("server", "waitress") == "waitress" and settings["workers"] > 1:
        raise ConfigError("waitress serves from one process (threads = its concurrency): "
                          "use --server gunicorn or granian for several worker processes",
                          file=file, section="server:main", key="workers",
                          value=str(settings["workers"]))


def max_body_size_of(config) -> int | None:
    """``[app:gateway] max_body_size`` of the ini file, expanded (for servers that get only
    the WSGI app, such as ``pserve``)."""
    import configparser

    parser = configparser.RawConfigParser()
    try:
        parser.read(config, encoding="utf-8")
        value = parser.get("app:gateway", "max_body_size")
        return as_size(expand(value, key="max_body_size"))
    except (configparser.Error, ValueError):
        return None
