"""The error edge, alone around small WSGI apps (webtest + LintMiddleware)."""
from __future__ import annotations

import logging

import pytest
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

from meetinity_gateway.config import ConfigError
from meetinity_gateway.middleware.errors import ErrorMiddleware, filter_factory, unsafe_path_reason
from meetinity_gateway.problems import REQUEST_ID_KEY
from tests.servers import WaitressServer, session


def echo_app(environ, start_response):
    body = "|".join([
        environ.get(REQUEST_ID_KEY, ""), environ.get("HTTP_X_REQUEST_ID", ""),
    ]).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                              ("X-Request-ID", "upstream-said-this")])
    return [body]


def boom_app(environ, start_response):
    raise RuntimeError("secret internals: db password is hunter2")


def lazy_boom_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body():
        raise RuntimeError("failed before the first byte")
        yield b""  # pragma: no cover

    return body()


def late_boom_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body():
        yield b"first part"
        raise RuntimeError("failed mid-body")

    return body()


def client(app, **kwargs) -> TestApp:
    return TestApp(LintMiddleware(ErrorMiddleware(LintMiddleware(app), **kwargs)))


def test_keeps_a_sane_request_id_and_replaces_upstreams():
    response = client(echo_app).get("/x", headers={"X-Request-ID": "req-1.2:3"})
    assert response.text == "req-1.2:3|req-1.2:3"
    assert response.headers.getall("X-Request-ID") == ["req-1.2:3"]


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "é", "a\tb", "<script>"])
def test_replaces_an_insane_request_id(bad):
    response = client(echo_app).get("/x", headers={"X-Request-ID": bad} if bad else {})
    generated = response.headers["X-Request-ID"]
    assert generated != bad and len(generated) == 32
    assert response.text == f"{generated}|{generated}"


def test_exception_becomes_json_500_without_internals(caplog):
    with caplog.at_level(logging.ERROR, logger="meetinity_gateway.errors"):
        response = client(boom_app).get("/x", headers={"X-Request-ID": "r1"}, status=500)
    assert response.json == {"error": {"code": 500, "message": "internal error",
                                       "request_id": "r1"}}
    assert "hunter2" not in response.text and "Traceback" not in response.text
    assert response.headers["X-Request-ID"] == "r1"
    # ...but the log has everything, with the request id.
    assert "r1" in caplog.text and "hunter2" in caplog.text


def test_exception_before_first_byte_of_a_lazy_body_is_still_json_500():
    # Replacing a started response (start_response with exc_info) needs a real server:
    # webtest keeps the first status it was given.
    with WaitressServer(ErrorMiddleware(lazy_boom_app)) as server:
        response = session().get(server.url + "/x")
    assert response.status_code == 500
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == 500


def test_exception_after_first_byte_is_logged_and_reraised(caplog):
    app = ErrorMiddleware(late_boom_app)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "wsgi.url_scheme": "http"}
    body = app(environ, lambda status, headers, exc_info=None: None)
    with caplog.at_level(logging.ERROR, logger="meetinity_gateway.errors"):
        with pytest.raises(RuntimeError, match="mid-body"):
            list(body)
    body.close()
    assert "while streaming" in caplog.text


# werkzeug's lint does not know that a HEAD answer keeps the GET's Content-Length.
@pytest.mark.filterwarnings("ignore:Content-Length and the number of bytes")
def test_head_error_has_no_body():
    response = Client(LintMiddleware(ErrorMiddleware(boom_app))).head("/x")
    assert response.status_code == 500
    assert response.data == b""
    response.close()


@pytest.mark.parametrize("path, raw, reason", [
    ("/api/users/../auth", None, "dot-segment"),
    ("/api/./users", None, "dot-segment"),
    ("/api/users/..", None, "dot-segment"),
    ("/api/auth/../users/1", "/api/auth/..%2Fusers%2F1", "encoded slash"),
    ("/a/b", "/a%2fb", "encoded slash"),
    ("/a\\b", "/a%5Cb", "encoded slash"),
    ("/api/auth/../users", "/api/auth/%2e%2e/users", "dot-segment"),
    ("/a\\..\\b", None, "backslash"),
    ("/a\x00b", None, "control character"),
    ("/a/%2e%2e/b", "/a/%252e%252e/b", "double-encoded"),
])
def test_unsafe_paths(path, raw, reason):
    assert reason in unsafe_path_reason(path, raw)


@pytest.mark.parametrize("path_info, raw", [
    ("/", "/"), ("/api/users/7", "/api/users/7?x=../y"), ("/a/..b/c.", "/a/..b/c."),
    ("/x/...", "/x/..."), ("/caf\xc3\xa9", "/caf%C3%A9"), ("/100%", "/100%25"),
    ("/a b", "/a%20b"),
])
def test_safe_paths(path_info, raw):
    assert unsafe_path_reason(path_info, raw) is None
    assert unsafe_path_reason(path_info) is None


def test_unsafe_path_is_a_json_400_before_the_app_runs():
    called = []

    def app(environ, start_response):  # pragma: no cover - must not run
        called.append(environ)
        return echo_app(environ, start_response)

    # webtest sets no REQUEST_URI: pass the raw target as waitress would.
    response = client(app).get("/api/auth/..%2Fusers", status=400,
                               extra_environ={"REQUEST_URI": "/api/auth/..%2Fusers"})
    assert response.json["error"]["message"] == "encoded slash in path"
    assert response.json["error"]["request_id"] == response.headers["X-Request-ID"]
    assert called == []


def test_path_checks_can_be_turned_off():
    response = client(echo_app, check_paths=False).get("/a/%2e%2e/b")
    assert response.status_int == 200


def test_filter_factory_casts_and_rejects_unknown_keys():
    make = filter_factory({"__file__": "gw.ini"}, check_paths="false",
                          request_id_header="X-Correlation-ID")
    app = TestApp(make(echo_app))
    response = app.get("/x", headers={"X-Correlation-ID": "c-1"})
    assert response.headers["X-Correlation-ID"] == "c-1"
    with pytest.raises(ConfigError) as info:
        filter_factory({"__file__": "gw.ini"}, check_path="no")
    assert "gw.ini" in str(info.value) and "check_path" in str(info.value)
    with pytest.raises(ConfigError, match="check_paths = 'maybe'"):
        filter_factory({}, check_paths="maybe")


# -- control characters and dot-segments with parameters (issue 11, point 7) ----------------

DOT_PARAM_SEGMENTS = ["..;", "..;x", ".;", ".;x", "%2e%2e;x", "%2E%2e;", "%2e;", ".%2e;a=b",
                      "..%3b", "..%3Bjsessionid=1", "%2e%2e%3b", ".%3B"]


@pytest.mark.parametrize("segment", DOT_PARAM_SEGMENTS)
def test_dot_segments_with_parameters_are_refused(segment):
    raw = f"/api/auth/{segment}/users/1"
    decoded = raw.replace("%2e", ".").replace("%2E", ".").replace("%3b", ";").replace("%3B", ";")
    assert unsafe_path_reason(decoded, raw) == "dot-segment in path"
    assert unsafe_path_reason(decoded) == "dot-segment in path"  # no REQUEST_URI either


@pytest.mark.parametrize("path_info, raw", [
    ("/a/..b;c/d", "/a/..b;c/d"), ("/a/b;..", "/a/b;.."), ("/a/...;x", "/a/...;x"),
    ("/a;b/c", "/a;b/c"), ("/users/7;v=1", "/users/7;v=1"),
])
def test_parameters_on_other_segments_are_fine(path_info, raw):
    assert unsafe_path_reason(path_info, raw) is None


@pytest.mark.parametrize("byte", [*range(0x20), 0x7F])
def test_control_characters_anywhere_in_the_raw_target_are_refused(byte):
    char = chr(byte)
    # waitress hands over PATH_INFO and QUERY_STRING with TAB/CR/LF deleted: only the raw
    # target still shows them.
    for path_info, raw, query in [
        ("/api/x", f"/api/x?next=java{char}script:", "next=javascript:"),
        ("/api/x", f"/api/x{char}", ""),
        ("/api/xy", f"/api/x{char}y", ""),
    ]:
        assert "control character" in unsafe_path_reason(path_info, raw, query)
    # Without REQUEST_URI: the query and the decoded path are checked.
    assert "control character" in unsafe_path_reason("/a", None, f"q={char}")
    assert "control character" in unsafe_path_reason(f"/a{char}", None, "")


@pytest.mark.parametrize("code", ["%00", "%09", "%0a", "%0D", "%1f", "%7F", "%7f"])
def test_encoded_control_characters_in_the_path_are_refused_in_the_query_they_are_data(code):
    decoded = "/api/x" + chr(int(code[1:], 16))
    assert "control character" in unsafe_path_reason(decoded, f"/api/x{code}")
    assert unsafe_path_reason("/api/x", f"/api/x?q=a{code}b", f"q=a{code}b") is None


def test_control_character_in_query_is_a_json_400_before_the_app_runs():
    called = []

    def app(environ, start_response):  # pragma: no cover - must not run
        called.append(environ)
        return echo_app(environ, start_response)

    response = client(app).get("/x", status=400, extra_environ={
        "REQUEST_URI": "/x?next=java\tscript:", "QUERY_STRING": "next=javascript:"})
    assert response.json["error"]["message"] == "control character in request target"
    assert called == []
