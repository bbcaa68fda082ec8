"""The bulkhead alone, under a lock the test holds as an upstream pool would.

Its behaviour inside a pool (waiting, first come first served, stalls, the 503) is in
tests/test_upstream.py and tests/test_upstream_faults.py.
"""
from __future__ import annotations

import threading

import pytest

from meetinity_gateway.proxy.bulkhead import BUSY_REASONS, Bulkhead, UpstreamBusy
from tests.conftest import wait_until


def test_without_a_cap_every_slot_is_counted_and_none_refused():
    lock = threading.Lock()
    bulkhead = Bulkhead(lock, name="svc")
    with lock:
        for _ in range(50):
            bulkhead.take()
    assert bulkhead.in_flight == 50 and bulkhead.waiting == 0 and bulkhead.rejected == 0
    with lock:
        for _ in range(50):
            bulkhead.release()
    assert bulkhead.in_flight == 0


@pytest.mark.parametrize("size, timeout, kept", [
    (3, 0.0, (0, 0.0)), (0, 2.0, (0, 0.0)), (3, 2.0, (3, 2.0)),
])
def test_a_queue_needs_both_a_size_and_a_timeout(size, timeout, kept):
    bulkhead = Bulkhead(threading.Lock(), max_in_flight=1, queue_size=size,
                        queue_timeout=timeout)
    assert (bulkhead.queue_size, bulkhead.queue_timeout) == kept


@pytest.mark.parametrize("kwargs, message", [
    ({"max_in_flight": 0}, "max_in_flight must be at least 1"),
    ({"queue_size": -1}, "queue_size and queue_timeout"),
    ({"queue_timeout": -0.5}, "queue_size and queue_timeout"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Bulkhead(threading.Lock(), **kwargs)


def test_a_waiter_lets_go_of_the_lock_and_gets_the_slot_handed_over():
    lock = threading.Lock()
    bulkhead = Bulkhead(lock, name="svc", max_in_flight=1, queue_size=1, queue_timeout=30)
    with lock:
        bulkhead.take()
    taken = threading.Event()

    def wait_for_a_slot():
        with lock:
            bulkhead.take()
        taken.set()

    waiter = threading.Thread(target=wait_for_a_slot, daemon=True)
    waiter.start()
    wait_until(lambda: bulkhead.waiting == 1)
    with lock:  # free while the waiter waits
        with pytest.raises(UpstreamBusy) as info:
            bulkhead.take(wait=False)
        bulkhead.release()
    assert info.value.reason == "queue_full" and "svc" in info.value.message
    assert taken.wait(10)
    waiter.join(10)
    assert bulkhead.in_flight == 1 and bulkhead.waiting == 0  # handed over, counted once
    assert bulkhead.rejected_by == dict.fromkeys(BUSY_REASONS, 0) | {"queue_full": 1}
    with lock:
        bulkhead.release()
    assert bulkhead.in_flight == 0
