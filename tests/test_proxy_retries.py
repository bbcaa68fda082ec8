"""The upstream never receives more requests than the clients sent: retries and 1xx handling.

Two raw-socket targets behind one upstream (tests/rawkit.py), the shipped gateway.ini
under waitress, every failure a target can show after the request reached it: a failing
answer, a reset, an unrequested 101, interim responses then a reset, a read timeout. A
request that is not idempotent (POST, PATCH) reaches exactly one target; an idempotent one
may be retried on the *other* target, never sent twice to the same one; reading past
interim responses sends nothing.

Outlier ejection is on, as shipped (three consecutive failures eject a target, at most half
of them at once). Between two failures, answered requests reach both targets, as real
traffic does: each target's run of consecutive failures ends, and every failure meets both
targets in rotation. Back to back, the same failures eject one of the two: what a retry
does then is tested too. Counts are of ``forwarded`` requests, without the gateway's own
``GET /health`` re-checks of an ejected target (tests/rawkit.py).
"""
from __future__ import annotations

import pytest

from tests.rawkit import ScriptedUpstream, get, response
from tests.test_proxy_hostile import HINTS, dispatch


def answer_503(request, conn):
    conn.send(response(503, b"{}", reason="Service Unavailable"))


def reset_after_request(request, conn):
    conn.reset()


def stall(request, conn):
    conn.pause(2.5)


def hints_then_answer(request, conn):
    conn.send(HINTS + HINTS + response(body=b"answer"))


SCRIPTS = {"answer_503": answer_503, "reset_after_request": reset_after_request,
           "stall": stall, "hints_then_answer": hints_then_answer}


def handler(request, conn):
    script = SCRIPTS.get(request.path.rsplit("/", 1)[-1])
    return script(request, conn) if script else dispatch(request, conn)


@pytest.fixture
def targets():
    with ScriptedUpstream(handler) as first, ScriptedUpstream(handler) as second:
        yield first, second


def answered_by_both(gateway, first, second) -> None:
    """Answered requests until each target has answered one (round robin: two)."""
    before = [len(first.forwarded), len(second.forwarded)]
    for _ in range(4):
        assert get(gateway.url, "/api/auth/plain").status == 200
        if len(first.forwarded) > before[0] and len(second.forwarded) > before[1]:
            return
    raise AssertionError("answered requests did not reach both targets")


def sent_by(method, body, gateway, first, second, script, status) -> list[int]:
    """Send ``script`` once; how many requests each target got (with the body sent)."""
    before = [len(first.forwarded), len(second.forwarded)]
    answer = get(gateway.url, f"/api/auth/{script}", method=method, body=body)
    assert answer.status == status, (script, answer)
    new = [first.forwarded[before[0]:], second.forwarded[before[1]:]]
    if body is not None:
        assert all(request.body == body for request in new[0] + new[1])
    return [len(requests) for requests in new]


@pytest.mark.parametrize("method", ["POST", "PATCH", "GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
def test_requests_reach_a_target_at_most_once_and_unsafe_ones_one_target(
        gateway_factory, targets, method):
    first, second = targets
    gateway = gateway_factory(USER_SERVICE_URL=f"{first.url}, {second.url}",
                              UPSTREAM_READ_TIMEOUT="1")
    idempotent = method not in ("POST", "PATCH")
    body = None if method in ("GET", "HEAD", "DELETE", "OPTIONS") else b'{"name": "x"}'
    for script, status in (("answer_503", 503), ("reset_after_request", 502),
                           ("switching", 502), ("hints_then_reset", 502), ("stall", 504),
                           ("hints_then_answer", 200)):
        sent = sent_by(method, body, gateway, first, second, script, status)
        assert max(sent) == 1, (script, sent)  # never twice to one target
        if idempotent and status != 200:
            assert sum(sent) == 2, (script, sent)  # retried once, on the other target
        else:
            assert sum(sent) == 1, (script, sent)
        # Traffic goes on between failures: both targets answer, which ends their runs of
        # consecutive failures. Without it, the failures of an idempotent request (one on
        # each target) would eject a target at the third script, and the fourth would have
        # only the other one left to try: no retry, [1, 0] (tested below).
        answered_by_both(gateway, first, second)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_back_to_back_failures_eject_one_target_and_retries_skip_it(
        gateway_factory, targets, method):
    first, second = targets
    gateway = gateway_factory(USER_SERVICE_URL=f"{first.url}, {second.url}")
    idempotent = method == "GET"
    body = None if idempotent else b'{"name": "x"}'
    # Failures and nothing else: a GET meets both targets each time (retried), a POST one
    # target at a time (never retried), so six of them bring both to three in a row.
    for _ in range(3 if idempotent else 6):
        sent = sent_by(method, body, gateway, first, second, "reset_after_request", 502)
        assert max(sent) == 1 and sum(sent) == (2 if idempotent else 1), sent
    # The first to reach max_fails (3) is ejected; the share cap (max_eject_percent 50 of
    # two targets: one) keeps the other in rotation. Every request now goes to that one,
    # and a failure there has no other target left to be retried on.
    sent = sent_by(method, body, gateway, first, second, "reset_after_request", 502)
    assert sorted(sent) == [0, 1], sent
    survivor, ejected = (first, second) if sent[0] else (second, first)
    before = len(ejected.requests)
    for _ in range(4):
        assert sent_by("GET", None, gateway, first, second, "plain", 200) == (
            [1, 0] if survivor is first else [0, 1])
    # The gateway's own view (/health's per-target detail, to a loopback client): that one
    # ejected, the other in rotation. /health asks both targets GET /health itself.
    report = get(gateway.url, "/health")
    assert report.status == 200 and report.json()["status"] == "degraded", report
    states = {row["target"]: row["state"]
              for row in report.json()["targets"]["user_service"]}
    assert states == {ejected.url: "ejected", survivor.url: "healthy"}, states
    # Its ejection lasts eject_time (10 s): since, the ejected target got that probe of the
    # gateway's and no request of a client.
    since = ejected.requests[before:]
    assert since and all(request.gateway_probe for request in since), since
