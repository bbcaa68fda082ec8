"""``meetinity-gateway serve`` and ``pserve``: the gateway served by the server its
``[server:main]`` names, until stopped.

One idea per module below this façade:

* :mod:`meetinity_gateway.settings` — the ``[server:main]`` table (keys, casters, defaults);
* :mod:`meetinity_gateway.serving.hardened` — waitress hardened at its extension points
  (strict framing, JSON refusals, slow clients, lingering close);
* :mod:`meetinity_gateway.serving.lifecycle` — the start-up line, the run loop, stop signals
  and the drain;
* :mod:`meetinity_gateway.serving.launchers` — granian and gunicorn worker processes and what
  several workers share.

A new server is a launcher there and one branch in :func:`serve`. Embedding::

    from meetinity_gateway.server import create_server, run
    server = create_server(app, listen="127.0.0.1:8080", threads=8)
    run(server, drain_seconds=20)
"""
from __future__ import annotations

import logging
import os
import typing as t
from pathlib import Path

from meetinity_gateway.config import ConfigError, parse_listen
from meetinity_gateway.serving import affinity
from meetinity_gateway.serving.hardened import build, create_server
from meetinity_gateway.serving.launchers import (
    bind_strings,
    check_bind,
    check_shared_state,
    gunicorn_options,
    mark_worker_dead,
    prepare_metrics_directory,
    serve_granian,
    serve_gunicorn,
)
from meetinity_gateway.serving.lifecycle import announce, listening_on, run, stop
from meetinity_gateway.settings import (
    DEFAULTS,
    SETTINGS,
    max_body_size_of,
    read_settings,
    refuse_waitress_workers,
    server_settings,
)

# serve and serve_paste, and the names this module had before it was split, for embedders and
# operators' own gunicorn.conf.py files (the gateway itself imports them from where they live).
__all__ = [
    "DEFAULTS", "SETTINGS", "announce", "create_server", "gunicorn_options", "mark_worker_dead",
    "parse_listen", "prepare_metrics_directory", "read_settings", "run", "serve", "serve_paste",
    "server_settings", "stop",
]


def serve(pipeline, settings: t.Mapping[str, t.Any], *, config=None, app=None) -> int:
    """Serve a loaded pipeline with the server ``settings["server"]`` names, until stopped.

    The start-up line (:func:`announce`) is logged once the server listens (so a bind error
    is the only line); ``app`` replaces ``pipeline.app`` under waitress (a
    :class:`~meetinity_gateway.reload.ReloadingApp`). granian and gunicorn run worker
    processes that each load ``config`` themselves (threads and sockets do not survive a
    fork); ``pipeline`` has validated it already. Returns the exit status: 1 when requests
    were cut at stop."""
    name = settings["server"]
    file = str(config) if config else None
    refuse_waitress_workers(settings, file)
    if name == "waitress":
        server = build(app or pipeline.app, settings, max_body_size=pipeline.max_body_size,
                       file=file)
        affinity.apply(settings["cpu_affinity"])  # the server's threads exist now
        announce(pipeline, where=listening_on(server), server=name)
        return 1 if run(server, drain_seconds=settings["drain_seconds"]) else 0
    if config is None:
        raise ConfigError(f"server {name!r} needs the ini file's path")
    check_shared_state(pipeline, settings, file)
    os.environ["GATEWAY_CONFIG"] = str(Path(config).resolve())
    check_bind(settings, file)
    announce(pipeline, where=" ".join(f"http://{item}" for item in
                                      bind_strings(settings["listen"])), server=name)
    logging.shutdown()  # flush; each worker process sets its logging up again
    if name == "gunicorn":
        return serve_gunicorn(settings, file)
    return serve_granian(settings, file)


def serve_paste(wsgi_app, global_conf, **local_conf) -> int:
    """PasteDeploy ``paste.server_runner`` (``use = egg:meetinity_gateway#main`` in
    ``[server:main]``, for ``pserve gateway.ini``): the same settings and server as ``serve``.
    """
    import configparser

    from meetinity_gateway.assembly import adopt
    from meetinity_gateway.logs import configure_logging

    file = (global_conf or {}).get("__file__")
    # pserve calls logging.basicConfig() unless the ini has a [loggers] section: replace that
    # default with the gateway's logging; an operator's own [loggers] setup is kept.
    parser = configparser.RawConfigParser()
    if file:
        parser.read(file, encoding="utf-8")
    configure_logging(os.environ.get("LOG_LEVEL") or "INFO",
                      os.environ.get("LOG_FORMAT") or "json",
                      force=not parser.has_section("loggers"))
    settings = server_settings(local_conf, global_conf)
    refuse_waitress_workers(settings, file)
    # PasteDeploy built the pipeline: find its layers so /status, /health and the start-up
    # line say what `serve` would.
    pipeline = adopt(wsgi_app, file)
    server = build(wsgi_app, settings, file=file,
                   max_body_size=max_body_size_of(file) if file else None)
    affinity.apply(settings["cpu_affinity"])
    announce(pipeline, where=listening_on(server), server="waitress")  # pserve prints its own
    cut = run(server, drain_seconds=settings["drain_seconds"])
    logging.shutdown()
    return 1 if cut else 0
