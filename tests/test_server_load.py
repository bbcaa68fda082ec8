"""Issue 18: under a burst, a healthy service is never refused. The shipped ``gateway.ini``
(its bulkhead: ``max_in_flight`` 6 of 8 threads, a queue of 2 waiting up to 0.5 s) under
waitress, granian and gunicorn, in front of a loopback service that answers in 1-50 ms:
every answer, fresh connection or kept alive, 16 to 256 clients at once, is the service's
200. Counts, never durations; only the rate budgets are lifted.
"""
from __future__ import annotations

import http.client
import json
import threading

import pytest

from tests.servers import auth_headers
from tests.test_server_smoke import SERVERS, Served, require_server
from tests.upstream import Upstream

#: (clients at once, requests per client, kept-alive connection?) for each server.
ROUNDS = [(16, 4, True), (64, 3, True), (64, 1, False), (256, 1, False)]


def burst(port: int, clients: int, each: int, keep_alive: bool) -> list[tuple[int, object]]:
    """``clients`` threads released together, ``each`` requests apiece (one kept-alive
    connection per client, or a fresh one per request); every (status, JSON body)."""
    headers = auth_headers()
    answers: list[tuple[int, object]] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(number: int) -> None:
        connection = None
        own = []
        try:
            start.wait(60)
            for index in range(each):
                if connection is None or not keep_alive:
                    if connection is not None:
                        connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                # The service sleeps 1 to 50 ms, a different time for each request.
                delay = ((number * each + index) % 50 + 1) / 1000
                connection.request("GET", f"/api/users/42/slow?seconds={delay}",
                                   headers=headers)
                response = connection.getresponse()
                body = response.read()
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = body[:200]
                own.append((response.status, payload))
        except Exception as exc:  # counted as a failed answer, shown in the assertion
            own.append((0, repr(exc)))
        finally:
            if connection is not None:
                connection.close()
            with lock:
                answers.extend(own)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers


@pytest.mark.parametrize("name", SERVERS)
def test_a_burst_on_a_healthy_service_is_all_200_under_each_server(name):
    require_server(name)
    with Upstream() as service:
        # The shipped [server:main] threads (8), the shipped bulkhead; rate budgets lifted.
        gateway = Served(name, {"USER_SERVICE_URL": service.url,
                                "RATE_LIMIT_USERS": "1000000/minute"}, threads=None)
        try:
            for clients, each, keep_alive in ROUNDS:
                answers = burst(gateway.port, clients, each, keep_alive)
                refused = [answer for answer in answers if answer != (200, {"slow": True})]
                assert len(answers) == clients * each, (clients, keep_alive)
                assert not refused, (clients, keep_alive, len(refused), refused[:3])
        finally:
            gateway.stop()
        total = sum(clients * each for clients, each, _ in ROUNDS)
        assert len(service.requests) == total  # each reached the service once
        # The bulkhead still held: never more than its cap at the service at once.
        assert 1 <= service.most_at_once <= 6
