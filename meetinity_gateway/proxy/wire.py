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
  so the client closes the connection and the proxy answers a JSON 502):

  - a ``101 Switching Protocols`` (the gateway never asks for an upgrade);
  - a status line other than ``HTTP/1.x NNN [reason]`` with a status from 100 to 599 and a
    reason of visible characters, spaces and tabs;
  - a line of the response head not ended by CRLF (a bare LF), a header line holding CR,
    NUL or any other control character (HTAB allowed in values), an obs-fold continuation
    line, a name that is not an RFC 9110 token (empty, spaces before the colon, no colon at
    all), or a head cut short — in the final response and in interim ones alike;
  - ambiguous framing: ``Content-Length`` values that are not all the same plain decimal
    number, ``Transfer-Encoding`` together with ``Content-Length``, a ``Transfer-Encoding``
    other than exactly ``chunked``, or any ``Transfer-Encoding`` in an HTTP/1.0 response.

Refusing is the answer RFC 9112 §5.2 allows a proxy for obs-fold, and the only safe one for
the rest: such an upstream is broken or hostile, and repairing its headers (as the stdlib's
e-mail parser does, splitting a value at a bare CR into a second header) would hand the client
something the upstream never meant — or let the upstream inject headers.

* **reads the body as it comes**: :meth:`GuardedResponse.read1` returns what is available,
  up to the size asked (an answer written in small pieces goes on piece by piece), and
  raises :class:`http.client.IncompleteRead` when a ``Content-Length`` body ends early (the
  stdlib's ``read1`` would just return ``b""``, a truncated body looking complete).

Whether a connection may carry another request afterwards is decided by the stdlib as usual
(``Connection: close``, HTTP/1.0 without keep-alive, a close-delimited body all close it);
the client additionally gives a connection back to its pool only once its response was read
to its exact end with nothing after it (see :mod:`meetinity_gateway.proxy.client`).
"""
from __future__ import annotations

import http.client
import re
import typing as t

__all__ = [
    "GuardedResponse",
    "InvalidUpstreamResponse",
    "MAX_INTERIM",
]

#: Interim (1xx) responses read past before the final one; more is an invalid response
#: (an upstream sending ``102 Processing`` for ever would otherwise hold a thread for ever).
MAX_INTERIM = 32

_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] [1-5][0-9][0-9](?: [\t\x20-\x7e\x80-\xff]*)?\r\n")
# RFC 9110 §5.1: field-name = token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5: field-value = VCHAR, obs-text, SP, HTAB; anything else is a control byte.
_VALUE_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]+")


class InvalidUpstreamResponse(http.client.HTTPException):
    """The upstream's response cannot be forwarded as it is (the reason says why)."""


class _LineRecorder:
    """Wraps a response's file while its head is read, keeping every line read."""

    __slots__ = ("inner", "lines")

    def __init__(self, inner) -> None:
        self.inner = inner
        self.lines: list[bytes] = []

    def readline(self, limit: int = -1) -> bytes:
        line = self.inner.readline(limit)
        self.lines.append(line)
        return line

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self.inner, name)


class GuardedResponse(http.client.HTTPResponse):
    """An HTTP/1.x response read strictly (see the module docstring)."""

    def __init__(self, sock, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.interim = 0  # interim responses read past
        #: The body was read to its exact end by its own framing (or the answer has none);
        #: False while it streams, and after an error (the stdlib then closes too).
        self.complete = False
        self.fp = _LineRecorder(self.fp)

    def _read_status(self):
        recorder = self.fp
        for _ in range(MAX_INTERIM + 1):
            recorder.lines.clear()
            version, status, reason = super()._read_status()
            if not _STATUS_LINE.fullmatch(recorder.lines[-1]):
                raise InvalidUpstreamResponse(f"invalid status line {recorder.lines[-1][:80]!r}")
            recorder.lines.clear()  # from here on: this response's header lines
            if status >= 200 or status == 101:
                return version, status, reason
            # An interim response: its header section (dropped, but framed as strictly as
            # any, so the next status line is found where the upstream meant it), then the
            # next status line.
            http.client.parse_headers(recorder)
            _check_header_lines(recorder.lines)
            self.interim += 1
        raise InvalidUpstreamResponse(f"more than {MAX_INTERIM} interim responses")

    def begin(self) -> None:
        if self.headers is not None:
            return
        recorder = self.fp
        try:
            super().begin()
        except (InvalidUpstreamResponse, ConnectionError):
            raise  # ConnectionError: RemoteDisconnected, the upstream went away
        except http.client.HTTPException as exc:  # bad status line, line or head too long
            raise InvalidUpstreamResponse(f"{type(exc).__name__}: {str(exc)[:80]}") from exc
        self.fp = recorder.inner  # no wrapper on the way of the body
        if self.status == 101:
            raise InvalidUpstreamResponse("unrequested 101 Switching Protocols")
        _check_header_lines(recorder.lines)
        codings = self._check_framing()
        if self.status in (204, 304) or self._method == "HEAD":
            # No body, whatever the head says (RFC 9112 §6.3). The stdlib would still read
            # a chunked body of a 204/304 (and wait for it); and a sender that frames a
            # body-less answer, or gives a 204 a length, may send the body too: such a
            # connection carries no other request.
            if codings or (self.status == 204 and self.msg.get("content-length", "0") != "0"):
                self.will_close = True
            self.chunked = False
            self.length = 0
            self._close_conn()
            self.complete = True

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

    def _check_framing(self) -> list[str] | None:
        """Refuse ambiguous framing; returns the ``Transfer-Encoding`` values."""
        headers = self.msg
        lengths = headers.get_all("content-length")
        codings = headers.get_all("transfer-encoding")
        if codings:
            if lengths:
                raise InvalidUpstreamResponse("both Transfer-Encoding and Content-Length")
            if self.version == 10:
                raise InvalidUpstreamResponse("Transfer-Encoding in an HTTP/1.0 response")
            names = [name.strip().lower() for value in codings for name in value.split(",")]
            # Exactly what the stdlib reads as chunked: anything else would be read as a
            # close-delimited body with the chunk framing inside, or not at all.
            if names != ["chunked"] or not self.chunked:
                raise InvalidUpstreamResponse(f"unsupported Transfer-Encoding {codings!r}")
        elif lengths:
            values = {item.strip() for value in lengths for item in value.split(",")}
            if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
                raise InvalidUpstreamResponse(f"invalid Content-Length {lengths!r}")
            declared = int(values.pop())
            if self.length not in (declared, 0):
                # 0: a HEAD, 204 or 304 answer, which has no body whatever it declares.
                raise InvalidUpstreamResponse(f"invalid Content-Length {lengths!r}")
        return codings


def _check_header_lines(lines: list[bytes]) -> None:
    """Refuse a header section that would not reach the client as the upstream sent it."""
    if not lines or lines[-1] != b"\r\n":
        raise InvalidUpstreamResponse("header section cut short or not ended by CRLF")
    for line in lines[:-1]:
        if not line.endswith(b"\r\n"):
            # A bare LF ends a line for some parsers and not for others: never guess.
            raise InvalidUpstreamResponse("header line not ended by CRLF")
        line = line[:-2]
        if line[:1] in (b" ", b"\t"):
            raise InvalidUpstreamResponse("obs-fold (continuation line) in a header")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise InvalidUpstreamResponse(f"invalid header name {name[:40]!r}")
        if _VALUE_CONTROL.search(value):
            raise InvalidUpstreamResponse(
                f"control character in the value of header {name.decode('latin-1')}"
            )
