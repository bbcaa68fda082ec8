"""The upstream never receives more requests than the clients sent: retries and 1xx handling.

Two raw-socket targets behind one upstream (tests/rawkit.py), the shipped gateway.ini
under waitress, every failure a target can show after the request reached it: a failing
answer, a reset, an unrequested 101, interim responses then a reset, a read timeout. A
request that is not idempotent (POST, PATCH) reaches exactly one target; an idempotent one
may be retried on the *other* target, never sent twice to the same one; reading past
interim responses sends nothing.
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


@pytest.mark.parametrize("method", ["POST", "PATCH", "GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
def test_requests_reach_a_target_at_most_once_and_unsafe_ones_one_target(
        gateway_factory, targets, method):
    first, second = targets
    gateway = gateway_factory(USER_SERVICE_URL=f"{first.url}, {second.url}",
                              UPSTREAM_MAX_FAILS="1000", UPSTREAM_READ_TIMEOUT="1")
    idempotent = method not in ("POST", "PATCH")
    body = None if method in ("GET", "HEAD", "DELETE", "OPTIONS") else b'{"name": "x"}'
    for script, status in (("answer_503", 503), ("reset_after_request", 502),
                           ("switching", 502), ("hints_then_reset", 502), ("stall", 504),
                           ("hints_then_answer", 200)):
        before = [list(first.requests), list(second.requests)]
        answer = get(gateway.url, f"/api/auth/{script}", method=method, body=body)
        assert answer.status == status, (script, answer)
        sent = [len(first.requests) - len(before[0]), len(second.requests) - len(before[1])]
        assert max(sent) == 1, (script, sent)  # never twice to one target
        if idempotent and status != 200:
            assert sum(sent) == 2, (script, sent)  # retried once, on the other target
        else:
            assert sum(sent) == 1, (script, sent)
        if body is not None:
            new = first.requests[len(before[0]):] + second.requests[len(before[1]):]
            assert all(request.body == body for request in new)
