"""Fallback upstream when nginx is not installed: a minimal asyncio HTTP/1.1 server.

It answers every request with a fixed small JSON, ``/download?size=N`` with N bytes, and
reads (discards) any request body. It does no more than that, which keeps it several times
faster than any Python WSGI gateway in front of it (it is the 'upstream direct' reference).

``python bench/fastupstream.py HOST PORT``
"""
from __future__ import annotations

import asyncio
import sys
from urllib.parse import parse_qs, urlsplit

BODY = b'{"id":42,"name":"Ada Lovelace","headline":"Engineer"}'
SMALL = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
         + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
CHUNK = b"x" * 65536


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            length = 0
            chunked = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            while length:
                data = await reader.read(min(length, 1 << 20))
                if not data:
                    return
                length -= len(data)
            if chunked:
                while True:
                    size = int((await reader.readline()).split(b";")[0], 16)
                    if size:
                        await reader.readexactly(size)
                    await reader.readline()
                    if not size:
                        break
            url = urlsplit(target.decode("latin-1"))
            if url.path.endswith("/download"):
                size = int(parse_qs(url.query).get("size", ["0"])[0])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n\r\n" % size)
                while size:
                    piece = CHUNK[:min(size, len(CHUNK))]
                    writer.write(piece)
                    size -= len(piece)
                    await writer.drain()
            else:
                writer.write(SMALL)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
