"""The error edge: request ids, path hygiene, and the JSON 500.

The outermost layer of the gateway. For every request it

1. keeps a sane client ``X-Request-ID`` (1–128 characters of ``A-Z a-z 0-9 . _ : = + / -``)
   or generates one, puts it in the environ (``meetinity_gateway.request_id``, and as the
   ``X-Request-ID`` request header, so the proxy sends it upstream) and on the response;
2. rejects with 400, before any inner layer matches paths, a request target that could
   escape its route or that a server would have to "correct":

   * dot-segments (``.``/``..``), also followed by parameters (``..;``, ``.;x``,
     ``%2e%2e;x``, ``%2E%2e%3B``: servlet-style upstreams drop the ``;…`` part and then
     resolve the dot-segment), and encoded slashes or backslashes (``%2F``, ``%5C``) —
     checked on the raw request URI and again after percent-decoding, so
     ``/api/auth/../users/1`` and ``/api/auth/..%2Fusers%2F1`` never reach an upstream;
   * control characters (C0 ``0x00``–``0x1F`` and DEL ``0x7F``) anywhere in the raw target,
     path or query. The raw target is what counts: waitress (through ``urllib.parse``)
     silently deletes TAB, CR and LF from the path and query it hands over, so
     ``?next=java<TAB>script:`` would otherwise become ``javascript:``. In the path they are
     refused percent-encoded too (``%00``, ``%09``, ``%7F``: the decoded ``PATH_INFO`` holds
     them); in the query an encoded ``%0A`` is data for the service and passes;
   * backslashes and percent-escapes left after decoding (double encoding) in the path.

   A target is never rewritten to make it valid: it is served as sent, or refused.
3. turns any exception raised by the inner app into the standard JSON 500, logged with the
   request id; the client never sees a traceback. If the response had already started, the
   error is logged and re-raised so the server drops the connection: a truncated body must
   not look complete.

Use alone around any WSGI app::

    from meetinity_gateway.middleware.errors import ErrorMiddleware
    app = ErrorMiddleware(app)

:param app: the WSGI application to wrap.
:param request_id_header: the header carrying the request id (``X-Request-ID``).
:param check_paths: reject unsafe paths (default ``True``). Only turn this off if an outer
    layer already does the same.

In gateway.ini::

    [filter:errors]
    use = egg:meetinity_gateway#errors
"""
from __future__ import annotations

import logging
import re
import sys
import typing as t
from urllib.parse import unquote

from meetinity_gateway.config import as_bool, as_str, cast_settings
from meetinity_gateway.keys import REQUEST_ID_KEY
from meetinity_gateway.problems import (
    ResponseAborted,
    assign_request_id,
    error_response,
)

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ErrorMiddleware", "filter_factory", "unsafe_path_reason"]

log = logging.getLogger("meetinity_gateway.errors")

# In the raw URI: an encoded "/", "\" or "." would become a separator or a dot-segment for
# some layer that decodes once more.
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _has_dot_segment(path: str) -> bool:
    """A ``.``/``..`` segment, also with parameters (``..;jsessionid=x``, ``.;``)."""
    if "." not in path:
        return False  # the common case: no dot at all, no segment to split
    return any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/"))


def unsafe_path_reason(
    path_info: str, raw_uri: str | None = None, query: str | None = None
) -> str | None:
    """Why this request target must be refused, or ``None`` when it is safe to route.

    ``path_info`` is the decoded WSGI ``PATH_INFO``; ``raw_uri`` the request target as sent
    (``REQUEST_URI``/``RAW_URI``) when the server provides it; ``query`` the
    ``QUERY_STRING`` (still percent-encoded, as WSGI hands it over).
    """
    if query and _CONTROL.search(query):
        return "control character in request target"
    if raw_uri is not None:
        # Before anything else: the server may have deleted these from PATH_INFO.
        if _CONTROL.search(raw_uri):
            return "control character in request target"
        raw_path = raw_uri.split("?", 1)[0]
        if _ENCODED_SEPARATOR.search(raw_path):
            return "encoded slash in path"
        if _has_dot_segment(raw_path) or ("%" in raw_path
                                          and _has_dot_segment(unquote(raw_path))):
            return "dot-segment in path"
    if _has_dot_segment(path_info):
        return "dot-segment in path"
    if "\\" in path_info:
        return "backslash in path"
    if _CONTROL.search(path_info):
        return "control character in path"
    if "%" in path_info and unquote(path_info) != path_info:
        # Still percent-encoded after the server decoded it once: double encoding, which an
        # upstream decoding again would read as something else.
        return "double-encoded path"
    return None


class _GuardedBody:
    """The inner body iterable; an exception before the first byte still becomes the JSON 500.

    After the first byte has gone out the status cannot change any more: the error is logged
    and re-raised, so the server aborts the connection instead of ending the body cleanly.
    """

    __slots__ = ("_inner", "_edge", "_environ", "_start_response")

    def __init__(self, inner, edge, environ, start_response) -> None:
        self._inner = inner
        self._edge = edge
        self._environ = environ
        self._start_response = start_response

    def __iter__(self):
        body_started = False
        try:
            for chunk in self._inner:
                if chunk:
                    body_started = True
                yield chunk
        except ResponseAborted:
            raise  # logged where it happened; the server aborts the connection
        except Exception:
            if body_started:
                self._edge.log_exception(self._environ, "error while streaming the response")
                raise
            self._edge.log_exception(self._environ, "unhandled error")
            yield from error_response(
                self._environ, self._start_response, 500, "internal error",
                exc_info=sys.exc_info(),
            )

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                self._edge.log_exception(self._environ, "error while closing the response")


class ErrorMiddleware:
    """Request ids, path hygiene and the JSON 500 (see the module docstring)."""

    #: What this layer is, for the pipeline model (meetinity_gateway.pipeline).
    kind = "errors"

    def __init__(
        self,
        app: WSGIApplication,
        *,
        request_id_header: str = "X-Request-ID",
        check_paths: bool = True,
    ) -> None:
        self.app = app
        self.request_id_header = request_id_header
        self._environ_key = "HTTP_" + request_id_header.upper().replace("-", "_")
        self.check_paths = check_paths
        self._header_name = request_id_header.lower()

    def log_exception(self, environ: WSGIEnvironment, what: str) -> None:
        log.exception(
            "%s (request_id=%s, %s %s)",
            what,
            environ.get(REQUEST_ID_KEY),
            environ.get("REQUEST_METHOD"),
            environ.get("PATH_INFO"),
            extra={"request_id": environ.get(REQUEST_ID_KEY)},
        )

    def describe(self) -> list[str]:
        """Its settings, one line each (``check``, ``/status``)."""
        checks = ("dot-segments, encoded slashes and control characters refused (400)"
                  if self.check_paths else "off")
        return [f"request id header: {self.request_id_header}", f"path checks: {checks}",
                "an exception from inside: the JSON 500"]

    def policy_for(self, path: str, method: str = "GET") -> None:
        """No say per path: every request gets the same edge."""
        return None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        request_id = assign_request_id(environ, self._environ_key)
        id_header = (self.request_id_header, request_id)
        header_name = self._header_name
        started = []

        def start_with_id(status, headers, exc_info=None):
            started.append(True)
            headers = [h for h in headers if h[0].lower() != header_name]
            headers.append(id_header)
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        if self.check_paths:
            raw_uri = environ.get("REQUEST_URI") or environ.get("RAW_URI")
            reason = unsafe_path_reason(environ.get("PATH_INFO", ""), raw_uri,
                                        environ.get("QUERY_STRING"))
            if reason is not None:
                return error_response(environ, start_with_id, 400, reason)

        try:
            inner = self.app(environ, start_with_id)
        except Exception:
            self.log_exception(environ, "unhandled error")
            return error_response(
                environ, start_with_id, 500, "internal error",
                # exc_info only to replace a started response: some servers re-raise it
                # whenever it is given.
                exc_info=sys.exc_info() if started else None,
            )
        return _GuardedBody(inner, self, environ, start_with_id)


_PARAMS = {"request_id_header": as_str, "check_paths": as_bool}


def filter_factory(global_conf, **local_conf):
    """``paste.filter_factory`` for ``egg:meetinity_gateway#errors``."""
    kwargs = cast_settings(local_conf, _PARAMS, global_conf)

    def make_filter(app):
        return ErrorMiddleware(app, **kwargs)

    return make_filter
