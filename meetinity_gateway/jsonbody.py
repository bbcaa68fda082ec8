"""JSON bodies the gateway must read to decide: requests held for an ownership check, answers
held for a field filter.

Both directions follow one strict reading, so that the gateway never sees a body differently
from the service behind it:

* UTF-8 only, without a byte order mark (RFC 8259 §8.1: a sender must not add one; Python's
  ``json.loads(bytes)`` silently accepts UTF-8/16/32 with or without it, other parsers do
  not), no invalid sequences;
* no key twice in any object (parsers disagree on which copy wins: Python keeps the last,
  others the first), no ``NaN``/``Infinity`` (not JSON), no number beyond what Python reads
  exactly (its 4300-digit limit);
* a request body held for a check is read once, bounded, and replayed byte for byte:
  ``wsgi.input`` is replaced by the bytes read and ``CONTENT_LENGTH`` says their length.

Errors are :class:`~meetinity_gateway.problems.GatewayError` types that know their status.
"""
from __future__ import annotations

import io
import json
import typing as t

from meetinity_gateway.problems import BadRequest, GatewayError, PayloadTooLarge

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import WSGIEnvironment

__all__ = ["BodyError", "UnsupportedMediaType", "is_json_media_type", "loads_strict",
           "read_request_body"]


class UnsupportedMediaType(GatewayError):
    code = 415
    message = "a JSON body (Content-Type: application/json) is required"


class BodyError(ValueError):
    """A body that is not the strict JSON described in the module docstring."""


def is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json`` (parameters ignored), as Flask's
    ``is_json`` reads it."""
    mimetype = (content_type or "").split(";", 1)[0].strip().lower()
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json"))


def _no_duplicates(pairs: list[tuple[str, t.Any]]) -> dict[str, t.Any]:
    out: dict[str, t.Any] = {}
    for key, value in pairs:
        if key in out:
            raise BodyError(f"the key {key!r} appears twice in an object")
        out[key] = value
    return out


def _no_constant(name: str) -> t.Any:
    raise BodyError(f"{name} is not JSON")


def loads_strict(data: bytes) -> t.Any:
    """Parse ``data`` as described in the module docstring; :class:`BodyError` if not."""
    if data.startswith(b"\xef\xbb\xbf"):
        raise BodyError("a byte order mark is not allowed")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("the body is not UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except BodyError:
        raise
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError, or int() past the digit limit: never echo the body itself.
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "unreadable number"
        raise BodyError(f"not JSON ({reason})") from None


def read_request_body(environ: WSGIEnvironment, limit: int) -> bytes:
    """Read the request body once (at most ``limit`` bytes) and put it back for the app.

    Afterwards ``wsgi.input`` is a fresh stream of exactly those bytes and ``CONTENT_LENGTH``
    their count (a de-chunked upload is forwarded with a length). Raises
    :class:`PayloadTooLarge` past ``limit`` (nothing forwarded), :class:`BadRequest` for a
    malformed or short body.
    """
    stream = environ.get("wsgi.input")
    length = (environ.get("CONTENT_LENGTH") or "").strip()
    if length:
        if not length.isdigit():
            raise BadRequest("bad Content-Length")
        size = int(length)
        if size > limit:
            raise PayloadTooLarge(f"a body checked by the gateway is limited to {limit} bytes")
        data = _read_exactly(stream, size)
    elif environ.get("wsgi.input_terminated") and stream is not None:
        data = _read_exactly(stream, limit + 1, short_ok=True)
        if len(data) > limit:
            raise PayloadTooLarge(f"a body checked by the gateway is limited to {limit} bytes")
        environ.pop("HTTP_TRANSFER_ENCODING", None)
    else:
        data = b""
    environ["wsgi.input"] = io.BytesIO(data)
    environ["CONTENT_LENGTH"] = str(len(data))
    return data


def _read_exactly(stream: t.Any, size: int, short_ok: bool = False) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0 and stream is not None:
        try:
            chunk = stream.read(min(remaining, 65536))
        except GatewayError:
            raise
        except Exception as exc:  # gunicorn raises for a malformed or cut chunked upload
            raise BadRequest("the request body could not be read") from exc
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    if remaining and not short_ok:
        raise BadRequest("the request body is shorter than its Content-Length")
    return b"".join(chunks)
