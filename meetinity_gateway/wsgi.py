"""``meetinity_gateway.wsgi:application`` for gunicorn, uWSGI, mod_wsgi.

The ini file comes from ``GATEWAY_CONFIG`` (environment, or the ``.env`` of the current
folder; default ``./gateway.ini``)::

    gunicorn -w 2 -b 127.0.0.1:8080 meetinity_gateway.wsgi:application

The ``.env`` beside that file is read first, exactly as ``meetinity-gateway serve`` reads it,
so ``LOG_LEVEL`` / ``LOG_FORMAT`` (stderr; unless the server already configured the root
logger) and every other variable may be set there. ``RELOAD=true`` reloads the configuration
when its files change (see :mod:`meetinity_gateway.reload`; no SIGHUP here: gunicorn owns it).
"""
from __future__ import annotations

import os
import sys

from meetinity_gateway.config import config_path, load_env
from meetinity_gateway.logs import configure_logging
from meetinity_gateway.reload import serving_app
from meetinity_gateway.serving.lifecycle import announce

CONFIG = config_path()
load_env({"here": str(CONFIG.resolve().parent)})
configure_logging(os.environ.get("LOG_LEVEL") or "INFO", os.environ.get("LOG_FORMAT") or "json")

pipeline, application = serving_app(CONFIG)
# The start-up line, as under `serve` (each worker process that imports this module logs
# it once). Under gunicorn with the shipped gunicorn.conf.py, its post_worker_init logs it,
# with the addresses gunicorn listens on.
if "meetinity_gateway.gunicorn_conf" not in sys.modules:
    announce(pipeline, server="wsgi")
