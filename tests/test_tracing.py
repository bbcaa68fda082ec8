"""OpenTelemetry export end to end: the shipped gateway (``OTEL_ENABLED=true``) in a child
process sends its spans to a real OTLP/HTTP receiver on loopback, which decodes them with
``opentelemetry-proto``; a collector that is down or hangs costs the requests nothing but a
counter in ``/metrics``."""
from __future__ import annotations

import http.server
import json
import re
import secrets
import sys
import threading
import time

import pytest

from tests.servers import GatewayProcess, auth_headers, free_port, make_token, session

pytest.importorskip("opentelemetry.sdk", reason="pip install -r requirements-dev.txt")
trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")


class Receiver:
    """An OTLP/HTTP traces receiver on a free loopback port: ``POST /v1/traces`` decoded into
    ``spans`` (dicts); with ``hang=True`` it reads each request and never answers."""

    def __init__(self, hang: bool = False) -> None:
        self.spans: list[dict] = []
        self.posts = 0
        self.hang = hang
        self.release = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.posts += 1
                if receiver.hang:
                    receiver.release.wait(30)
                    return
                request = trace_service.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.spans.extend(decode(request))
                answer = trace_service.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.spans) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.spans)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def decode(request) -> list[dict]:
    """Spans of an ExportTraceServiceRequest as plain dicts (ids in hex)."""
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attributes = {}
                for attribute in span.attributes:
                    value = attribute.value
                    kind = value.WhichOneof("value")
                    attributes[attribute.key] = getattr(value, kind)
                out.append({
                    "name": span.name, "kind": span.kind, "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                    "attributes": attributes, "status": span.status.code,
                    "service": resource.get("service.name"),
                })
    return out


@pytest.fixture
def receiver():
    started = []

    def start(**kw) -> Receiver:
        server = Receiver(**kw)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def traced(gateway_process, endpoint: str, **env) -> GatewayProcess:
    env = {"OTEL_ENABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
           "OTEL_BSP_SCHEDULE_DELAY": "100", "LOG_FORMAT": "json", **env}
    return gateway_process(**env)


def test_spans_reach_the_collector_with_their_parents_and_attributes(gateway_process, upstream,
                                                                     receiver):
    collector = receiver()
    gateway = traced(gateway_process, collector.endpoint)
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    token = make_token(sub=42, email="ada@example.com")
    response = session().get(gateway.url + "/api/users/42", headers={
        "Authorization": f"Bearer {token}", "traceparent": f"00-{trace_id}-{caller_span}-01"})
    assert response.status_code == 200
    spans = collector.wait_for(2)
    server = [s for s in spans if s["kind"] == 2]  # SPAN_KIND_SERVER
    client = [s for s in spans if s["kind"] == 3]  # SPAN_KIND_CLIENT
    assert len(server) == 1 and len(client) == 1, spans
    [server], [client] = server, client
    # The caller's trace goes on: the server span is the child of the caller's span ...
    assert server["trace_id"] == trace_id and server["parent"] == caller_span
    assert server["service"] == "meetinity-gateway"
    assert server["name"] == "GET users"
    attributes = server["attributes"]
    assert attributes["http.request.method"] == "GET"
    assert attributes["url.path"] == "/api/users/42"
    assert attributes["http.route"] == "users"
    assert attributes["http.response.status_code"] == 200
    assert attributes["client.address"] == "127.0.0.1"
    assert attributes["enduser.id"] == "42"
    assert attributes["gateway.request_id"] == response.headers["X-Request-ID"]
    assert attributes["gateway.ratelimit.rule"] == "users"
    assert attributes["gateway.ratelimit.allowed"] is True
    # ... the upstream attempt its child, and the service's parent.
    assert client["trace_id"] == trace_id and client["parent"] == server["span_id"]
    assert client["attributes"]["gateway.upstream"] == "user_service"
    assert client["attributes"]["server.port"] == upstream.port
    assert client["attributes"]["http.response.status_code"] == 200
    [(_, _, headers)] = [r for r in upstream.requests if r[1] == "/users/42"]
    sent = {name.lower(): value for name, value in headers}
    assert sent["traceparent"] == f"00-{trace_id}-{client['span_id']}-01"
    # Never a token, an email or another claim in a span.
    everything = json.dumps(spans)
    assert token not in everything and "ada@example.com" not in everything


def test_a_refused_and_a_failed_request_say_why(gateway_process, upstream, receiver):
    collector = receiver()
    dead = f"http://127.0.0.1:{free_port()}, http://127.0.0.1:{free_port()}"  # two targets
    gateway = traced(gateway_process, collector.endpoint, UPSTREAM_RETRIES="1",
                     EVENT_SERVICE_URL=dead)
    client = session()
    assert client.get(gateway.url + "/api/users/42",
                      headers={"Authorization": "Bearer a.b.c"}).status_code == 401
    assert client.get(gateway.url + "/api/events/1", headers=auth_headers()).status_code == 502
    spans = collector.wait_for(4)  # two server spans, two attempts
    refused = [s for s in spans if s["kind"] == 2 and s["attributes"].get("url.path")
               == "/api/users/42"]
    assert refused and refused[0]["attributes"]["gateway.auth.error"] == "malformed token"
    assert "enduser.id" not in refused[0]["attributes"]
    [failed] = [s for s in spans if s["kind"] == 2
                and s["attributes"].get("url.path") == "/api/events/1"]
    assert failed["attributes"]["http.response.status_code"] == 502
    assert failed["status"] == 2  # STATUS_CODE_ERROR
    # A new trace (no traceparent came): the server span is a root.
    assert failed["parent"] == ""
    attempts = [s for s in spans if s["kind"] == 3 and s["parent"] == failed["span_id"]]
    # Each attempt (the retry included) is a span: its number and why it failed.
    assert sorted(s["attributes"].get("http.request.resend_count", 0) for s in attempts) \
        == [0, 1], attempts
    assert {s["attributes"]["error.type"] for s in attempts} == {"unavailable"}


def dropped_and_failed(gateway: GatewayProcess) -> tuple[float, float]:
    text = session().get(gateway.url + "/metrics").text
    values = {}
    for name in ("gateway_otel_spans_dropped_total", "gateway_otel_export_failures_total"):
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert match, text
        values[name] = float(match.group(1))
    return values["gateway_otel_spans_dropped_total"], \
        values["gateway_otel_export_failures_total"]


@pytest.mark.parametrize("collector_state", ["down", "hangs"])
def test_a_collector_down_or_hanging_costs_only_a_counter(gateway_process, receiver,
                                                          collector_state):
    if collector_state == "down":
        endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens
    else:
        endpoint = receiver(hang=True).endpoint
    gateway = traced(gateway_process, endpoint, OTEL_BSP_MAX_QUEUE_SIZE="8",
                     OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4", OTEL_EXPORTER_OTLP_TIMEOUT="30")
    client = session()
    statuses = [client.get(gateway.url + f"/api/auth/call{i}").status_code for i in range(60)]
    assert statuses == [200] * 60  # the requests never wait for the collector
    dropped, failed = dropped_and_failed(gateway)
    # 120 spans, a queue of 8, an export stuck for up to 30 s: most were dropped, counted.
    assert dropped >= 60, (dropped, failed)
    started = time.monotonic()
    gateway.process.terminate()
    gateway.process.wait(20)
    # The stop waits a bounded time for the queue, not the exporter's 30 s.
    assert time.monotonic() - started < 15
    assert gateway.process.returncode == 0, gateway.stderr()


def test_off_by_default_the_sdk_is_never_imported(monkeypatch):
    import subprocess

    from tests.servers import SHIPPED_INI, TEST_JWT_SECRET

    code = ("import sys; from webtest import TestApp;"
            "from meetinity_gateway.assembly import load_pipeline;"
            f"app = TestApp(load_pipeline({str(SHIPPED_INI)!r}).app);"
            "app.get('/api/auth/x', expect_errors=True);"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env={"JWT_SECRET": TEST_JWT_SECRET, "PATH": ""})
    assert result.stdout.strip() == "[]", result.stderr


def test_sampling_follows_the_callers_flag_by_default(gateway_process, upstream, receiver):
    """OTEL_TRACES_SAMPLER's default (parent-based): a caller's unsampled trace is not
    exported, yet its context still goes upstream; a sampled one is."""
    collector = receiver()
    gateway = traced(gateway_process, collector.endpoint)
    unsampled, sampled = secrets.token_hex(16), secrets.token_hex(16)
    client = session()
    for trace_id, flags in ((unsampled, "00"), (sampled, "01")):
        response = client.get(gateway.url + "/api/auth/x", headers={
            "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"})
        assert response.status_code == 200
    spans = collector.wait_for(2)
    assert {span["trace_id"] for span in spans} == {sampled}, spans
    sent = [dict((k.lower(), v) for k, v in headers)["traceparent"]
            for _, _, headers in upstream.requests]
    assert [value.split("-")[1] for value in sent] == [unsampled, sampled]
    assert [value.split("-")[3] for value in sent] == ["00", "01"]
