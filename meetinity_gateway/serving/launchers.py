"""Serving with worker processes: granian and gunicorn from ``[server:main]``, and what
several workers share (one rate-limit budget, one ``/metrics``).

Each worker process loads the configuration itself (:func:`worker_app`): threads and sockets
do not survive a fork. The start-up checks here (:func:`check_bind`,
:func:`check_shared_state`) run once in the parent so a mistake is one line, not one per
worker. :func:`gunicorn_options` is also what ``gunicorn_conf`` (``gunicorn --paste``) uses.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import sys
import typing as t
from pathlib import Path

from meetinity_gateway.config import ConfigError, parse_listen


def several_workers(settings: t.Mapping[str, t.Any]) -> bool:
    """Whether ``settings`` start more than one worker process (granian, gunicorn)."""
    return settings["server"] != "waitress" and settings["workers"] > 1


_METRIC_FILE = re.compile(r"^[a-z_]+_\d+\.db$")  # prometheus-client's: counter_123.db, ...


def prepare_metrics_directory(settings: t.Mapping[str, t.Any]) -> t.Callable[[], None]:
    """Prometheus' multiprocess mode for several workers, set up before anything imports
    prometheus-client; returns what to do once the server has stopped.

    With one process nothing changes. With several, ``PROMETHEUS_MULTIPROC_DIR`` names the
    directory where every worker keeps its values and from which any worker's ``/metrics``
    adds them all up: the operator's directory, emptied of a previous run's files (stale
    values would be added to the new run's), else a private temporary one, removed after
    the stop."""
    if not several_workers(settings):
        return lambda: None
    import shutil
    import tempfile

    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        folder = Path(given)
        if not folder.is_dir():
            raise ConfigError("PROMETHEUS_MULTIPROC_DIR is not a directory",
                              key="PROMETHEUS_MULTIPROC_DIR", value=given)
        for stale in folder.iterdir():
            if _METRIC_FILE.match(stale.name):
                stale.unlink()
        return lambda: None
    folder = Path(tempfile.mkdtemp(prefix="meetinity-gateway-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return lambda: shutil.rmtree(folder, ignore_errors=True)


def mark_worker_dead(server, worker) -> None:
    """gunicorn's ``child_exit`` hook: a dead worker's live gauges (requests in flight) stop
    counting in the multiprocess sum."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def check_shared_state(pipeline, settings: t.Mapping[str, t.Any], file: str | None) -> None:
    """Several workers must share their rate-limit counters: refuse ``memory://`` (each
    worker would allow the whole budget, N workers N times it), and warn when ``processes``
    (each one's share while the shared storage fails) is below the number of workers."""
    if not several_workers(settings):
        return
    from meetinity_gateway.middleware.ratelimit import RateLimitMiddleware

    workers = settings["workers"]
    for name, layer in pipeline.layers.items():
        if not isinstance(layer, RateLimitMiddleware) or not (layer.rules or layer.default):
            continue
        uri = layer.storage_uri or ""
        if uri.split(":", 1)[0].lower() == "memory":
            raise ConfigError(
                f"memory:// counts in each process: with {workers} workers every client would "
                f"get {workers} times each budget; share the counters in Redis "
                "(RATELIMIT_STORAGE_URI=redis://…) or serve with workers = 1",
                file=file, section=f"filter:{name}", key="storage_uri", value=uri)
        if layer.processes < workers:
            logging.getLogger("meetinity_gateway").warning(
                "[filter:%s] processes = %d but %d workers share the storage: while it "
                "fails each worker allows 1/%d of every limit, %d times the budget in all; "
                "set RATELIMIT_PROCESSES to the number of gateway processes", name,
                layer.processes, workers, layer.processes, workers // layer.processes)


def _missing(name: str, file: str | None) -> ConfigError:
    return ConfigError(f"{name} is not installed (pip install meetinity_gateway[{name}])",
                       file=file, section="server:main", key="server", value=name)


def check_bind(settings: t.Mapping[str, t.Any], file: str | None) -> None:
    """Bind each address once, as the server will, so a taken port or an unknown host is a
    one-line error here rather than the server's retries and tracebacks."""
    for host, port in parse_listen(settings["listen"]):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, kind, proto, _, address = infos[0]
            with socket.socket(family, kind, proto) as probe:
                if os.name == "posix":
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(f"cannot listen there: {reason}", file=file,
                              section="server:main", key="listen",
                              value=settings["listen"]) from None


def worker_logging() -> None:
    """Logging in a worker process: a log handler inherited through fork has lost its writer
    thread, so it is replaced; a handler someone else configured is kept."""
    from meetinity_gateway.logs import BufferedStreamHandler, configure_logging

    inherited = any(isinstance(h, BufferedStreamHandler) for h in logging.getLogger().handlers)
    configure_logging(os.environ.get("LOG_LEVEL") or "INFO",
                      os.environ.get("LOG_FORMAT") or "json", force=inherited)
    # A worker started by multiprocessing (granian's) ends with os._exit: the interpreter's
    # exit handlers never run, so the lines still buffered (the access lines of the requests
    # that finished during the drain) would be lost. multiprocessing's own exit hook runs.
    from multiprocessing import util

    util.Finalize(None, logging.shutdown, exitpriority=-100)
    util.Finalize(None, _end_tracing, exitpriority=-50)  # queued spans, at most 2 s


def _end_tracing() -> None:
    tracing = sys.modules.get("meetinity_gateway.tracing")  # loaded only when it is on
    current = getattr(tracing, "_tracing", None) if tracing is not None else None
    if current is not None:
        current.processor.shutdown()


def worker_app(target: str | None = None, pin: bool = False):
    """The pipeline of ``GATEWAY_CONFIG``, loaded in a worker process (granian's and
    gunicorn's loader). ``pin``: the worker's threads on one CPU as ``cpu_affinity`` says
    (gunicorn's; granian's worker is not pinned: on one CPU its exit at a stop outran the
    access line of a request finishing during the drain, every time)."""
    from meetinity_gateway.reload import serving_app
    from meetinity_gateway.serving import affinity
    from meetinity_gateway.settings import read_settings

    worker_logging()
    config = Path(os.environ.get("GATEWAY_CONFIG") or "gateway.ini")
    # With RELOAD on, each worker watches the files itself (a thread does not survive fork).
    app = serving_app(config)[1]
    if pin:  # each worker process on its own CPU (serving/affinity.py)
        affinity.apply(read_settings(config)["cpu_affinity"])
    return app


def serve_gunicorn(settings: t.Mapping[str, t.Any], file: str | None) -> int:
    if sys.platform == "win32":
        raise ConfigError("gunicorn does not run on Windows (use waitress)", file=file,
                          section="server:main", key="server", value="gunicorn")
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError:
        raise _missing("gunicorn", file) from None
    options = gunicorn_options(settings)

    class GatewayGunicorn(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            return worker_app(pin=True)

    GatewayGunicorn().run()
    return 0


def serve_granian(settings: t.Mapping[str, t.Any], file: str | None) -> int:
    try:
        from granian import Granian
        from granian.constants import HTTPModes, Interfaces
        from granian.http import HTTP1Settings
    except ImportError:
        raise _missing("granian", file) from None
    addresses = parse_listen(settings["listen"])
    if len(addresses) > 1:
        raise ConfigError("granian listens on one address", file=file, section="server:main",
                          key="listen", value=settings["listen"])
    [(host, port)] = addresses
    server = Granian(
        "meetinity_gateway.wsgi:application",  # named for granian's logs; worker_app loads
        address=host, port=port, interface=Interfaces.WSGI, http=HTTPModes.http1,
        workers=settings["workers"], blocking_threads=settings["threads"],
        backlog=settings["backlog"], websockets=False,
        # at most `threads` requests in the interpreter at once, as under waitress
        backpressure=settings["threads"],
        http1_settings=HTTP1Settings(
            header_read_timeout=int(settings["header_timeout"] * 1000), keep_alive=True),
        workers_kill_timeout=max(1, round(settings["drain_seconds"])),
        log_access=False,  # the gateway's observe layer writes the access log
        # granian's own lines in the gateway's format, on stderr with the others
        log_dictconfig=granian_log_config(os.environ.get("LOG_FORMAT") or "json"),
    )
    server.serve(target_loader=worker_app)
    return 0


def granian_log_config(log_format: str) -> dict[str, t.Any]:
    """granian's ``log_dictconfig``: its loggers write to stderr through the gateway's
    formatter (JSON lines under ``LOG_FORMAT=json``)."""
    from meetinity_gateway.logs import TEXT_FORMAT

    if (log_format or "json").strip().lower() == "json":
        formatter = {"()": "meetinity_gateway.logs.JsonFormatter"}
    else:
        formatter = {"()": "logging.Formatter", "fmt": TEXT_FORMAT}
    handler = {"formatter": "gateway", "class": "logging.StreamHandler",
               "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"gateway": formatter},
        "handlers": {"gateway": handler},
        "loggers": {
            "_granian": {"handlers": ["gateway"], "level": "INFO", "propagate": False},
            "granian.access": {"handlers": ["gateway"], "level": "INFO", "propagate": False},
        },
    }


def bind_strings(listen: str) -> list[str]:
    return [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            for host, port in parse_listen(listen)]


def gunicorn_options(settings: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """gunicorn settings equivalent to ``[server:main]``: ``gthread`` workers, same address,
    threads, connection limit, keep-alive and drain period."""
    return {
        "bind": bind_strings(settings["listen"]),
        "workers": settings["workers"],
        "threads": settings["threads"],
        "worker_class": "gthread",
        "worker_connections": settings["connection_limit"],
        "backlog": settings["backlog"],
        "keepalive": max(1, int(settings["channel_timeout"])),
        "graceful_timeout": max(1, round(settings["drain_seconds"])),
        # gunicorn's own lines in the gateway's format (JSON under LOG_FORMAT=json)
        "logger_class": "meetinity_gateway.gunicorn_log.GatewayLogger",
        "child_exit": mark_worker_dead,
    }
