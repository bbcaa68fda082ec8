"""``meetinity_gateway.wsgi:application`` for gunicorn, uWSGI, mod_wsgi.

The ini file comes from ``GATEWAY_CONFIG`` (default ``./gateway.ini``)::

    gunicorn -w 2 -b 127.0.0.1:8080 meetinity_gateway.wsgi:application
"""
from __future__ import annotations

import os

from meetinity_gateway.assembly import load_app

application = load_app(os.environ.get("GATEWAY_CONFIG", "gateway.ini"))
