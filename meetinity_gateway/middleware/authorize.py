"""Authorization by claims: who may do what, per route and method, after authentication.

``auth`` proves *who* is calling and puts the verified claims in
``environ["meetinity_gateway.claims"]``; this layer decides whether that caller may make
*this* request. It runs right after ``auth`` and matches paths itself (its own
:class:`~meetinity_gateway.pathrules.PathTable`, the same template syntax, most-specific-wins
ordering and refused ties as the router's): the router runs further in, so its match is not
known yet. Usable alone around any WSGI app that sets the claims key.

A rule names methods, a path template and a requirement::

    rule.NAME = [METHODS] PATH -> REQUIREMENT

* ``METHODS``: comma-separated; left out, every method (``HEAD`` comes with ``GET``). A rule
  naming the method wins over an all-methods rule for the same path; for a method no rule
  of a path names, the next less specific rule decides.
* ``PATH``: ``/api/users``, ``/api/users/*`` (itself and below), ``/api/users/<int:id>/*``.
* ``REQUIREMENT``: alternatives separated by ``or``, each one or more conditions joined by
  ``and``:

  ``anonymous``           anyone, signed in or not;
  ``authenticated``       any verified token;
  ``CLAIM=VALUE``         the claim equals VALUE, or is a list holding it (``role=admin``,
                          ``roles=admin``, ``email_verified=true``); any claim name;
  ``CLAIM=<param>``       the claim equals the path parameter (``sub=<id>``: the caller's own
                          resource; ``42`` and ``"42"`` are equal);
  ``scope:VALUE``         VALUE is one of the caller's scopes: the space-separated ``scope``
                          claim or the ``scp`` claim (a list or a string); other claim names
                          with ``scope_claims``.

The most specific rule matching the path and method decides; a request no rule covers is
decided by ``default`` (same syntax). A caller with no verified claims refused by a rule
needing them gets ``401`` (with ``WWW-Authenticate: Bearer``); a signed-in caller without the
required claims gets ``403``. Both use the standard JSON shape, with a message naming the rule
and what it requires (``forbidden by rule user_own: requires sub=<id>``) — never a claim value
or a token. The refusing rule's name goes to ``environ["meetinity_gateway.authz_denied"]``
for the access log.

Use alone::

    from meetinity_gateway.middleware.authorize import AuthorizeMiddleware
    app = AuthorizeMiddleware(app, rules={
        "users_list": "GET /api/users -> role=admin",
        "user_own": "PUT,PATCH,DELETE,POST /api/users/<int:id>/* -> sub=<id>",
        "users": "/api/users/* -> authenticated",
    }, default="anonymous")

:param app: the WSGI application to wrap.
:param rules: rule name → ``[METHODS] PATH -> REQUIREMENT``, or ready :class:`Rule` objects.
:param default: the requirement for requests no rule covers (default ``authenticated``:
    nothing passes unsigned by omission).
:param scope_claims: claims holding the caller's scopes (default ``scope``, ``scp``).
:param realm: the ``realm`` of ``WWW-Authenticate`` on 401 (default ``meetinity``).

In gateway.ini (after ``auth`` in the pipeline)::

    [filter:authorize]
    use = egg:meetinity_gateway#authorize
    default = anonymous
    rule.users_list = GET /api/users -> role=admin
    rule.user_own = PUT, PATCH, DELETE, POST /api/users/<int:id>/* -> sub=<id>

Security notes: the path is matched as the router will match it (``PATH_INFO``, after the
error edge refused dot-segments and encoded slashes), and also with repeated slashes merged
and a trailing slash dropped; a request carrying ``X-HTTP-Method-Override`` (or
``X-HTTP-Method``, ``X-Method-Override``) must be allowed as that method too.

Conditions on the body: ``CLAIM=body.FIELD`` holds when the top-level field ``FIELD`` of the
JSON request body equals the claim (a string as is, an integer in decimal; ``1.0``, ``"01"``,
``true``, ``null``, lists and objects never do): ``POST /api/matching/swipe ->
sub=body.user_id``. The body is read only when a deciding rule needs it, once, at most
``body_limit`` bytes, and handed on byte for byte (:mod:`meetinity_gateway.jsonbody`); 415
when it is not declared JSON, 413 past the limit, 400 unless it is one strict JSON object
(UTF-8 without BOM, no key twice, no ``NaN``): nothing is forwarded then.

Field filters (``fields``): ``NAME = [METHODS] PATH [unless REQUIREMENT] -> LOCATION
allow|deny FIELD, ...``. When ``REQUIREMENT`` does not hold for the caller, a 2xx answer is
held (at most ``fields_limit`` bytes) and sent with only the allowed (or without the denied)
top-level fields of the record(s) at ``LOCATION``: ``body``, ``body.KEY`` or ``body.KEY[]``
(each object of the list ``KEY``). An answer that is not uncompressed JSON of that shape, or is
too large, becomes a 502: never the unfiltered body. Example::

    fields.user_public = GET /api/users/<id> unless sub=<id> -> body.user allow id, name

:param body_limit: the largest request body read for a body condition (default 64 KiB).
:param fields: filter name → spec, or ready :class:`FieldFilter` objects.
:param fields_limit: the largest answer held for a field filter (default 1 MiB).
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing as t

from meetinity_gateway.config import ConfigError, as_list, as_size, as_str, prepare, split_named
from meetinity_gateway.jsonbody import (
    BodyError,
    UnsupportedMediaType,
    is_json_media_type,
    loads_strict,
    read_request_body,
)
from meetinity_gateway.keys import AUTHZ_DENIED_KEY, CLAIMS_KEY
from meetinity_gateway.pathrules import PathTable, PathTemplate, PathTie, parse_path
from meetinity_gateway.preflight import METHOD_OVERRIDE_KEYS
from meetinity_gateway.problems import BadGateway, BadRequest, GatewayError, error_response

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["AuthorizeMiddleware", "Condition", "FieldFilter", "RequestJSON", "Rule",
           "filter_factory", "parse_field_filter", "parse_requirement", "parse_rule"]

_CLAIM_NAME = r"[A-Za-z_][A-Za-z0-9_.-]*"
_PARAM_CONDITION = re.compile(rf"^(?P<claim>{_CLAIM_NAME})\s*==?\s*<(?P<param>[A-Za-z_]\w*)>$")
# CLAIM=body.FIELD: a top-level field of the JSON request body (see "Conditions on the body").
_BODY_CONDITION = re.compile(
    rf"^(?P<claim>{_CLAIM_NAME})\s*==?\s*body\.(?P<field>[A-Za-z_][A-Za-z0-9_-]*)$")
_CONDITION = re.compile(rf"^(?P<claim>{_CLAIM_NAME})\s*(?P<op>[^\w\s\"']+)\s*(?P<value>\S.*)$")
_VALUE = re.compile(r"^[^\s<>\"']+$")
_RULE = re.compile(
    r"^\s*(?:(?P<methods>[A-Za-z]+(?:\s*,\s*[A-Za-z]+)*)\s+)?(?P<path>/\S*)\s*->\s*"
    r"(?P<requirement>\S.*?)\s*$"
)
_SLASHES = re.compile(r"/{2,}")


@dataclasses.dataclass(frozen=True)
class Condition:
    """One condition of a requirement (see the module docstring)."""

    kind: str            # "anonymous" | "authenticated" | "claim" | "param" | "scope" | "body"
    claim: str = ""
    value: str = ""

    def __str__(self) -> str:
        if self.kind in ("anonymous", "authenticated"):
            return self.kind
        if self.kind == "scope":
            return f"scope:{self.value}"
        if self.kind == "param":
            return f"{self.claim}=<{self.value}>"
        if self.kind == "body":
            return f"{self.claim}=body.{self.value}"
        return f"{self.claim}={self.value}"


Requirement = t.Tuple[t.Tuple[Condition, ...], ...]  # alternatives of conjunctions


def parse_requirement(text: str, params: t.Container[str] = ()) -> Requirement:
    """``role=admin or sub=<id>`` → alternatives; ValueError with the reason."""
    alternatives = []
    for alternative in re.split(r"\s+or\s+", text.strip()):
        conditions = []
        for item in re.split(r"\s+and\s+", alternative.strip()):
            conditions.append(_parse_condition(item.strip(), params))
        if not conditions or any(c is None for c in conditions):
            raise ValueError(f"empty condition in {text!r}")
        alternatives.append(tuple(conditions))
    return tuple(alternatives)


def _parse_condition(item: str, params: t.Container[str]) -> Condition:
    if item in ("anonymous", "authenticated"):
        return Condition(item)
    if not item:
        raise ValueError("empty condition")
    if item.startswith("scope:"):
        value = item[len("scope:"):].strip()
        if not value or not _VALUE.match(value):
            raise ValueError(f"{item!r}: expected scope:NAME")
        return Condition("scope", value=value)
    match = _PARAM_CONDITION.match(item)
    if match:
        if match.group("param") not in params:
            raise ValueError(f"{item!r}: parameter <{match.group('param')}> is not in the "
                             "rule's path")
        return Condition("param", claim=match.group("claim"), value=match.group("param"))
    match = _BODY_CONDITION.match(item)
    if match:
        return Condition("body", claim=match.group("claim"), value=match.group("field"))
    if re.match(rf"^{_CLAIM_NAME}\s*==?\s*body\.", item):
        raise ValueError(f"{item!r}: body.FIELD names one top-level field (letters, digits, "
                         "'_' or '-'; no nesting)")
    match = _CONDITION.match(item)
    if not match:
        raise ValueError(
            f"{item!r}: expected anonymous, authenticated, CLAIM=VALUE, CLAIM=<param> or "
            "scope:NAME")
    op = match.group("op")
    if op not in ("=", "=="):
        raise ValueError(f"{item!r}: unknown claim operator {op!r} (only '=' compares a "
                         "claim)")
    claim, value = match.group("claim"), match.group("value").strip()
    if not _VALUE.match(value):
        raise ValueError(f"{item!r}: a claim value is one word without quotes or <>")
    return Condition("claim", claim=claim, value=value)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One authorization rule: methods, path template, requirement."""

    name: str
    template: PathTemplate
    methods: frozenset[str] | None
    requirement: Requirement
    text: str

    @property
    def describe_requirement(self) -> str:
        return " or ".join(" and ".join(str(c) for c in alt) for alt in self.requirement)

    def describe(self) -> str:
        methods = ",".join(sorted(self.methods)) if self.methods else "*"
        return f"{self.name}: {methods} {self.template.text} -> {self.describe_requirement}"


def parse_rule(name: str, spec: str) -> Rule:
    """Parse ``[METHODS] PATH -> REQUIREMENT``; ValueError with the reason."""
    match = _RULE.match(spec)
    if not match:
        raise ValueError("expected '[METHODS] PATH -> REQUIREMENT'")
    template = parse_path(match.group("path"))
    methods = None
    if match.group("methods"):
        methods = frozenset(m.strip().upper() for m in match.group("methods").split(","))
    requirement = parse_requirement(match.group("requirement"), template.names)
    return Rule(name, template, methods, requirement, spec.strip())


def _as_text(value: t.Any) -> str | None:
    """A claim or parameter value as comparable text (``42`` and ``"42"`` alike)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


class AuthorizeMiddleware:
    """Rules over verified claims, per route and method (see the module docstring)."""

    #: What this layer is, for the pipeline model (meetinity_gateway.pipeline).
    kind = "authorize"

    def __init__(
        self,
        app: WSGIApplication,
        *,
        rules: t.Mapping[str, str | Rule] | t.Iterable[Rule] = (),
        default: str = "authenticated",
        scope_claims: t.Iterable[str] = ("scope", "scp"),
        realm: str = "meetinity",
        body_limit: int = 64 * 1024,
        fields: t.Mapping[str, str | FieldFilter] | t.Iterable[FieldFilter] = (),
        fields_limit: int = 1024 * 1024,
    ) -> None:
        self.app = app
        if body_limit < 1:
            raise ConfigError("expected a size of at least 1 byte", key="body_limit",
                              value=str(body_limit))
        if fields_limit < 1:
            raise ConfigError("expected a size of at least 1 byte", key="fields_limit",
                              value=str(fields_limit))
        self.body_limit = body_limit
        self.fields_limit = fields_limit
        self._filter_table = _build_filters(fields)
        self._filters = self._filter_table.entries
        # A cheap first sort, so requests no filter can cover skip the path match: the
        # methods filters name (None: some filter takes every method) and the literal start
        # of their paths (up to the first parameter).
        self._filter_methods: frozenset[str] | None = frozenset()
        for item in self._filters:
            if item.methods is None or self._filter_methods is None:
                self._filter_methods = None
            else:
                self._filter_methods |= item.methods | (
                    {"HEAD"} if "GET" in item.methods else set())
        self._filter_starts = tuple(
            item.template.path.split("<", 1)[0] for item in self._filters)
        items = rules.items() if isinstance(rules, t.Mapping) else ((r.name, r) for r in rules)
        self.rules: list[Rule] = []
        for name, rule in items:
            if isinstance(rule, str):
                try:
                    rule = parse_rule(name, rule)
                except ValueError as exc:
                    raise ConfigError(str(exc), key=f"rule.{name}", value=rule) from None
            self.rules.append(rule)
        try:
            self._table: PathTable[Rule] = PathTable(self.rules)
        except PathTie as tie:
            raise ConfigError(f"covers the same requests as rule {tie.other.name}",
                              key=f"rule.{tie.entry.name}", value=tie.entry.text) from None
        try:
            self.default = parse_requirement(default)
        except ValueError as exc:
            raise ConfigError(str(exc), key="default", value=default) from None
        if any(c.kind == "param" for alt in self.default for c in alt):
            raise ConfigError("the default has no path parameters", key="default", value=default)
        self.default_text = default.strip()
        self.scope_claims = tuple(c for c in scope_claims if c)
        if not self.scope_claims:
            raise ConfigError("at least one scope claim is needed", key="scope_claims")
        if not realm or '"' in realm or "\\" in realm:
            raise ConfigError("expected a realm without quotes or backslashes", key="realm",
                              value=realm)
        self.realm = realm

    # -- introspection (check, configuration cross-checks) -------------------------------------

    def describe(self) -> list[str]:
        """The policy table, one line per rule, then the default, then the field filters."""
        return ([rule.describe() for rule in self.rules] + [f"default: {self.default_text}"]
                + [f.describe() for f in self._filters])

    def route_checks(self) -> list[tuple[str, str, str, bool, list[str] | None]]:
        """For each rule: (key, value, a path it covers, whether it covers everything below
        that path too, its methods) — for the assembly to check that some route serves it."""
        return [(f"{kind}.{item.name}", item.text, item.template.sample(), item.template.prefix,
                 sorted(item.methods) if item.methods else None)
                for kind, items in (("rule", self.rules), ("fields", self._filters))
                for item in items]

    def policy_for(self, path: str, method: str = "GET") -> str:
        """The rule deciding ``method path`` (or the default), for ``check`` and ``/status``."""
        found = self._table.find(path or "/", method)
        if found is None:
            return f"default: {self.default_text}"
        return found[0].describe()

    # -- decisions -------------------------------------------------------------------------------

    def decide(self, path: str, method: str, claims: t.Any, body: RequestJSON | None = None,
               environ: WSGIEnvironment | None = None) -> tuple[Rule | None, bool]:
        """``(deciding rule or None for the default, allowed)``.

        Services often read ``/api/users//7/`` as ``/api/users/7`` (merged slashes, a
        trailing slash ignored): the request must be allowed both as sent and in that
        normalized form, so no spelling of a path escapes the rule its plain form meets.
        ``body`` reads the JSON request body for ``CLAIM=body.FIELD`` conditions (without it
        they do not hold); it raises a :class:`GatewayError` for a body that cannot be read.
        With ``environ``, the rule table's matches are kept there (see ``PathTable.lookup``).
        """
        rule, allowed = self._decide(path, method, claims, body, environ)
        if not allowed or ("//" not in path and not path.endswith("/")) or path == "/":
            return rule, allowed  # refused already, or nothing a service would normalise
        normalized = _SLASHES.sub("/", path).rstrip("/") or "/"
        if normalized != path:
            other, allowed = self._decide(normalized, method, claims, body, environ)
            if not allowed:
                rule = other
        return rule, allowed

    def _decide(self, path: str, method: str, claims: t.Any, body: RequestJSON | None = None,
                environ: WSGIEnvironment | None = None) -> tuple[Rule | None, bool]:
        found = self._table.find(path or "/", method, environ)
        if found is None:
            return None, self._satisfied(self.default, claims, {}, body)
        rule, values = found
        return rule, self._satisfied(rule.requirement, claims, values, body)

    def _satisfied(self, requirement: Requirement, claims: t.Any, values,
                   body: RequestJSON | None = None) -> bool:
        return any(all(self._holds(c, claims, values, body) for c in alt)
                   for alt in requirement)

    def _holds(self, condition: Condition, claims: t.Any, values,
               body: RequestJSON | None = None) -> bool:
        kind = condition.kind
        if kind == "anonymous":
            return True
        if not isinstance(claims, dict):
            return False
        if kind == "authenticated":
            return True
        if kind == "scope":
            return any(condition.value in _scopes(claims.get(name)) for name in self.scope_claims)
        actual = claims.get(condition.claim)
        if kind == "body":
            expected = body.field_text(condition.value) if body is not None else None
            if expected is None:
                return False
            if isinstance(actual, (list, tuple)):
                return any(_as_text(item) == expected for item in actual)
            return _as_text(actual) == expected
        if kind == "param":
            expected = _as_text(values.get(condition.value))
            return expected is not None and _as_text(actual) == expected
        if isinstance(actual, (list, tuple)):
            return any(_as_text(item) == condition.value for item in actual)
        return _as_text(actual) == condition.value

    # -- field filters (see "Field filters") ----------------------------------------------------

    def _filtered(self, environ: WSGIEnvironment, start_response: StartResponse, path: str,
                  method: str, claims: t.Any):
        """Call the app; when a field filter covers the request and its ``unless`` does not
        hold, hold the answer (bounded) and send it filtered, or a 502: never unfiltered."""
        # As for rules: a path a service would normalise (//, a trailing /) is filtered as
        # its plain form is.
        match = None
        candidates = [path or "/"]
        if "//" in path or (path.endswith("/") and path != "/"):
            candidates.append(_SLASHES.sub("/", path).rstrip("/") or "/")
        for candidate in candidates:
            if not candidate.startswith(self._filter_starts):
                continue
            match = self._filter_table.find(candidate, method, environ)
            if match is not None:
                break
        if match is None:
            return self.app(environ, start_response)
        item, values = match
        if item.unless is not None and self._satisfied(item.unless, claims, values):
            return self.app(environ, start_response)
        # The answer must come whole and readable: no compression, no byte ranges.
        for key in ("HTTP_ACCEPT_ENCODING", "HTTP_RANGE", "HTTP_IF_RANGE"):
            environ.pop(key, None)
        captured: list[t.Any] = []

        def capture(status, headers, exc_info=None):
            captured[:] = [status, list(headers)]

            def write(data):  # pragma: no cover - the gateway's apps never use write()
                raise RuntimeError("write() is not supported under a field filter")
            return write

        result = self.app(environ, capture)
        chunks: list[bytes] = []
        size = 0
        too_large = passing = False
        try:
            iterator = iter(result)
            for chunk in iterator:
                if captured and captured[0][:1] != "2":
                    chunks.append(chunk)
                    passing = True
                    break
                size += len(chunk)
                if size > self.fields_limit:
                    too_large = True
                    break
                chunks.append(chunk)
            if passing or (captured and captured[0][:1] != "2" and not too_large):
                # Not a record (the service's error, the proxy's own): on as it is.
                start_response(*captured)
                return _Chained(chunks, iterator if passing else iter(()), result)
        except BaseException:
            if hasattr(result, "close"):
                result.close()
            raise
        if hasattr(result, "close"):
            result.close()
        environ[AUTHZ_DENIED_KEY] = f"fields.{item.name}"
        if not captured:
            return BadGateway("the service sent no answer")(environ, start_response)
        status, headers = captured
        if too_large:
            return BadGateway(f"an answer filtered by fields.{item.name} is over "
                              f"{self.fields_limit} bytes")(environ, start_response)
        types = [v for k, v in headers if k.lower() == "content-type"]
        encodings = [v.strip().lower() for k, v in headers if k.lower() == "content-encoding"]
        if len(types) != 1 or not is_json_media_type(types[0]) or any(
                e not in ("", "identity") for e in encodings):
            return BadGateway(f"an answer filtered by fields.{item.name} must be uncompressed "
                              "JSON")(environ, start_response)
        kept = [(k, v) for k, v in headers
                if k.lower() not in _BODY_HEADERS and k.lower() != "content-encoding"]
        if method == "HEAD":
            start_response(status, kept)
            return [b""]
        try:
            filtered = item.apply(loads_strict(b"".join(chunks)))
        except ValueError as exc:  # BodyError included
            return BadGateway(f"an answer filtered by fields.{item.name} could not be read: "
                              f"{exc}")(environ, start_response)
        del environ[AUTHZ_DENIED_KEY]
        payload = json.dumps(filtered, ensure_ascii=False, separators=(",", ":")).encode()
        start_response(status, kept + [("Content-Length", str(len(payload)))])
        return [payload]

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        claims = environ.get(CLAIMS_KEY)
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        body = RequestJSON(environ, self.body_limit)
        try:
            # A framework behind may honour X-HTTP-Method-Override: the request must be
            # allowed as the method it claims to be, too.
            rule, allowed = self.decide(path, method, claims, body, environ)
            if allowed:
                for key in METHOD_OVERRIDE_KEYS:
                    value = environ.get(key)
                    if value and value.strip():
                        rule, allowed = self.decide(path, value.strip().upper(), claims, body,
                                                    environ)
                        if not allowed:
                            break
        except GatewayError as exc:
            # The body a rule must read is not a readable JSON object: nothing forwarded.
            environ[AUTHZ_DENIED_KEY] = "body"
            return exc(environ, start_response)
        if allowed:
            if self._filters and (self._filter_methods is None
                                  or method in self._filter_methods):
                return self._filtered(environ, start_response, path, method, claims)
            return self.app(environ, start_response)
        name = rule.name if rule is not None else "default"
        requirement = rule.describe_requirement if rule is not None else self.default_text
        environ[AUTHZ_DENIED_KEY] = name
        if not isinstance(claims, dict):
            return error_response(
                environ, start_response, 401,
                f"rule {name} requires a signed-in caller ({requirement})",
                headers=[("WWW-Authenticate", f'Bearer realm="{self.realm}"')],
            )
        return error_response(environ, start_response, 403,
                              f"forbidden by rule {name}: requires {requirement}")


# -- conditions on the JSON request body ------------------------------------------------------

_UNREAD = object()


class RequestJSON:
    """The request's JSON body, read at most once and only when a condition needs it.

    The first :meth:`field_text` reads the body (bounded by ``limit``, put back for the app
    byte for byte, see :func:`meetinity_gateway.jsonbody.read_request_body`) and parses it
    strictly; an unreadable body raises the same :class:`GatewayError` every time: 415 for a
    body not declared JSON, 413 past the limit, 400 for anything but one JSON object.
    """

    def __init__(self, environ: WSGIEnvironment, limit: int) -> None:
        self.environ = environ
        self.limit = limit
        self._doc: t.Any = _UNREAD
        self._error: GatewayError | None = None

    def _load(self) -> dict[str, t.Any]:
        if self._error is not None:
            raise self._error
        if self._doc is _UNREAD:
            try:
                if not is_json_media_type(self.environ.get("CONTENT_TYPE")):
                    # A service may then read the same field from the query string instead.
                    raise UnsupportedMediaType()
                data = read_request_body(self.environ, self.limit)
                try:
                    doc = loads_strict(data)
                except BodyError as exc:
                    raise BadRequest(f"the request body must be one JSON object: {exc}") from None
                if not isinstance(doc, dict):
                    raise BadRequest("the request body must be one JSON object")
                self._doc = doc
            except GatewayError as exc:
                self._error = exc
                raise
        return self._doc

    def field_text(self, name: str) -> str | None:
        """The top-level field ``name`` as comparable text: a string as is, an integer in
        decimal; ``None`` when absent or of another type (``1.0``, ``true``, ``null``, an
        object or a list never equal a claim)."""
        value = self._load().get(name)
        if isinstance(value, bool):
            return None
        if isinstance(value, str):
            return value
        if isinstance(value, int):
            return str(value)
        return None


# -- field filters on JSON answers -----------------------------------------------------------

_FILTER = re.compile(
    r"^\s*(?:(?P<methods>[A-Za-z]+(?:\s*,\s*[A-Za-z]+)*)\s+)?(?P<path>/\S*)"
    r"(?:\s+unless\s+(?P<unless>\S.*?))?\s*->\s*(?P<location>body\S*)\s+"
    r"(?P<mode>allow|deny)\s+(?P<fields>\S.*?)\s*$",
    re.DOTALL,  # an ini value may go on over several lines
)
_LOCATION = re.compile(r"^body(?:\.(?P<key>[A-Za-z_][A-Za-z0-9_-]*))?(?P<each>\[\])?$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# Headers that describe the unfiltered body: dropped from a filtered answer.
_BODY_HEADERS = frozenset({"content-length", "etag", "content-md5", "digest", "content-range",
                           "accept-ranges", "last-modified"})


@dataclasses.dataclass(frozen=True)
class FieldFilter:
    """Which top-level fields of the JSON records in an answer a caller may see."""

    name: str
    template: PathTemplate
    methods: frozenset[str] | None
    unless: Requirement | None     # the filter applies when this does *not* hold
    key: str | None                # None: the answer itself; else its top-level key
    each: bool                     # the location is a list of records
    mode: str                      # "allow" | "deny"
    fields: frozenset[str]
    text: str

    def describe(self) -> str:
        methods = ",".join(sorted(self.methods)) if self.methods else "*"
        unless = ""
        if self.unless is not None:
            unless = " unless " + " or ".join(
                " and ".join(str(c) for c in alt) for alt in self.unless)
        location = "body" + (f".{self.key}" if self.key else "") + ("[]" if self.each else "")
        return (f"fields {self.name}: {methods} {self.template.text}{unless} -> {location} "
                f"{self.mode} {', '.join(sorted(self.fields))}")

    def apply(self, doc: t.Any) -> t.Any:
        """The filtered document; ValueError when it is not of the expected shape."""
        if not isinstance(doc, dict):
            raise ValueError("the answer is not a JSON object")
        target = doc
        if self.key is not None:
            if self.key not in doc:
                raise ValueError(f"the answer has no {self.key!r}")
            target = doc[self.key]
        records = target if self.each else [target]
        if not isinstance(records, list):
            raise ValueError("the records are not a JSON list")
        kept = []
        for record in records:
            if not isinstance(record, dict):
                raise ValueError("a record is not a JSON object")
            if self.mode == "allow":
                kept.append({k: v for k, v in record.items() if k in self.fields})
            else:
                kept.append({k: v for k, v in record.items() if k not in self.fields})
        result = kept if self.each else kept[0]
        if self.key is None:
            return result
        return {**doc, self.key: result}


def parse_field_filter(name: str, spec: str) -> FieldFilter:
    """Parse ``[METHODS] PATH [unless REQUIREMENT] -> LOCATION allow|deny FIELD, ...``;
    ValueError with the reason."""
    match = _FILTER.match(spec)
    if not match:
        raise ValueError("expected '[METHODS] PATH [unless REQUIREMENT] -> body[.KEY][[]] "
                         "allow|deny FIELD, ...'")
    template = parse_path(match.group("path"))
    methods = None
    if match.group("methods"):
        methods = frozenset(m.strip().upper() for m in match.group("methods").split(","))
    unless = None
    if match.group("unless"):
        unless = parse_requirement(match.group("unless"), template.names)
        if any(c.kind == "body" for alt in unless for c in alt):
            raise ValueError("a field filter cannot depend on the request body")
    location = _LOCATION.match(match.group("location"))
    if not location:
        raise ValueError(f"{match.group('location')!r}: expected body, body.KEY, body[] or "
                         "body.KEY[]")
    fields = [f.strip() for f in match.group("fields").split(",")]
    for field in fields:
        if not _FIELD.match(field):
            raise ValueError(f"{field!r} is not a top-level field name")
    return FieldFilter(name, template, methods, unless, location.group("key"),
                       bool(location.group("each")), match.group("mode"), frozenset(fields),
                       spec.strip())


def _build_filters(items) -> PathTable[FieldFilter]:
    filters: list[FieldFilter] = []
    pairs = items.items() if isinstance(items, t.Mapping) else ((f.name, f) for f in items)
    for name, item in pairs:
        if isinstance(item, str):
            try:
                item = parse_field_filter(name, item)
            except ValueError as exc:
                raise ConfigError(str(exc), key=f"fields.{name}", value=item) from None
        filters.append(item)
    try:
        return PathTable(filters)
    except PathTie as tie:
        raise ConfigError(f"covers the same requests as fields.{tie.other.name}",
                          key=f"fields.{tie.entry.name}", value=tie.entry.text) from None


class _Chained:
    """The chunks already read, then the rest of the app's iterable; closes it."""

    def __init__(self, head: list[bytes], rest: t.Iterator[bytes], result: t.Any) -> None:
        self._head = head
        self._rest = rest
        self._result = result

    def __iter__(self):
        yield from self._head
        yield from self._rest

    def close(self) -> None:
        if self._result is not None and hasattr(self._result, "close"):
            self._result.close()


def _scopes(value: t.Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return [item for item in value if isinstance(item, str)]
    return []


# -- ini ------------------------------------------------------------------------------------

_PARAMS = {"default": as_str, "scope_claims": as_list, "realm": as_str, "body_limit": as_size,
           "fields_limit": as_size}


def filter_factory(global_conf, **local_conf):
    """``paste.filter_factory`` for ``egg:meetinity_gateway#authorize``.

    Keys: ``rule.NAME = [METHODS] PATH -> REQUIREMENT`` and ``default``, ``scope_claims``,
    ``realm``. Every rule is parsed here, at start: a bad one is a ConfigError naming the
    file, the key and the value.
    """
    file = global_conf.get("__file__")
    named, values = split_named(prepare(local_conf, global_conf), "rule", "fields")
    rules = named["rule"]
    fields = named["fields"]
    kwargs: dict[str, t.Any] = {"fields": fields}
    for key, value in values.items():
        if key in _PARAMS:
            try:
                kwargs[key] = _PARAMS[key](value)
            except ValueError as exc:
                raise ConfigError(str(exc), file=file, key=key, value=value) from None
        else:
            known = ", ".join(sorted(_PARAMS) + ["fields.NAME", "rule.NAME"])
            raise ConfigError(f"unknown key (known keys: {known})", file=file, key=key,
                              value=value)
    # Built once now, so a bad rule fails at start with its location.
    try:
        AuthorizeMiddleware(_NoApp(), rules=rules, **kwargs)
    except ConfigError as exc:
        raise exc.locate(file=file) from None

    def make_filter(app):
        return AuthorizeMiddleware(app, rules=rules, **kwargs)

    return make_filter


class _NoApp:
    """Placeholder app used only to validate settings in :func:`filter_factory`."""

    def __call__(self, environ, start_response):  # pragma: no cover - never called
        raise RuntimeError("settings check only")
