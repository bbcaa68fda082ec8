"""gunicorn settings from ``gateway.ini``'s ``[server:main]``, so that gunicorn serves where and
how ``meetinity-gateway serve`` would::

    gunicorn --paste gateway.ini                       # reads ./gunicorn.conf.py (this module)
    gunicorn -c python:meetinity_gateway.gunicorn_conf --paste /srv/gateway.ini

The ini file is ``GATEWAY_CONFIG`` (default ``./gateway.ini``; its ``.env`` is read too).
Each worker process logs like ``serve`` (``LOG_LEVEL`` / ``LOG_FORMAT`` to stderr), access log
included. Options given on gunicorn's command line win over these.
"""
from __future__ import annotations

import os

from meetinity_gateway.serving.launchers import gunicorn_options
from meetinity_gateway.settings import read_settings

_settings = read_settings(os.environ.get("GATEWAY_CONFIG") or "gateway.ini")
# The app sizes its upstream connection pools from GATEWAY_THREADS: the same number.
os.environ.setdefault("GATEWAY_THREADS", str(_settings["threads"]))
globals().update(gunicorn_options(_settings))


def post_worker_init(worker) -> None:
    """Configure logging in each worker (a log writer thread does not survive a fork), and
    make the pipeline gunicorn loaded (``--paste``: PasteDeploy built it) known to the
    status page and /health; log the start-up line as ``serve`` does."""
    from meetinity_gateway.assembly import adopt
    from meetinity_gateway.serving.launchers import worker_logging
    from meetinity_gateway.serving.lifecycle import announce

    worker_logging()
    file = getattr(worker.cfg, "paste", None) or os.environ.get("GATEWAY_CONFIG") or "gateway.ini"
    pipeline = adopt(worker.wsgi, os.path.abspath(file))
    where = " ".join(f"http://{sock.cfg_addr[0]}:{sock.cfg_addr[1]}"
                     if isinstance(sock.cfg_addr, tuple) else str(sock.cfg_addr)
                     for sock in getattr(worker, "sockets", ()))
    announce(pipeline, where=where, server="gunicorn")
