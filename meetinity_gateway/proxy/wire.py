"""What the proxy accepts from an upstream on the wire: one final response, strictly framed.

The upstream client (:mod:`meetinity_gateway.proxy.client`) reads every response with
:class:`GuardedResponse`, a :class:`http.client.HTTPResponse` that

* **reads past interim responses**: ``100``, ``102``, ``103`` or any other ``1xx`` except
  ``101`` is read to its end and dropped (WSGI has no way to relay it), at most
  :data:`MAX_INTERIM` of them; the final response after them is the answer. (The stdlib skips
  ``100`` only: a ``103 Early Hints`` came back as *the* answer, with zero body bytes, and the
  real answer stayed unread in a connection that went back to the pool — the next request on
  it, another user's, got it.)
* **refuses** with :class:`InvalidUpstreamResponse` (an :class:`http.client.HTTPException`,
  so the client closes the connection and the proxy answers a JSON 502) what breaks the
  HTTP/1.1 grammar of :mod:`meetinity_gateway.http11` — the rules the server applies to
  requests, so nothing is accepted from an upstream that a client could not send:

  - a ``101 Switching Protocols`` (the gateway never asks for an upgrade);
  - a status line other than ``HTTP/1.x NNN [reason]`` with a status from 100 to 599 and a
    reason of visible characters, spaces and tabs;
  - a header line longer than 64 KiB or more than 100 header lines;
  - a line of the response head not ended by CRLF (a bare LF), a header line holding CR,
    NUL or any other control character (HTAB allowed in values), an obs-fold continuation
    line, a name that is not an RFC 9110 token (empty, spaces before the colon, no colon at
    all), or a head cut short — in the final response and in interim ones alike;
  - ambiguous framing: a ``Content-Length`` other than one line of 1 to 18 plain decimal
    digits (a comma list ``5, 5`` and repeated equal lines included), ``Transfer-Encoding``
    together with ``Content-Length``, a ``Transfer-Encoding`` other than exactly
    ``chunked``, or any ``Transfer-Encoding`` in an HTTP/1.0 response;
  - while a chunked body is read: a chunk-size line that is not strictly hexadecimal
    (``0x10``, a sign, spaces, an empty line, a bare LF) or has malformed extensions, chunk
    data not followed by CRLF, a trailer line that is not a valid field line (the stdlib's
    reader accepts all of these). Before the first body byte is sent this is a JSON 502;
    later the client's connection is aborted, so a broken body never looks complete.

Refusing is the answer RFC 9112 §5.2 allows a proxy for obs-fold, and the only safe one for
the rest: such an upstream is broken or hostile, and repairing its headers (as the stdlib's
e-mail parser does, splitting a value at a bare CR into a second header) would hand the client
something the upstream never meant — or let the upstream inject headers.

* **reads the body as it comes**: :meth:`GuardedResponse.read1` returns what is available,
  up to the size asked (an answer written in small pieces goes on piece by piece), and
  raises :class:`http.client.IncompleteRead` when a ``Content-Length`` body ends early (the
  stdlib's ``read1`` would just return ``b""``, a truncated body looking complete).

The head is parsed here (not by the stdlib's e-mail parser, the slowest step of a proxied
request); the body is read by :class:`http.client.HTTPResponse`'s machinery. Whether a
connection may carry another request afterwards follows HTTP/1.1 (``Connection: close``,
HTTP/1.0 without keep-alive, a close-delimited body all close it; ``will_close``);
the client additionally gives a connection back to its pool only once its response was read
to its exact end with nothing after it (see :mod:`meetinity_gateway.proxy.client`).
"""
from __future__ import annotations

import http.client
import re
import typing as t

from meetinity_gateway import http11

__all__ = [
    "GuardedResponse",
    "InvalidUpstreamResponse",
    "MAX_INTERIM",
]

#: Interim (1xx) responses read past before the final one; more is an invalid response
#: (an upstream sending ``102 Processing`` for ever would otherwise hold a thread for ever).
MAX_INTERIM = 32

_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] [1-5][0-9][0-9](?: [\t\x20-\x7e\x80-\xff]*)?\r\n")
#: Longest header line and most header lines accepted (the stdlib's limits).
_MAX_LINE = 65536
_MAX_HEADERS = 100


class InvalidUpstreamResponse(http.client.HTTPException):
    """The upstream's response cannot be forwarded as it is (the reason says why)."""


class Fields(list):
    """A response's header fields: ``(name, value)`` pairs (latin-1 text, values without
    leading spaces), in order, duplicates kept; looked up case-insensitively."""

    def items(self) -> Fields:
        return self

    def get(self, name: str, default: t.Any = None) -> t.Any:
        """The first value of ``name``, or ``default``."""
        lowered = name.lower()
        for key, value in self:
            if key.lower() == lowered:
                return value
        return default

    def get_all(self, name: str, failobj: t.Any = None) -> t.Any:
        """Every value of ``name`` in order, or ``failobj`` when there is none."""
        lowered = name.lower()
        values = [value for key, value in self if key.lower() == lowered]
        return values or failobj


class GuardedResponse(http.client.HTTPResponse):
    """An HTTP/1.x response read strictly (see the module docstring).

    The head is parsed here, not by the stdlib's e-mail parser (the slowest part of a
    proxied request); the body is read by :class:`http.client.HTTPResponse`'s machinery.
    """

    def __init__(self, sock, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.interim = 0  # interim responses read past
        #: The body was read to its exact end by its own framing (or the answer has none);
        #: False while it streams, and after an error (the stdlib then closes too).
        self.complete = False

    def _read_lines(self) -> list[bytes]:
        """A header section's lines, the empty line (or what ended it) last."""
        readline = self.fp.readline
        lines = []
        while True:
            line = readline(_MAX_LINE + 1)
            if len(line) > _MAX_LINE:
                raise InvalidUpstreamResponse("header line too long")
            lines.append(line)
            if line == b"\r\n" or line == b"\n" or not line:
                return lines
            if len(lines) > _MAX_HEADERS:
                raise InvalidUpstreamResponse(f"more than {_MAX_HEADERS} header lines")

    def begin(self) -> None:
        if self.headers is not None:
            return
        readline = self.fp.readline
        for _ in range(MAX_INTERIM + 1):
            line = readline(_MAX_LINE + 1)
            if not line:
                raise http.client.RemoteDisconnected("the upstream closed without answering")
            if not _STATUS_LINE.fullmatch(line):
                raise InvalidUpstreamResponse(f"invalid status line {line[:80]!r}")
            status = int(line[9:12])
            # Interim answers too are framed strictly: dropped, but the next status line
            # must be found where the upstream meant it.
            lines = self._read_lines()
            _check_header_lines(lines)
            if status >= 200 or status == 101:
                break
            self.interim += 1
        else:
            raise InvalidUpstreamResponse(f"more than {MAX_INTERIM} interim responses")
        if status == 101:
            raise InvalidUpstreamResponse("unrequested 101 Switching Protocols")
        self.code = self.status = status
        self.reason = line[13:-2].decode("latin-1").strip()
        self.version = version = 10 if line[5:8] == b"1.0" else 11
        fields = Fields()
        codings: list[bytes] = []
        lengths: list[bytes] = []
        connection = ""
        keep_alive = False
        for raw in lines[:-1]:
            name, _, value = raw[:-2].partition(b":")
            value = value.lstrip(b" \t")
            pair = (name.decode("latin-1"), value.decode("latin-1"))
            fields.append(pair)
            lowered = pair[0].lower()
            if lowered == "transfer-encoding":
                codings.append(value.rstrip(b" \t"))
            elif lowered == "content-length":
                lengths.append(value.rstrip(b" \t"))
            elif lowered == "connection":
                connection += "," + pair[1].lower()
            elif lowered == "keep-alive" or (lowered == "proxy-connection"
                                             and "keep-alive" in pair[1].lower()):
                keep_alive = True
        self.headers = self.msg = fields
        self.chunk_left = None
        try:
            framing = http11.body_framing((1, 0) if version == 10 else (1, 1), lengths, codings)
        except http11.FramingError as exc:
            raise InvalidUpstreamResponse(str(exc)) from None
        self.chunked = framing == http11.CHUNKED
        self.length = None if self.chunked else framing
        if version == 11:
            will_close = "close" in connection
        else:
            will_close = not (keep_alive or "keep-alive" in connection)
        if status in (204, 304) or self._method == "HEAD":
            # No body, whatever the head says (RFC 9112 §6.3). A sender that frames a
            # body-less answer, or gives a 204 a length, may send the body too: such a
            # connection carries no other request.
            if codings or (status == 204 and self.length):
                will_close = True
            self.will_close = will_close
            self.chunked = False
            self.length = 0
            self._close_conn()
            self.complete = True
            return
        if not self.chunked and self.length is None:
            will_close = True  # close-delimited
        self.will_close = will_close

    # -- chunked bodies: the stdlib's reader accepts "0x10", " 10", "+10", a bare LF, any
    # bytes where the CRLF after chunk data belongs and any trailer; here the grammar's rules.

    def _get_chunk_left(self) -> int | None:
        chunk_left = self.chunk_left
        if chunk_left:
            return chunk_left
        fp = self.fp
        if chunk_left is not None:
            end = fp.read(2)
            if end != b"\r\n":
                if len(end) < 2:
                    raise http.client.IncompleteRead(b"")
                raise InvalidUpstreamResponse("chunk data not followed by CRLF")
        try:
            chunk_left = http11.chunk_size(_chunk_line(fp))
            if not chunk_left:  # the last chunk: trailer fields, then an empty line
                chunk_left = None
                trailer = 0
                while line := _chunk_line(fp):
                    trailer += len(line)
                    if trailer > http11.MAX_CHUNK_LINE:
                        raise http11.FramingError("chunked trailer too long")
                    http11.check_field_line(line)
                self._close_conn()
        except http11.FramingError as exc:
            raise InvalidUpstreamResponse(str(exc)) from None
        self.chunk_left = chunk_left
        return chunk_left

    def read1(self, n: int = -1) -> bytes:
        """What is available of the body, up to ``n`` bytes (at most one read from the
        socket once the framing is known); ``b""`` when the body is over, the connection's
        part done (``isclosed()``)."""
        if self.fp is None or not n:
            return b""
        if self.chunked:
            data = self._read1_chunked(n)  # closes after the last chunk and the trailers
            if not data and self.fp is None:
                self.complete = True
            return data
        length = self.length
        if length is None:  # close-delimited: the end of the connection ends the body
            data = self.fp.read1(n)
            if not data:
                self._close_conn()
                self.complete = True
            return data
        if not length:
            self._close_conn()
            self.complete = True
            return b""
        data = self.fp.read1(length if n < 0 or n > length else n)
        if not data:
            # The stdlib's read1 ends a Content-Length body cut short silently.
            self._close_conn()
            raise http.client.IncompleteRead(b"", length)
        self.length = length = length - len(data)
        if not length:
            self._close_conn()  # read to its exact end
            self.complete = True
        return data


def _chunk_line(fp: t.BinaryIO) -> bytes:
    """A chunk-size or trailer line without its CRLF."""
    line = fp.readline(http11.MAX_CHUNK_LINE + 2)
    if line[-2:] == b"\r\n":
        return line[:-2]
    if line[-1:] == b"\n":
        raise http11.FramingError("bare CR or LF in a chunked body")
    if len(line) > http11.MAX_CHUNK_LINE:
        raise http11.FramingError("chunk line too long")
    raise http.client.IncompleteRead(b"")  # the connection ended mid-line


def _check_header_lines(lines: list[bytes]) -> None:
    """Refuse a header section that would not reach the client as the upstream sent it."""
    if not lines or lines[-1] != b"\r\n":
        raise InvalidUpstreamResponse("header section cut short or not ended by CRLF")
    for line in lines[:-1]:
        if not line.endswith(b"\r\n"):
            # A bare LF ends a line for some parsers and not for others: never guess.
            raise InvalidUpstreamResponse("header line not ended by CRLF")
        try:
            http11.check_field_line(line[:-2])
        except http11.FramingError as exc:
            # The name only: a value may be a secret (a cookie) and this goes to the log.
            name = line.partition(b":")[0][:40]
            raise InvalidUpstreamResponse(f"{exc} ({name!r})") from None
