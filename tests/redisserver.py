"""A real ``redis-server`` on a free loopback port (that can be frozen with SIGSTOP), a TCP
server that never answers, and a counting proxy that shows what a client sends to Redis."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.servers import free_port, wait_for_port


class RedisServer:
    """``redis-server`` on 127.0.0.1, no persistence; ``stop()`` kills it (also mid-test)."""

    def __init__(self, executable: str, port: int | None = None) -> None:
        self.executable = executable
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout=10, process=self.process)
        except Exception:
            self.stop()
            raise

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its port (the kernel still accepts connections) but
        answers nothing — a Redis stuck in a long command, a swap storm or a VM pause.
        Skips the test where the signal does not exist (Windows)."""
        if not hasattr(signal, "SIGSTOP"):
            pytest.skip("SIGSTOP does not exist on this platform (test-only fault injection)")
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: the frozen server carries on."""
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # SIGKILL also ends a stopped process
            self.process.wait(5)
        if self.process.stderr:
            self.process.stderr.close()

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class SilentServer:
    """Accepts TCP connections on loopback and never answers: a Redis that hangs."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        # accept() wakes up regularly: closing a socket does not interrupt a blocked accept.
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._accepted: list[socket.socket] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                connection, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._accepted.append(connection)

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(5)
        self._listener.close()
        for connection in self._accepted:
            connection.close()

    def __enter__(self) -> "SilentServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_commands(buffer: bytearray) -> list[str]:
    """Take the complete RESP commands (arrays of bulk strings, as redis-py sends them) off
    the front of ``buffer``; return their names (``EVALSHA``, ``CLIENT``…), upper-case."""
    names = []
    while buffer:
        if buffer[:1] != b"*":  # an inline command: one line
            end = buffer.find(b"\r\n")
            if end < 0:
                break
            names.append(bytes(buffer[:end]).split(b" ", 1)[0].decode("latin-1").upper())
            del buffer[:end + 2]
            continue
        end = buffer.find(b"\r\n")
        if end < 0:
            break
        count, position, args = int(buffer[1:end]), end + 2, []
        for _ in range(count):
            end = buffer.find(b"\r\n", position)
            if end < 0:
                return names
            start = end + 2
            length = int(buffer[position + 1:end])
            if len(buffer) < start + length + 2:
                return names
            args.append(bytes(buffer[start:start + length]))
            position = start + length + 2
        del buffer[:position]
        names.append(args[0].decode("latin-1").upper() if args else "")
    return names


class RedisProxy:
    """A TCP proxy in front of a Redis that records what clients do: every connection, every
    command (by name, with the time it passed), how many times a connection started waiting
    (``waits``: sent something, nothing answered yet — against a frozen Redis, one attempt of
    a client still inside its timeout, however many commands it pipelined) and the most
    connections waiting at once (``max_waiting``). ``reset()`` starts a new measurement."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._waiting: set[int] = set()
        self._stopping = False
        self.reset()
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)
        self._accept_thread.start()

    def reset(self) -> None:
        with self._lock:
            self.connections = 0
            self.commands: list[tuple[float, str]] = []
            self.waits = 0
            self.max_waiting = len(self._waiting)

    def _accept(self) -> None:
        number = 0
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            number += 1
            with self._lock:
                self.connections += 1
                self._sockets.append(client)
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
            except OSError:
                client.close()  # Redis is gone: the client sees the connection drop
                continue
            with self._lock:
                self._sockets.append(server)
            for source, sink, upstream in ((client, server, True), (server, client, False)):
                thread = threading.Thread(target=self._pump, daemon=True,
                                          args=(number, source, sink, upstream))
                self._threads.append(thread)
                thread.start()

    def _pump(self, number: int, source: socket.socket, sink: socket.socket,
              upstream: bool) -> None:
        source.settimeout(0.1)
        buffer = bytearray()
        try:
            while not self._stopping:
                try:
                    data = source.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                with self._lock:
                    if upstream:
                        buffer += data
                        now = time.monotonic()
                        self.commands += [(now, name) for name in parse_commands(buffer)]
                        if number not in self._waiting:
                            self.waits += 1
                            self._waiting.add(number)
                        self.max_waiting = max(self.max_waiting, len(self._waiting))
                    else:
                        self._waiting.discard(number)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._waiting.discard(number)
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stopping = True
        self._accept_thread.join(5)
        self._listener.close()
        for thread in self._threads:
            thread.join(5)
        for sock in self._sockets:
            sock.close()

    def __enter__(self) -> "RedisProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
