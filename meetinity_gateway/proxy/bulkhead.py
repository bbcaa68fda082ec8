"""The concurrency cap of one upstream (a bulkhead) with a short first-come-first-served queue.

With ``max_in_flight = N``, at most N requests are *waiting on the upstream* (from
:meth:`UpstreamPool.acquire <meetinity_gateway.proxy.upstream.UpstreamPool.acquire>` until
its response head arrived, :meth:`~meetinity_gateway.proxy.upstream.UpstreamPool.responded`,
or the attempt failed). A response body then streams outside the cap, at the client's pace:
slow readers or long streams (server-sent events) of a healthy service never take its slots
(the server's send timeout bounds slow readers; a body that stalls mid-way, its
``read_timeout``). A request over the cap *waits* for a slot, first come first served, like
Envoy's pending requests or nginx' ``upstream queue``: at most ``queue_size`` wait, each at
most ``queue_timeout`` seconds. A burst against a service that answers is therefore queued
for the milliseconds a slot takes to free, and served. :class:`UpstreamBusy` (a JSON 503
with ``Retry-After``) is raised, with its ``reason``, only when

- ``queue_full``: ``queue_size`` requests are waiting already;
- ``queue_timeout``: the request waited ``queue_timeout`` and no slot freed;
- ``stalled``: a request timed out waiting and no request to the upstream has finished
  since. The upstream is not making progress (it hangs), so further requests are refused
  at once instead of each waiting ``queue_timeout``: a hung service holds ``max_in_flight``
  threads plus, once per stall, ``queue_size`` threads for ``queue_timeout``. The next
  request that finishes (an answer, or a read timeout) ends the stall.

Waiters hold server threads too: set ``max_in_flight + queue_size`` to at most the server's
threads (see :func:`default_max_in_flight` and :func:`default_queue_size`), so that a
service that never answers holds at most ``max_in_flight`` threads for long, and the others
and ``/health/live`` keep theirs. ``rejected`` counts the refusals, and ``rejected_by`` by
reason.

A :class:`Bulkhead` has no lock of its own: it works under its owner's (the upstream pool's),
so that a request takes its slot and its target in one lock round trip.
"""
from __future__ import annotations

import collections
import threading
import typing as t

from meetinity_gateway.problems import ServiceUnavailable

__all__ = [
    "BUSY_REASONS",
    "Bulkhead",
    "UpstreamBusy",
    "default_max_in_flight",
    "default_queue_size",
]

#: Why :meth:`Bulkhead.take` refused: too many waiting, waited too long, or the upstream
#: has finished nothing since a request timed out waiting (see the module docstring).
BUSY_REASONS = ("queue_full", "queue_timeout", "stalled")


class UpstreamBusy(ServiceUnavailable):
    """The upstream is at its ``max_in_flight`` cap and the request could not wait for a
    slot (``reason``, one of :data:`BUSY_REASONS`): 503 with ``Retry-After``."""

    _WHY = {
        "queue_full": "and {queue} requests waiting",
        "queue_timeout": "and no slot freed within {timeout:g} s",
        "stalled": "and none finished lately",
    }

    def __init__(self, upstream: str, limit: int, reason: str = "queue_full",
                 retry_after: int = 1, *, queue: int = 0, timeout: float = 0.0) -> None:
        why = self._WHY[reason].format(queue=queue, timeout=timeout)
        super().__init__(
            f"upstream {upstream} is busy ({limit} requests in flight {why}), "
            "try again later",
            headers=[("Retry-After", str(retry_after))],
        )
        self.reason = reason
        self.retry_after = retry_after


def default_max_in_flight(threads: int) -> int:
    """The default cap per upstream for a server with ``threads`` worker threads.

    ``threads - max(2, threads // 4)``, at least 1: two threads (a quarter of them on big
    servers) stay free for the other upstreams and ``/health/live`` however slow one
    upstream is. 8 threads -> 6, 4 -> 2, 16 -> 12, 32 -> 24; with 1 or 2 threads, 1.
    """
    if threads < 1:
        raise ValueError("threads must be at least 1")
    return max(1, threads - max(2, threads // 4))


def default_queue_size(threads: int, max_in_flight: int | None) -> int:
    """The default number of requests that may wait for a slot of one upstream: the threads
    the cap leaves, ``threads - max_in_flight`` (at least 1), so that a burst against one
    healthy upstream can use every thread (8 threads, cap 6 -> 2). 0 without a cap."""
    if max_in_flight is None:
        return 0
    return max(1, threads - max_in_flight)


class _Waiter:
    """A request waiting for a slot: ``granted`` once a finishing request handed its slot
    over, ``ready`` (on the owner's lock) signalled then."""

    __slots__ = ("ready", "granted")

    def __init__(self, lock: threading.Lock) -> None:
        self.ready = threading.Condition(lock)
        self.granted = False


class Bulkhead:
    """The slots of one upstream and the requests waiting for one (see the module docstring).

    :meth:`take` and :meth:`release` are called with ``lock`` held; the counters
    (``in_flight``, :attr:`waiting`, ``rejected``, ``rejected_by``) are read without it.

    :param lock: the owner's lock (the upstream pool's), held around every call.
    :param name: the upstream's name, for :class:`UpstreamBusy`'s message.
    :param max_in_flight: requests in flight to this upstream at most (``None``: no cap;
        they are counted all the same).
    :param queue_size: requests that may wait for a slot when ``max_in_flight`` are in flight
        (0: none, refused at once).
    :param queue_timeout: seconds a request waits for a slot before it is refused (0: no
        wait).
    """

    def __init__(self, lock: threading.Lock, *, name: str = "upstream",
                 max_in_flight: int | None = None, queue_size: int = 0,
                 queue_timeout: float = 0.0) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1 (None: no cap)")
        if queue_size < 0 or queue_timeout < 0:
            raise ValueError("queue_size and queue_timeout must be 0 (no queue) or positive")
        self.name = name
        self.max_in_flight = max_in_flight
        self.queue_size = queue_size if queue_timeout > 0 else 0
        self.queue_timeout = queue_timeout if queue_size > 0 else 0.0
        #: Requests holding a slot: taken, and not released.
        self.in_flight = 0
        #: Requests refused since the bulkhead was made, and by reason.
        self.rejected = 0
        self.rejected_by: dict[str, int] = dict.fromkeys(BUSY_REASONS, 0)
        self._lock = lock
        #: Requests waiting for a slot, longest first.
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._stalled = False  # a waiter timed out and nothing finished since

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._queue)

    def take(self, wait: bool = True) -> None:
        """Hold a slot (under the lock). At the cap, or while others wait, wait until a
        finishing request hands its slot over (unless ``wait`` is false), or raise
        :class:`UpstreamBusy`."""
        if self.max_in_flight is not None and (
                self.in_flight >= self.max_in_flight or self._queue):
            self._wait_for_slot(wait)
        else:
            self.in_flight += 1

    def _wait_for_slot(self, wait: bool) -> None:
        """Wait (under the lock) until a finishing request hands its slot over, or raise
        :class:`UpstreamBusy`. The slot comes already counted in flight."""
        if not wait or self._stalled or len(self._queue) >= self.queue_size:
            self._refuse("stalled" if self._stalled and wait else "queue_full")
        waiter = _Waiter(self._lock)
        self._queue.append(waiter)
        if not waiter.ready.wait_for(lambda: waiter.granted, self.queue_timeout):
            self._queue.remove(waiter)
            self._stalled = True
            self._refuse("queue_timeout")

    def _refuse(self, reason: str) -> t.NoReturn:
        self.rejected += 1
        self.rejected_by[reason] += 1
        raise UpstreamBusy(self.name, t.cast(int, self.max_in_flight), reason,
                           queue=len(self._queue), timeout=self.queue_timeout)

    def release(self) -> None:
        """A slot is free (under the lock): handed to the longest waiter, if any. Handing
        it over (rather than freeing it) keeps a newcomer from taking it first, so a waiter
        is never starved by the threads that keep finishing and coming back."""
        self._stalled = False  # the upstream finished one: it is making progress
        if self._queue:
            waiter = self._queue.popleft()
            waiter.granted = True
            waiter.ready.notify()
        else:
            self.in_flight -= 1
