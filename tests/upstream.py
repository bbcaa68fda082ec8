"""A small real HTTP/1.1 upstream on loopback, for end-to-end tests of the gateway.

Behaviour is chosen by the last path segment, so it works behind any route rewrite:

==================  ===========================================================================
``…/gzip``          a gzip body with ``Content-Encoding: gzip``
``…/cookies``       two ``Set-Cookie`` headers
``…/hop``           ``Connection: close, X-Internal`` with ``X-Internal: secret``, ``Keep-Alive``,
                    ``Access-Control-Allow-Origin: *`` (none of which may reach the client)
``…/slow``          sleeps ``?seconds=`` (default 5) before answering; ``most_at_once``
                    keeps the largest number of them sleeping at the same time
``…/download``      streams ``?size=`` bytes of :func:`pattern` with ``Content-Length``
``…/chunked``       streams ``?size=`` bytes of :func:`pattern` chunked
``…/upload``        reads the body in chunks; answers its length and SHA-256
``…/status``        answers ``?code=``
``…/powered``       echo, answered with ``X-Powered-By: Express`` and ``X-Keep: yes``
``…/health``        200 ``{"status": "ok"}`` (or ``health_status`` when set)
``…/die``           reads the body, then closes the connection without answering (an
                    upstream crashing mid-request); answers like echo when ``dies`` is False
anything else       echo: method, path, query, headers, body length and SHA-256, and
                    ``upstream`` (this server's URL) as JSON
==================  ===========================================================================

A ``mode`` other than ``"ok"`` makes it misbehave on every request but ``HEAD`` (``/health``
included: a broken service is broken everywhere):

==============  ============================================================================
``"503"`` …     any status code: answers it, with ``{"service_error": code}``
``"hang"``      reads the request, then never answers until :meth:`Upstream.release` (or
                ``hang_limit`` seconds), and closes the connection without a word; ``hung``
                counts the requests hanging
``"reset"``     reads the request, then resets the connection (RST, no answer)
``"stall"``     answers 200 with a ``Content-Length`` of 128 KiB, sends half of the body, and
                the rest only after :meth:`Upstream.release` (a response in progress)
==============  ============================================================================

A *refusing* upstream is a stopped one (or a :func:`tests.servers.free_port` nothing listens
on); ``Upstream(port=…)`` brings a service back on the same address. Byte-level misbehaviour
(bad framing, interim answers, control characters) is :class:`tests.rawkit.ScriptedUpstream`'s.

Every request is recorded in ``upstream.requests`` (method, raw target, headers) and every
new connection counted in ``upstream.connections``. With ``idle_close=T``, a request arriving
on a keep-alive connection idle for more than T seconds is dropped unanswered, the
connection closed: what a server whose keep-alive timer fires just as the request comes in
does (the race a proxy must avoid by not reusing old idle connections).
Run alone: ``python -m tests.upstream --port 5001``.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.rawkit import reset_on_close

CHUNK = 64 * 1024
_BLOCK = bytes(range(256)) * (CHUNK // 256)
_HALF = 64 * 1024  # half the body a "stall" answer sends


def pattern(size: int):
    """Deterministic bytes (``0..255`` repeating), yielded in 64 KiB chunks."""
    while size > 0:
        piece = _BLOCK[: min(size, CHUNK)]
        size -= len(piece)
        yield piece


def pattern_digest(size: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern(size):
        digest.update(piece)
    return digest.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def setup(self):
        super().setup()
        self._last_done = None
        self.server.owner.count_connection()

    def handle_one_request(self):
        super().handle_one_request()
        self._last_done = time.monotonic()

    def parse_request(self):
        idle_close = self.server.owner.idle_close
        if (idle_close is not None and self._last_done is not None
                and time.monotonic() - self._last_done > idle_close):
            self.close_connection = True
            return False  # handle_one_request returns without answering; the socket closes
        return super().parse_request()

    def _dispatch(self):
        if self.server.owner.mode != "ok":
            return self._misbehave(self.server.owner)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        self.server.owner.record(self.command, self.path, list(self.headers.items()))
        name = url.path.rstrip("/").rsplit("/", 1)[-1]
        handler = getattr(self, f"do_{name}_", None)
        if handler is None:
            return self.echo(url)
        return handler(query)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def do_HEAD(self):
        self.server.owner.record(self.command, self.path, list(self.headers.items()))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "1234")
        self.end_headers()

    def _misbehave(self, owner: "Upstream"):
        owner.record(self.command, self.path, list(self.headers.items()))
        self.body_summary()
        mode = owner.mode
        if mode in ("hang", "stall"):
            if mode == "stall":
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(2 * _HALF))
                self.end_headers()
                self.wfile.write(b"a" * _HALF)
                self.wfile.flush()
            owner.hanging(+1)
            try:
                owner.released.wait(owner.hang_limit)
            finally:
                owner.hanging(-1)
            if mode == "stall":
                self.wfile.write(b"b" * _HALF)
                return None
            self.close_connection = True
            return None
        if mode == "reset":
            self.close_connection = True
            reset_on_close(self.connection)
            return None
        code = int(mode)
        return self.send_json({"service_error": code}, status=code)

    # -- helpers ---------------------------------------------------------------------------

    def read_body(self):
        """Yields the request body in chunks (Content-Length or chunked)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                remaining = size
                while remaining:
                    data = self.rfile.read(min(remaining, CHUNK))
                    remaining -= len(data)
                    yield data
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            data = self.rfile.read(min(remaining, CHUNK))
            if not data:
                return
            remaining -= len(data)
            yield data

    def body_summary(self):
        digest = hashlib.sha256()
        length = 0
        for data in self.read_body():
            digest.update(data)
            length += len(data)
        return length, digest.hexdigest()

    def send_json(self, payload, status=200, headers=()):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    # -- behaviours ------------------------------------------------------------------------

    def echo(self, url):
        length, digest = self.body_summary()
        self.send_json({
            "method": self.command,
            "path": url.path,
            "query": url.query,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_length": length,
            "body_sha256": digest,
            "upstream": self.server.owner.url,
        })

    def do_die_(self, query):
        if not self.server.owner.dies:
            return self.echo(urlsplit(self.path))
        self.body_summary()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def do_gzip_(self, query):
        self.body_summary()
        body = gzip.compress(b'{"compressed": true}' * 50)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_cookies_(self, query):
        self.body_summary()
        self.send_json({"ok": True}, headers=[
            ("Set-Cookie", "session=abc; Path=/; HttpOnly"),
            ("Set-Cookie", "theme=dark; Path=/"),
        ])

    def do_hop_(self, query):
        self.body_summary()
        self.close_connection = True
        self.send_json({"ok": True}, headers=[
            ("Connection", "close, X-Internal"),
            ("X-Internal", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("Access-Control-Allow-Origin", "*"),
            ("X-Public", "visible"),
        ])

    def do_slow_(self, query):
        self.body_summary()
        owner = self.server.owner
        owner.sleeping(+1)
        try:
            time.sleep(float(query.get("seconds", ["5"])[0]))
        finally:
            owner.sleeping(-1)
        self.send_json({"slow": True})

    def do_download_(self, query):
        self.body_summary()
        size = int(query.get("size", ["0"])[0])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        for piece in pattern(size):
            self.wfile.write(piece)

    def do_chunked_(self, query):
        self.body_summary()
        size = int(query.get("size", ["0"])[0])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in pattern(size):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def do_upload_(self, query):
        length, digest = self.body_summary()
        self.send_json({"body_length": length, "body_sha256": digest})

    def do_powered_(self, query):
        length, digest = self.body_summary()
        self.send_json({"headers": [[k, v] for k, v in self.headers.items()]},
                       headers=[("X-Powered-By", "Express"), ("X-Keep", "yes")])

    def do_status_(self, query):
        self.body_summary()
        code = int(query.get("code", ["200"])[0])
        self.send_json({"status": code}, status=code)

    def do_health_(self, query):
        self.body_summary()
        status = self.server.owner.health_status
        self.send_json({"status": "ok" if status == 200 else "error"}, status=status)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "Upstream"

    def handle_error(self, request, client_address):
        # A client (the gateway) hanging up on a slow or big answer is part of the tests.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Upstream:
    """A threaded loopback upstream; use as a context manager or call ``start``/``stop``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 idle_close: float | None = None, mode: str = "ok",
                 hang_limit: float = 30.0) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.owner = self
        self.host, self.port = self._server.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.health_status = 200
        self.dies = True
        self.idle_close = idle_close
        self.mode = mode
        self.hang_limit = hang_limit
        self.released = threading.Event()
        self.hung = 0  # requests hanging ("hang", "stall") right now
        self.connections = 0
        self.at_once = self.most_at_once = 0  # ``…/slow`` requests sleeping together
        self.requests: list[tuple[str, str, list[tuple[str, str]]]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def record(self, method, target, headers) -> None:
        with self._lock:
            self.requests.append((method, target, headers))

    def sleeping(self, delta: int) -> None:
        with self._lock:
            self.at_once += delta
            self.most_at_once = max(self.most_at_once, self.at_once)

    def hanging(self, delta: int) -> None:
        with self._lock:
            self.hung += delta

    def release(self) -> None:
        """Let every hanging request go (each closes its connection unanswered)."""
        self.released.set()

    def paths(self, since: int = 0) -> list[str]:
        """Request targets received, from the ``since``-th on."""
        with self._lock:
            return [target for _, target, _ in self.requests[since:]]

    def count_connection(self) -> None:
        with self._lock:
            self.connections += 1

    def start(self) -> "Upstream":
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "Upstream":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args()
    upstream = Upstream(args.host, args.port)
    print(f"upstream on {upstream.url}", flush=True)
    upstream._server.serve_forever()


if __name__ == "__main__":
    main()
