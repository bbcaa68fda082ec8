"""``meetinity_gateway.wsgi:application`` for gunicorn, uWSGI, mod_wsgi.

The ini file comes from ``GATEWAY_CONFIG`` (default ``./gateway.ini``)::

    gunicorn -w 2 -b 127.0.0.1:8080 meetinity_gateway.wsgi:application

Logging follows ``LOG_LEVEL`` / ``LOG_FORMAT`` to stderr, unless the server already configured
the root logger.
"""
from __future__ import annotations

import os

from meetinity_gateway.assembly import load_app
from meetinity_gateway.logs import configure_logging

configure_logging(os.environ.get("LOG_LEVEL") or "INFO", os.environ.get("LOG_FORMAT") or "json")

application = load_app(os.environ.get("GATEWAY_CONFIG", "gateway.ini"))
