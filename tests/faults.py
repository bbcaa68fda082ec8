"""A loopback upstream that misbehaves on command, and a small gateway in front of it.

:class:`FaultyUpstream` is :class:`tests.upstream.Upstream` with a ``mode`` applied to every
request (``/health`` included: a broken service is broken everywhere):

==============  ============================================================================
``"ok"``        behaves as :class:`~tests.upstream.Upstream` (echo, ``/health``, …)
``"503"`` …     any status code: answers it, with a small JSON body of its own
``"hang"``      reads the request, then never answers until :meth:`FaultyUpstream.release`
                (or ``hang_limit`` seconds), and closes the connection without a word
``"reset"``     reads the request, then resets the connection (RST, no answer)
``"stall"``     answers 200 with a ``Content-Length`` of 128 KiB, sends half of the body, and
                the rest only after :meth:`FaultyUpstream.release` (a response in progress)
==============  ============================================================================

A *refusing* upstream is a stopped one: :func:`refusing_port` gives a port nothing listens
on, and ``FaultyUpstream(port=…)`` brings a service back on the same address.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

from meetinity_gateway.assembly import load_pipeline
from tests.servers import WaitressServer, free_port
from tests.upstream import Upstream, _Handler

__all__ = ["FaultyUpstream", "GatewayUnderTest", "refusing_port"]

_HALF = 64 * 1024


class _FaultHandler(_Handler):
    def _faulty(self):
        owner: FaultyUpstream = self.server.owner
        mode = owner.mode
        if mode == "ok":
            return self._dispatch()
        owner.record(self.command, self.path, list(self.headers.items()))
        self.body_summary()
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
            # Linger 0: closing the socket sends RST instead of FIN (struct linger is two
            # u_short on Windows, two int elsewhere).
            linger = struct.pack("HH" if os.name == "nt" else "ii", 1, 0)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            return None
        code = int(mode)
        return self.send_json({"service_error": code}, status=code)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _faulty


class FaultyUpstream(Upstream):
    """An :class:`~tests.upstream.Upstream` whose ``mode`` decides how it answers."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, mode: str = "ok",
                 hang_limit: float = 30.0) -> None:
        super().__init__(host, port)
        self._server.RequestHandlerClass = _FaultHandler
        self.mode = mode
        self.hang_limit = hang_limit
        self.released = threading.Event()
        self.hung = 0

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

    def stop(self) -> None:
        self.release()
        super().stop()


def refusing_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    return free_port()


class GatewayUnderTest:
    """A gateway built from a small ini (observe, errors, router), under a real waitress.

    ``upstreams`` maps names to target strings; each gets a route ``/NAME/*``. ``settings``
    are ``[app:gateway]`` keys (``max_fails = 1`` …).
    """

    def __init__(self, directory: Path, upstreams: dict[str, str], threads: int = 4,
                 **settings) -> None:
        lines = [
            "[pipeline:main]", "pipeline = observe errors gateway", "",
            "[filter:observe]", "use = egg:meetinity_gateway#observe", "",
            "[filter:errors]", "use = egg:meetinity_gateway#errors", "",
            "[app:gateway]", "use = egg:meetinity_gateway#main",
            "route.health = GET /health -> @health",
            "route.live = GET /health/live -> @live",
            f"server_threads = {threads}",
        ]
        for name, targets in upstreams.items():
            lines.append(f"upstream.{name} = {targets}")
            lines.append(f"route.{name} = /{name}/* -> {name}")
        lines.extend(f"{key} = {value}" for key, value in settings.items())
        path = directory / "gateway-under-test.ini"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.pipeline = load_pipeline(path)
        self.server = WaitressServer(self.pipeline.app, threads=threads)
        self.url = self.server.url

    def pool(self, name: str):
        return self.pipeline.router.endpoints[name].pool

    def states(self, name: str) -> list[str]:
        return [row["state"] for row in self.pool(name).snapshot()]

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            for endpoint in self.pipeline.router.endpoints.values():
                close = getattr(endpoint, "close", None)
                if close is not None:
                    close()
