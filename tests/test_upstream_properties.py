"""Pool invariants under any sequence of outcomes (Hypothesis, fake clock, no sockets).

Whatever targets answer, in whatever order, with attempts overlapping and outcomes arriving
late: never more than the allowed share ejected; :meth:`UpstreamPool.acquire` never raises
while targets exist (below the concurrency cap, and always at it); the in-flight counts
return to zero; an outcome of an attempt from an earlier state changes nothing; a burst of
attempts started together ejects a target at most once.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from meetinity_gateway.proxy.bulkhead import UpstreamBusy
from meetinity_gateway.proxy.targets import parse_targets
from meetinity_gateway.proxy.upstream import UpstreamPool

STATUSES = st.sampled_from([200, 204, 404, 500, 502, 503, 504])


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class PoolMachine(RuleBasedStateMachine):
    """Drives one pool with overlapping attempts, outcomes, time and re-checks."""

    @initialize(
        count=st.integers(1, 5),
        weights=st.lists(st.integers(1, 4), min_size=5, max_size=5),
        percent=st.sampled_from([0, 10, 34, 50, 100]),
        max_fails=st.integers(1, 4),
        cap=st.sampled_from([None, 1, 3, 8]),
        balance=st.sampled_from(["round_robin", "least_outstanding"]),
        failure_statuses=st.sampled_from(["", "503", "502, 503, 504"]),
        recheck=st.sampled_from([0, 1.0]),
    )
    def start(self, count, weights, percent, max_fails, cap, balance, failure_statuses,
              recheck):
        spec = ", ".join(f"http://127.0.0.{i + 1}:1 weight={weights[i]}" for i in range(count))
        self.clock = FakeClock()
        self.answer: int | None = None  # what a re-check hears
        self.pool = UpstreamPool(
            parse_targets(spec), name="svc", balance=balance, max_fails=max_fails,
            eject_time=10, max_eject_percent=percent, max_in_flight=cap,
            failure_statuses=failure_statuses, eject_recheck=recheck, clock=self.clock,
        )
        # Re-checks ask the model, never the network (the background thread does too).
        self.pool.ask = lambda target, path=None, timeout=None: self.answer
        self.allowed = 0 if not percent else max(1, count * percent // 100)
        self.open: list[tuple[object, float]] = []  # (target, when its attempt began)

    def teardown(self):
        pool = getattr(self, "pool", None)
        if pool is None:
            return
        try:
            for target, _ in self.open:
                pool.done(target)
            self.open.clear()
            assert pool.in_flight == 0
            assert all(target.outstanding == 0 for target in pool.targets)
        finally:
            pool.close()

    # -- rules -------------------------------------------------------------------------------

    @rule(excluding=st.booleans())
    def acquire(self, excluding):
        pool = self.pool
        exclude = {pool.targets[0]} if excluding else ()
        full = pool.max_in_flight is not None and len(self.open) >= pool.max_in_flight
        try:
            target = pool.acquire(exclude)
        except UpstreamBusy:
            assert full, "refused below the cap"
            return
        assert not full, "admitted over the cap"
        if target is None:
            # Only the excluded target was a candidate.
            assert excluding
            return
        assert target in pool.targets and target not in exclude
        self.open.append((target, self.clock()))

    @precondition(lambda self: self.open)
    @rule(data=st.data(), outcome=st.one_of(st.booleans(), STATUSES))
    def finish(self, data, outcome):
        index = data.draw(st.integers(0, len(self.open) - 1))
        target, began = self.open.pop(index)
        if isinstance(outcome, bool):
            self.pool.record(target, outcome, since=began)
        else:
            self.pool.answered(target, outcome, since=began)
        self.pool.done(target)

    @rule(size=st.integers(2, 8), index=st.integers(0, 4))
    def burst_of_failures(self, size, index):
        """Attempts started together, all failing later: at most one more ejection."""
        pool = self.pool
        target = pool.targets[index % len(pool.targets)]
        began = self.clock()
        before = target.ejections
        self.clock.now += 1
        for _ in range(size):
            pool.record(target, False, since=began)
        assert target.ejections - before <= 1

    @rule(index=st.integers(0, 4), ok=st.booleans())
    def outcome_from_an_earlier_state(self, index, ok):
        """A late outcome of an attempt that began before the target's state changed."""
        pool = self.pool
        target = pool.targets[index % len(pool.targets)]
        if target.period == float("-inf"):
            return
        before = pool.snapshot()
        pool.record(target, ok, since=target.period - 0.5)
        assert pool.snapshot() == before

    @rule(seconds=st.sampled_from([0.5, 1, 5, 10, 30, 120]))
    def time_passes(self, seconds):
        self.clock.now += seconds

    @rule(answer=st.sampled_from([None, 200, 404, 503]))
    def recheck(self, answer):
        self.answer = answer
        self.pool.recheck()

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def never_more_than_the_share_ejected(self):
        ejected = sum(1 for target in self.pool.targets if target.ejected)
        assert ejected <= self.allowed

    @invariant()
    def in_flight_counts_match(self):
        pool = self.pool
        assert pool.in_flight == len(self.open)
        assert sum(target.outstanding for target in pool.targets) == len(self.open)
        assert all(target.outstanding >= 0 for target in pool.targets)

    @invariant()
    def an_ejected_target_is_not_ejected_again(self):
        """Failures while a target is ejected are spent: its ejection neither restarts nor
        grows until it was re-admitted."""
        seen = getattr(self, "seen", {})
        for target in self.pool.targets:
            now = (target.ejected, target.ejections, target.ejected_until)
            before = seen.get(id(target))
            if before is not None and before[0] and now[0]:
                assert now == before
            seen[id(target)] = now
        self.seen = seen

    @invariant()
    def ejection_steps_are_bounded(self):
        for row in self.pool.snapshot():
            if row["state"] == "ejected":
                assert 0 <= row["ejected_for"] <= 10 * 8


TestPoolInvariants = PoolMachine.TestCase
TestPoolInvariants.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_acquire_always_finds_a_target_whatever_was_ejected(count):
    """Everything ejected and the clock frozen: every acquire still returns a target."""
    spec = ", ".join(f"http://127.0.0.{i + 1}:1" for i in range(count))
    pool = UpstreamPool(parse_targets(spec), name="svc", max_fails=1, max_eject_percent=100,
                        eject_recheck=0, clock=lambda: 5.0)
    try:
        for target in pool.targets:
            pool.record(target, False)
        assert all(target.ejected for target in pool.targets)
        held = [pool.acquire() for _ in range(count * 3)]
        assert all(target is not None for target in held)
        for target in held:
            pool.done(target)
        assert pool.in_flight == 0
    finally:
        pool.close()
