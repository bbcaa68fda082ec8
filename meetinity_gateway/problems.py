"""The one JSON error shape of every response the gateway itself makes.

Upstream answers pass through untouched; everything the gateway says on its own (401, 404,
413, 429, 502, 504, the 500 of the error edge) looks the same as the platform's services::

    {"error": {"code": 401, "message": "invalid token", "request_id": "…"}}

Any layer can answer with :func:`error_response` (a WSGI call) or raise a
:class:`GatewayError` subclass, which is itself a tiny WSGI app rendering that shape.
"""
from __future__ import annotations

import json
import random
import re
import typing as t
from http import HTTPStatus

from meetinity_gateway.keys import REQUEST_ID_KEY

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


Headers = t.Iterable[t.Tuple[str, str]]


_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:=+/-]{1,128}$")


def random_hex(digits: int) -> str:
    """``digits`` random hex digits for an identifier (request id, trace and span ids).

    From the interpreter's Mersenne Twister, seeded from the system's randomness at start
    and again in every forked worker (``random`` re-seeds after ``fork``): unpredictable
    enough to correlate logs and traces without collisions, but not a secret — never use it
    for tokens or keys. ``os.urandom``/``secrets`` cost a ``getrandom`` system call per id,
    a release of the GIL that under load hands the interpreter to another thread.
    """
    return "%0*x" % (digits, random.getrandbits(digits * 4))


def assign_request_id(environ: WSGIEnvironment, header_key: str = "HTTP_X_REQUEST_ID") -> str:
    """Give the request its id: the client's (header ``header_key`` in the environ) when it is
    1–128 characters of ``A-Za-z0-9._:=+/-``, else a new random one.

    The id is stored under :data:`REQUEST_ID_KEY` and as the request header (so it goes
    upstream); the caller puts it on the response. Used by the error edge and by every
    endpoint served outside it (``/metrics``).
    """
    request_id = environ.get(header_key)
    if not request_id or not _SANE_REQUEST_ID.match(request_id):
        request_id = random_hex(32)  # uuid4().hex's shape, without building a UUID
    environ[header_key] = request_id
    environ[REQUEST_ID_KEY] = request_id
    return request_id


def request_id_of(environ: WSGIEnvironment) -> str | None:
    """The request id set by the error edge, else the client's header, else ``None``."""
    return environ.get(REQUEST_ID_KEY) or environ.get("HTTP_X_REQUEST_ID") or None


def status_line(code: int) -> str:
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Error"


def error_body(code: int, message: str, request_id: str | None = None) -> bytes:
    """The JSON body of a gateway-made error."""
    return json.dumps(
        {"error": {"code": code, "message": message, "request_id": request_id}},
        separators=(",", ":"),
    ).encode("utf-8")


def error_response(
    environ: WSGIEnvironment,
    start_response: StartResponse,
    code: int,
    message: str,
    headers: Headers = (),
    exc_info: t.Any = None,
) -> list[bytes]:
    """Answer ``code`` with the standard JSON body; returns the WSGI body iterable.

    ``headers`` are extra response headers (``WWW-Authenticate``, ``Retry-After``, ``Allow``).
    Pass ``exc_info`` when replacing a response whose ``start_response`` was already called.
    """
    payload = error_body(code, message, request_id_of(environ))
    response_headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
        ("Cache-Control", "no-store"),
        *headers,
    ]
    if exc_info is not None:
        start_response(status_line(code), response_headers, exc_info)
    else:
        start_response(status_line(code), response_headers)
    # A HEAD answer keeps the Content-Length of the GET answer but carries no body.
    return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else payload]


class GatewayError(Exception):
    """An error the gateway answers itself; a WSGI app that renders the JSON shape.

    Subclasses fix ``code`` and a default ``message``; ``headers`` adds response headers.
    """

    code = 500
    message = "internal error"

    def __init__(self, message: str | None = None, headers: Headers = ()) -> None:
        super().__init__(message or self.message)
        if message:
            self.message = message
        self.headers = list(headers)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        return error_response(environ, start_response, self.code, self.message, self.headers)


class BadRequest(GatewayError):
    code = 400
    message = "bad request"


class NotFound(GatewayError):
    code = 404
    message = "not found"


class MethodNotAllowed(GatewayError):
    code = 405
    message = "method not allowed"

    def __init__(self, allowed: t.Iterable[str], message: str | None = None) -> None:
        super().__init__(message, headers=[("Allow", ", ".join(sorted(allowed)))])


class PayloadTooLarge(GatewayError):
    code = 413
    message = "request body too large"


class BadGateway(GatewayError):
    code = 502
    message = "upstream unavailable"


class ServiceUnavailable(GatewayError):
    code = 503
    message = "service unavailable"


class GatewayTimeout(GatewayError):
    code = 504
    message = "upstream timed out"


try:  # waitress aborts a connection quietly for this one (an info line, no traceback)
    from waitress.channel import ClientDisconnected as _QuietAbort
except ImportError:  # pragma: no cover - another server: any exception aborts
    _QuietAbort = Exception


class ResponseAborted(_QuietAbort):
    """A response that cannot be completed after its headers went out; already logged.

    Raised from a body iterable so that the server aborts the connection (the client sees a
    truncated body, never a well-framed short one). Layers let it pass without logging it
    again; waitress closes the connection without a traceback.
    """
