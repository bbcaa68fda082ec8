"""The authorization layer alone (webtest + LintMiddleware), its parser, and its ini errors."""
from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware

from meetinity_gateway.assembly import load_pipeline
from meetinity_gateway.config import ConfigError
from meetinity_gateway.keys import AUTHZ_DENIED_KEY, CLAIMS_KEY
from meetinity_gateway.middleware.authorize import (
    AuthorizeMiddleware,
    filter_factory,
    parse_requirement,
    parse_rule,
)
from meetinity_gateway.middleware.observe import ObserveMiddleware

RULES = {
    "users": "/api/users/* -> authenticated",
    "users_list": "GET /api/users -> role=admin",
    "users_create": "POST /api/users -> role=admin",
    "user_own": "PUT, PATCH, DELETE, POST /api/users/<id>/* -> sub=<id>",
    "reports": "/api/reports/* -> scope:reports.read or role=admin",
    "both": "/api/both -> role=staff and scope:write",
    "login": "/api/auth/* -> anonymous",
    "typed": "GET /api/things/<int:n> -> level=<n>",
}

ADA = {"sub": 42, "email": "ada@example.com"}
BOB = {"sub": "7"}
ADMIN = {"sub": 1, "role": "admin"}


def inner(environ, start_response):
    body = json.dumps({"ok": True}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def client(claims=None, rules=RULES, **kwargs):
    calls = []

    def recording(environ, start_response):
        calls.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
        return inner(environ, start_response)

    middleware = AuthorizeMiddleware(LintMiddleware(recording), rules=rules, **kwargs)
    extra = {} if claims is None else {CLAIMS_KEY: claims}
    return TestApp(LintMiddleware(middleware), extra_environ=extra), calls


@pytest.mark.parametrize("claims, method, path, status", [
    # The owner changes their own resource and its sub-resources; nobody else does.
    (ADA, "PUT", "/api/users/42", 200),
    (ADA, "DELETE", "/api/users/42", 200),
    (ADA, "POST", "/api/users/42/photo", 200),
    (ADA, "PATCH", "/api/users/42/", 200),
    (ADA, "PUT", "/api/users/7", 403),
    (ADA, "DELETE", "/api/users/7/photo", 403),
    (BOB, "PUT", "/api/users/7", 200),  # a string sub equals the segment too
    (ADMIN, "DELETE", "/api/users/42", 403),  # the owner only
    # Reading another user's profile: any signed-in user.
    (ADA, "GET", "/api/users/7", 200),
    (ADA, "HEAD", "/api/users/7", 200),
    (ADA, "GET", "/api/users/search", 200),
    # Listing and creating users: admins.
    (ADA, "GET", "/api/users", 403),
    (ADMIN, "GET", "/api/users", 200),
    (ADA, "POST", "/api/users", 403),
    (ADMIN, "POST", "/api/users", 200),
    ({"sub": 5, "role": ["staff", "admin"]}, "GET", "/api/users", 200),  # a list claim
    ({"sub": 5, "role": "administrator"}, "GET", "/api/users", 403),
    ({"sub": 5, "role": ["administrator"]}, "GET", "/api/users", 403),
    # Scopes: space-separated "scope", or "scp" as a list or a string.
    ({"sub": 5, "scope": "profile reports.read"}, "GET", "/api/reports/1", 200),
    ({"sub": 5, "scp": ["reports.read"]}, "GET", "/api/reports/1", 200),
    ({"sub": 5, "scp": "reports.read"}, "GET", "/api/reports", 200),
    ({"sub": 5, "scope": "reports.readonly"}, "GET", "/api/reports", 403),
    ({"sub": 5, "scope": ["reports"]}, "GET", "/api/reports", 403),
    # and: every condition.
    ({"sub": 5, "role": "staff", "scope": "write"}, "GET", "/api/both", 200),
    ({"sub": 5, "role": "staff"}, "GET", "/api/both", 403),
    # Anonymous rules, and the default for paths no rule covers.
    (None, "POST", "/api/auth/login", 200),
    (ADA, "POST", "/api/auth/login", 200),
    (None, "GET", "/elsewhere", 401),
    (ADA, "GET", "/elsewhere", 200),
    # A typed parameter compares as text: 3 == "3".
    ({"sub": 1, "level": "3"}, "GET", "/api/things/3", 200),
    ({"sub": 1, "level": 3}, "GET", "/api/things/3", 200),
    ({"sub": 1, "level": 4}, "GET", "/api/things/3", 403),
])
def test_decisions(claims, method, path, status):
    app, calls = client(claims)
    response = app.request(path, method=method, status=status)
    assert (calls != []) == (status == 200)
    if status != 200:
        assert response.json["error"]["code"] == status


@pytest.mark.parametrize("path", [
    "/api/users//42", "/api/users/42//", "//api/users/42", "/api/users/042",
    "/api/users/%D9%A7",  # U+0667 ARABIC-INDIC DIGIT SEVEN (a Python int() reads 7)
    "/api/users/%EF%BC%97",  # U+FF17 FULLWIDTH DIGIT SEVEN
    "/api/users/7;x", "/api/users/7.0", "/api/users/+7",
])
def test_other_spellings_of_someone_elses_id_are_refused(path):
    # A service's int converter may read all of these as 7 (or 42 for the owner's: refused
    # anyway, it is not the owner's exact id): only the exact segment passes.
    app, calls = client(BOB if "42" not in path else {"sub": 7})
    app.request(path, method="DELETE", status=403)
    assert calls == []


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method",
                                    "X-Method-Override"])
def test_a_method_override_must_be_allowed_too(header):
    app, calls = client(ADA)
    app.get("/api/users/7", headers={header: "delete"}, status=403)
    app.post("/api/users/42", headers={header: "PUT"}, status=200)
    assert calls == [("POST", "/api/users/42")]


def test_no_claims_is_401_naming_the_rule_and_the_denial_is_in_the_environ():
    seen = {}

    def spy(environ, start_response):
        response = middleware(environ, start_response)
        seen.update(environ)
        return response

    middleware = AuthorizeMiddleware(inner, rules=RULES)
    response = TestApp(LintMiddleware(spy)).put("/api/users/7", status=401)
    assert response.json["error"] == {
        "code": 401, "message": "rule user_own requires a signed-in caller (sub=<id>)",
        "request_id": None}
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="meetinity"'
    assert seen[AUTHZ_DENIED_KEY] == "user_own"


def test_403_names_the_rule_never_a_claim_value():
    app, _ = client({"sub": "secret-subject-9", "role": "pw=hunter2"})
    response = app.get("/api/users", status=403)
    assert response.json["error"]["message"] == "forbidden by rule users_list: requires role=admin"
    assert "hunter2" not in response.text and "secret-subject-9" not in response.text
    assert response.content_type == "application/json"


def test_the_access_log_records_the_refusing_rule(caplog):
    caplog.set_level(logging.INFO, logger="meetinity_gateway.access")
    app = TestApp(ObserveMiddleware(AuthorizeMiddleware(inner, rules=RULES), metrics=False),
                  extra_environ={CLAIMS_KEY: ADA, "REMOTE_ADDR": "127.0.0.1"})
    app.delete("/api/users/7", status=403)
    app.get("/api/users/7")
    records = [json.loads(r.msg.to_json()) for r in caplog.records
               if r.name == "meetinity_gateway.access"]
    assert [(r["status"], r.get("authz_denied")) for r in records] == [
        (403, "user_own"), (200, None)]


def test_default_is_authenticated_when_used_alone():
    app, _ = client(None, rules={})
    app.get("/anything", status=401)
    app, _ = client(ADA, rules={})
    app.get("/anything", status=200)
    app, _ = client(ADA, rules={}, default="role=admin")
    app.get("/anything", status=403)


def test_describe_is_the_policy_table():
    middleware = AuthorizeMiddleware(inner, rules={"own": "PUT,DELETE /u/<id> -> sub=<id>"},
                                     default="anonymous")
    assert middleware.describe() == ["own: DELETE,PUT /u/<id> -> sub=<id>",
                                     "default: anonymous"]


def test_custom_scope_claims():
    app, _ = client({"sub": 1, "permissions": ["reports.read"]}, scope_claims=["permissions"])
    app.get("/api/reports", status=200)
    app, _ = client({"sub": 1, "scope": "reports.read"}, scope_claims=["permissions"])
    app.get("/api/reports", status=403)


# -- the parser -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("/api/x -> role!=admin", "unknown claim operator '!='"),
    ("/api/x -> role~admin", "unknown claim operator '~'"),
    ("/api/x -> role>admin", "unknown claim operator '>'"),
    ("/api/x -> role:admin", "unknown claim operator ':'"),
    ("/api/users/<int:id> -> sub=<uid>", "parameter <uid> is not in the rule's path"),
    ("/api/users -> sub=<id>", "parameter <id> is not in the rule's path"),
    ("/api/x -> ", "expected"),
    ("/api/x -> role=", "expected"),
    ("/api/x -> role=a b", "one word"),
    ("/api/x -> scope:", "expected scope:NAME"),
    ("/api/x -> authenticated and", "expected"),
    ("api/x -> anonymous", "expected"),
    ("/api/<foo:x> -> anonymous", "unknown converter"),
    ("G3T /x -> anonymous", "expected"),
])
def test_bad_rules(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_rule("bad", spec)


def test_requirements_parse_into_alternatives():
    requirement = parse_requirement("role=admin or sub=<id> and scope:x", {"id"})
    assert [[str(c) for c in alt] for alt in requirement] == [
        ["role=admin"], ["sub=<id>", "scope:x"]]


@settings(max_examples=200, deadline=None, print_blob=True)
@given(st.text(max_size=40))
def test_parser_never_crashes(text):
    try:
        parse_rule("r", "/api/x/<id> -> " + text)
    except ValueError:
        pass


# -- ini: every bad input is a ConfigError naming file, section, key and value ----------------

INI = """[pipeline:main]
pipeline = authorize gateway

[filter:authorize]
use = egg:meetinity_gateway#authorize
default = anonymous
{rules}

[app:gateway]
use = egg:meetinity_gateway#main
upstream.users = http://127.0.0.1:5999
upstream.events = {events_url}
route.users = /api/users/* -> users /users
route.events = /api/events/* -> events /events
route.swipe = POST /api/swipe -> users /swipe
"""


def write(tmp_path, rules, events_url="http://127.0.0.1:5998"):
    path = tmp_path / "gw.ini"
    path.write_text(INI.format(rules=rules, events_url=events_url))
    return path


@pytest.mark.parametrize("rule, message", [
    ("rule.x = /api/users -> role!=admin", "unknown claim operator '!='"),
    ("rule.x = /api/users/<int:id> -> sub=<uid>", "parameter <uid> is not in the rule's path"),
    ("rule.x = /api/nothing/* -> authenticated", "no route serves /api/nothing"),
    ("rule.x = /api/user -> authenticated", "no route serves /api/user"),
    ("rule.x = GET /api/swipe -> authenticated", "no route serves GET /api/swipe"),
    ("rule.x = /api/users/* -> authenticated\nrule.y = /api/users/* -> anonymous",
     "covers the same requests as rule x"),
])
def test_bad_rules_in_the_ini_name_file_section_key_value(tmp_path, rule, message):
    path = write(tmp_path, rule)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    error = info.value
    key, _, value = rule.splitlines()[-1].partition(" = ")
    assert (error.file, error.section, error.key, error.value) == (
        str(path), "filter:authorize", key, value)
    assert message in error.message
    assert f"{path} [filter:authorize] {key} = {value!r}: " in str(error)


def test_unknown_keys_and_bad_defaults(tmp_path):
    for extra, key in [("colour = blue", "colour"), ("default = role<admin", "default")]:
        path = write(tmp_path, extra)
        if extra.startswith("default"):
            path.write_text(path.read_text().replace("default = anonymous\n", ""))
        with pytest.raises(ConfigError) as info:
            load_pipeline(path)
        assert (info.value.file, info.value.section, info.value.key) == (
            str(path), "filter:authorize", key)


def test_rules_for_routes_of_an_unmounted_service_are_fine(tmp_path):
    path = write(tmp_path, "rule.events = /api/events/* -> authenticated", events_url="")
    pipeline = load_pipeline(path)
    assert pipeline.router.unmounted_upstreams == ["events"]
    assert pipeline.layers["authorize"].describe()[0] == "events: * /api/events/* -> authenticated"


def test_filter_factory_alone_knows_the_file():
    with pytest.raises(ConfigError) as info:
        filter_factory({"__file__": "gw.ini"}, **{"rule.x": "/a -> role=>admin"})
    assert (info.value.file, info.value.key, info.value.value) == (
        "gw.ini", "rule.x", "/a -> role=>admin")
