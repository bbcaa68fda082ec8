"""What each layer of the gateway costs per request, timed in-process.

``python bench/layers.py UPSTREAM_URL [--requests 3000] [--rounds 5] [--profile FILE]``

Loads ``gateway.ini`` (environment as ``bench/run.py`` sets it) and calls the WSGI app
directly, one request after another on one thread, with the environ waitress would build for
the bench's small GET with a valid token and an allowed Origin (``/api/users/42``). Variants:

* ``full``: the whole pipeline, the real proxy to ``UPSTREAM_URL``;
* ``stubbed``: the same with the route's proxy app replaced by a stub answering what the
  upstream answers, so the layers are timed without the upstream's noise;
* ``stubbed`` minus one filter (observe, errors, cors, ratelimit, auth, authorize, userlimit),
  relinked exactly as a pipeline built without it (without auth, a shim puts the claims auth
  would have verified into the environ, or authorize would refuse); minus the router (the
  stub called directly);
* ``http.client``: one kept-alive stdlib connection, the upstream's round trip alone.

A layer's cost is ``stubbed - stubbed minus that layer``; the proxy's is ``full - stubbed -
http.client`` (what the gateway's client adds to a bare round trip). Variants are interleaved
round by round and each keeps its fastest round, so a neighbour's burst on a shared machine
moves one round, not one variant. This is more trustworthy than wrk deltas: differences of
10 µs are 1–2 % of a request served through waitress, below the noise of two wrk runs.
Prints one JSON object (µs per request) on stdout.
"""
from __future__ import annotations

import argparse
import gc
import http.client
import io
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYERS = ("observe", "errors", "cors", "ratelimit", "auth", "authorize", "userlimit")
BODY = b'{"id":42,"name":"Ada Lovelace","headline":"Engineer"}'
STUB_HEADERS = [("Server", "nginx"), ("Date", "Tue, 24 Nov 2026 00:00:00 GMT"),
                ("Content-Type", "application/json"), ("Content-Length", str(len(BODY))),
                ("Connection", "keep-alive")]


def stub(environ, start_response):
    """What the upstream answers, without the trip."""
    start_response("200 OK", list(STUB_HEADERS))
    return [BODY]


def make_environ(token: str, origin: str, path: str = "/api/users/42") -> dict:
    return {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "",
        "REQUEST_URI": path, "RAW_URI": path, "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_SOFTWARE": "waitress",
        "REMOTE_ADDR": "127.0.0.1", "REMOTE_HOST": "127.0.0.1", "REMOTE_PORT": "50000",
        "HTTP_HOST": "127.0.0.1:8080", "HTTP_USER_AGENT": "wrk", "HTTP_ACCEPT": "*/*",
        "HTTP_AUTHORIZATION": f"Bearer {token}", "HTTP_ORIGIN": origin,
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
        "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "wsgi.input_terminated": True,
    }


def call(app, template: dict) -> int:
    environ = dict(template)
    environ["wsgi.input"] = io.BytesIO(b"")
    status = []

    def start_response(line, headers, exc_info=None):
        status.append(line)
        return lambda data: None

    body = app(environ, start_response)
    try:
        for _ in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return int(status[0][:3])


def _replace_proxy(router, route: str) -> None:
    """Swap the route's proxy app (under its header rules) for the stub."""
    from meetinity_gateway.proxy.app import ProxyApp

    holder, app = router._apps, router._apps[route]
    if isinstance(app, ProxyApp):
        holder[route] = stub
        return
    while not isinstance(app.app, ProxyApp):
        app = app.app
    app.app = stub


class _WithClaims:
    def __init__(self, app, environ_extra: dict) -> None:
        self.app, self.extra = app, environ_extra

    def __call__(self, environ, start_response):
        environ.update(self.extra)
        return self.app(environ, start_response)


def build(config: Path, variant: str, template: dict, auth_extra: dict):
    """The app of one variant (a fresh pipeline each: relinking mutates it)."""
    from meetinity_gateway.assembly import load_pipeline

    pipeline = load_pipeline(config)
    if variant == "full":
        return pipeline.app
    _replace_proxy(pipeline.router, "users")
    chain = [pipeline.layers[name] for name in pipeline.names[:-1]]
    names = list(pipeline.names[:-1])
    if variant == "stubbed":
        return pipeline.app
    if variant == "router":
        chain[-1].app = _route_stub(pipeline.router)
        return chain[0]
    index = names.index(variant)
    inner = chain[index].app
    if variant == "auth":
        inner = _WithClaims(inner, auth_extra)
    if index == 0:
        return inner
    chain[index - 1].app = inner
    return chain[0]


def _route_stub(router):
    """The stub under the route's header rules, without the router's matching."""
    app = router._apps["users"]
    environ_keys = {}

    def direct(environ, start_response):
        environ.update(environ_keys)
        return app(environ, start_response)

    from meetinity_gateway.proxy.app import UPSTREAM_PATH_KEY
    from meetinity_gateway.routing import ROUTE_KEY

    environ_keys.update({ROUTE_KEY: "users", UPSTREAM_PATH_KEY: "/users/42"})
    return direct


def auth_environ(config: Path, template: dict) -> dict:
    """The environ keys the auth layer adds for the bench's token (claims, identity)."""
    from meetinity_gateway.assembly import load_pipeline

    pipeline = load_pipeline(config)
    _replace_proxy(pipeline.router, "users")
    auth = pipeline.layers["auth"]
    seen = {}

    def capture(environ, start_response):
        seen.update(environ)
        start_response("200 OK", [])
        return [b""]

    auth.app = capture
    environ = dict(template, **{"wsgi.input": io.BytesIO(b"")})
    body = auth(environ, lambda *a: None)
    list(body)
    return {key: value for key, value in seen.items()
            if key not in template or template[key] != value}


def direct_round_trip(upstream: str, count: int) -> float:
    url = urlsplit(upstream)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    started = time.perf_counter()
    for _ in range(count):
        connection.request("GET", "/users/42", headers={"Accept": "*/*"})
        response = connection.getresponse()
        response.read()
    elapsed = time.perf_counter() - started
    connection.close()
    return elapsed / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream")
    parser.add_argument("--config", default=str(ROOT / "gateway.ini"))
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--token", required=True)
    parser.add_argument("--origin", required=True)
    parser.add_argument("--profile", help="write a cProfile of one variant here")
    parser.add_argument("--profile-variant", default="stubbed",
                        help="the variant --profile runs (default: stubbed; full: with proxy)")
    args = parser.parse_args()

    import logging
    import os

    from meetinity_gateway.logs import configure_logging

    # As the server logs (the access line is part of observe's cost), to where the bench's
    # servers write theirs (os.devnull).
    configure_logging(os.environ.get("LOG_LEVEL") or "INFO",
                      os.environ.get("LOG_FORMAT") or "json",
                      stream=open(os.devnull, "w", encoding="utf-8"), force=True)
    quiet = logging.getLogger("meetinity_gateway")
    quiet.setLevel(logging.WARNING)  # no start-up lines for the variants built here...
    config = Path(args.config)
    template = make_environ(args.token, args.origin)
    extra = auth_environ(config, template)
    variants = ["full", "stubbed", *LAYERS, "router"]
    apps = {name: build(config, name, template, extra) for name in variants}
    quiet.setLevel(logging.NOTSET)  # ...but the access log of every request, as served
    for name, app in apps.items():
        status = call(app, template)
        if status != 200:
            raise SystemExit(f"variant {name}: status {status}")
        for _ in range(200):  # warm up: pools, caches, counters
            call(app, template)

    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        app = apps[args.profile_variant]
        profiler.enable()
        for _ in range(args.requests):
            call(app, template)
        profiler.disable()
        profiler.dump_stats(args.profile)

    best = {name: float("inf") for name in [*variants, "http.client"]}
    for _ in range(args.rounds):
        gc.collect()  # each round starts from the same heap
        for name in variants:
            app = apps[name]
            started = time.perf_counter()
            for _ in range(args.requests):
                call(app, template)
            per = (time.perf_counter() - started) / args.requests * 1e6
            best[name] = min(best[name], per)
        best["http.client"] = min(best["http.client"],
                                  direct_round_trip(args.upstream, args.requests))
    costs = {name: best["stubbed"] - best[name] for name in LAYERS}
    costs["router"] = best["stubbed"] - best["router"]
    costs["proxy"] = best["full"] - best["stubbed"] - best["http.client"]
    print(json.dumps({"per_request_us": best, "layer_cost_us": costs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
