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

:class:`PathTable` is the one table of templates every layer that matches paths uses (the
router's routes, ``authorize``'s rules and field filters, ``auth``'s public paths): entries
with a template and their methods, most specific first (an entry naming the method beats an
all-methods one on the same paths), ties refused when the table is built, Werkzeug's
exceptions turned into a plain answer. A table may keep its answer for a request in the
environ (``meetinity_gateway.path_matches``), so a later layer holding the same table reads
it instead of matching again; without it, each layer matches by itself.

A table also remembers its recent answers (:data:`MEMO_ENTRIES` of them, for paths up to
:data:`MEMO_PATH` characters): the answer for a method and path never changes for a built
table, and Werkzeug's matcher (a few µs, regular expressions per segment) was the largest
share of the layers' own time. A path seen again costs one dictionary look-up; a table
that has seen too many different paths forgets them all and starts again, so a client
sending endless distinct paths costs a miss each (what matching cost before), never memory.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing as t
import uuid

from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound
from werkzeug.routing import BaseConverter, Map, RequestRedirect, Rule

from meetinity_gateway.keys import PATH_MATCHES_KEY

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import WSGIEnvironment

__all__ = ["PathMatch", "PathTable", "PathTemplate", "PathTie", "build_map", "parse_path",
           "parse_rewrite"]

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


# -- the table ------------------------------------------------------------------------------

E = t.TypeVar("E")


class PathTie(ValueError):
    """Two entries of a :class:`PathTable` accept the same requests: which one wins would
    depend on the order they were written in. ``entry`` came after ``other``."""

    def __init__(self, entry: t.Any, other: t.Any) -> None:
        super().__init__(f"{_template(entry).text} ties with {_template(other).text}")
        self.entry = entry
        self.other = other


#: How many answers a :class:`PathTable` remembers, and for paths up to how many characters.
MEMO_ENTRIES = 4096
MEMO_PATH = 256

_NO_VALUES: t.Mapping[str, t.Any] = types.MappingProxyType({})


class PathMatch(t.NamedTuple):
    """A table's answer for a path and method: the entry and its match values (parameters,
    and the rest below a prefix; read-only, the answer may be remembered), or ``entry is
    None``; then ``allowed`` names the methods some entry takes on that path (empty: no
    entry covers the path at all)."""

    entry: t.Any
    values: t.Mapping[str, t.Any]
    allowed: tuple[str, ...] = ()


def _template(entry: t.Any) -> PathTemplate:
    return entry if isinstance(entry, PathTemplate) else entry.template


def _methods(entry: t.Any) -> frozenset[str] | None:
    return None if isinstance(entry, PathTemplate) else entry.methods


class PathTable(t.Generic[E]):
    """Templates to entries, the most specific first (see the module docstring).

    :param entries: objects with a ``template`` (:class:`PathTemplate`) and ``methods`` (a
        set of method names, or ``None`` for every method; ``HEAD`` comes with ``GET``), or
        bare templates (every method).
    :param refuse_ties: raise :class:`PathTie` for two entries accepting the same paths with
        a method in common (the router's and ``authorize``'s tables). A table whose entries
        all lead to the same answer (``auth``'s public paths) may allow them.
    """

    def __init__(self, entries: t.Iterable[E], *, refuse_ties: bool = True) -> None:
        self.entries: list[E] = list(entries)
        if refuse_ties:
            seen: list[E] = []
            for entry in self.entries:
                for other in seen:
                    if _ties(entry, other):
                        raise PathTie(entry, other)
                seen.append(entry)
        rules: list[Rule] = []
        # Werkzeug orders rules by specificity, then keeps the given order among equals:
        # entries naming methods go first, so they win over an all-methods entry on the
        # same paths (and fall through to it for the other methods).
        for entry in sorted(self.entries, key=lambda e: _methods(e) is None):
            rules.extend(_template(entry).rules(entry, _methods(entry)))
        # Matching needs no per-request binding: the gateway matches on the path alone.
        self._adapter = build_map(rules).bind("gateway", "/") if rules else None
        self._memo: dict[tuple[str, str], PathMatch] = {}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, path: str, method: str,
               environ: WSGIEnvironment | None = None) -> PathMatch:
        """The entry for ``method path`` (see :class:`PathMatch`). With ``environ``, an
        answer this table gave for the same path and method in this request is reused, and a
        new one is kept there for a later layer holding the same table."""
        key = (self, path, method)
        kept = None
        if environ is not None:
            kept = environ.get(PATH_MATCHES_KEY)
            if kept is not None and key in kept:
                return kept[key]
        found = self._memo.get((path, method))
        if found is None:
            found = self._match(path or "/", method)
            if len(path) + len(method) <= MEMO_PATH:
                memo = self._memo
                if len(memo) >= MEMO_ENTRIES:
                    memo.clear()
                memo[(path, method)] = found
        if environ is not None:
            if kept is None:
                kept = environ[PATH_MATCHES_KEY] = {}
            kept[key] = found
        return found

    def find(self, path: str, method: str,
             environ: WSGIEnvironment | None = None) -> tuple[E, t.Mapping[str, t.Any]] | None:
        """``(entry, values)`` for ``method path``, or ``None``."""
        found = self.lookup(path, method, environ)
        return None if found.entry is None else (found.entry, found.values)

    def _match(self, path: str, method: str) -> PathMatch:
        if self._adapter is None:
            return PathMatch(None, _NO_VALUES)
        try:
            entry, values = self._adapter.match(path, method)
        except WerkzeugMethodNotAllowed as exc:
            return PathMatch(None, _NO_VALUES, tuple(exc.valid_methods or ()))
        except (WerkzeugNotFound, RequestRedirect):
            return PathMatch(None, _NO_VALUES)
        return PathMatch(entry, types.MappingProxyType(values))


def _ties(entry: t.Any, other: t.Any) -> bool:
    """The same paths (a prefix template covers its own path too) for a common method. A
    rule for some methods beside one for all of them is no tie: the one naming the method
    wins."""
    if _template(entry).base_signature != _template(other).base_signature:
        return False
    mine, theirs = _methods(entry), _methods(other)
    return (mine is None and theirs is None) or bool(mine and theirs and mine & theirs)
