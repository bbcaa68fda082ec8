"""A real ``redis-server`` on a free loopback port (that can be frozen with SIGSTOP), a TCP
server that never answers, and a counting proxy that shows what a client sends to Redis."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.servers import free_port, wait_for_port


class RedisServer:
    """``redis-server`` on 127.0.0.1, no persistence; ``stop()`` kills it (also mid-test).
    ``args``: more command-line options (a replica's ``--replicaof``, a cluster node's...);
    ``config``: a configuration file to start from (a sentinel's, which Redis rewrites)."""

    def __init__(self, executable: str, port: int | None = None, *args: str,
                 config: Path | None = None) -> None:
        self.executable = executable
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        # Its working directory is its own: a replica writes the master's snapshot to disk
        # (dump.rdb) even with --save "", which must not land in the caller's folder.
        self._home = None
        if "--dir" not in args:
            self._home = tempfile.TemporaryDirectory(prefix="redis-")
            args = ("--dir", self._home.name, *args)
        self.process = subprocess.Popen(
            [executable, *([str(config)] if config else []), "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *args],
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
        if self._home is not None:
            self._home.cleanup()
            self._home = None

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


def _wait_until(condition, what: str, timeout: float = 20.0):
    """Poll ``condition()`` until it returns something true (redis-py's ConnectionError, an
    OSError, is "not yet": a node still starting)."""
    return wait_until(condition, timeout, what, ignore=(OSError,))


class RedisCluster:
    """A Redis Cluster of ``masters`` nodes (no replicas) on loopback, its 16384 slots split
    evenly, assembled with CLUSTER ADDSLOTSRANGE and CLUSTER MEET (what ``redis-cli
    --cluster create`` does, without needing redis-cli). ``url`` is the ``limits`` URI
    listing every node."""

    def __init__(self, executable: str, folder: Path, masters: int = 3) -> None:
        import redis

        self.nodes: list[RedisServer] = []
        bus_ports: list[int] = []
        try:
            for number in range(masters):
                home = folder / f"node{number}"
                home.mkdir(parents=True)
                # The cluster bus port is chosen too: port + 10000 may be taken or too high.
                bus_ports.append(free_port())
                self.nodes.append(RedisServer(
                    executable, None, "--cluster-enabled", "yes", "--dir", str(home),
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-port", str(bus_ports[-1]), "--cluster-node-timeout", "2000"))
            clients = [redis.Redis(port=node.port, socket_timeout=5) for node in self.nodes]
            step = 16384 // masters
            for number, client in enumerate(clients):
                last = 16383 if number == masters - 1 else (number + 1) * step - 1
                client.execute_command("CLUSTER ADDSLOTSRANGE", number * step, last)
            for client in clients[1:]:
                client.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port,
                                       bus_ports[0])
            for client in clients:
                _wait_until(lambda c=client: c.execute_command("CLUSTER INFO")
                            ["cluster_state"] == "ok", "cluster_state:ok on every node")
                _wait_until(lambda c=client: len(c.execute_command("CLUSTER NODES")) == masters,
                            "every node knows every other")
            for client in clients:
                client.close()
        except Exception:
            self.stop()
            raise
        self.url = "redis+cluster://" + ",".join(
            f"127.0.0.1:{node.port}" for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelSet:
    """A Redis master, one replica and three sentinels watching them (quorum 2) on loopback,
    failing over one second after the master stops answering. ``url`` is the ``limits``
    URI naming the sentinels and the service."""

    SERVICE = "gateway"

    def __init__(self, executable: str, folder: Path, down_after_ms: int = 1000) -> None:
        import redis

        self.master = self.replica = None
        self.sentinels: list[RedisServer] = []
        try:
            self.master = RedisServer(executable)
            self.replica = RedisServer(executable, None, "--replicaof", "127.0.0.1",
                                       str(self.master.port))
            for number in range(3):
                config = folder / f"sentinel{number}.conf"
                config.write_text(
                    f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 2\n"
                    f"sentinel down-after-milliseconds {self.SERVICE} {down_after_ms}\n"
                    f"sentinel failover-timeout {self.SERVICE} 10000\n"
                    f"sentinel parallel-syncs {self.SERVICE} 1\n"
                    f"dir {folder}\n", encoding="utf-8")
                self.sentinels.append(RedisServer(executable, None, "--sentinel",
                                                  config=config))
            replica = redis.Redis(port=self.replica.port, socket_timeout=5)
            _wait_until(lambda: replica.info("replication")["master_link_status"] == "up",
                        "the replica in sync")
            replica.close()
            for sentinel in self.sentinels:
                client = redis.Redis(port=sentinel.port, socket_timeout=5,
                                     decode_responses=True)
                _wait_until(lambda c=client: (lambda m: int(m["num-other-sentinels"]) == 2
                                              and int(m["num-slaves"]) == 1)(
                    c.sentinel_master(self.SERVICE)), "every sentinel sees the set")
                client.close()
        except Exception:
            self.stop()
            raise
        self.url = ("redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
                    + f"/{self.SERVICE}")

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers says."""
        import redis

        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, socket_timeout=1)
            try:
                return int(client.sentinel_get_master_addr_by_name(self.SERVICE)[1])
            except (redis.RedisError, OSError, TypeError):
                continue
            finally:
                client.close()
        raise ConnectionError("no sentinel answers")

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            if server is not None:
                server.stop()
