"""authorize's conditions on the JSON request body and its field filters on JSON answers
(webtest + LintMiddleware), with property tests for the JSON edge cases."""
from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware

from meetinity_gateway.config import ConfigError
from meetinity_gateway.jsonbody import BodyError, loads_strict, read_request_body
from meetinity_gateway.keys import AUTHZ_DENIED_KEY, CLAIMS_KEY
from meetinity_gateway.middleware.authorize import (
    AuthorizeMiddleware,
    parse_field_filter,
    parse_requirement,
)

RULES = {
    "swipe": "POST /api/matching/swipe -> sub=body.user_id",
    "join": "POST /api/events/<id>/join -> email=body.email",
    "bookmark": "POST /api/events/<id>/bookmark -> role=admin or sub=body.user_id",
    "all": "/* -> authenticated",
}
ADA = {"sub": "42", "email": "ada@example.com"}
ADA_INT = {"sub": 42, "email": "ada@example.com"}
ADMIN = {"sub": "1", "role": "admin"}
JSON = "application/json"


def client(claims, rules=RULES, answer=None, **kwargs):
    """A TestApp around authorize; the inner app records the body it was given."""
    seen = []

    def recording(environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        seen.append(body)
        if answer is not None:
            return answer(environ, start_response)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    app = AuthorizeMiddleware(LintMiddleware(recording), rules=rules, **kwargs)
    extra = {} if claims is None else {CLAIMS_KEY: claims}
    return TestApp(LintMiddleware(app), extra_environ=extra), seen


def post(app, path, body: bytes, content_type=JSON, status="*"):
    return app.post(path, body, headers={"Content-Type": content_type}, status=status,
                    expect_errors=True)


@pytest.mark.parametrize("claims, body, status", [
    (ADA, b'{"user_id": 42, "target_id": 7, "action": "like"}', 200),
    (ADA, b'{"user_id": "42", "target_id": 7}', 200),
    (ADA_INT, b'{"user_id": 42}', 200),
    (ADA, b'{"user_id": 7, "target_id": 42}', 403),          # acting as someone else
    (ADA, b'{"target_id": 7}', 403),                          # no user named
    (ADA, b'{"user_id": 42.0}', 403),                         # another type
    (ADA, b'{"user_id": "042"}', 403),
    (ADA, b'{"user_id": true}', 403),
    (ADA, b'{"user_id": null}', 403),
    (ADA, b'{"user_id": [42]}', 403),
    (ADA, b'{"user_id": {"id": 42}}', 403),                   # nested where the rule is flat
    (ADA, b'{"user_id": "\\u0034\\u0032"}', 200),             # "42", escaped
    (ADA, b'{"user_id": 42, "user_id": 7}', 400),             # twice
    (ADA, b'{"user_id": 7, "user_id": 42}', 400),
    (ADA, b'\xef\xbb\xbf{"user_id": 42}', 400),               # a byte order mark
    (ADA, '{"user_id": 42}'.encode("utf-16"), 400),
    (ADA, b'{"user_id": 42', 400),
    (ADA, b'[{"user_id": 42}]', 400),
    (ADA, b'"42"', 400),
    (ADA, b'', 400),
    (ADA, b'{"user_id": NaN}', 400),
    (ADA, b'{"user_id": 1' + b'0' * 5000 + b'}', 400),         # past Python's digit limit
    (ADA, b'{"user_id": 1e400}', 403),                        # a float (inf): another type
    (ADA, b'{"user_id": "42\xff"}', 400),                     # not UTF-8
    (None, b'{"user_id": 42}', 401),
])
def test_ownership_in_the_body(claims, body, status):
    app, seen = client(claims)
    response = post(app, "/api/matching/swipe", body)
    assert response.status_int == status, response.text
    if status == 200:
        assert seen == [body]                  # byte for byte
    else:
        assert seen == []                      # the upstream untouched
        error = response.json["error"]
        assert error["code"] == status and error["message"]
        assert "42" not in error["message"]     # never a claim or a body value


def test_the_body_is_replayed_with_a_consistent_length():
    app, seen = client(ADA)
    body = b'{"user_id": 42, "note": "caf\xc3\xa9"}'
    response = post(app, "/api/matching/swipe", body)
    assert response.status_int == 200
    assert seen == [body]


def test_a_body_not_declared_json_is_415_and_not_forwarded():
    app, seen = client(ADA)
    response = post(app, "/api/matching/swipe", b'{"user_id": 42}', content_type="text/plain")
    assert response.status_int == 415 and seen == []
    response = post(app, "/api/matching/swipe", b'{"user_id": 42}',
                    content_type="application/vnd.meetinity+json; charset=utf-8")
    assert response.status_int == 200


def test_a_body_over_the_limit_is_413_and_not_forwarded():
    app, seen = client(ADA, body_limit=64)
    body = json.dumps({"user_id": 42, "pad": "x" * 100}).encode()
    response = post(app, "/api/matching/swipe", body)
    assert response.status_int == 413 and seen == []
    assert response.json["error"]["code"] == 413


def test_an_unterminated_upload_is_read_up_to_the_limit_and_replayed_with_a_length():
    body = b'{"user_id": 42}'
    environ = {"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True,
               "HTTP_TRANSFER_ENCODING": "chunked"}
    assert read_request_body(environ, 64) == body
    assert environ["CONTENT_LENGTH"] == str(len(body))
    assert "HTTP_TRANSFER_ENCODING" not in environ
    assert environ["wsgi.input"].read() == body
    environ = {"wsgi.input": io.BytesIO(b"x" * 65), "wsgi.input_terminated": True}
    with pytest.raises(Exception) as info:
        read_request_body(environ, 64)
    assert info.value.code == 413


def test_a_short_body_is_400():
    environ = {"wsgi.input": io.BytesIO(b'{"a"'), "CONTENT_LENGTH": "20"}
    with pytest.raises(Exception) as info:
        read_request_body(environ, 64)
    assert info.value.code == 400


class _BrokenUpload(io.RawIOBase):
    """A ``wsgi.input`` that fails mid-read, as gunicorn's does for a malformed chunk
    (``InvalidChunkSize``) or an upload cut short (``NoMoreData``)."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.served = False

    def readable(self) -> bool:
        return True

    def read(self, size=-1):
        if not self.served:
            self.served = True
            return b'{"user'
        raise self.error


@pytest.mark.parametrize("error", [ValueError("Invalid chunk size: b'zz'"),
                                   IOError("No more data"), TimeoutError("timed out")])
@pytest.mark.parametrize("framing", [{"CONTENT_LENGTH": "40"},
                                     {"wsgi.input_terminated": True}])
def test_an_upload_the_server_cannot_read_is_400_not_500(error, framing):
    environ = {"wsgi.input": _BrokenUpload(error), **framing}
    with pytest.raises(Exception) as info:
        read_request_body(environ, 64)
    assert info.value.code == 400, info.value
    assert "could not be read" in info.value.message


def test_an_admin_alternative_never_reads_the_body():
    app, seen = client(ADMIN)
    response = post(app, "/api/events/5/bookmark", b"not json at all", content_type="text/plain")
    assert response.status_int == 200 and seen == [b"not json at all"]


def test_email_binding_and_a_claim_list():
    app, _ = client(ADA)
    assert post(app, "/api/events/5/join", b'{"email": "ada@example.com"}').status_int == 200
    assert post(app, "/api/events/5/join", b'{"email": "bob@example.com"}').status_int == 403
    assert post(app, "/api/events/5/join", b'{"email": "ADA@example.com"}').status_int == 403


def test_the_refusal_is_recorded_for_the_access_log():
    environ_seen = {}

    def probe(environ, start_response):  # pragma: no cover - never reached
        raise AssertionError("forwarded")

    app = AuthorizeMiddleware(probe, rules=RULES)

    def start_response(status, headers, exc_info=None):
        environ_seen["status"] = status

    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/matching/swipe",
               "CONTENT_TYPE": JSON, "CONTENT_LENGTH": "2", "wsgi.input": io.BytesIO(b"[]"),
               CLAIMS_KEY: ADA}
    app(environ, start_response)
    assert environ_seen["status"].startswith("400") and environ[AUTHZ_DENIED_KEY] == "body"


@pytest.mark.parametrize("text, message", [
    ("sub=body.user.id", "no nesting"),
    ("sub=body.", "no nesting"),
    ("sub=body.a b", "no nesting"),
])
def test_bad_body_conditions(text, message):
    with pytest.raises(ValueError, match=message):
        parse_requirement(text)


def test_body_conditions_describe_themselves():
    (alt,), = [parse_requirement("sub=body.user_id")]
    assert str(alt[0]) == "sub=body.user_id"


# -- property tests: the gateway reads a body as the service will, or refuses it ------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                         st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=4),
       st.one_of(st.integers(), st.text(max_size=6), st.booleans(), st.none(),
                 st.floats(allow_nan=False, allow_infinity=False)),
       st.sampled_from(["42", "7", "1"]), st.booleans())
def test_property_allowed_only_when_the_field_is_the_claim(doc, user_id, sub, ascii_only):
    doc = dict(doc, user_id=user_id)
    body = json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8")
    app, seen = client({"sub": sub})
    response = post(app, "/api/matching/swipe", body)
    # What Flask's request.get_json() reads is what the gateway compared.
    read = json.loads(body)["user_id"]
    same = (not isinstance(read, bool) and isinstance(read, (int, str)) and str(read) == sub)
    assert response.status_int == (200 if same else 403)
    assert seen == ([body] if same else [])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["user_id", "a", "b"]), json_scalars), min_size=1,
                max_size=5))
def test_property_a_repeated_key_is_always_refused(pairs):
    body = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()
    keys = [k for k, _ in pairs]
    app, seen = client({"sub": "42"})
    response = post(app, "/api/matching/swipe", body)
    if len(set(keys)) < len(keys):
        assert response.status_int == 400 and seen == []
    else:
        assert response.status_int in (200, 403)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=-(10 ** 60), max_value=10 ** 60), st.sampled_from(
    ["{}", "{}.0", "{}e0", '"{}"', '" {}"', '"{} "', "{}.5"]))
def test_property_numbers_in_every_spelling(number, spelling):
    text = spelling.format(number)
    body = b'{"user_id": ' + text.encode() + b"}"
    app, _ = client({"sub": str(number)})
    response = post(app, "/api/matching/swipe", body)
    # Only the integer and the exact string name the caller; 1.0, 1e0, " 1" do not.
    assert response.status_int == (200 if spelling in ("{}", '"{}"') else 403)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40))
def test_property_any_bytes_never_crash_and_never_pass_unless_json(data):
    app, seen = client({"sub": "42"})
    response = post(app, "/api/matching/swipe", data)
    assert response.status_int in (200, 400, 403)
    if response.status_int == 200:
        assert loads_strict(data)["user_id"] in (42, "42") and seen == [data]


def test_loads_strict_refuses_what_parsers_disagree_on():
    for data in (b'{"a":1,"a":1}', b'{"x":{"a":1,"a":2}}', b"\xef\xbb\xbf{}", b"Infinity",
                 b"-Infinity", b"NaN", "{}".encode("utf-32")):
        with pytest.raises(BodyError):
            loads_strict(data)
    assert loads_strict(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001F600"}


# -- field filters --------------------------------------------------------------------------

PUBLIC = "id, name, title"
FILTERS = {
    "user_public": f"GET /api/users/<id> unless sub=<id> or role=admin -> body.user allow {PUBLIC}",
    "search": "GET /api/users/search -> body.items[] allow id, name",
    "deny": "GET /api/things/* -> body deny secret",
}
ALICE = {"id": 7, "name": "Alice", "title": "CTO", "email": "alice@example.com",
         "sessions": [{"ip_address": "10.0.0.1"}], "privacy_settings": {"show_email": False}}


def answering(payload, status="200 OK", content_type=JSON, extra=()):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()

    def app(environ, start_response):
        start_response(status, [("Content-Type", content_type),
                                ("Content-Length", str(len(data))), ("ETag", '"x"'), *extra])
        return [data[i:i + 10] for i in range(0, len(data), 10)] or [b""]
    return app


def filtered(claims, path, payload, **kwargs):
    extra = kwargs.pop("extra", ())
    status = kwargs.pop("status", "200 OK")
    content_type = kwargs.pop("content_type", JSON)
    app, _ = client(claims, rules={"all": "/* -> authenticated"}, fields=FILTERS,
                    answer=answering(payload, status, content_type, extra), **kwargs)
    return app.get(path, status="*", expect_errors=True)


def test_another_user_sees_only_the_public_fields():
    response = filtered(ADA, "/api/users/7", {"user": ALICE})
    assert response.status_int == 200
    assert response.json == {"user": {"id": 7, "name": "Alice", "title": "CTO"}}
    assert response.headers["Content-Length"] == str(len(response.body))
    assert "ETag" not in response.headers


def test_the_owner_and_an_admin_see_everything():
    for claims in ({"sub": "7"}, ADMIN):
        response = filtered(claims, "/api/users/7", {"user": ALICE})
        assert response.json == {"user": ALICE}


def test_search_results_are_filtered_record_by_record():
    payload = {"items": [ALICE, dict(ALICE, id=8, email="x@example.com")], "total": 2}
    response = filtered({"sub": "7"}, "/api/users/search?q=a", payload)
    assert response.json == {"items": [{"id": 7, "name": "Alice"}, {"id": 8, "name": "Alice"}],
                             "total": 2}
    assert "email" not in response.text


def test_a_deny_list_at_the_top_level():
    response = filtered(ADA, "/api/things/1", {"secret": 1, "open": 2})
    assert response.json == {"open": 2}


@pytest.mark.filterwarnings("ignore:Content-Length and the number of bytes")
@pytest.mark.parametrize("payload, kwargs", [
    (b"<html>Alice alice@example.com</html>", {"content_type": "text/html"}),
    (b'{"user": {"email": "alice@example.com"', {}),                       # truncated
    (b'{"user": {"email": "alice@example.com"}, "user": {}}', {}),          # twice
    ({"users": ALICE}, {}),                                                  # another shape
    ({"user": [ALICE]}, {}),
    ({"user": ALICE}, {"extra": [("Content-Encoding", "gzip")]}),
    ({"user": ALICE, "pad": "x" * 400}, {"fields_limit": 256}),
])
def test_an_unreadable_answer_is_502_never_the_unfiltered_body(payload, kwargs):
    response = filtered(ADA, "/api/users/7", payload, **kwargs)
    assert response.status_int == 502
    assert "alice@" not in response.text
    assert response.json["error"]["code"] == 502


def test_error_answers_pass_as_they_are():
    response = filtered(ADA, "/api/users/7", {"error": {"code": 404, "message": "not found"}},
                        status="404 NOT FOUND")
    assert response.status_int == 404 and response.json["error"]["code"] == 404


def test_a_filtered_request_asks_for_an_uncompressed_whole_answer():
    seen = {}

    def app(environ, start_response):
        seen.update(environ)
        return answering({"user": ALICE})(environ, start_response)

    middleware = AuthorizeMiddleware(LintMiddleware(app), rules={"all": "/* -> authenticated"},
                                     fields=FILTERS)
    TestApp(LintMiddleware(middleware), extra_environ={CLAIMS_KEY: ADA}).get(
        "/api/users/7", headers={"Accept-Encoding": "gzip", "Range": "bytes=0-10"})
    assert "HTTP_ACCEPT_ENCODING" not in seen and "HTTP_RANGE" not in seen


def test_head_of_a_filtered_route_has_no_stale_length():
    app, _ = client(ADA, rules={"all": "/* -> authenticated"}, fields=FILTERS,
                    answer=answering(b""))
    response = app.head("/api/users/7")
    assert response.status_int == 200 and "Content-Length" not in response.headers


@pytest.mark.parametrize("spec, message", [
    ("GET /api/users/<id> -> user allow a", "expected"),
    ("GET /api/users/<id> -> body.a.b allow a", "body.KEY"),
    ("GET /api/users/<id> -> body allow a.b", "top-level"),
    ("GET /api/users/<id> unless sub=<nope> -> body allow a", "not in the rule's path"),
    ("GET /api/users/<id> unless sub=body.x -> body allow a", "request body"),
    ("GET /api/users/<id> -> body keep a", "expected"),
])
def test_bad_field_filters(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_field_filter("x", spec)


def test_field_filters_that_tie_and_bad_limits_are_config_errors():
    with pytest.raises(ConfigError, match="fields.b"):
        AuthorizeMiddleware(None, fields={"a": "GET /x/<id> -> body allow a",
                                          "b": "GET /x/<n> -> body deny a"})
    with pytest.raises(ConfigError, match="fields_limit"):
        AuthorizeMiddleware(None, fields_limit=0)
    describe = AuthorizeMiddleware(None, fields=FILTERS).describe()
    assert any(line.startswith("fields user_public: GET /api/users/<id> unless sub=<id> or "
                               "role=admin -> body.user allow id, name, title")
               for line in describe)


@pytest.mark.parametrize("path", ["/api/users//7", "/api/users/7/", "/api/users/07"])
def test_other_spellings_of_another_users_record_are_filtered_too(path):
    response = filtered({"sub": "7"} if path.endswith("07") else ADA, path, {"user": ALICE})
    assert response.json == {"user": {"id": 7, "name": "Alice", "title": "CTO"}}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["id", "name", "email", "sessions", "title"]),
                                json_values, max_size=5), max_size=4))
def test_property_a_filtered_answer_never_holds_a_field_outside_the_allow_list(records):
    payload = {"items": records, "total": len(records)}
    spec = "GET /api/users/search -> body.items[] allow id, name"
    app, _ = client(ADA, rules={"all": "/* -> authenticated"}, fields={"s": spec},
                    answer=answering(payload))
    response = app.get("/api/users/search?q=x")
    assert response.status_int == 200
    items = response.json["items"]
    assert len(items) == len(records)
    for got, record in zip(items, records):
        assert set(got) <= {"id", "name"}
        assert got == {k: v for k, v in record.items() if k in ("id", "name")}


@pytest.mark.parametrize("key, value, message", [
    ("fields.bad", "GET /x -> nowhere allow a", "fields.bad"),
    ("body_limit", "lots", "body_limit"),
    ("fields_limit", "0", "fields_limit"),
    ("rule.bad", "/x -> sub=body.a.b", "rule.bad"),
])
def test_ini_errors_name_file_key_and_value(key, value, message):
    from meetinity_gateway.middleware.authorize import filter_factory

    with pytest.raises(ConfigError) as info:
        filter_factory({"__file__": "gateway.ini"}, **{key: value})
    text = str(info.value)
    assert message in text and "gateway.ini" in text and value in text
