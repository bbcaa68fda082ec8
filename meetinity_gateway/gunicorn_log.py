"""gunicorn's own log lines (``Booting worker``, ``Listening at``…) in the gateway's format.

gunicorn writes them through its ``gunicorn.error`` logger with a text formatter of its own;
with ``LOG_FORMAT=json`` (the default) a JSON log shipper reading the gateway's stderr would
break on them. :class:`GatewayLogger` (gunicorn's ``logger_class``, set by
:func:`meetinity_gateway.serving.launchers.gunicorn_options`, hence by ``serve --server gunicorn``,
``gunicorn --paste gateway.ini`` and ``gunicorn meetinity_gateway.wsgi:application`` run from a
folder holding the shipped ``gunicorn.conf.py``) keeps gunicorn's handlers and levels and
swaps their formatter for the gateway's.
"""
from __future__ import annotations

import logging
import os

from gunicorn.glogging import Logger

from meetinity_gateway.logs import TEXT_FORMAT, JsonFormatter

__all__ = ["GatewayLogger"]


class GatewayLogger(Logger):
    """gunicorn's logger with the gateway's formatter (``LOG_FORMAT``: json | text)."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        if (os.environ.get("LOG_FORMAT") or "json").strip().lower() == "json":
            formatter: logging.Formatter = JsonFormatter()
        else:
            formatter = logging.Formatter(TEXT_FORMAT)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(formatter)
