"""The one path table (pathrules.PathTable) the router, authorize and auth's public paths use:
most specific first, ties refused at start, a match kept in the environ for a later layer."""
from __future__ import annotations

import dataclasses
import typing as t

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware

from meetinity_gateway.keys import PATH_MATCHES_KEY, ROUTE_KEY
from meetinity_gateway.pathrules import PathTable, PathTemplate, PathTie, parse_path
from meetinity_gateway.routing import Router, parse_route


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    template: PathTemplate
    methods: frozenset[str] | None = None


def entry(name: str, path: str, methods: str | None = None) -> Entry:
    return Entry(name, parse_path(path),
                 frozenset(methods.split(",")) if methods else None)


def test_most_specific_entry_wins_whatever_the_order():
    entries = [entry("all", "/api/*"), entry("users", "/api/users/*"),
               entry("one", "/api/users/<int:id>"), entry("named", "/api/users/me")]
    for ordered in (entries, entries[::-1]):
        table = PathTable(ordered)
        assert table.find("/api/x", "GET")[0].name == "all"
        assert table.find("/api/users/x/y", "GET")[0].name == "users"
        assert table.find("/api/users/7", "GET") == (ordered[[e.name for e in ordered]
                                                             .index("one")], {"id": 7})
        assert table.find("/api/users/me", "GET")[0].name == "named"
        assert table.find("/other", "GET") is None


def test_an_entry_naming_the_method_wins_and_falls_through_for_others():
    table = PathTable([entry("any", "/a/*"), entry("post", "/a/*", "POST")])
    assert table.find("/a/b", "POST")[0].name == "post"
    assert table.find("/a/b", "GET")[0].name == "any"
    only = PathTable([entry("get", "/a", "GET")])
    found = only.lookup("/a", "DELETE")
    assert found.entry is None and set(found.allowed) == {"GET", "HEAD"}
    assert only.lookup("/b", "GET") == (None, {}, ())


@pytest.mark.parametrize("first, second", [
    (("a", "/x/<id>", None), ("b", "/x/<other>", None)),
    (("a", "/x/*", "GET"), ("b", "/x", "GET,POST")),
    (("a", "/x/<int:n>/*", None), ("b", "/x/<int:m>/*", None)),
])
def test_ties_are_refused_naming_both_entries(first, second):
    with pytest.raises(PathTie) as raised:
        PathTable([entry(*first), entry(*second)])
    assert raised.value.entry.name == "b" and raised.value.other.name == "a"
    # Different methods, or a converter of another type, are no tie.
    PathTable([entry("a", "/x/<id>", "GET"), entry("b", "/x/<other>", "POST")])
    PathTable([entry("a", "/x/<int:id>"), entry("b", "/x/<other>")])
    # A table whose entries all lead to the same answer may allow them.
    assert len(PathTable([parse_path("/p"), parse_path("/p")], refuse_ties=False)) == 2


_SEGMENT = st.sampled_from(["a", "b", "<p{}>", "<int:p{}>"])
_TEMPLATE = st.builds(
    lambda parts, prefix: "/" + "/".join(part.format(i) for i, part in enumerate(parts))
    + ("/*" if prefix else ""),
    st.lists(_SEGMENT, min_size=1, max_size=3), st.booleans())
_PATH = st.lists(st.sampled_from(["a", "b", "7", "zz"]), min_size=1, max_size=4).map(
    lambda parts: "/" + "/".join(parts))


@settings(max_examples=80, deadline=None)
@given(st.lists(_TEMPLATE, min_size=1, max_size=5, unique=True), st.lists(_PATH, max_size=6),
       st.sampled_from(["GET", "POST"]))
def test_a_kept_match_is_the_match(templates, paths, method):
    try:
        table = PathTable([entry(f"e{i}", text) for i, text in enumerate(templates)])
    except PathTie:
        return  # two templates for the same paths: refused, nothing to match
    environ: dict[str, t.Any] = {}
    calls = []
    match = table._match
    table._match = lambda path, method: calls.append(path) or match(path, method)
    for path in paths + paths:
        assert table.lookup(path, method, environ) == match(path, method)
    # Each distinct path matched once; the repeats read the environ.
    assert sorted(calls) == sorted(set(paths))
    assert set(environ.get(PATH_MATCHES_KEY, ())) == {(table, path, method) for path in paths}


def test_a_later_layer_holding_the_same_table_reads_the_match():
    """A layer in front asks the router's own table; the router then does not match again,
    and alone (no kept match) it matches by itself."""
    routes = [parse_route("users", "/api/users/<int:id>/* -> svc /u/<id>"),
              parse_route("rest", "/api/* -> svc")]

    def svc(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ[ROUTE_KEY].encode()]

    router = Router(routes, {"svc": svc})
    calls = []
    match = router.table._match
    router.table._match = lambda path, method: calls.append(path) or match(path, method)

    def in_front(environ, start_response):
        found = router.table.find(environ["PATH_INFO"], environ["REQUEST_METHOD"], environ)
        environ["HTTP_X_SEEN"] = found[0].name if found else "none"
        return router(environ, start_response)

    assert TestApp(LintMiddleware(in_front)).get("/api/users/7/x").text == "users"
    assert calls == ["/api/users/7/x"]
    calls.clear()
    assert TestApp(LintMiddleware(router)).get("/api/other").text == "rest"
    assert calls == ["/api/other"]


@settings(max_examples=80, deadline=None, print_blob=True)
@given(st.lists(_TEMPLATE, min_size=1, max_size=5, unique=True),
       st.lists(_PATH, min_size=1, max_size=12), st.sampled_from(["GET", "POST"]),
       st.integers(1, 4))
def test_a_remembered_answer_is_the_answer(templates, paths, method, entries):
    """The table's memory of answers never changes one, also once it is full and starts
    again (a small memory here, to go round it often)."""
    import meetinity_gateway.pathrules as module

    try:
        table = PathTable([entry(f"e{i}", text) for i, text in enumerate(templates)])
    except PathTie:
        return
    fresh = PathTable(table.entries)
    saved = module.MEMO_ENTRIES
    module.MEMO_ENTRIES = entries
    try:
        for path in paths + paths[::-1] + paths:
            assert table.lookup(path, method) == fresh._match(path, method)
            assert len(table._memo) <= entries
    finally:
        module.MEMO_ENTRIES = saved


def test_remembered_answers_are_read_only_and_long_paths_are_not_remembered():
    import meetinity_gateway.pathrules as module

    table = PathTable([entry("users", "/api/users/<int:id>/*")])
    found = table.lookup("/api/users/7/photo", "GET")
    assert found.values["id"] == 7
    with pytest.raises(TypeError):
        found.values["id"] = 8  # type: ignore[index]
    assert table.lookup("/api/users/7/photo", "GET").values["id"] == 7
    long_path = "/api/users/7/" + "x" * module.MEMO_PATH
    assert table.lookup(long_path, "GET").entry.name == "users"
    assert (long_path, "GET") not in table._memo
