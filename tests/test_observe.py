"""The observability layer: alone around small WSGI apps (webtest + LintMiddleware), then end
to end through the shipped gateway.ini under waitress, and in real processes."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from webtest import TestApp
from werkzeug.middleware.lint import LintMiddleware

from meetinity_gateway.config import ConfigError
from meetinity_gateway.keys import (
    AUTH_ERROR_KEY,
    TARGET_KEY,
    TRACE_ID_KEY,
    UPSTREAM_ERROR_KEY,
    UPSTREAM_KEY,
    UPSTREAM_MS_KEY,
)
from meetinity_gateway.logs import (
    AccessRecord,
    BufferedStreamHandler,
    JsonFormatter,
    configure_logging,
    without_query,
)
from meetinity_gateway.middleware.errors import ErrorMiddleware
from meetinity_gateway.middleware.observe import (
    ObserveMiddleware,
    filter_factory,
    new_traceparent,
    parse_traceparent,
)
from meetinity_gateway.problems import REQUEST_ID_KEY, assign_request_id, random_hex
from tests.conftest import wait_until
from tests.test_errors import late_boom_app
from tests.servers import (
    GatewayProcess,
    WaitressServer,
    auth_headers,
    free_port,
    make_token,
    session,
    write_ini,
)

LOOPBACK = {"REMOTE_ADDR": "127.0.0.1"}
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")


def app_setting(**keys):
    """A WSGI app that leaves ``keys`` in the environ (as inner layers do) and echoes trace
    headers."""
    status = keys.pop("status", "200 OK")

    def app(environ, start_response):
        environ.update(keys)
        body = json.dumps({
            "traceparent": environ.get("HTTP_TRACEPARENT"),
            "tracestate": environ.get("HTTP_TRACESTATE"),
            "trace_id": environ.get(TRACE_ID_KEY),
        }).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body)))])
        return [body]

    return app


def boom_app(environ, start_response):
    raise RuntimeError("boom")


def client(app, **kwargs) -> tuple[TestApp, ObserveMiddleware]:
    middleware = ObserveMiddleware(LintMiddleware(app), **kwargs)
    return TestApp(LintMiddleware(middleware), extra_environ=LOOPBACK), middleware


@pytest.fixture
def access(caplog):
    """The access records logged during the test, as dicts (from their JSON rendering)."""
    caplog.set_level(logging.INFO, logger="meetinity_gateway.access")

    def records():
        return [json.loads(record.msg.to_json()) for record in caplog.records
                if record.name == "meetinity_gateway.access"]

    return records


def sample(middleware, name, **labels):
    return middleware.registry.get_sample_value(name, labels)


# -- access log -------------------------------------------------------------------------------

def test_access_record_has_every_field(access):
    app, _ = client(app_setting(**{
        REQUEST_ID_KEY: "req-1", "meetinity_gateway.route": "users",
        UPSTREAM_KEY: "user_service", TARGET_KEY: "127.0.0.1:5001", UPSTREAM_MS_KEY: 1.23456,
        "meetinity_gateway.claims": {"sub": 42, "email": "ada@example.com"},
    }))
    response = app.get("/api/users/7?token=secret", headers={
        "Authorization": "Bearer abc.def.ghi", "Cookie": "sid=cookie-value"})
    [line] = access()
    assert set(line) == {"ts", "request_id", "method", "path", "status", "duration_ms",
                         "bytes_out", "client", "route", "upstream", "target", "upstream_ms",
                         "user", "trace_id"}
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", line["ts"])
    assert line["request_id"] == "req-1"
    assert line["method"] == "GET"
    assert line["path"] == "/api/users/7"
    assert line["status"] == 200
    assert line["bytes_out"] == len(response.body)
    assert line["duration_ms"] >= 0
    assert line["client"] == "127.0.0.1"
    assert (line["route"], line["upstream"], line["target"]) == (
        "users", "user_service", "127.0.0.1:5001")
    assert line["upstream_ms"] == 1.235
    assert line["user"] == "42"
    assert line["trace_id"] == response.json["trace_id"]
    text = json.dumps(line)
    assert "secret" not in text and "abc.def" not in text and "cookie-value" not in text


def test_query_string_is_logged_only_when_asked(access):
    app, _ = client(app_setting(), log_query=True)
    app.get("/x?page=2")
    assert access()[0]["path"] == "/x?page=2"


def test_utf8_path_and_text_format(caplog):
    caplog.set_level(logging.INFO, logger="meetinity_gateway.access")
    app, _ = client(app_setting(), log_format="text")
    app.get("/caf%C3%A9/a%20b")
    [record] = [r for r in caplog.records if r.name == "meetinity_gateway.access"]
    line = record.getMessage()
    assert "\n" not in line
    # Non-ASCII escaped (no exotic line separators can reach a log file), quoted.
    assert 'path="/caf\\u00e9/a b"' in line
    assert "status=200 " in line and "user=- " in line


def test_text_values_cannot_forge_fields():
    line = str(AccessRecord({"path": "/x status=999\nfake=1", "user": None}, as_json=False))
    assert line == 'path="/x status=999\\nfake=1" user=-'


def test_status_of_a_crash_is_logged_as_500_and_reraised(access):
    app, middleware = client(boom_app)
    with pytest.raises(RuntimeError):
        app.get("/x")
    [line] = access()
    assert line["status"] == 500 and line["error"] == "unhandled exception"
    assert sample(middleware, "gateway_requests_in_flight") == 0
    assert sample(middleware, "gateway_requests_total", route="none", method="GET",
                  status="5xx") == 1


def test_error_edge_500_is_logged_with_its_request_id(access):
    middleware = ObserveMiddleware(ErrorMiddleware(boom_app))
    response = TestApp(LintMiddleware(middleware)).get("/x", status=500)
    [line] = access()
    assert line["status"] == 500
    assert line["request_id"] == response.headers["X-Request-ID"]
    assert line["bytes_out"] == len(response.body)


def test_response_cut_mid_body_is_logged(access):
    app, _ = client(late_boom_app)
    with pytest.raises(RuntimeError):
        app.get("/x")
    [line] = access()
    assert line["status"] == 200
    assert line["bytes_out"] == len(b"first part")
    assert line["error"] == "response aborted"


def test_disabled_access_logger_builds_no_record(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="meetinity_gateway.access")
    built = []
    monkeypatch.setattr(ObserveMiddleware, "_access_record",
                        lambda self, *args: built.append(args))
    app, middleware = client(app_setting())
    app.get("/x")
    assert built == []
    assert sample(middleware, "gateway_requests_total", route="none", method="GET",
                  status="2xx") == 1


def test_json_formatter_for_other_records():
    record = logging.LogRecord("meetinity_gateway.proxy", logging.WARNING, __file__, 1,
                               "upstream %s down", ("u",), None)
    payload = json.loads(JsonFormatter().format(record))
    assert payload["level"] == "WARNING" and payload["message"] == "upstream u down"
    assert payload["logger"] == "meetinity_gateway.proxy"


def test_configure_logging(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(logging.getLogger("urllib3"), "level", logging.NOTSET)
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    assert root.level == logging.DEBUG
    assert logging.getLogger("urllib3").level == logging.INFO  # its DEBUG lines hold URLs
    logging.getLogger("meetinity_gateway.test").debug("hello %s", "there")
    assert stream.getvalue() == ""  # buffered: written in batches...
    root.handlers[0].flush()  # ...at the latest after a fraction of a second
    assert json.loads(stream.getvalue())["message"] == "hello there"
    logging.getLogger("meetinity_gateway.test").warning("now")
    assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "now"  # at once
    # A second call (or an embedding app's own setup) changes nothing.
    configure_logging("ERROR", "text", stream=io.StringIO())
    assert root.level == logging.DEBUG and len(root.handlers) == 1
    root.handlers[0].close()


def test_buffered_handler_flushes_on_its_own():
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, interval=0.05)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("meetinity_gateway.test.buffered")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        for number in range(3):
            logger.info("line %d", number)
        wait_until(lambda: stream.getvalue().count("\n") >= 3, 5)
        assert stream.getvalue() == "line 0\nline 1\nline 2\n"
        handler.max_bytes = 10
        logger.info("a long enough line")
        assert stream.getvalue().endswith("a long enough line\n")  # over max_bytes: at once
    finally:
        logger.removeHandler(handler)
        handler.close()


class _SlowStream(io.StringIO):
    """A stream whose writes take a while (a pipe a reader drains slowly)."""

    def write(self, text: str) -> int:
        time.sleep(0.002)
        return super().write(text)


def test_buffered_handler_keeps_every_line_whole_and_in_order_across_threads():
    """Lines are formatted outside the handler's lock and written in batches: from 8 threads
    logging at once, every line arrives once, whole, each thread's lines in order; a filter
    still drops, a formatter that fails costs its own line only."""
    stream = _SlowStream()
    handler = BufferedStreamHandler(stream, interval=0.01, max_bytes=512)
    handler.setFormatter(logging.Formatter("%(threadName)s %(message)s"))
    handler.addFilter(lambda record: "drop" not in str(record.msg))
    logger = logging.getLogger("meetinity_gateway.test.threads")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    errors = []
    handler.handleError = lambda record: errors.append(record)  # type: ignore[method-assign]

    def work(name: str) -> None:
        for number in range(300):
            logger.info("%s-%03d", name, number)
        logger.info("drop me")
        logger.info("%d", "not a number")  # the formatter fails: handleError, nothing else

    threads = [threading.Thread(target=work, args=(f"t{i}",), name=f"t{i}") for i in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        handler.flush()
        lines = stream.getvalue().splitlines()
        assert len(lines) == 8 * 300
        for i in range(8):
            mine = [line.split(" ")[1] for line in lines if line.startswith(f"t{i} ")]
            assert mine == [f"t{i}-{number:03d}" for number in range(300)]
        assert len(errors) == 8
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_iso_time_renders_every_second_it_is_given():
    from meetinity_gateway.logs import iso_time

    assert iso_time(0.5) == "1970-01-01T00:00:00.500Z"
    assert iso_time(86400 * 365 + 0.25) == "1971-01-01T00:00:00.250Z"
    assert iso_time(0.999) == "1970-01-01T00:00:00.999Z"  # back to an earlier second


def test_configure_logging_rejects_bad_values():
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        configure_logging("INFO", "xml")
    with pytest.raises(ValueError, match="LOG_LEVEL"):
        configure_logging("LOUD", "json")


def test_query_strings_are_cut_from_messages():
    text = "Max retries exceeded with url: /auth/7?access_token=s3cret (Caused by X)"
    assert without_query(text) == "Max retries exceeded with url: /auth/7?… (Caused by X)"


# -- trace context -----------------------------------------------------------------------------

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("value, trace_id", [
    (VALID, "4bf92f3577b34da6a3ce929d0e0e4736"),
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future",
     "4bf92f3577b34da6a3ce929d0e0e4736"),
    (VALID + "-extra", None),  # version 00 has exactly four fields
    (VALID.upper(), None),
    ("ff" + VALID[2:], None),
    ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", None),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", None),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", None),
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", None),
    ("", None), (None, None), ("garbage", None),
])
def test_parse_traceparent(value, trace_id):
    assert parse_traceparent(value) == trace_id


def test_generated_request_ids_have_uuid_hex_shape_and_do_not_repeat():
    ids = {assign_request_id({}) for _ in range(2000)}
    assert len(ids) == 2000
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in ids)
    assert all(len(random_hex(digits)) == digits for digits in (1, 8, 32, 48))  # zero-padded


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forked workers are POSIX-only")
def test_forked_workers_generate_different_ids():
    # gunicorn forks its workers: each must draw its own ids, not replay its parent's.
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.write(writer, random_hex(32).encode())
        finally:
            os._exit(0)
    os.close(writer)
    child = os.read(reader, 64).decode()
    os.close(reader)
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{32}", child)
    assert child != random_hex(32)


def test_new_traceparent_is_valid():
    seen = set()
    for _ in range(50):
        value, trace_id = new_traceparent()
        assert TRACEPARENT.match(value) and parse_traceparent(value) == trace_id
        seen.add(trace_id)
    assert len(seen) == 50
    assert new_traceparent(sampled=False)[0].endswith("-00")


def test_trace_started_when_absent(access):
    app, _ = client(app_setting())
    body = app.get("/x").json
    match = TRACEPARENT.match(body["traceparent"])
    assert match and match.group(1) == body["trace_id"] == access()[0]["trace_id"]


def test_valid_trace_kept_with_its_state(access):
    app, _ = client(app_setting())
    body = app.get("/x", headers={"traceparent": VALID, "tracestate": "vendor=abc"}).json
    assert body == {"traceparent": VALID, "tracestate": "vendor=abc",
                    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}
    assert access()[0]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize("bad", [VALID.upper(), "00-xyz", VALID + "-x", "ff" + VALID[2:]])
def test_malformed_trace_restarted_and_its_state_dropped(bad):
    app, _ = client(app_setting())
    body = app.get("/x", headers={"traceparent": bad, "tracestate": "vendor=abc"}).json
    assert TRACEPARENT.match(body["traceparent"]) and body["traceparent"] != bad
    assert body["tracestate"] is None


def test_oversized_tracestate_dropped():
    app, _ = client(app_setting())
    body = app.get("/x", headers={"traceparent": VALID, "tracestate": "a=" + "b" * 600}).json
    assert body["traceparent"] == VALID and body["tracestate"] is None


def test_trace_off_leaves_headers_alone(access):
    app, _ = client(app_setting(), trace=False)
    body = app.get("/x").json
    assert body["traceparent"] is None and access()[0]["trace_id"] is None


# -- metrics -----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")
def test_metrics_by_route_upstream_rule_and_reason():
    upstream = {"meetinity_gateway.route": "users", UPSTREAM_KEY: "user_service",
                TARGET_KEY: "127.0.0.1:5001", UPSTREAM_MS_KEY: 20.0}
    ok_app, middleware = client(app_setting(**upstream))
    registry = middleware.registry
    for _ in range(3):
        ok_app.get("/api/users/1")
    ok_app.post("/api/users/1", "x")
    timeout = ObserveMiddleware(LintMiddleware(app_setting(
        status="504 Gateway Timeout", **upstream, **{UPSTREAM_ERROR_KEY: "timeout"})),
        registry=registry, namespace="other")
    TestApp(timeout).get("/api/users/1", status=504)
    limited = ObserveMiddleware(LintMiddleware(app_setting(
        status="429 Too Many Requests", **{"meetinity_gateway.ratelimit": {
            "rule": "auth", "allowed": False, "storage_failed": False}})),
        registry=registry, namespace="limited")
    TestApp(limited).get("/api/auth/login", status=429)
    refused = ObserveMiddleware(LintMiddleware(app_setting(
        status="401 Unauthorized", **{AUTH_ERROR_KEY: "token expired"})),
        registry=registry, namespace="auth")
    TestApp(refused).get("/api/users/1", status=401)
    TestApp(refused).get("/api/users/1", status=401)
    odd = ok_app.request("/api/users/1", method="PROPFIND")
    assert odd.status_int == 200

    get = registry.get_sample_value
    assert get("gateway_requests_total",
               {"route": "users", "method": "GET", "status": "2xx"}) == 3
    assert get("gateway_requests_total",
               {"route": "users", "method": "POST", "status": "2xx"}) == 1
    assert get("gateway_requests_total",
               {"route": "users", "method": "OTHER", "status": "2xx"}) == 1
    assert get("gateway_request_duration_seconds_count",
               {"route": "users", "method": "GET", "status": "2xx"}) == 3
    assert get("gateway_upstream_request_duration_seconds_count",
               {"upstream": "user_service", "target": "127.0.0.1:5001"}) == 5
    assert get("gateway_upstream_request_duration_seconds_sum",
               {"upstream": "user_service", "target": "127.0.0.1:5001"}) == pytest.approx(0.1)
    assert get("other_upstream_failures_total", {
        "upstream": "user_service", "target": "127.0.0.1:5001", "reason": "timeout"}) == 1
    assert get("other_requests_total",
               {"route": "users", "method": "GET", "status": "5xx"}) == 1
    assert get("limited_ratelimit_rejections_total", {"rule": "auth"}) == 1
    assert get("auth_auth_failures_total", {"reason": "token expired"}) == 2
    assert get("gateway_requests_in_flight") == 0


def test_in_flight_counts_until_close():
    seen = []

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            seen.append(middleware.registry.get_sample_value("gateway_requests_in_flight"))
            yield b"x"

        return body()

    middleware = ObserveMiddleware(app)
    TestApp(LintMiddleware(middleware)).get("/x")
    assert seen == [1]
    assert middleware.registry.get_sample_value("gateway_requests_in_flight") == 0


def metrics_of(response) -> dict[str, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text) for s in family.samples
    }


def test_metrics_endpoint_serves_loopback_and_is_not_counted(access):
    app, middleware = client(app_setting(**{"meetinity_gateway.route": "users"}))
    app.get("/api/users/1")
    response = app.get("/metrics")
    assert response.content_type.startswith("text/plain")
    assert response.headers["Cache-Control"] == "no-store"
    samples = metrics_of(app.get("/metrics"))
    key = ("gateway_requests_total", (("method", "GET"), ("route", "users"),
                                      ("status", "2xx")))
    assert samples[key] == 1
    assert not any(dict(labels).get("route") == "@metrics" for _, labels in samples)
    lines = access()
    assert [line["route"] for line in lines] == ["users", "@metrics", "@metrics"]
    assert lines[1]["status"] == 200 and lines[1]["bytes_out"] == len(response.body)


def test_metrics_endpoint_speaks_openmetrics_when_asked():
    app, _ = client(app_setting())
    response = app.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.content_type == "application/openmetrics-text"
    assert response.text.rstrip().endswith("# EOF")


@pytest.mark.parametrize("remote, forwarded, trusted, allowed", [
    ("127.0.0.1", None, 0, True),
    ("::1", None, 0, True),
    ("10.1.2.3", None, 0, True),
    ("192.168.1.9", None, 0, True),
    ("::ffff:127.0.0.1", None, 0, True),
    ("8.8.8.8", None, 0, False),
    ("2001:db8::1", None, 0, False),
    ("8.8.8.8", "127.0.0.1", 0, False),  # a client-sent X-Forwarded-For is not trusted
    ("10.0.0.1", "8.8.8.8", 1, False),  # the balancer is private, the client is not
    ("10.0.0.1", "192.168.0.7", 1, True),
    ("not an address", None, 0, False),
])
def test_metrics_allow_list(remote, forwarded, trusted, allowed):
    app, _ = client(app_setting(), trusted_proxies=trusted)
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    response = app.get("/metrics", headers=headers, extra_environ={"REMOTE_ADDR": remote},
                       status="*")
    if allowed:
        assert response.status_int == 200 and "gateway_requests_total" in response.text
    else:
        assert response.status_int == 404
        assert response.json["error"]["code"] == 404
        assert response.json["error"]["message"] == "no route for /metrics"


@pytest.mark.parametrize("sent, kept", [
    (None, False), ("scrape-7f:1", True), ("bad id with spaces", False), ("x" * 129, False),
    ("a\u00e9b", False),
])
@pytest.mark.parametrize("remote, status", [("127.0.0.1", 200), ("8.8.8.8", 404)])
def test_metrics_answers_carry_a_request_id(sent, kept, remote, status):
    """Served outside the error edge, /metrics still gives each answer an X-Request-ID, by
    the same rule (the client's when sane, else a new one), also on the 404 and 405."""
    app, _ = client(app_setting())
    headers = {"X-Request-ID": sent} if sent is not None else {}
    response = app.get("/metrics", headers=headers, extra_environ={"REMOTE_ADDR": remote},
                       status=status)
    request_id = response.headers["X-Request-ID"]
    assert response.headers.getall("X-Request-ID") == [request_id]
    if kept:
        assert request_id == sent
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    if status == 404:
        assert response.json["error"]["request_id"] == request_id
    post = app.post("/metrics", headers=headers, extra_environ={"REMOTE_ADDR": remote},
                    status="*")
    assert post.headers["X-Request-ID"]


def test_metrics_request_id_is_logged(access):
    app, _ = client(app_setting())
    response = app.get("/metrics", headers={"X-Request-ID": "scrape-1"})
    assert response.headers["X-Request-ID"] == "scrape-1"
    assert access()[-1]["request_id"] == "scrape-1"


def test_metrics_allow_list_is_configurable():
    app, _ = client(app_setting(), metrics_allow=["203.0.113.0/24"])
    app.get("/metrics", extra_environ={"REMOTE_ADDR": "203.0.113.7"}, status=200)
    app.get("/metrics", extra_environ={"REMOTE_ADDR": "127.0.0.1"}, status=404)


@pytest.mark.filterwarnings("ignore:Content-Length and the number of bytes")  # HEAD
def test_metrics_endpoint_methods_and_path():
    app, _ = client(app_setting(), metrics_path="/internal/metrics")
    response = app.post("/internal/metrics", status=405)
    assert response.headers["Allow"] == "GET, HEAD"
    assert app.head("/internal/metrics").body == b""
    # The old path is an ordinary request for the wrapped app now.
    assert "traceparent" in app.get("/metrics").json


def test_metrics_off_serves_nothing():
    app, middleware = client(app_setting(), metrics=False)
    assert "traceparent" in app.get("/metrics").json
    assert middleware.registry is None


def test_each_instance_has_its_own_registry():
    first, second = ObserveMiddleware(app_setting()), ObserveMiddleware(app_setting())
    assert first.registry is not second.registry
    registry = CollectorRegistry()
    assert ObserveMiddleware(app_setting(), registry=registry).registry is registry


# -- configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, key", [
    ({"log_format": "xml"}, "log_format"),
    ({"metrics_allow": ["10.0.0.0/8", "not-a-network"]}, "metrics_allow"),
    ({"metrics_path": "metrics"}, "metrics_path"),
    ({"metrics_path": "/met rics"}, "metrics_path"),
    ({"namespace": "9lives"}, "namespace"),
    ({"buckets": [0, 1]}, "buckets"),
    ({"trusted_proxies": -1}, "trusted_proxies"),
])
def test_bad_arguments_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as info:
        ObserveMiddleware(app_setting(), **kwargs)
    assert info.value.key == key


def test_filter_factory_casts_and_rejects_unknown_keys():
    make = filter_factory({"__file__": "gateway.ini"}, metrics_allow="10.0.0.0/8, ::1",
                          trusted_proxies="1", buckets="0.1, 1", log_format="text")
    middleware = make(app_setting())
    assert [str(n) for n in middleware.metrics_allow] == ["10.0.0.0/8", "::1/128"]
    assert middleware.trusted_proxies == 1
    with pytest.raises(ConfigError, match="unknown key"):
        filter_factory({}, metric_path="/m")
    with pytest.raises(ConfigError) as info:
        filter_factory({"__file__": "gateway.ini"}, metrics_allow="nope")(app_setting())
    assert info.value.file == "gateway.ini" and info.value.key == "metrics_allow"
    with pytest.raises(ConfigError, match="seconds"):
        filter_factory({}, buckets="fast, slow")


def test_multiprocess_dir_must_exist_and_be_set_before_import(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a directory"):
        ObserveMiddleware(app_setting())
    # prometheus-client was imported without it (this process): refusing beats metrics
    # silently kept per process.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="before the process starts"):
        ObserveMiddleware(app_setting())


# -- end to end: the shipped gateway.ini under waitress ----------------------------------------

@pytest.fixture
def log_lines():
    """Every log line (any logger, DEBUG and up) written while the test runs, as the JSON
    formatter renders it — with the level clamps of the real logging setup."""
    root = logging.getLogger()
    urllib3_logger = logging.getLogger("urllib3")
    saved = root.level, urllib3_logger.level
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    # The level clamps of configure_logging, keeping pytest's handlers.
    root.setLevel(logging.DEBUG)
    urllib3_logger.setLevel(logging.INFO)
    root.addHandler(handler)
    yield lambda: stream.getvalue().splitlines()
    root.removeHandler(handler)
    root.setLevel(saved[0])
    urllib3_logger.setLevel(saved[1])


def access_lines(lines):
    parsed = [json.loads(line) for line in lines]
    return [line for line in parsed if "status" in line and "level" not in line]


def wait_for_access_lines(log_lines, count: int):
    """A request is logged and counted when the server closes its body, which may be just
    after the client has read it: wait (bounded) for that."""
    wait_until(lambda: len(access_lines(log_lines())) >= count, timeout=5)
    return log_lines()


ACCESS_FIELDS = {"ts", "request_id", "method", "path", "status", "duration_ms", "bytes_out",
                 "client", "route", "upstream", "target", "upstream_ms", "user", "trace_id"}


def boom_factory(global_conf, **local_conf):
    """``call:`` app factory for an ini whose app always crashes."""
    return boom_app


def test_access_log_for_every_outcome_and_no_secret(
        gateway_factory, upstream, tmp_path, log_lines):
    token = make_token()
    cookie = "sid=cookie-secret-4711"
    query_secret = "query-secret-9923"
    bad_token = "garbage.token-value.notasignature"
    # moving-window: an exact count, no window edge to let the third request through.
    gateway = gateway_factory(RATE_LIMIT_AUTH="2/hour", RATELIMIT_STRATEGY="moving-window",
                              UPSTREAM_READ_TIMEOUT="0.5")
    down = gateway_factory(USER_SERVICE_URL=f"http://127.0.0.1:{free_port()}")
    edge_ini = write_ini(tmp_path / "edge.ini", """
[pipeline:main]
pipeline = observe errors boom
[filter:observe]
use = egg:meetinity_gateway#observe
[filter:errors]
use = egg:meetinity_gateway#errors
[app:boom]
use = call:tests.test_observe:boom_factory
""")
    from meetinity_gateway.assembly import load_app

    client = session()
    client.headers["Cookie"] = cookie
    bearer = {"Authorization": f"Bearer {token}"}
    calls = [
        (gateway.url + f"/api/users/42?access_token={query_secret}", bearer, 200),
        (gateway.url + "/api/users/42", {"Authorization": f"Bearer {bad_token}"}, 401),
        (gateway.url + "/nope", bearer, 404),
        (gateway.url + "/api/auth/status?code=500", {}, 500),
        (gateway.url + "/api/auth/slow?seconds=2", {}, 504),
        (gateway.url + "/api/auth/login", bearer, 429),
        (down.url + f"/api/users/42/me?access_token={query_secret}", bearer, 502),
    ]
    request_ids = []
    with WaitressServer(load_app(edge_ini)) as edge:
        for url, headers, status in calls + [(edge.url + "/anything", bearer, 500)]:
            response = client.get(url, headers=headers)
            assert response.status_code == status, url
            request_ids.append(response.headers["X-Request-ID"])

    lines = wait_for_access_lines(log_lines, 8)
    records = access_lines(lines)
    assert [r["status"] for r in records] == [200, 401, 404, 500, 504, 429, 502, 500]
    assert [r["request_id"] for r in records] == request_ids
    for record in records:
        assert ACCESS_FIELDS <= set(record)
        assert record["method"] == "GET" and "?" not in record["path"]
        assert record["client"] == "127.0.0.1"
        assert re.match(r"^[0-9a-f]{32}$", record["trace_id"])
        assert record["duration_ms"] >= 0 and record["bytes_out"] > 0
    ok, unauthorized, missing, failed, timeout, limited, down_, edge_ = records
    assert (ok["route"], ok["upstream"], ok["target"], ok["user"]) == (
        "users", "user_service", f"127.0.0.1:{upstream.port}", "42")
    assert ok["upstream_ms"] > 0 and ok["path"] == "/api/users/42"
    assert unauthorized["user"] is None and unauthorized["upstream"] is None
    # A 401 says why (a fixed text, never the token); the others have no such field.
    assert unauthorized["auth_error"] == "malformed token", unauthorized
    assert bad_token not in json.dumps(unauthorized)
    assert "auth_error" not in ok and "auth_error" not in missing
    assert missing["route"] is None
    assert failed["route"] == "auth" and failed["upstream"] == "user_service"
    assert timeout["upstream_ms"] >= 400 and timeout["route"] == "auth"
    assert limited["upstream"] is None
    assert down_["upstream"] == "user_service" and down_["user"] == "42"
    assert edge_["path"] == "/anything" and edge_["route"] is None
    # The edge's exception was logged too, with the request id and no header value.
    assert any('"level":"ERROR"' in line and request_ids[-1] in line for line in lines)
    # Nothing secret in any line of the run, whatever logged it.
    for line in lines:
        for secret in (token, "cookie-secret-4711", query_secret, bad_token):
            assert secret not in line


def scrape(url, **kwargs):
    response = session().get(url + "/metrics", **kwargs)
    assert response.status_code == 200, response.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text) for s in family.samples
    }


def labels(**kw):
    return tuple(sorted(kw.items()))


def test_metrics_after_known_traffic(gateway_factory, upstream, log_lines):
    gateway = gateway_factory(RATE_LIMIT_AUTH="1/hour", RATELIMIT_STRATEGY="moving-window")
    client = session()
    bearer = {"Authorization": f"Bearer {make_token()}"}
    for _ in range(3):
        assert client.get(gateway.url + "/api/users/42", headers=bearer).status_code == 200
    for _ in range(2):
        assert client.get(gateway.url + "/api/users/1").status_code == 401
    assert client.get(gateway.url + "/api/users/1",
                      headers={"Authorization": "Bearer a.b.c"}).status_code == 401
    assert client.delete(gateway.url + "/nope", headers=bearer).status_code == 404
    assert client.get(gateway.url + "/api/auth/x").status_code == 200
    assert client.get(gateway.url + "/api/auth/x").status_code == 429

    wait_for_access_lines(log_lines, 9)
    samples = scrape(gateway.url)
    target = f"127.0.0.1:{upstream.port}"
    assert samples[("gateway_requests_total",
                    labels(route="users", method="GET", status="2xx"))] == 3
    assert samples[("gateway_requests_total",
                    labels(route="auth", method="GET", status="2xx"))] == 1
    # Answered before the router: no route.
    assert samples[("gateway_requests_total",
                    labels(route="none", method="GET", status="4xx"))] == 4
    assert samples[("gateway_requests_total",
                    labels(route="none", method="DELETE", status="4xx"))] == 1
    assert samples[("gateway_request_duration_seconds_count",
                    labels(route="users", method="GET", status="2xx"))] == 3
    assert samples[("gateway_upstream_request_duration_seconds_count",
                    labels(upstream="user_service", target=target))] == 4
    assert samples[("gateway_auth_failures_total",
                    labels(reason="missing bearer token"))] == 2
    assert samples[("gateway_auth_failures_total", labels(reason="malformed token"))] == 1
    assert samples[("gateway_ratelimit_rejections_total", labels(rule="auth"))] == 1
    assert samples[("gateway_requests_in_flight", ())] == 0
    assert not any(name == "gateway_upstream_failures_total" for name, _ in samples)


def test_upstream_failures_counted_by_reason(gateway_factory, upstream, log_lines):
    slow = gateway_factory(UPSTREAM_READ_TIMEOUT="0.3")
    port = free_port()
    down = gateway_factory(USER_SERVICE_URL=f"http://127.0.0.1:{port}")
    client = session()
    assert client.get(slow.url + "/api/auth/slow?seconds=1").status_code == 504
    assert client.get(down.url + "/api/auth/x").status_code == 502
    assert client.get(down.url + "/api/auth/x").status_code == 502
    wait_for_access_lines(log_lines, 3)
    assert scrape(slow.url)[("gateway_upstream_failures_total", labels(
        upstream="user_service", target=f"127.0.0.1:{upstream.port}", reason="timeout"))] == 1
    assert scrape(down.url)[("gateway_upstream_failures_total", labels(
        upstream="user_service", target=f"127.0.0.1:{port}", reason="unavailable"))] == 2


def test_metrics_not_rate_limited_and_refused_outside_the_allow_list(gateway_factory):
    gateway = gateway_factory(RATE_LIMIT_DEFAULT="1/hour", RATELIMIT_STRATEGY="moving-window")
    client = session()
    # Counted before auth: the unknown path's 401 (deny by default) uses the budget.
    assert client.get(gateway.url + "/nope").status_code == 401
    assert client.get(gateway.url + "/nope").status_code == 429
    for _ in range(3):
        scrape(gateway.url)

    closed = gateway_factory(METRICS_ALLOW="10.0.0.0/8")
    response = client.get(closed.url + "/metrics")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "no route for /metrics"
    assert "gateway_" not in response.text


def test_trace_context_started_and_propagated(gateway, upstream, log_lines):
    client = session()
    echoed = dict(client.get(gateway.url + "/api/auth/echo").json()["headers"])
    match = TRACEPARENT.match(echoed["Traceparent"])
    assert match
    assert access_lines(wait_for_access_lines(log_lines, 1))[-1]["trace_id"] == match.group(1)
    assert "Tracestate" not in echoed

    echoed = dict(client.get(gateway.url + "/api/auth/echo", headers={
        "traceparent": VALID, "tracestate": "congo=t61rcWkgMzE"}).json()["headers"])
    assert echoed["Traceparent"] == VALID and echoed["Tracestate"] == "congo=t61rcWkgMzE"
    assert access_lines(wait_for_access_lines(log_lines, 2))[-1]["trace_id"] == VALID.split("-")[1]

    echoed = dict(client.get(gateway.url + "/api/auth/echo", headers={
        "traceparent": "00-zz", "tracestate": "congo=t61rcWkgMzE"}).json()["headers"])
    assert TRACEPARENT.match(echoed["Traceparent"]) and "Tracestate" not in echoed


def test_text_log_format_from_the_environment(gateway_factory, caplog):
    caplog.set_level(logging.INFO, logger="meetinity_gateway.access")
    gateway = gateway_factory(LOG_FORMAT="text")
    session().get(gateway.url + "/nope", headers=auth_headers())

    def messages():
        return [r.getMessage() for r in caplog.records if r.name == "meetinity_gateway.access"]

    [message] = wait_until(messages, timeout=5)
    assert message.startswith("ts=") and " status=404 " in message


# -- real processes: the CLI's logging and prometheus-client's multiprocess mode ---------------

def test_processes_share_metrics_and_log_json(upstream, tmp_path):
    env = {"USER_SERVICE_URL": upstream.url, "RATE_LIMIT_AUTH": "100000/minute",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "LOG_LEVEL": "INFO"}
    client = session()
    with GatewayProcess(env=env, threads=2) as first, GatewayProcess(env=env, threads=2) as other:
        for _ in range(2):
            assert client.get(first.url + "/api/auth/x").status_code == 200
        for _ in range(3):
            assert client.get(other.url + "/api/auth/x").status_code == 200
        key = ("gateway_requests_total", labels(route="auth", method="GET", status="2xx"))
        samples = wait_until(lambda: (lambda s: s if s.get(key) == 5 else None)(
            scrape(first.url)), timeout=5)
        assert samples[key] == 5
        target = f"127.0.0.1:{upstream.port}"
        assert samples[("gateway_upstream_request_duration_seconds_count",
                        labels(upstream="user_service", target=target))] == 5
        first.process.terminate()
        first.process.wait(10)
        output = first.stderr()
    records = access_lines(output.splitlines())
    assert [(r["path"], r["status"]) for r in records if r["path"] != "/metrics"] == [
        ("/api/auth/x", 200)] * 2
    assert {r["route"] for r in records if r["path"] == "/metrics"} == {"@metrics"}
    # Every line of the process's output is JSON.
    assert output.strip()
    for line in output.splitlines():
        json.loads(line)


def test_retried_attempts_counted_per_target(gateway_factory, upstream, log_lines):
    dead = f"127.0.0.1:{free_port()}"
    gateway = gateway_factory(USER_SERVICE_URL=f"http://{dead}, {upstream.url}")
    client = session()
    for _ in range(4):
        assert client.get(gateway.url + "/api/auth/x").status_code == 200
    records = access_lines(wait_for_access_lines(log_lines, 4))
    live = f"127.0.0.1:{upstream.port}"
    assert {r["target"] for r in records} == {live}
    retried = [r for r in records if r.get("attempts") == 2]
    assert retried  # the dead target was tried first at least once (round robin)
    samples = scrape(gateway.url)
    assert samples[("gateway_upstream_request_duration_seconds_count",
                    labels(upstream="user_service", target=live))] == 4
    assert samples[("gateway_upstream_failures_total", labels(
        upstream="user_service", target=dead, reason="unavailable"))] == len(retried)


def test_a_made_record_has_every_field_logging_gives_it():
    """make_record (the access log's records) gives what Logger.makeRecord gives, and an
    application's record factory is used as it is."""
    from meetinity_gateway.logs import make_record

    logger = logging.getLogger("meetinity_gateway.test.records")
    for _ in range(2):  # the first builds the per-process template, the second uses it
        made = make_record(logger.name, logging.INFO, "hello", __file__)
        usual = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "hello", None, None)
        assert set(vars(made)) == set(vars(usual))
        for name in set(vars(usual)) - {"created", "msecs", "relativeCreated"}:
            assert getattr(made, name) == getattr(usual, name), name
        assert abs(made.created - usual.created) < 1
        assert made.getMessage() == "hello" and made.process == os.getpid()

    class Mine(logging.LogRecord):
        pass

    previous = logging.getLogRecordFactory()
    logging.setLogRecordFactory(Mine)
    try:
        assert type(make_record(logger.name, logging.INFO, "x", __file__)) is Mine
    finally:
        logging.setLogRecordFactory(previous)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only (Windows: no fork)")
def test_a_forked_worker_logs_its_own_process_id():
    from meetinity_gateway.logs import make_record

    make_record("meetinity_gateway.test.fork", logging.INFO, "parent", __file__)
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        try:
            record = make_record("meetinity_gateway.test.fork", logging.INFO, "child", __file__)
            os.write(writing, f"{record.process} {os.getpid()}".encode())
        finally:
            os._exit(0)
    os.close(writing)
    try:
        logged, actual = os.read(reading, 100).decode().split()
    finally:
        os.close(reading)
        os.waitpid(child, 0)
    assert logged == actual != str(os.getpid())
