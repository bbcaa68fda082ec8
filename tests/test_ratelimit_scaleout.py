"""Many gateways, one budget, on the Redis set-ups operators run: four gateway processes on a
real 3-master Redis Cluster and on a real Sentinel set (master, replica, three sentinels),
all on loopback. Budgets are exact; when the Sentinel master dies under a steady trickle the
gateways follow the promotion without a restart, the requests in between follow
RATELIMIT_ON_ERROR, and the budget is exact again afterwards.

The failover numbers (promotion, time for the gateways to follow, requests over budget) are
printed (``pytest -s``) and recorded in docs/scale-out.md."""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import require_tool, wait_until
from tests.redisserver import RedisCluster, SentinelSet
from tests.servers import GatewayProcess, session

GATEWAYS = 4
BUDGET = 50
LOGIN = "/api/auth/login"
#: The gateways sit behind one load balancer (one trusted hop): the test is many clients.
BALANCER = {"TRUSTED_PROXIES": "1"}


@pytest.fixture
def gateways(tmp_path, upstream):
    started: list[GatewayProcess] = []

    def start(storage_uri: str, **env: str) -> list[GatewayProcess]:
        env = {"USER_SERVICE_URL": upstream.url, "RATELIMIT_STORAGE_URI": storage_uri,
               "RATELIMIT_PROCESSES": str(GATEWAYS), "RATE_LIMIT_AUTH": f"{BUDGET}/minute",
               **BALANCER, **env}
        with ThreadPoolExecutor(GATEWAYS) as pool:
            futures = [pool.submit(GatewayProcess, env=env, log=tmp_path / f"gateway{n}.log")
                       for n in range(GATEWAYS)]
            for future in futures:
                started.append(future.result())
        return started[-GATEWAYS:]

    yield start
    for process in started:
        process.stop()


def login(client, gateway: GatewayProcess, who: str):
    return client.post(gateway.url + LOGIN, json={"email": "ada@example.com"}, timeout=10,
                       headers={"X-Forwarded-For": who})


def logins_over(gateways: list[GatewayProcess], who: str, count: int) -> list[int]:
    """``count`` logins of client ``who``, spread over the gateways, one caller per gateway
    at once (so they race for the same counter); the statuses."""
    statuses: list[int] = []
    lock = threading.Lock()

    def caller(gateway: GatewayProcess, share: int) -> None:
        with session() as client:
            for _ in range(share):
                response = login(client, gateway, who)
                if response.status_code == 429:
                    assert response.json()["error"]["code"] == 429
                    assert int(response.headers["Retry-After"]) >= 1
                with lock:
                    statuses.append(response.status_code)

    with ThreadPoolExecutor(len(gateways)) as pool:
        shares = [count // len(gateways) + (n < count % len(gateways))
                  for n in range(len(gateways))]
        for future in [pool.submit(caller, g, s) for g, s in zip(gateways, shares)]:
            future.result()
    return statuses


def assert_exact_budget(statuses: list[int], count: int) -> None:
    assert len(statuses) == count
    assert statuses.count(200) == BUDGET, statuses
    assert statuses.count(429) == count - BUDGET, statuses


# -- Redis Cluster ---------------------------------------------------------------------------

def test_four_gateways_on_a_redis_cluster_keep_every_budget_exact(tmp_path, gateways):
    cluster = RedisCluster(require_tool("redis-server", "a Redis Cluster"), tmp_path / "cluster")
    try:
        group = gateways(cluster.url)
        # 200 logins of one client over the four: exactly the budget passes.
        assert_exact_budget(logins_over(group, "203.0.113.1", 200), 200)
        # Eleven more clients: their counters spread over the three masters (hash slots),
        # and each client still gets exactly its budget.
        for number in range(2, 13):
            assert_exact_budget(logins_over(group, f"203.0.113.{number}", 60), 60)
        import redis

        holding = 0
        for node in cluster.nodes:
            client = redis.Redis(port=node.port, socket_timeout=5)
            holding += client.dbsize() > 0
            client.close()
        assert holding >= 2  # twelve clients on one of three masters: 3**-11
        assert all(g.process.poll() is None for g in group)
    finally:
        cluster.stop()


# -- Redis Sentinel ----------------------------------------------------------------------------

class Trickle:
    """One client's logins, every ``interval`` seconds, round-robin over the gateways, in a
    thread: ``(time, status)`` of each answer."""

    def __init__(self, gateways: list[GatewayProcess], who: str, interval: float = 0.05):
        self.gateways, self.who, self.interval = gateways, who, interval
        self.answers: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        clients = [session() for _ in self.gateways]
        number = 0
        while not self._stop.is_set():
            index = number % len(self.gateways)
            response = login(clients[index], self.gateways[index], self.who)
            if response.status_code == 503:
                assert response.json()["error"]["code"] == 503
                assert int(response.headers["Retry-After"]) >= 1
            self.answers.append((time.monotonic(), response.status_code))
            number += 1
            self._stop.wait(self.interval)
        for client in clients:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def between(self, start: float, end: float = float("inf")) -> list[int]:
        return [status for when, status in self.answers if start <= when < end]


def local_share_bound(share: int, start: float, end: float, window: int = 60) -> int:
    """The most one process admits by itself (its share of a per-minute limit) between the
    wall-clock times ``start`` and ``end``. The local counter is limits' in-memory sliding
    window, whose windows follow the clock: past a window's start the previous window's count
    weighs less and less, so a failover that crosses it may admit a few more (the floor of
    ``share * elapsed / window``, rounded up)."""
    crossings = math.floor(end / window) - math.floor(start / window)
    if crossings == 0:
        return share
    # The last window started at `boundary`; each earlier one allowed at most its share.
    boundary = math.floor(end / window) * window
    weight = 1 - (end - boundary) / window  # of the previous window, at the latest moment
    return share * crossings + share - math.floor(share * weight)


def _followed(group: list[GatewayProcess]) -> bool:
    """Every gateway logged that its storage answers again (it counts there again)."""
    return all("answers again" in gateway.stderr() for gateway in group)


@pytest.mark.parametrize("on_error", ["open", "closed"])
def test_four_gateways_follow_a_sentinel_failover(on_error, tmp_path, gateways):
    sentinels = SentinelSet(require_tool("redis-server", "a Redis Sentinel set"),
                            tmp_path)
    trickle = None
    try:
        group = gateways(sentinels.url, RATELIMIT_ON_ERROR=on_error)
        assert_exact_budget(logins_over(group, "198.51.100.1", 200), 200)

        # A client that has spent its budget keeps calling, every 50 ms, over the four.
        spent = "198.51.100.2"
        assert_exact_budget(logins_over(group, spent, 60), 60)
        trickle = Trickle(group, spent)
        time.sleep(1)
        killed, killed_at = time.monotonic(), time.time()
        sentinels.master.stop()
        wait_until(lambda: sentinels.master_port() == sentinels.replica.port, 30)
        promoted = time.monotonic()
        wait_until(lambda: _followed(group), 30)
        followed = time.monotonic()
        followed_at = killed_at + (followed - killed)
        time.sleep(1)  # the trickle goes on against the new master
        trickle.stop()

        before = trickle.between(0, killed)
        during = trickle.between(killed, followed)
        after = trickle.between(followed)
        assert before and set(before) == {429}  # the budget was spent
        assert after and set(after) == {429}  # the new master holds the count
        over = during.count(200)
        if on_error == "open":
            # Each gateway counted alone meanwhile, allowing its share: 50 // 4 = 12.
            assert set(during) <= {200, 429}
            assert over <= GATEWAYS * local_share_bound(BUDGET // GATEWAYS, killed_at,
                                                        followed_at)
        else:
            assert set(during) <= {503, 429} and over == 0
        assert all(g.process.poll() is None for g in group)  # no restart
        print(f"\nsentinel failover (on_error={on_error}, {GATEWAYS} gateways, "
              f"budget {BUDGET}/minute, one login every 50 ms): promoted after "
              f"{promoted - killed:.1f} s, every gateway followed after {followed - killed:.1f} s,"
              f" {len(during)} requests meanwhile, {over} admitted over budget, "
              f"{during.count(503)} answered 503")

        # A new client on the promoted master: exactly its budget.
        assert_exact_budget(logins_over(group, "198.51.100.3", 200), 200)
    finally:
        if trickle is not None:
            trickle.stop()
        sentinels.stop()
