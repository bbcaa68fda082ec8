"""The reference points: the smallest honest WSGI pass-throughs, on two HTTP clients.

``urllib3`` (a keep-alive ``HTTPConnectionPool`` driven through ``urlopen``) or ``stdlib``
(``http.client``, one kept-alive ``HTTPConnection`` per server thread): the request's method,
path, query and body forwarded, the answer streamed back with hop-by-hop headers dropped
(servers refuse them). No routing, no middleware, no error shaping, no timeouts beyond the
connection's: whatever the full gateway costs beyond these is the price of its layers and
its client. Served with the same settings as the gateway (see ``bench/run.py``)::

    python bench/passthrough.py urllib3|stdlib|werkzeug UPSTREAM_URL HOST:PORT THREADS \
        [waitress|granian]

``PASSTHROUGH_CPU_AFFINITY=auto`` pins the waitress pass-through to one CPU the way the
gateway pins itself (``cpu_affinity``), for a row measured under the same conditions.

gunicorn imports ``passthrough:app`` (``--chdir bench``) built from ``PASSTHROUGH_CLIENT``,
``PASSTHROUGH_UPSTREAM`` and ``PASSTHROUGH_THREADS`` in the environment.
"""
from __future__ import annotations

import http.client
import os
import sys
import threading
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authenticate", "proxy-authorization"}


def _headers(environ) -> dict[str, str]:
    return {key[5:].replace("_", "-"): value for key, value in environ.items()
            if key.startswith("HTTP_") and key != "HTTP_HOST"}


def _target(environ) -> str:
    target = environ.get("PATH_INFO", "/")
    if environ.get("QUERY_STRING"):
        target += "?" + environ["QUERY_STRING"]
    return target


def _streamed(response, close):
    try:
        yield from response.stream(65536, decode_content=False)
    finally:
        close()


def make_urllib3_app(upstream: str, pool_size: int):
    import urllib3

    pool = urllib3.connection_from_url(upstream, maxsize=pool_size, retries=False)

    def app(environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else None
        response = pool.urlopen(environ["REQUEST_METHOD"], _target(environ), body=body,
                                headers=_headers(environ), preload_content=False,
                                decode_content=False, redirect=False)
        start_response(f"{response.status} {response.reason}",
                       [(k, v) for k, v in response.headers.items() if k.lower() not in _HOP])
        return _streamed(response, response.release_conn)

    return app


def make_stdlib_app(upstream: str, pool_size: int):
    url = urlsplit(upstream)
    local = threading.local()

    def connection() -> http.client.HTTPConnection:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        return conn

    def body_of(environ):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        stream = environ["wsgi.input"]
        while length > 0:
            piece = stream.read(min(length, 65536))
            if not piece:
                return
            length -= len(piece)
            yield piece

    def app(environ, start_response):
        conn = connection()
        headers = _headers(environ)
        length = environ.get("CONTENT_LENGTH")
        if length:
            headers["Content-Length"] = length
        try:
            conn.request(environ["REQUEST_METHOD"], _target(environ),
                         body=body_of(environ) if length else None, headers=headers,
                         encode_chunked=False)
            response = conn.getresponse()
        except Exception:
            conn.close()  # reconnects on the next request
            raise
        start_response(f"{response.status} {response.reason}",
                       [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP])

        def stream():
            try:
                while True:
                    piece = response.read1(65536)
                    if not piece:
                        break
                    yield piece
            finally:
                if response.isclosed() or response.length == 0:
                    # Read to its end (read1 does not close a sized body at its last byte):
                    # the connection serves the next request.
                    response.close()
                else:
                    conn.close()  # not read to the end: never reused

        return stream()

    return app


def make_werkzeug_app(upstream: str, pool_size: int):
    """Werkzeug's own ``ProxyMiddleware`` bare: a new upstream connection per request."""
    from werkzeug.exceptions import NotFound
    from werkzeug.middleware.http_proxy import ProxyMiddleware

    # Its prefixes are normalised to "/x/" ("/" would become "//"): the bench's one path.
    return ProxyMiddleware(NotFound(), {"/users/": {"target": upstream}})


MAKERS = {"urllib3": make_urllib3_app, "stdlib": make_stdlib_app,
          "werkzeug": make_werkzeug_app}


def from_environment():
    """The app described by ``PASSTHROUGH_*`` (gunicorn's and granian's workers)."""
    return MAKERS[os.environ["PASSTHROUGH_CLIENT"]](
        os.environ["PASSTHROUGH_UPSTREAM"], int(os.environ.get("PASSTHROUGH_THREADS", "8")))


def load(target=None):
    """granian's ``target_loader``: the app, built in the worker process."""
    return from_environment()


def __getattr__(name):  # ``passthrough:app`` for gunicorn, built on first import
    if name == "app":
        return from_environment()
    raise AttributeError(name)


def main() -> None:
    import logging

    client, upstream, listen, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    server = sys.argv[5] if len(sys.argv) > 5 else "waitress"
    if server == "granian":
        from granian import Granian
        from granian.constants import HTTPModes, Interfaces

        os.environ.update(PASSTHROUGH_CLIENT=client, PASSTHROUGH_UPSTREAM=upstream,
                          PASSTHROUGH_THREADS=str(threads))
        host, _, port = listen.rpartition(":")
        # The gateway's granian settings (meetinity_gateway.serving.launchers.serve_granian).
        Granian("passthrough:app", address=host, port=int(port), interface=Interfaces.WSGI,
                http=HTTPModes.http1, workers=1, blocking_threads=threads,
                backpressure=threads, websockets=False, log_access=False,
                ).serve(target_loader=load)
        return

    from meetinity_gateway.cli import create_server

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # as the gateway does
    server = create_server(MAKERS[client](upstream, threads), listen=listen, threads=threads)
    pinned = os.environ.get("PASSTHROUGH_CPU_AFFINITY")
    if pinned:  # the gateway's own pin (serving/affinity.py), for a like-for-like row
        from meetinity_gateway.config import as_cpu_affinity
        from meetinity_gateway.serving import affinity

        affinity.apply(as_cpu_affinity(pinned), "waitress")
    server.run()


if __name__ == "__main__":
    main()
