"""The one definition of a CORS preflight, shared by the ``cors`` and ``auth`` layers.

A browser sends a preflight (Fetch standard, "CORS-preflight request") before a cross-origin
request it may not send blindly. It is always exactly::

    OPTIONS /path HTTP/1.1
    Origin: https://app.example.com
    Access-Control-Request-Method: DELETE
    [Access-Control-Request-Headers: authorization, content-type]

with no body and no credentials. :func:`is_preflight` accepts only that: method ``OPTIONS``
as sent (methods are case-sensitive), a non-empty ``Origin``, an ``Access-Control-Request-
Method`` that is a method token, no body (no ``Transfer-Encoding``, no non-zero
``Content-Length``) and no method-override header. Anything else is an ordinary request that
meets authentication like any other.

:func:`looks_like_preflight` is the loose shape (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``, whatever else it carries) that the ``cors`` layer refuses
when it is not a real preflight, so nothing shaped like a preflight ever travels further as
one.

Both read only the WSGI environ; no layer imports another for them.
"""
from __future__ import annotations

import typing as t

from meetinity_gateway.http11 import is_token

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import WSGIEnvironment

__all__ = ["METHOD_OVERRIDE_KEYS", "is_preflight", "looks_like_preflight", "why_not_preflight"]

#: environ keys of the headers some frameworks read as "treat this request as method X".
#: A preflight never carries one; a request that does is not a preflight.
METHOD_OVERRIDE_KEYS = (
    "HTTP_X_HTTP_METHOD_OVERRIDE",
    "HTTP_X_HTTP_METHOD",
    "HTTP_X_METHOD_OVERRIDE",
)


def looks_like_preflight(environ: WSGIEnvironment) -> bool:
    """``OPTIONS`` with an ``Origin`` and an ``Access-Control-Request-Method`` header."""
    return (
        environ.get("REQUEST_METHOD") == "OPTIONS"
        and bool(environ.get("HTTP_ORIGIN"))
        and bool(environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD"))
    )


def why_not_preflight(environ: WSGIEnvironment) -> str | None:
    """Why a request shaped like a preflight is not a real one (``None``: it is real).

    Only meaningful when :func:`looks_like_preflight` is true.
    """
    requested = environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD", "").strip()
    if not is_token(requested):  # RFC 9110: a method is a token
        return "malformed Access-Control-Request-Method"
    if environ.get("HTTP_TRANSFER_ENCODING"):
        return "a preflight has no body"
    length = (environ.get("CONTENT_LENGTH") or "").strip()
    if length and length != "0":
        return "a preflight has no body"
    if any(environ.get(key) for key in METHOD_OVERRIDE_KEYS):
        return "a preflight has no method override"
    return None


def is_preflight(environ: WSGIEnvironment) -> bool:
    """Whether the request is a real CORS preflight (see the module docstring)."""
    return looks_like_preflight(environ) and why_not_preflight(environ) is None
