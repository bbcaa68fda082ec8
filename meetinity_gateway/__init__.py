"""meetinity_gateway: the API gateway of the Meetinity platform.

A stack of independent WSGI middlewares (errors, CORS, rate limiting, JWT auth) around a
Werkzeug routing dispatcher whose proxy apps stream requests to the upstream services, all
assembled from ``gateway.ini``.

Embedding::

    from meetinity_gateway import make_app
    application = make_app("gateway.ini")
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "make_app"]


def make_app(config_path="gateway.ini", name="main"):
    """Build the WSGI application described by ``config_path`` (section ``[pipeline:NAME]``)."""
    from meetinity_gateway.assembly import load_app

    return load_app(config_path, name=name)
