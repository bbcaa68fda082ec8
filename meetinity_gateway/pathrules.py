"""Path templates with Werkzeug converters, shared by the router and the authorization layer.

A template is a literal path, optionally holding Werkzeug converters, optionally ending in
``/*`` (a prefix: the path itself and everything below it on segment boundaries)::

    /health                                  exact
    /api/users/*                             /api/users, /api/users/7, /api/users/7/photo
    /api/users/<int:id>/recommendations      exact, with a parameter
    /api/users/<int:id>/*                    /api/users/7 and everything below it

Converters: ``string`` (the default, one segment), ``int``, ``float``, ``uuid``, ``path``
(several segments) and ``any(a,b)``. Matching is Werkzeug's own: :func:`build_map` makes a
``Map`` where the most specific rule wins (static segments over converters, ``int`` over
``string``, a longer static prefix over a shorter one), with no slash redirects and no merged
slashes. Two templates that accept exactly the same paths (``/a/<x>`` and ``/a/<y>``) have
the same :attr:`PathTemplate.signature`: callers refuse such ties, because the winner would
be decided by file order.

A rewrite (``/users/<id>/recommendations``) uses the template's parameters by name.
"""
from __future__ import annotations

import dataclasses
import re
import typing as t
import uuid

from werkzeug.routing import BaseConverter, Map, Rule

__all__ = ["PathTemplate", "build_map", "parse_path", "parse_rewrite"]

# RFC 3986 pchar minus "%" (a template is a literal, already-decoded path) and minus "<>".
_LITERAL = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@-]*$")
_PARAM = re.compile(
    r"<(?:(?P<conv>[a-z]+)(?P<args>\([^)<>]*\))?:)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)>")
_CONVERTERS = frozenset({"string", "default", "int", "float", "uuid", "path", "any"})
# A value each converter accepts, to build a sample path from a template.
_SAMPLES = {"string": "x", "default": "x", "int": "1", "float": "1.0",
            "uuid": str(uuid.UUID(int=1)), "path": "x"}


class _RestConverter(BaseConverter):
    """The rest of a path below a prefix: may be empty, may hold slashes."""

    regex = ".*"
    part_isolating = False


REST = "__rest"


@dataclasses.dataclass(frozen=True)
class PathTemplate:
    """A parsed path template (see the module docstring)."""

    text: str                      # as written, e.g. /api/users/<int:id>/*
    path: str                      # without the /* suffix; "/" for the root
    prefix: bool
    params: tuple[tuple[str, str], ...]  # (name, converter) in order
    signature: str                 # the template with parameter names erased

    @property
    def base_signature(self) -> str:
        """The signature of the path itself: a prefix template covers it too, so two
        templates with the same base signature both accept that path (a tie)."""
        return self.signature[:-2] if self.prefix else self.signature

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.params)

    def rules(self, endpoint: t.Any, methods: t.Iterable[str] | None) -> list[Rule]:
        """Werkzeug rules for this template (two for a prefix: itself and below)."""
        methods = sorted(methods) if methods else None
        out = [Rule(self.path, endpoint=endpoint, methods=methods)]
        if self.prefix:
            below = "/" if self.path == "/" else self.path + "/"
            out.append(Rule(f"{below}<rest:{REST}>", endpoint=endpoint, methods=methods))
        return out

    def sample(self) -> str:
        """A concrete path this template matches (for configuration cross-checks)."""
        def replace(match: re.Match[str]) -> str:
            conv = match.group("conv") or "string"
            if conv == "any":
                return match.group("args")[1:-1].split(",")[0].strip().strip("'\"")
            return _SAMPLES[conv]

        return _PARAM.sub(replace, self.path)


def parse_path(text: str) -> PathTemplate:
    """Parse ``PATH[/*]``; raises ValueError with the reason."""
    raw = text.strip()
    if not raw.startswith("/"):
        raise ValueError(f"{raw!r} is not a path like /api/users")
    prefix = raw == "/*" or raw.endswith("/*")
    path = (raw[:-2] or "/") if prefix else raw
    if path != "/":
        path = path.rstrip("/") or "/"
    if "//" in path:
        raise ValueError(f"{raw!r} holds an empty segment")
    params: list[tuple[str, str]] = []
    for segment in path.split("/")[1:]:
        literal = _PARAM.sub("", segment)
        if not _LITERAL.match(literal) or "<" in literal or ">" in literal:
            raise ValueError(
                f"{raw!r}: bad segment {segment!r} (literal characters, or converters like "
                "<int:id>)")
        if segment in (".", ".."):
            raise ValueError(f"{raw!r} holds a dot-segment")
        for match in _PARAM.finditer(segment):
            conv = match.group("conv") or "string"
            if conv not in _CONVERTERS:
                known = ", ".join(sorted(_CONVERTERS - {"default"}))
                raise ValueError(f"{raw!r}: unknown converter {conv!r} (known: {known})")
            if match.group("args") and conv not in ("any", "int", "float", "string"):
                raise ValueError(f"{raw!r}: converter {conv!r} takes no arguments")
            name = match.group("name")
            if name == REST or any(name == seen for seen, _ in params):
                raise ValueError(f"{raw!r}: parameter {name!r} appears twice")
            params.append((name, conv))
    if prefix and any(conv == "path" for _, conv in params):
        raise ValueError(f"{raw!r}: a <path:…> parameter cannot be followed by /*")
    try:
        # Let Werkzeug itself reject what it would not compile (bad converter arguments).
        Map(PathTemplate(raw, path, prefix, tuple(params), "").rules("x", None),
            converters={"rest": _RestConverter})
    except Exception as exc:  # werkzeug raises several types here
        raise ValueError(f"{raw!r}: {exc}") from None
    signature = _PARAM.sub(
        lambda m: "<" + (m.group("conv") or "string").replace("default", "string")
        + (m.group("args") or "") + ">", path) + ("/*" if prefix else "")
    return PathTemplate(raw, path, prefix, tuple(params), signature)


_REWRITE_PARAM = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)>")


def parse_rewrite(text: str, template: PathTemplate) -> str:
    """Check a rewrite path against ``template``: only ``<name>`` of its parameters."""
    raw = text.strip()
    if not raw.startswith("/") or "//" in raw:
        raise ValueError(f"{raw!r} is not a path like /users")
    for segment in raw.split("/")[1:]:
        literal = _REWRITE_PARAM.sub("", segment)
        if not _LITERAL.match(literal):
            raise ValueError(f"rewrite {raw!r}: bad segment {segment!r} (use <name> for a "
                             "parameter of the path)")
        if segment in (".", ".."):
            raise ValueError(f"rewrite {raw!r} holds a dot-segment")
    for name in _REWRITE_PARAM.findall(raw):
        if name not in template.names:
            known = ", ".join(sorted(template.names)) or "none"
            raise ValueError(f"rewrite {raw!r}: parameter <{name}> is not in the path "
                             f"{template.text} (its parameters: {known})")
    return raw.rstrip("/") or "/"


def substitute(rewrite: str, values: t.Mapping[str, t.Any]) -> str:
    """``/users/<id>`` with ``{"id": 7}`` → ``/users/7``."""
    if "<" not in rewrite:
        return rewrite
    return _REWRITE_PARAM.sub(lambda m: str(values[m.group(1)]), rewrite)


def build_map(rules: t.Iterable[Rule]) -> Map:
    """A Werkzeug ``Map`` with the gateway's settings (see the module docstring)."""
    return Map(
        list(rules),
        strict_slashes=False,
        merge_slashes=False,
        redirect_defaults=False,
        converters={"rest": _RestConverter},
    )
