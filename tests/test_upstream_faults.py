"""Issue 13, points 1 and 2, end to end: no client can black-hole a service, and a slow
service cannot starve the others.

A real waitress serves a gateway (observe, errors, router) in front of loopback upstreams
that misbehave on command (:class:`tests.upstream.Upstream` with a ``mode``: answer 503,
hang, reset, stall; a free port refuses).
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import wait_until
from tests.servers import GatewayUnderTest, free_port, session
from tests.upstream import Upstream


@pytest.fixture
def gateways(tmp_path):
    started: list[GatewayUnderTest] = []

    def start(upstreams: dict[str, str], threads: int = 4, **settings) -> GatewayUnderTest:
        gateway = GatewayUnderTest(tmp_path, upstreams, threads=threads, **settings)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def faulty():
    servers: list[Upstream] = []

    def start(mode: str = "ok", port: int = 0) -> Upstream:
        server = Upstream(port=port, mode=mode).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def get(url: str, method: str = "GET", **kwargs):
    kwargs.setdefault("timeout", 30)
    with session() as client:
        return client.request(method, url, **kwargs)


# -- point 1: a service's own answers never eject it (by default) ------------------------------

@pytest.mark.parametrize("code", ["503", "502", "504", "500"])
def test_a_service_answering_5xx_is_never_ejected(gateways, faulty, code):
    service = faulty(code)
    gateway = gateways({"svc": service.url})
    # Any path, any method: the service's own answer passes through, again and again.
    for method, path in [("GET", "/svc/a"), ("POST", "/svc/b"), ("GET", "/svc/c"),
                         ("DELETE", "/svc/d"), ("GET", "/svc/a?x=1"), ("PUT", "/svc/e")] * 2:
        response = get(gateway.url + path, method, data=b"x" if method != "GET" else None)
        assert response.status_code == int(code)
        assert response.json() == {"service_error": int(code)}  # its answer, not ours
    assert gateway.states("svc") == ["healthy"]
    service.mode = "ok"
    response = get(gateway.url + "/svc/echo")  # at once: nothing to wait out
    assert response.status_code == 200 and response.json()["upstream"] == service.url


def test_three_503_answers_never_eject_one_of_two_targets(gateways, faulty):
    sick, well = faulty("503"), faulty()
    gateway = gateways({"svc": f"{sick.url}, {well.url}"}, retries=0)
    codes = [get(gateway.url + "/svc/echo").status_code for _ in range(8)]
    assert sorted(codes) == [200] * 4 + [503] * 4  # round robin goes on through both
    assert gateway.states("svc") == ["healthy", "healthy"]
    health = get(gateway.url + "/health").json()
    assert health["upstreams"] == {"svc": "up"} and health["status"] == "ok"


def test_configured_failure_statuses_eject_and_panic_routing_keeps_serving(gateways, faulty):
    service = faulty("503")
    gateway = gateways({"svc": service.url}, failure_statuses="502, 503, 504",
                       eject_time=60)
    for _ in range(3):
        assert get(gateway.url + "/svc/echo").status_code == 503
    assert gateway.states("svc") == ["ejected"]
    # Ejected but the only target: still routed to (panic), never "no healthy target".
    assert get(gateway.url + "/svc/echo").json() == {"service_error": 503}
    service.mode = "ok"
    response = get(gateway.url + "/svc/echo")
    assert response.status_code == 200
    assert gateway.states("svc") == ["healthy"]  # a success re-admits it at once


# -- point 1: a burst of failures ejects once -------------------------------------------------

def test_a_burst_of_eight_timeouts_ejects_once(gateways, faulty, caplog):
    service = faulty("hang")
    # 12 threads (the derived cap: 9): the eight all reach the service, none waits.
    gateway = gateways({"svc": service.url}, threads=12, read_timeout=1,
                       eject_time=20, health_timeout=0.5, eject_recheck=0.2)
    caplog.set_level("WARNING", logger="meetinity_gateway.upstream")
    with ThreadPoolExecutor(8) as executor:
        responses = list(executor.map(lambda _: get(gateway.url + "/svc/slow"), range(8)))
    assert [r.status_code for r in responses] == [504] * 8
    assert all(r.json()["error"]["code"] == 504 for r in responses)
    row = gateway.pool("svc").snapshot()[0]
    assert row["state"] == "ejected" and row["ejections"] == 1
    assert 10 < row["ejected_for"] <= 20  # once, for eject_time: not doubled
    ejected = [r for r in caplog.records if "ejected for" in r.getMessage()]
    assert len(ejected) == 1, [r.getMessage() for r in ejected]
    service.release()


# -- point 1: panic routing ------------------------------------------------------------------

def test_every_target_ejected_is_still_routed_to(gateways, faulty):
    first, second = faulty("reset"), faulty("reset")
    gateway = gateways({"svc": f"{first.url}, {second.url}"}, max_fails=1, eject_time=60,
                       max_eject_percent=100)
    for _ in range(3):
        response = get(gateway.url + "/svc/echo")
        assert response.status_code == 502 and response.json()["error"]["code"] == 502
    assert gateway.states("svc") == ["ejected", "ejected"]
    health = get(gateway.url + "/health").json()
    assert health["status"] == "error" and health["upstreams"] == {"svc": "down"}
    first.mode = second.mode = "ok"
    # 60 s of ejection left, yet the next request is served: no 503 "no healthy target".
    response = get(gateway.url + "/svc/echo")
    assert response.status_code == 200
    assert "healthy" in gateway.states("svc")


def test_a_refusing_only_target_serves_again_as_soon_as_it_is_back(gateways, faulty):
    port = free_port()  # nothing listens there: connections are refused
    gateway = gateways({"svc": f"http://127.0.0.1:{port}"}, max_fails=1, eject_time=60)
    for method in ("GET", "POST", "GET"):
        assert get(gateway.url + "/svc/echo", method, data=b"x").status_code == 502
    assert gateway.states("svc") == ["ejected"]
    faulty(port=port)
    response = get(gateway.url + "/svc/echo", "POST", data=b"x")
    assert response.status_code == 200 and gateway.states("svc") == ["healthy"]


# -- point 1: /health shows it ---------------------------------------------------------------

def test_health_reports_a_degraded_service_and_its_ejected_target(gateways, faulty):
    sick, well = faulty("reset"), faulty()
    gateway = gateways({"svc": f"{sick.url}, {well.url}", "other": well.url}, max_fails=1,
                       eject_time=60)
    for _ in range(4):
        assert get(gateway.url + "/svc/echo").status_code == 200  # retried on the other
    response = get(gateway.url + "/health")
    assert response.status_code == 200  # still served: degraded, not down
    payload = response.json()
    assert payload["status"] == "degraded"
    assert payload["upstreams"] == {"svc": "degraded", "other": "up"}
    assert sick.url not in str(payload["upstreams"])  # the summary names no target
    rows = {row["target"]: row for row in payload["targets"]["svc"]}
    assert rows[sick.url]["state"] == "ejected" and rows[sick.url]["ejections"] == 1
    assert 0 < rows[sick.url]["ejected_for"] <= 60
    assert rows[well.url]["state"] == "healthy" and "ejected_for" not in rows[well.url]


# -- point 1: prompt re-admission ------------------------------------------------------------

def test_an_ejected_target_is_rechecked_and_readmitted_without_traffic(gateways, faulty):
    sick, well = faulty("reset"), faulty()
    gateway = gateways({"svc": f"{sick.url}, {well.url}"}, max_fails=1, eject_time=0.5,
                       eject_recheck=0.2, health_timeout=1)
    while gateway.states("svc")[0] != "ejected":
        assert get(gateway.url + "/svc/echo").status_code == 200
    seen = len(sick.requests)
    # Ejection time over, but the target still resets: re-checks keep it out and no client
    # request reaches it (every answer comes from the other one).
    wait_until(lambda: len(sick.requests) >= seen + 3, timeout=10)
    for _ in range(6):
        response = get(gateway.url + "/svc/echo")
        assert response.status_code == 200 and response.json()["upstream"] == well.url
    assert gateway.states("svc")[0] == "ejected"
    assert set(sick.paths(seen)) == {"/health"}
    # It recovers: back within a re-check, with no request needed to find out.
    sick.mode = "ok"
    wait_until(lambda: gateway.states("svc") == ["healthy", "healthy"], timeout=5)
    served = {get(gateway.url + "/svc/echo").json()["upstream"] for _ in range(4)}
    assert served == {sick.url, well.url}


# -- point 2: the bulkhead -------------------------------------------------------------------

def test_a_hanging_service_cannot_starve_live_or_other_upstreams(gateways, faulty, caplog):
    """16 requests to a service that never answers (read timeout 10 s), 8 threads, the
    shipped queue: 6 (the derived cap) hang, 2 wait for a slot and time out, the 8 others
    are refused at once (stalled) -- and /health/live and another upstream answer
    throughout, also while the two wait."""
    slow, fast = faulty("hang"), faulty()
    gateway = gateways({"slow": slow.url, "fast": fast.url}, threads=8, read_timeout=10)
    pool = gateway.pool("slow")
    assert (pool.max_in_flight, pool.queue_size, pool.queue_timeout) == (6, 2, 0.5)
    caplog.set_level("INFO", logger="meetinity_gateway.access")
    executor = ThreadPoolExecutor(16)
    probes: list = []
    stop = threading.Event()

    def probe():
        # Keeps asking while the 16 arrive, wait and are refused.
        while not stop.is_set():
            probes.append(get(gateway.url + "/health/live", timeout=5).status_code)
            probes.append(get(gateway.url + "/fast/echo", timeout=5).status_code)

    prober = threading.Thread(target=probe)
    try:
        futures = [executor.submit(get, gateway.url + f"/slow/x{i}",
                                   "POST" if i % 2 else "GET", data=b"x" if i % 2 else None)
                   for i in range(16)]
        prober.start()
        wait_until(lambda: slow.hung == 6 and sum(f.done() for f in futures) == 10,
                   timeout=15)
        stop.set()
        prober.join(10)
        # Threads remain for everything else, answered while the 6 still hang.
        live = get(gateway.url + "/health/live", timeout=5)
        assert live.status_code == 200 and live.json()["status"] == "ok"
        for _ in range(3):
            other = get(gateway.url + "/fast/echo", timeout=5)
            assert other.status_code == 200 and other.json()["upstream"] == fast.url
        assert probes and set(probes) == {200}
        rejected = [f.result() for f in futures if f.done()]
        assert len(rejected) == 10 and pool.in_flight == 6 and pool.waiting == 0
        for response in rejected:
            assert response.status_code == 503
            assert response.headers["Content-Type"] == "application/json"
            assert response.headers["Retry-After"] == "1"
            error = response.json()["error"]
            assert error["code"] == 503 and "slow" in error["message"]
            assert error["request_id"] == response.headers["X-Request-ID"]
        assert slow.hung == 6 and len(slow.requests) == 6  # none of them reached it
        slow.release()
        finished = [f.result(timeout=30) for f in futures]
        assert sorted(r.status_code for r in finished) == [502] * 6 + [503] * 10
    finally:
        stop.set()
        slow.release()
        executor.shutdown(wait=True)
    wait_until(lambda: pool.in_flight == 0, timeout=5)
    assert pool.rejected_by == {"queue_full": 0, "queue_timeout": 2, "stalled": 8}
    metrics = get(gateway.url + "/metrics").text
    for reason, count in (("queue_timeout", 2), ("stalled", 8)):
        assert (f'gateway_upstream_rejections_total{{reason="{reason}",upstream="slow"}} '
                f'{count}.0') in metrics
    assert 'gateway_upstream_max_in_flight{upstream="slow"} 6.0' in metrics
    assert 'gateway_upstream_max_in_flight{upstream="fast"} 6.0' in metrics
    assert not [line for line in metrics.splitlines()
                if line.startswith("gateway_upstream_rejections_total{")
                and 'upstream="fast"' in line]
    assert pool.rejected == 10
    # The access log says why each was refused.
    access = [json.loads(r.msg.to_json()) for r in caplog.records
              if r.name == "meetinity_gateway.access"]
    reasons = sorted(a["upstream_rejected"] for a in access if a.get("upstream_rejected"))
    assert reasons == ["queue_timeout"] * 2 + ["stalled"] * 8
    assert all(a["status"] == 503 for a in access if a.get("upstream_rejected"))


def test_a_burst_on_a_healthy_service_waits_for_slots_instead_of_503(gateways, faulty):
    """64 requests at once, 8 threads, the shipped cap (6) and queue: every one is served;
    the cap still holds (the service never sees more than 6 at a time)."""
    service = faulty()
    gateway = gateways({"svc": service.url}, threads=8)
    pool = gateway.pool("svc")
    with ThreadPoolExecutor(64) as executor:
        codes = list(executor.map(
            lambda i: get(gateway.url + f"/svc/{i}/slow?seconds=0.02").status_code, range(64)))
    assert codes == [200] * 64
    assert pool.rejected == 0 and len(service.requests) == 64
    assert 1 <= service.most_at_once <= 6


def test_the_cap_counts_until_the_response_head_not_while_the_body_streams(
        gateways, faulty):
    """A body in progress (a slow reader, a long stream) holds no slot: with a cap of 1
    and no queue, the service still answers others; the cap counts only what waits on it."""
    service = faulty("stall")
    gateway = gateways({"svc": service.url}, max_in_flight=1, queue_size=0)
    pool = gateway.pool("svc")
    with session() as client:
        streaming = client.get(gateway.url + "/svc/stream", stream=True, timeout=30)
        try:
            assert streaming.status_code == 200
            assert next(streaming.iter_content(1024)) == b"a" * 1024
            # The first answer is still being sent, its slot is free; the target still
            # counts it as outstanding (for least_outstanding and the status page).
            assert pool.in_flight == 0
            assert [row["outstanding"] for row in pool.snapshot()] == [1]
            service.mode = "ok"
            for method in ("GET", "POST", "HEAD"):
                assert get(gateway.url + "/svc/echo", method).status_code == 200
            assert pool.rejected == 0
            service.release()
            rest = b"".join(streaming.iter_content(65536))
            assert len(rest) == 128 * 1024 - 1024 and rest.endswith(b"b" * 65536)
        finally:
            streaming.close()
    wait_until(lambda: [row["outstanding"] for row in pool.snapshot()] == [0], timeout=5)
    assert pool.in_flight == 0


def test_over_the_cap_without_a_queue_the_503_is_immediate(gateways, faulty):
    service = faulty("hang")
    gateway = gateways({"svc": service.url}, max_in_flight=1, queue_size=0, read_timeout=30)
    with ThreadPoolExecutor(1) as executor:
        hung = executor.submit(get, gateway.url + "/svc/hang")
        wait_until(lambda: service.hung == 1)
        for method in ("GET", "POST", "HEAD"):
            busy = get(gateway.url + "/svc/echo", method)
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        assert gateway.pool("svc").rejected_by["queue_full"] == 3
        assert len(service.requests) == 1
        service.release()
        assert hung.result(30).status_code == 502
    wait_until(lambda: gateway.pool("svc").in_flight == 0, timeout=5)


def test_shipped_gateway_serves_a_service_that_answered_503_three_times(gateway_factory,
                                                                        upstream):
    """The issue's reproduction, on the shipped gateway.ini: three requests to a path the
    service answers 503 used to eject its only target for 10, 20, 40 s."""
    gateway = gateway_factory()
    client = session()
    for _ in range(3):
        response = client.get(gateway.url + "/api/auth/status?code=503", timeout=10)
        assert response.status_code == 503 and response.json() == {"status": 503}
    response = client.get(gateway.url + "/api/auth/echo", timeout=10)
    assert response.status_code == 200
    health = client.get(gateway.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["upstreams"] == {"user_service": "up"}
    assert [row["state"] for row in health["targets"]["user_service"]] == ["healthy"]
