"""Which upstream client: the same minimal WSGI pass-through on each candidate, under wrk.

Every variant forwards the method, path and headers of a small GET to a loopback upstream
(``bench/fastupstream.py``) and streams the answer back; waitress serves it (8 threads, in
its own process) and ``wrk -t1 -c16`` drives it for ``--seconds``, ``--rounds`` times with the
variants interleaved (the median is shown); all rows run in the same invocation, so their
ratios are comparable. Variants:

``urllib3-urlopen``  ``HTTPConnectionPool.urlopen`` (retries off, no preload), the client the
                     proxy drove before issue 15
``urllib3-conn``     urllib3 ``HTTPConnection`` objects driven directly (``request`` and
                     ``getresponse``), kept in a LIFO deque
``stdlib``           ``http.client.HTTPConnection``, one kept-alive connection per thread
                     (the issue's reference)
``client``           :class:`meetinity_gateway.proxy.client.ConnectionPool` (stdlib sockets,
                     strict reader, leftover checks, idle recycling)
``proxyapp``         the whole :class:`~meetinity_gateway.proxy.app.ProxyApp` (no middleware)

``python bench/client_compare.py [--seconds 5] [--rounds 3] [--variants a,b,…]
[--baseline DIR]``; needs ``wrk``. ``--baseline DIR`` adds a ``proxyapp`` row run from
another checkout of the gateway (e.g. ``git archive <commit> | tar -x -C DIR``), to compare
before and after.
Installs nothing; prints one table (req/s, ratio to ``stdlib``).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("urllib3-urlopen", "urllib3-conn", "stdlib", "client", "proxyapp")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authenticate", "proxy-authorization"}


def _headers(environ) -> dict[str, str]:
    return {key[5:].replace("_", "-").title(): value for key, value in environ.items()
            if key.startswith("HTTP_") and key != "HTTP_HOST"}


def _target(environ) -> str:
    target = environ.get("PATH_INFO", "/")
    if environ.get("QUERY_STRING"):
        target += "?" + environ["QUERY_STRING"]
    return target


def _answer(start_response, status, reason, items):
    start_response(f"{status} {reason}", [(k, v) for k, v in items if k.lower() not in _HOP])


def make_app(variant: str, host: str, port: int):
    host_header = f"{host}:{port}"
    if variant == "urllib3-urlopen":
        import urllib3

        pool = urllib3.HTTPConnectionPool(host, port, maxsize=8, retries=False)

        def app(environ, start_response):
            headers = _headers(environ)
            headers["Host"] = host_header
            response = pool.urlopen(environ["REQUEST_METHOD"], _target(environ),
                                    headers=headers, preload_content=False,
                                    decode_content=False, redirect=False, retries=False)
            _answer(start_response, response.status, response.reason, response.headers.items())
            try:
                yield from response.stream(65536, decode_content=False)
            finally:
                response.release_conn()

        return app
    if variant == "urllib3-conn":
        from urllib3.connection import HTTPConnection

        idle: collections.deque = collections.deque()

        def app(environ, start_response):
            headers = _headers(environ)
            headers["Host"] = host_header
            try:
                conn = idle.pop()
            except IndexError:
                conn = HTTPConnection(host, port)
            conn.request(environ["REQUEST_METHOD"], _target(environ), headers=headers,
                         preload_content=False, decode_content=False)
            response = conn.getresponse()
            _answer(start_response, response.status, response.reason, response.headers.items())
            try:
                while True:
                    piece = response.read1(65536)
                    if not piece:
                        break
                    yield piece
            finally:
                if response.isclosed() or response._fp is None or response._fp.isclosed():
                    idle.append(conn)
                else:
                    conn.close()

        return app
    if variant == "stdlib":
        import http.client

        local = threading.local()

        def app(environ, start_response):
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection(host, port)
            headers = _headers(environ)
            headers["Host"] = host_header
            conn.request(environ["REQUEST_METHOD"], _target(environ), headers=headers)
            response = conn.getresponse()
            _answer(start_response, response.status, response.reason, response.getheaders())
            while True:
                piece = response.read(65536)
                if not piece:
                    break
                yield piece

        return app
    if variant == "client":
        from meetinity_gateway.proxy.client import ConnectionPool, release

        pool = ConnectionPool("http", host, port, maxsize=8)

        def app(environ, start_response):
            headers = _headers(environ)
            headers["Host"] = host_header
            response = pool.request(environ["REQUEST_METHOD"], _target(environ), headers)
            _answer(start_response, response.status, response.reason, response.headers.items())
            try:
                while True:
                    piece = response.read1(65536)
                    if not piece:
                        break
                    yield piece
            finally:
                release(response)

        return app
    if variant == "proxyapp":
        from meetinity_gateway.proxy.app import ProxyApp

        return ProxyApp(f"http://{host}:{port}", pool_size=8)
    raise SystemExit(f"unknown variant {variant!r}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def run(variants: list[str], seconds: int, baseline: str | None = None,
        rounds: int = 3) -> dict[str, float]:
    """req/s per variant: the median of ``rounds`` wrk runs, the variants interleaved (every
    server started first, then round after round each driven in turn), so that load from
    elsewhere on the machine falls on all of them alike."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed")
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    rows = [(variant, variant, env) for variant in variants]
    if baseline:
        old_env = dict(env, PYTHONPATH=str(Path(baseline).resolve()))
        rows.append(("proxyapp (baseline)", "proxyapp", old_env))
    up_port = _free_port()
    processes = [subprocess.Popen([sys.executable, str(HERE / "fastupstream.py"), "127.0.0.1",
                                   str(up_port)], env=env)]
    samples: dict[str, list[float]] = {label: [] for label, _, _ in rows}
    try:
        _wait_port(up_port)
        urls = {}
        for label, variant, row_env in rows:
            port = _free_port()
            processes.append(subprocess.Popen([sys.executable, __file__, "serve", variant,
                                               str(up_port), str(port)], env=row_env))
            _wait_port(port)
            urls[label] = f"http://127.0.0.1:{port}/api/users/42"
            # Warm up (connections, caches).
            subprocess.run([wrk, "-t1", "-c16", "-d2s", urls[label]], capture_output=True,
                           check=True, timeout=60)
        for _ in range(rounds):
            for label, url in urls.items():
                out = subprocess.run([wrk, "-t1", "-c16", f"-d{seconds}s", url],
                                     capture_output=True, text=True, check=True,
                                     timeout=seconds + 60).stdout
                match = re.search(r"Requests/sec:\s+([0-9.]+)", out)
                errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                if errors or not match:
                    raise SystemExit(f"{label}: error answers or no rate\n{out}")
                samples[label].append(float(match.group(1)))
    finally:
        for process in reversed(processes):  # the servers, then their upstream
            _stop(process)
    for label, values in samples.items():
        print(f"# {label}: " + ", ".join(f"{value:.0f}" for value in values))
    return {label: statistics.median(values) for label, values in samples.items()}


def serve(variant: str, up_port: int, port: int) -> None:
    import waitress

    import logging

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth" lines
    waitress.serve(make_app(variant, "127.0.0.1", up_port), host="127.0.0.1", port=port,
                   threads=8, _quiet=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--baseline", help="another checkout's directory, for a proxyapp row")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    results = run(variants, args.seconds, args.baseline, args.rounds)
    reference = results.get("stdlib")
    print(f"{'variant':<22} {'req/s':>9} {'x stdlib':>9}")
    for variant, rate in results.items():
        ratio = f"{rate / reference:.2f}" if reference else "-"
        print(f"{variant:<22} {rate:>9.0f} {ratio:>9}")


if __name__ == "__main__":
    main()
