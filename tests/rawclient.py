"""Raw-socket HTTP for attack tests: the bytes go out exactly as written, no client tidies them.

:func:`exchange` sends one request (the caller writes every byte, usually ending with
``Connection: close``) and reads the answer until the server closes or the body announced by
``Content-Length`` is complete.
"""
from __future__ import annotations

import json
import socket
import typing as t


class RawResponse(t.NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> t.Any:
        return json.loads(self.body)


def _parse(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    length = next((v for k, v in headers if k.lower() == "content-length"), None)
    if length is not None:
        body = body[: int(length)]
    return RawResponse(status, headers, body)


def exchange(port: int, request: bytes, host: str = "127.0.0.1",
             timeout: float = 10.0) -> RawResponse:
    """Send ``request`` as is; the parsed first response (raises on no answer)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = None
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if length is not None and len(body) >= length:
                    break
    if not data:
        raise ConnectionError("the server closed the connection without an answer")
    return _parse(data)


def request_bytes(method: str, target: bytes | str, headers: t.Sequence[tuple[str, str]] = (),
                  body: bytes = b"", host: str = "gateway.test") -> bytes:
    """``METHOD target HTTP/1.1`` with ``Host``, ``headers``, ``Content-Length`` when there is
    a body, and ``Connection: close``."""
    if isinstance(target, str):
        target = target.encode("latin-1")
    lines = [method.encode("latin-1") + b" " + target + b" HTTP/1.1", b"Host: " + host.encode()]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
