"""The HTTP/1.1 grammar the gateway accepts, written once for both directions.

The hardened server (:mod:`meetinity_gateway.serving.hardened`) checks a client's request
with these rules and answers a violation with a JSON 400 (then closes the connection); the upstream
response reader (:mod:`meetinity_gateway.proxy.wire`) checks an upstream's response with the
same rules and answers a violation with a JSON 502. One set of rules, not one per direction
(h11: "we don't cheat and apply different rules to local and remote parties"); the
configuration checks (header names in ``transform``, ``cors``, ``auth``) use the same token.

The rules, from RFC 9110 (semantics) and RFC 9112 (HTTP/1.1 messages):

* **token** (RFC 9110 §5.6.2): one or more ``tchar`` — ``!#$%&'*+-.^_`|~``, digits, letters.
  A field name is a token.
* **field value** (RFC 9110 §5.5): visible characters, obs-text (``0x80``–``0xff``), spaces
  and tabs; any other control character (NUL, CR, LF, ``0x7f``…) is refused, never repaired.
  Leading and trailing spaces and tabs are optional whitespace, not part of the value.
* **field line** (RFC 9112 §5): ``name ":" OWS value OWS``; no whitespace before the colon,
  no obs-fold continuation line (§5.2), no bare CR or LF anywhere (§2.2).
* **Content-Length** (RFC 9112 §6.3): exactly one field line of 1 to 18 decimal digits. A
  list (even ``5, 5``) or a repeated line (even with equal values) is refused: RFC 9112
  allows a recipient to refuse them, and a message forwarded with them may be read
  otherwise by the next hop.
* **Transfer-Encoding** (RFC 9112 §6.1): only in HTTP/1.1, in one field line, never together
  with Content-Length; the list must end with exactly one ``chunked`` and hold no empty
  element; and since the gateway decodes no other coding, it must be ``chunked`` alone.
* **chunked body** (RFC 9112 §7.1): a chunk-size line is ``chunk-size [chunk-ext]`` ended
  by CRLF; the size is 1 to 16 hexadecimal digits — no ``0x``, sign, underscore or
  whitespace; extensions are ``;name`` or ``;name=value`` (value a token or a quoted
  string) with no whitespace around ``;`` or ``=`` (the optional BWS of RFC 9112 is not
  accepted); chunk data is followed by CRLF; trailer lines are field lines; a chunk-size
  line, and the trailer section altogether, hold at most :data:`MAX_CHUNK_LINE` bytes.

Every check raises :class:`FramingError` with a short message safe to show a client; the
caller turns it into its own answer.
"""
from __future__ import annotations

import re
import typing as t

__all__ = [
    "CHUNKED",
    "FramingError",
    "MAX_CHUNK_LINE",
    "body_framing",
    "check_field_line",
    "chunk_size",
    "content_length",
    "field_line",
    "is_field_value",
    "is_token",
]

#: Longest chunk-size line (extensions included, CRLF not) and longest trailer section.
MAX_CHUNK_LINE = 4096

#: :func:`body_framing`'s answer for a chunked body.
CHUNKED = "chunked"

_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN = _TCHAR + "+"
# Anything but VCHAR, obs-text, SP and HTAB.
_FIELD_CONTROL = r"[\x00-\x08\x0a-\x1f\x7f]"
_QUOTED_STRING = r'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_EXT = rf"(?:;{_TOKEN}(?:=(?:{_TOKEN}|{_QUOTED_STRING}))?)*"

_TOKEN_TEXT = re.compile(_TOKEN)
_TOKEN_BYTES = re.compile(_TOKEN.encode("latin-1"))
_CONTROL_TEXT = re.compile(_FIELD_CONTROL)
_CONTROL_BYTES = re.compile(_FIELD_CONTROL.encode("latin-1"))
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,18}")
# One pattern per line checked on the hot path (every header line, every chunk): the faults
# are told apart only when it does not match.
_FIELD_LINE = re.compile(rb"%b:[\t\x20-\x7e\x80-\xff]*" % _TOKEN.encode("latin-1"))
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})%b" % _CHUNK_EXT.encode("latin-1"))


class FramingError(ValueError):
    """The message breaks the HTTP/1.1 grammar; the text is safe to show a client."""


def is_token(value: str | bytes) -> bool:
    """Is ``value`` exactly an RFC 9110 token (a field name, a method, a coding name)?"""
    pattern = _TOKEN_BYTES if isinstance(value, bytes) else _TOKEN_TEXT
    return pattern.fullmatch(value) is not None


def is_field_value(value: str | bytes) -> bool:
    """Does ``value`` hold no control character a field value may not hold (HTAB is fine)?
    Text is checked character by character (latin-1 decoded bytes, or configured text)."""
    pattern = _CONTROL_BYTES if isinstance(value, bytes) else _CONTROL_TEXT
    return pattern.search(value) is None


def check_field_line(line: bytes) -> None:
    """Is this a header or trailer line (without its CRLF)? Raises :class:`FramingError`."""
    if _FIELD_LINE.fullmatch(line) is None:
        if line[:1] in (b" ", b"\t"):
            raise FramingError("obsolete line folding in a header")
        if b"\r" in line or b"\n" in line:
            raise FramingError("bare CR or LF in a header")
        name, colon, _ = line.partition(b":")
        if not colon or not is_token(name):
            raise FramingError("malformed header field")
        raise FramingError("control character in a header value")


def field_line(line: bytes) -> tuple[bytes, bytes]:
    """One header or trailer line, without its CRLF: ``(name, value)``, the value without
    its optional whitespace. Raises :class:`FramingError`."""
    check_field_line(line)
    name, _, value = line.partition(b":")
    return name, value.strip(b" \t")


def content_length(values: t.Sequence[bytes]) -> int | None:
    """The length the ``Content-Length`` field lines' values (OWS stripped) give; ``None``
    without any. Raises :class:`FramingError`."""
    if not values:
        return None
    if len(values) > 1:
        raise FramingError("duplicated Content-Length")
    if not _CONTENT_LENGTH.fullmatch(values[0]):
        raise FramingError("invalid Content-Length")
    return int(values[0])


def body_framing(
    version: tuple[int, int], lengths: t.Sequence[bytes], codings: t.Sequence[bytes]
) -> int | str | None:
    """How a message's body is delimited, from its ``Content-Length`` and
    ``Transfer-Encoding`` field values (OWS stripped): :data:`CHUNKED`, a length, or
    ``None`` (neither: no body for a request, read to the close for a response).
    Raises :class:`FramingError`."""
    if not codings:
        return content_length(lengths)
    if version != (1, 1):
        raise FramingError("Transfer-Encoding is only allowed with HTTP/1.1, not HTTP/%d.%d"
                           % version)
    if len(codings) > 1:
        raise FramingError("duplicated Transfer-Encoding")
    if lengths:
        raise FramingError("both Content-Length and Transfer-Encoding")
    names = [name.strip(b" \t").lower() for name in codings[0].split(b",")]
    if names[-1] != b"chunked" or names.count(b"chunked") != 1 or not all(names):
        raise FramingError("Transfer-Encoding must end with one chunked")
    if len(names) > 1:
        # well-formed but for a coding before chunked (gzip, chunked): nothing here decodes it
        raise FramingError("transfer coding not supported")
    return CHUNKED


def chunk_size(line: bytes) -> int:
    """The size a chunk-size line (without its CRLF) gives. Raises :class:`FramingError`."""
    if len(line) > MAX_CHUNK_LINE:
        raise FramingError("chunk line too long")
    match = _CHUNK_LINE.fullmatch(line)
    if match is None:
        if b"\r" in line or b"\n" in line:
            raise FramingError("bare CR or LF in a chunked body")
        raise FramingError("invalid chunk size line")
    return int(match.group(1), 16)
