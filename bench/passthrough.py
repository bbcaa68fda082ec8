"""The reference points: the smallest honest WSGI pass-throughs, on two HTTP clients.

``urllib3`` (the gateway's own client: a keep-alive ``HTTPConnectionPool``) or ``requests``
(a pooled ``Session``, what the earlier gateway used): the request's method, path, query and
body forwarded, the answer streamed back with hop-by-hop headers dropped (waitress refuses
them). No routing, no middleware, no error shaping: whatever the full gateway costs beyond
the urllib3 one is the price of its layers. Served by waitress with the same settings as the
gateway (see ``bench/run.py``).

``python bench/passthrough.py urllib3|requests UPSTREAM_URL HOST:PORT THREADS``
"""
from __future__ import annotations

import sys

import requests
from requests.adapters import HTTPAdapter

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


def make_requests_app(upstream: str, pool_size: int):
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=pool_size))

    def app(environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else None
        response = session.request(environ["REQUEST_METHOD"], upstream + _target(environ),
                                   headers=_headers(environ), data=body, stream=True,
                                   allow_redirects=False)
        start_response(f"{response.status_code} {response.reason}",
                       [(k, v) for k, v in response.raw.headers.items()
                        if k.lower() not in _HOP])
        return _streamed(response.raw, response.close)

    return app


def main() -> None:
    import logging

    from meetinity_gateway.cli import create_server

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # as the gateway does

    client, upstream, listen, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    make_app = {"urllib3": make_urllib3_app, "requests": make_requests_app}[client]
    server = create_server(make_app(upstream, threads), listen=listen, threads=threads)
    server.run()


if __name__ == "__main__":
    main()
