"""Raw-socket HTTP helpers for server tests (an HTTP client would tidy the attacks away)."""
from __future__ import annotations

import json
import socket
import time


def connect(url_or_port, timeout: float = 10.0) -> socket.socket:
    port = url_or_port if isinstance(url_or_port, int) else int(url_or_port.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def read_until_close(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes; ``closed`` is False when it kept the
    connection open past ``timeout`` seconds of silence."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except socket.timeout:
            return data, False
        except ConnectionResetError:
            return data, True
        if not piece:
            return data, True
        data += piece


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict, bytes, bytes]:
    """One response with a Content-Length body: (status, headers lowercased, body, rest)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += piece
        if time.monotonic() > deadline:
            raise TimeoutError(data)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        rest += piece
    return status, headers, rest[:length], rest[length:]


def json_error(body: bytes) -> dict:
    """The gateway's error shape, checked."""
    payload = json.loads(body)
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"code", "message", "request_id"}
    return payload["error"]
