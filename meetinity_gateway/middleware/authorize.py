"""Authorization by claims: who may do what, per route and method, after authentication.

``auth`` proves *who* is calling and puts the verified claims in
``environ["meetinity_gateway.claims"]``; this layer decides whether that caller may make
*this* request. It runs right after ``auth`` and matches paths itself (its own Werkzeug
``Map``, the same template syntax and most-specific-wins ordering as the router, see
:mod:`meetinity_gateway.pathrules`): the router runs further in, so its match is not known
yet. Usable alone around any WSGI app that sets the claims key.

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
``X-HTTP-Method``, ``X-Method-Override``) must be allowed as that method too. Rules only
see what the token says: a request body naming another user (``{"user_id": 9}``) is the
service's to check.
"""
from __future__ import annotations

import dataclasses
import re
import typing as t

from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound
from werkzeug.routing import RequestRedirect

from meetinity_gateway.config import ConfigError, as_list, as_str, prepare
from meetinity_gateway.keys import AUTHZ_DENIED_KEY, CLAIMS_KEY
from meetinity_gateway.pathrules import PathTemplate, build_map, parse_path
from meetinity_gateway.preflight import METHOD_OVERRIDE_KEYS
from meetinity_gateway.problems import error_response

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["AuthorizeMiddleware", "Condition", "Rule", "filter_factory", "parse_requirement",
           "parse_rule"]

_CLAIM_NAME = r"[A-Za-z_][A-Za-z0-9_.-]*"
_PARAM_CONDITION = re.compile(rf"^(?P<claim>{_CLAIM_NAME})\s*==?\s*<(?P<param>[A-Za-z_]\w*)>$")
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

    kind: str            # "anonymous" | "authenticated" | "claim" | "param" | "scope"
    claim: str = ""
    value: str = ""

    def __str__(self) -> str:
        if self.kind in ("anonymous", "authenticated"):
            return self.kind
        if self.kind == "scope":
            return f"scope:{self.value}"
        if self.kind == "param":
            return f"{self.claim}=<{self.value}>"
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

    def __init__(
        self,
        app: WSGIApplication,
        *,
        rules: t.Mapping[str, str | Rule] | t.Iterable[Rule] = (),
        default: str = "authenticated",
        scope_claims: t.Iterable[str] = ("scope", "scp"),
        realm: str = "meetinity",
    ) -> None:
        self.app = app
        items = rules.items() if isinstance(rules, t.Mapping) else ((r.name, r) for r in rules)
        self.rules: list[Rule] = []
        for name, rule in items:
            if isinstance(rule, str):
                try:
                    rule = parse_rule(name, rule)
                except ValueError as exc:
                    raise ConfigError(str(exc), key=f"rule.{name}", value=rule) from None
            self.rules.append(rule)
        seen: dict[str, Rule] = {}
        for rule in self.rules:
            for other in seen.values():
                same = other.template.base_signature == rule.template.base_signature
                # A rule for some methods beside one for all of them is no tie: the rule
                # naming the method wins (its rules go first in the map).
                overlap = (other.methods is None and rule.methods is None) or bool(
                    other.methods and rule.methods and other.methods & rule.methods)
                if same and overlap:
                    raise ConfigError(f"covers the same requests as rule {other.name}",
                                      key=f"rule.{rule.name}", value=rule.text)
            seen[rule.name] = rule
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
        rules_for_map = []
        # Werkzeug keeps file order among equally specific rules: method rules go first.
        for rule in sorted(self.rules, key=lambda r: r.methods is None):
            rules_for_map.extend(rule.template.rules(rule, rule.methods))
        self._adapter = build_map(rules_for_map).bind("gateway", "/")

    # -- introspection (check, configuration cross-checks) -------------------------------------

    def describe(self) -> list[str]:
        """The policy table, one line per rule, then the default."""
        return [rule.describe() for rule in self.rules] + [f"default: {self.default_text}"]

    def route_checks(self) -> list[tuple[str, str, str, bool, list[str] | None]]:
        """For each rule: (key, value, a path it covers, whether it covers everything below
        that path too, its methods) — for the assembly to check that some route serves it."""
        return [(f"rule.{rule.name}", rule.text, rule.template.sample(), rule.template.prefix,
                 sorted(rule.methods) if rule.methods else None) for rule in self.rules]

    def policy_for(self, path: str, method: str = "GET") -> str:
        """The rule deciding ``method path`` (or the default), for ``check`` and ``/status``."""
        try:
            rule, _ = self._adapter.match(path or "/", method)
        except (WerkzeugNotFound, WerkzeugMethodNotAllowed, RequestRedirect):
            return f"default: {self.default_text}"
        return rule.describe()

    # -- decisions -------------------------------------------------------------------------------

    def decide(self, path: str, method: str, claims: t.Any) -> tuple[Rule | None, bool]:
        """``(deciding rule or None for the default, allowed)``.

        Services often read ``/api/users//7/`` as ``/api/users/7`` (merged slashes, a
        trailing slash ignored): the request must be allowed both as sent and in that
        normalized form, so no spelling of a path escapes the rule its plain form meets.
        """
        rule, allowed = self._decide(path, method, claims)
        if not allowed or ("//" not in path and not path.endswith("/")) or path == "/":
            return rule, allowed  # refused already, or nothing a service would normalise
        normalized = _SLASHES.sub("/", path).rstrip("/") or "/"
        if normalized != path:
            other, allowed = self._decide(normalized, method, claims)
            if not allowed:
                rule = other
        return rule, allowed

    def _decide(self, path: str, method: str, claims: t.Any) -> tuple[Rule | None, bool]:
        try:
            rule, values = self._adapter.match(path or "/", method)
        except (WerkzeugNotFound, WerkzeugMethodNotAllowed, RequestRedirect):
            return None, self._satisfied(self.default, claims, {})
        return rule, self._satisfied(rule.requirement, claims, values)

    def _satisfied(self, requirement: Requirement, claims: t.Any, values) -> bool:
        return any(all(self._holds(c, claims, values) for c in alt) for alt in requirement)

    def _holds(self, condition: Condition, claims: t.Any, values) -> bool:
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
        if kind == "param":
            expected = _as_text(values.get(condition.value))
            return expected is not None and _as_text(actual) == expected
        if isinstance(actual, (list, tuple)):
            return any(_as_text(item) == condition.value for item in actual)
        return _as_text(actual) == condition.value

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        claims = environ.get(CLAIMS_KEY)
        path = environ.get("PATH_INFO") or "/"
        # A framework behind may honour X-HTTP-Method-Override: the request must be allowed
        # as the method it claims to be, too.
        rule, allowed = self.decide(path, environ.get("REQUEST_METHOD", "GET"), claims)
        if allowed:
            for key in METHOD_OVERRIDE_KEYS:
                value = environ.get(key)
                if value and value.strip():
                    rule, allowed = self.decide(path, value.strip().upper(), claims)
                    if not allowed:
                        break
        if allowed:
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


def _scopes(value: t.Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return [item for item in value if isinstance(item, str)]
    return []


# -- ini ------------------------------------------------------------------------------------

_PARAMS = {"default": as_str, "scope_claims": as_list, "realm": as_str}


def filter_factory(global_conf, **local_conf):
    """``paste.filter_factory`` for ``egg:meetinity_gateway#authorize``.

    Keys: ``rule.NAME = [METHODS] PATH -> REQUIREMENT`` and ``default``, ``scope_claims``,
    ``realm``. Every rule is parsed here, at start: a bad one is a ConfigError naming the
    file, the key and the value.
    """
    file = global_conf.get("__file__")
    values = prepare(local_conf, global_conf)
    rules: dict[str, str] = {}
    kwargs: dict[str, t.Any] = {}
    for key, value in values.items():
        kind, _, name = key.partition(".")
        if kind == "rule" and name:
            rules[name] = value
        elif key in _PARAMS:
            kwargs[key] = _PARAMS[key](value)
        else:
            known = ", ".join(sorted(_PARAMS) + ["rule.NAME"])
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
