"""The reference point: the smallest honest WSGI pass-through on the gateway's HTTP client.

One pooled ``requests.Session``, the request's method, path, query and body forwarded, the
answer streamed back with hop-by-hop headers dropped (waitress refuses them). No routing, no
middleware, no error shaping: whatever the full gateway costs beyond this is the price of its
layers. Served by waitress with the same settings as the gateway (see ``bench/run.py``).

``python bench/passthrough.py UPSTREAM_URL HOST:PORT THREADS``
"""
from __future__ import annotations

import sys

import requests
from requests.adapters import HTTPAdapter

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authenticate", "proxy-authorization"}


def make_app(upstream: str, pool_size: int):
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=pool_size))

    def app(environ, start_response):
        url = upstream + environ.get("PATH_INFO", "/")
        if environ.get("QUERY_STRING"):
            url += "?" + environ["QUERY_STRING"]
        headers = {key[5:].replace("_", "-"): value for key, value in environ.items()
                   if key.startswith("HTTP_") and key != "HTTP_HOST"}
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else None
        response = session.request(environ["REQUEST_METHOD"], url, headers=headers, data=body,
                                   stream=True, allow_redirects=False)
        start_response(f"{response.status_code} {response.reason}",
                       [(k, v) for k, v in response.raw.headers.items()
                        if k.lower() not in _HOP])

        def body_iter():
            try:
                yield from response.raw.stream(65536, decode_content=False)
            finally:
                response.close()

        return body_iter()

    return app


def main() -> None:
    from meetinity_gateway.cli import create_server

    upstream, listen, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    server = create_server(make_app(upstream, threads), listen=listen, threads=threads)
    server.run()


if __name__ == "__main__":
    main()
