"""A served gateway's life: the start-up line, the run loop, the stop signals and the drain.

**Graceful stop** (:func:`run`): on SIGTERM / SIGINT (Ctrl+C, and Ctrl+Break where
``signal.SIGBREAK`` exists, i.e. Windows) the server stops accepting, lets the requests in
flight finish for up to ``drain_seconds``, answers any further request on a kept-alive
connection with ``Connection: close``, then exits. A second signal stops at once; the
requests cut are logged, marked in their access-log line and make the exit status 1.

:func:`announce` logs the start-up line once per loaded pipeline, whichever server runs it.

Signals are optional: outside the main thread (tests, embedding) :func:`stop` asks for the
same graceful stop. Nothing here needs fork or a POSIX-only signal.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import typing as t

from waitress.channel import HTTPChannel

from meetinity_gateway.keys import CUT_KEY
from meetinity_gateway.pipeline import startup_line
from meetinity_gateway.serving.hardened import (
    GatewayChannel,
    ServingState,
    listeners,
    socket_map_of,
)
from meetinity_gateway.settings import DEFAULTS

log = logging.getLogger("meetinity_gateway.server")


def _install_signals(state: ServingState, socket_map: dict) -> t.Callable[[], None]:
    """Stop signals set a flag the loop checks; ``signal.set_wakeup_fd`` on a socket pair in
    the loop's map wakes the loop at once (a handler must not take the trigger's lock). Only
    possible in the main thread; elsewhere (tests) the caller uses :func:`stop`."""
    import waitress.wasyncore as wasyncore

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum, frame):
        state.stops += 1

    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):  # SIGBREAK: Ctrl+Break on Windows
        number = getattr(signal, name, None)
        if number is not None:
            try:
                previous[number] = signal.signal(number, handler)
            except (OSError, ValueError):
                pass

    class Wakeup(wasyncore.dispatcher):
        def readable(self) -> bool:
            return True

        def writable(self) -> bool:
            return False

        def handle_read(self) -> None:
            try:
                self.recv(512)
            except OSError:
                pass

    reader, writer = socket.socketpair()
    writer.setblocking(False)
    wakeup = Wakeup(reader, map=socket_map)
    old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def restore() -> None:
        signal.set_wakeup_fd(old_fd)
        for number, old in previous.items():
            signal.signal(number, old)
        wakeup.close()
        writer.close()

    return restore


def stop(server) -> None:
    """Ask a server running in :func:`run` to stop gracefully (thread-safe)."""
    server.gateway.stops += 1


def run(server, *, drain_seconds: float = DEFAULTS["drain_seconds"]) -> int:
    """Serve until a stop signal (or :func:`stop`), then drain and close. Returns the number
    of requests cut at stop (0: every request was answered)."""
    import waitress.wasyncore as wasyncore

    state: ServingState = server.gateway
    adj = listeners(server)[0].adj
    socket_map = socket_map_of(server)
    restore = _install_signals(state, socket_map)
    try:
        while not state.stops and socket_map:
            wasyncore.loop(timeout=adj.asyncore_loop_timeout, map=socket_map,
                           use_poll=adj.asyncore_use_poll, count=1)
        return _drain(server, drain_seconds, wasyncore)
    finally:
        restore()


def _drain(server, drain_seconds: float, wasyncore) -> int:
    state: ServingState = server.gateway
    adj = listeners(server)[0].adj
    socket_map = socket_map_of(server)
    state.draining = True
    began = time.monotonic()
    for listener in listeners(server):  # stop accepting; keep the triggers
        listener.accepting = False
        wasyncore.dispatcher.close(listener)

    def channels() -> list[GatewayChannel]:
        return [obj for obj in list(socket_map.values()) if isinstance(obj, HTTPChannel)]

    busy = sum(1 for ch in channels() if ch.busy())
    log.info("stopping: %d request(s) in flight, waiting up to %g s", busy, drain_seconds)
    deadline = began + drain_seconds
    while (state.stops < 2 and time.monotonic() < deadline
           and any(ch.busy() for ch in channels())):
        wasyncore.loop(timeout=min(0.2, adj.asyncore_loop_timeout), map=socket_map,
                       use_poll=adj.asyncore_use_poll, count=1)
    left = [ch for ch in channels() if ch.busy()]
    elapsed = time.monotonic() - began
    why = ("a second stop signal" if state.stops >= 2
           else f"the drain deadline of {drain_seconds:g} s")
    for channel in left:
        # Its access-log line comes only if its thread ends within the grace below (one
        # waiting on an upstream may not): this line says what was cut, in any case.
        request = channel.requests[0] if channel.requests else channel.request
        task = channel.current_task
        environ = getattr(task, "environ", None) if task is not None else None
        if environ is not None and task.request is request:
            environ[CUT_KEY] = {"reason": f"cut at stop ({why})",
                                "answered": bool(task.wrote_header)}
        log.warning("stopping: request still in flight after %.1f s, cut by %s: %s %s from %s",
                    elapsed, why, getattr(request, "command", "-"),
                    getattr(request, "path", "-"), channel.addr[0] if channel.addr else "-")
    for channel in channels():
        channel._close_now()
    # Threads still writing notice the closed connection and end their request (its access
    # log line included); one blocked on an upstream gets a few seconds more.
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=5 if left else 1)
    wasyncore.close_all(socket_map)
    if left:
        log.warning("stopped after %.1f s: %d request(s) cut", time.monotonic() - began,
                    len(left))
    else:
        log.info("stopped")
    return len(left)


def announce(pipeline, *, where: str = "", server: str = "") -> None:
    """Log the start-up line once per loaded pipeline: version, pipeline, configuration
    fingerprint, upstreams and where it serves. At WARNING, so that it shows at every
    ``LOG_LEVEL`` but ERROR: an operator always sees that (and what) the gateway serves."""
    if pipeline is None or pipeline.announced:
        return
    pipeline.announced = True
    text = startup_line(pipeline)
    if server:
        text += f"; server {server}, pid {os.getpid()}"
    if where:
        text = f"serving on {where}: {text}"
    logging.getLogger("meetinity_gateway").warning("%s", text)


def listening_on(server) -> str:
    out = []
    for listener in listeners(server):
        host, port = listener.effective_host, listener.effective_port
        out.append(f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}")
    return " ".join(out)
