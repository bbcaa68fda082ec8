"""Upstream pools: balancing, outlier ejection, a concurrency cap, active checks, DNS refresh.

An :class:`UpstreamPool` is the set of *targets* behind one upstream name: one per address
of each configured URL, written and resolved as :mod:`meetinity_gateway.proxy.targets` says.
Targets whose address stays keep their state when the names are resolved again; when a
lookup fails, the last addresses stay.

* **Balancing.** ``round_robin`` (smooth weighted round-robin, the default) or
  ``least_outstanding`` (fewest requests in flight per unit of weight).
* **Outlier ejection** (passive health, after Envoy's outlier detection). ``max_fails``
  consecutive failures of a target eject it for a while. What counts as a failure is the
  target's doing, never the client's: no connection, a reset, a timeout — and an answer
  with one of ``failure_statuses`` only where configured (empty by default: a service
  answering 503 to some path is answering; a client could otherwise eject a service by
  calling that path three times). The rules that keep ejection from black-holing a service:

  - *a share cap*: never more than ``max_eject_percent`` % of the targets are ejected at
    once (at least one may always be, so that a pool of one or two still shows its
    outlier); a target over the cap stays in rotation;
  - *panic routing*: when every target is ejected anyway (one-target pools, DNS changes,
    ``max_eject_percent = 100``), requests go to all of them as if none were: a chance to
    be served beats a certain 503;
  - *one count per period*: an outcome counts only toward the state in which its attempt
    started. Failures of requests that were already in flight when the target was ejected
    (a burst of timeouts) or that started while it was ejected are spent: they neither
    eject it again nor, after re-admission, count toward the next ejection;
  - *no half-open trial*: when its ejection time is over, a target is re-admitted as a
    whole and needs ``max_fails`` new failures to be ejected again. The n-th ejection in a
    row lasts ``n * eject_time`` (at most 8x), and each ``eject_time`` a target spends
    healthy takes one step back, so one unlucky request cannot double the next ejection;
  - *prompt re-admission*: with ``eject_recheck > 0`` (the default), a target whose
    ejection time is over is first asked ``GET <health_path>`` by the background thread,
    then every ``eject_recheck`` seconds until it answers: it is back as soon as it answers
    (an HTTP answer that traffic would not count as a failure — a 404 means reachable — or,
    with ``health_interval`` on, a 2xx), and a still-dead target gets no real request.
    With ``eject_recheck = 0`` it is re-admitted when its ejection time ends. A success of
    a real request (panic routing) re-admits at once.

* **Concurrency cap (bulkhead) with a short queue.** ``max_in_flight``, ``queue_size`` and
  ``queue_timeout`` are those of the pool's :class:`~meetinity_gateway.proxy.bulkhead.Bulkhead`
  (its module says what they do and when :class:`~meetinity_gateway.proxy.bulkhead.UpstreamBusy`
  is raised). :meth:`UpstreamPool.acquire` takes a slot and picks the target under one lock;
  :meth:`UpstreamPool.responded` gives the slot back when the response head arrived,
  :meth:`UpstreamPool.done` when the attempt failed before.
* **Active health.** With ``health_interval > 0`` the background thread sends
  ``GET <target><health_path>`` to every target at that interval; the results feed the same
  state (a 2xx re-admits an ejected target whose ejection time is over, anything else counts
  as a failure).
* **Background thread.** DNS refresh, active checks and re-checks of ejected targets run in
  one daemon thread per pool, started when first needed. It holds the pool only through a
  weak reference and stops when :meth:`UpstreamPool.close` is called or the pool is garbage
  collected: no signals, works the same on Windows.
* **Connections.** Each target has its own keep-alive pool of ``pool_size`` idle
  connections (size it to the server's threads; see :mod:`meetinity_gateway.proxy.client`).
  A connection idle for more than ``idle_timeout`` seconds is closed instead of reused:
  many servers drop idle keep-alive connections after about 5 s, and a request written
  into a connection the upstream is closing at that moment fails with a spurious 502
  (fatal for a POST, which must not be retried).

Use alone::

    from meetinity_gateway.proxy.targets import parse_targets
    from meetinity_gateway.proxy.upstream import UpstreamPool
    pool = UpstreamPool(parse_targets("http://a:5001 weight=2, http://b:5001"), name="users")
    target = pool.acquire()          # may raise proxy.bulkhead.UpstreamBusy
    began = pool.clock()
    ...  # target.pool.request(...), then pool.responded() and
         # pool.answered(target, status, since=began), at the end pool.done(target,
         # holding=False); or pool.record(target, False, since=began), pool.done(target)

:param specs: the targets (see :func:`~meetinity_gateway.proxy.targets.parse_targets`).
:param name: the upstream's name, for logs and errors.
:param balance: ``round_robin`` or ``least_outstanding``.
:param max_fails: consecutive failures that eject a target.
:param eject_time: seconds of a first ejection (``n * eject_time`` for the n-th in a row,
    at most 8x).
:param failure_statuses: answer statuses (5xx) that count as the target's failure; empty
    by default (only connect errors, resets and timeouts count).
:param max_eject_percent: largest share of the targets ejected at once, 0-100 (0: never
    eject); at least one target may always be ejected.
:param eject_recheck: seconds between active checks of a target whose ejection time is
    over, until it answers (0: re-admit without asking when the time is over).
:param max_in_flight: requests in flight to this upstream at most (``None``: no cap);
    ``queue_size`` and ``queue_timeout``: its queue (see
    :class:`~meetinity_gateway.proxy.bulkhead.Bulkhead`).
:param health_interval: seconds between active ``GET /health`` rounds (0: off).
:param health_path: the path probed on each target.
:param health_timeout: seconds allowed to one probe.
:param dns_interval: seconds between re-resolutions of host names (0: connect by name).
:param resolver: a :data:`~meetinity_gateway.proxy.targets.Resolver`; the system's by
    default.
:param pool_size: keep-alive connections kept per target.
:param idle_timeout: seconds after which an idle keep-alive connection is not reused.
:param connect_timeout: seconds to wait for a TCP connection.
:param read_timeout: seconds to wait for each read.
:param ssl_context: the TLS settings of ``https`` targets (default
    ``ssl.create_default_context()``: certificates verified against the system's CAs, the
    configured host name checked and sent as SNI).
:param clock: the clock of the health state (``time.monotonic``); the ``since`` values
    given to :meth:`~UpstreamPool.record` and :meth:`~UpstreamPool.answered` come from it.
"""
from __future__ import annotations

import collections
import logging
import ssl
import threading
import time
import typing as t
import weakref

from meetinity_gateway.proxy.bulkhead import Bulkhead
from meetinity_gateway.proxy.client import ConnectionPool, read_body
from meetinity_gateway.proxy.targets import Resolver, TargetSpec, system_resolver

__all__ = [
    "BALANCERS",
    "Target",
    "UpstreamPool",
    "parse_failure_statuses",
]

log = logging.getLogger("meetinity_gateway.upstream")

BALANCERS = ("round_robin", "least_outstanding")
#: The n-th ejection in a row lasts n * eject_time, at most this many times eject_time.
_MAX_BACKOFF_FACTOR = 8
#: Bounds of the background thread's sleep between two rounds of work (seconds).
_MIN_WAIT, _MAX_WAIT = 0.02, 30.0


def parse_failure_statuses(value: str | t.Iterable[int | str]) -> frozenset[int]:
    """``"502, 503, 504"``, ``"5xx"`` or an iterable of codes; only 500-599 (a 4xx is the
    client's doing, and a client must never be able to eject a target). Empty or ``none``:
    no answer counts as a failure."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    codes: set[int] = set()
    for item in items:
        word = str(item).strip().lower()
        if word in ("", "none", "off"):
            continue
        if word == "5xx":
            codes.update(range(500, 600))
            continue
        try:
            code = int(word)
        except ValueError:
            raise ValueError(f"{item!r} is not a status code (expected 5xx codes, or 5xx)"
                             ) from None
        if not 500 <= code <= 599:
            raise ValueError(f"{code}: only 5xx answers can count as a target's failure")
        codes.add(code)
    return frozenset(codes)


# -- targets ---------------------------------------------------------------------------------

_NEVER = float("-inf")


class Target:
    """One address to send requests to, with its health state and connection pool.

    State fields are read and written under the owning :class:`UpstreamPool`'s lock.
    ``period`` is when the target's current state began (its last ejection or
    re-admission): an outcome of an attempt that started before it belongs to a past state
    and does not count.
    """

    __slots__ = (
        "spec", "address", "weight", "base_path", "host_header", "pool",
        "fails", "ejected", "ejected_until", "ejections", "period", "healthy_since",
        "checked", "outstanding", "current", "label", "recent",
    )

    def __init__(self, spec: TargetSpec, address: str, pool_kwargs: dict) -> None:
        self.spec = spec
        self.address = address
        self.weight = spec.weight
        self.base_path = spec.base_path
        self.host_header = spec.host_header
        # Connect to the address, verify the certificate for (and send SNI of) the
        # configured name.
        self.pool = ConnectionPool(spec.scheme, address, spec.port,
                                   server_hostname=spec.host, **pool_kwargs)
        self.fails = 0              # consecutive failures in the current period
        self.ejected = False
        self.ejected_until = 0.0    # end of the ejection time (clock)
        self.ejections = 0          # ejections in a row (the backoff step)
        self.period = _NEVER        # when the current state began (clock)
        self.healthy_since = _NEVER  # last re-admission (clock), for the backoff decay
        self.checked = _NEVER       # last re-check while ejected (clock)
        self.outstanding = 0
        self.current = 0  # smooth weighted round-robin
        #: (time.monotonic(), ok) of the latest verdicts, for the status page's error rate.
        self.recent: collections.deque[tuple[float, bool]] = collections.deque(maxlen=1000)
        shown = f"[{address}]" if ":" in address else address
        self.label = f"{spec.scheme}://{shown}:{spec.port}{spec.base_path}"
        if address != spec.host:
            self.label += f" ({spec.host})"

    def __repr__(self) -> str:
        return f"Target({self.label!r})"

    def state(self) -> str:
        """``healthy`` or ``ejected``."""
        return "ejected" if self.ejected else "healthy"


# -- the pool --------------------------------------------------------------------------------

class UpstreamPool:
    """The targets of one upstream and their state (see the module docstring)."""

    def __init__(
        self,
        specs: t.Sequence[TargetSpec],
        *,
        name: str = "upstream",
        balance: str = "round_robin",
        max_fails: int = 3,
        eject_time: float = 10.0,
        failure_statuses: str | t.Iterable[int] = (),
        max_eject_percent: int = 50,
        eject_recheck: float = 1.0,
        max_in_flight: int | None = None,
        queue_size: int = 0,
        queue_timeout: float = 0.0,
        health_interval: float = 0.0,
        health_path: str = "/health",
        health_timeout: float = 2.0,
        dns_interval: float = 30.0,
        resolver: Resolver | None = None,
        pool_size: int = 8,
        idle_timeout: float = 4.0,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        clock: t.Callable[[], float] = time.monotonic,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not specs:
            raise ValueError("an upstream needs at least one target")
        if balance not in BALANCERS:
            raise ValueError(f"balance must be one of {', '.join(BALANCERS)}, not {balance!r}")
        for label, value in (("max_fails", max_fails), ("pool_size", pool_size)):
            if value < 1:
                raise ValueError(f"{label} must be at least 1")
        self._lock = threading.Lock()
        #: The concurrency cap and its queue; it works under the pool's lock.
        self.bulkhead = Bulkhead(self._lock, name=name, max_in_flight=max_in_flight,
                                 queue_size=queue_size, queue_timeout=queue_timeout)
        if not 0 <= max_eject_percent <= 100:
            raise ValueError("max_eject_percent must be between 0 and 100")
        for label, value in (("eject_time", eject_time), ("idle_timeout", idle_timeout),
                             ("health_timeout", health_timeout)):
            if not value > 0:
                raise ValueError(f"{label} must be positive")
        for label, value in (("health_interval", health_interval),
                             ("dns_interval", dns_interval), ("eject_recheck", eject_recheck)):
            if value < 0:
                raise ValueError(f"{label} must be 0 (off) or positive")
        self.specs = list(specs)
        self.name = name
        self.balance = balance
        self.max_fails = max_fails
        self.eject_time = eject_time
        self.failure_statuses = parse_failure_statuses(failure_statuses)
        self.max_eject_percent = max_eject_percent
        self.eject_recheck = eject_recheck
        self.health_interval = health_interval
        self.health_path = health_path
        self.health_timeout = health_timeout
        self.dns_interval = dns_interval
        self.resolver = resolver or system_resolver
        self.clock = clock
        self._pool_kwargs = {
            "maxsize": pool_size,
            "idle_timeout": idle_timeout,
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "ssl_context": ssl_context,
        }
        self._rotation = 0
        self._panic = False
        self._stop = threading.Event()
        self._targets: tuple[Target, ...] = ()
        self._by_key: dict[tuple[int, str], Target] = {}
        self._resolving = dns_interval > 0 and any(not spec.is_ip for spec in self.specs)
        self.refresh()
        self._thread: threading.Thread | None = None
        self._next_dns = time.monotonic() + dns_interval  # resolved once already, above
        self._next_health = time.monotonic()
        if self._resolving or health_interval > 0:
            self._start_thread()

    def __repr__(self) -> str:
        return f"UpstreamPool({self.name!r}, {[t.label for t in self._targets]})"

    @property
    def targets(self) -> tuple[Target, ...]:
        return self._targets

    # The bulkhead's settings and counters, as the pool's (see proxy.bulkhead).

    @property
    def max_in_flight(self) -> int | None:
        return self.bulkhead.max_in_flight

    @property
    def queue_size(self) -> int:
        return self.bulkhead.queue_size

    @property
    def queue_timeout(self) -> float:
        return self.bulkhead.queue_timeout

    @property
    def in_flight(self) -> int:
        """Requests holding a slot: acquired, and neither answered nor done."""
        return self.bulkhead.in_flight

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self.bulkhead.waiting

    @property
    def rejected(self) -> int:
        """Requests refused by the concurrency cap since the pool was made."""
        return self.bulkhead.rejected

    @property
    def rejected_by(self) -> dict[str, int]:
        """The refusals by reason (:data:`~meetinity_gateway.proxy.bulkhead.BUSY_REASONS`)."""
        return self.bulkhead.rejected_by

    # -- discovery ---------------------------------------------------------------------------

    def _addresses(self, spec: TargetSpec) -> list[str]:
        if spec.is_ip or not self.dns_interval:
            return [spec.host]
        return list(self.resolver(spec.host, spec.port))

    def refresh(self) -> None:
        """Resolve host names again; targets whose address stays keep their state."""
        wanted: list[tuple[int, str]] = []
        for index, spec in enumerate(self.specs):
            try:
                addresses = self._addresses(spec)
            except OSError as exc:
                addresses = []
                log.warning("upstream %s: cannot resolve %s: %s", self.name, spec.host, exc)
            if not addresses:
                # Keep what we had; on the first round, connect by name until DNS answers.
                kept = [key for key in self._by_key if key[0] == index]
                addresses = [key[1] for key in kept] or [spec.host]
            wanted.extend((index, address) for address in addresses)
        with self._lock:
            old = self._by_key
            by_key = {}
            for key in wanted:
                target = old.get(key)
                if target is None:
                    target = Target(self.specs[key[0]], key[1], self._pool_kwargs)
                by_key[key] = target
            self._by_key = by_key
            self._targets = tuple(by_key.values())
        for key, target in old.items():
            if key not in by_key:
                log.info("upstream %s: target %s removed", self.name, target.label)
                # Idle connections close now; ones in use close when given back.
                target.pool.close()

    # -- choosing ------------------------------------------------------------------------------

    def acquire(self, exclude: t.Container[Target] = (), wait: bool = True) -> Target | None:
        """A target for one request attempt (counted in flight until :meth:`done`).

        ``None`` when only ``exclude``\\ d targets are left. When ``max_in_flight`` requests
        are in flight already, waits for a slot (unless ``wait`` is false) as
        :mod:`~meetinity_gateway.proxy.bulkhead` says, or raises
        :class:`~meetinity_gateway.proxy.bulkhead.UpstreamBusy`; never refuses because of
        ejections: when every target is ejected, all of them are candidates (panic routing).
        """
        with self._lock:
            self.bulkhead.take(wait)
            now = self.clock()
            targets = self._targets
            count = len(targets)
            candidates = [target for target in targets if not self._out(target, now)]
            panic = not candidates
            if panic != self._panic:
                self._panic = panic
                if panic:
                    log.warning("upstream %s: every target is ejected: routing to all of them "
                                "(panic)", self.name)
                else:
                    log.info("upstream %s: a target is back, panic routing is over", self.name)
            if panic:
                candidates = list(targets)
            best: Target | None = None
            total = 0
            round_robin = self.balance == "round_robin"
            # Least-outstanding ties go round, not always to the first candidate.
            self._rotation += 1
            start = 0 if round_robin else self._rotation % count
            for offset in range(len(candidates)):
                target = candidates[(start + offset) % len(candidates)]
                if target in exclude:
                    continue
                if round_robin:
                    target.current += target.weight
                    total += target.weight
                    if best is None or target.current > best.current:
                        best = target
                elif best is None or (
                    target.outstanding * best.weight < best.outstanding * target.weight
                ):
                    best = target
            if best is None:
                self.bulkhead.release()
                return None
            if round_robin:
                best.current -= total
            best.outstanding += 1
            return best

    def _out(self, target: Target, now: float) -> bool:
        """Is ``target`` out of rotation? (Under the lock.) Without re-checks, an ejection
        whose time is over ends here."""
        if not target.ejected:
            return False
        if not self.eject_recheck and now >= target.ejected_until:
            self._readmit(target, now, "its ejection time is over")
            return False
        return True

    def responded(self) -> None:
        """An attempt got its response head: its slot is free (the caller passes
        ``holding=False`` to :meth:`done` later)."""
        with self._lock:
            self.bulkhead.release()

    def done(self, target: Target, holding: bool = True) -> None:
        """The request on ``target`` is over (its response body closed, or it failed);
        ``holding``: it still holds its slot (no :meth:`responded`)."""
        with self._lock:
            target.outstanding -= 1
            if holding:
                self.bulkhead.release()

    # -- outcomes ------------------------------------------------------------------------------

    def answered(self, target: Target, status: int, since: float | None = None) -> None:
        """``target`` answered ``status`` to an attempt started at ``since`` (clock): a
        failure when the status is one of ``failure_statuses``, else a success."""
        self.record(target, status not in self.failure_statuses, since)

    def record(self, target: Target, ok: bool, since: float | None = None) -> None:
        """The outcome of one attempt on ``target`` started at ``since`` (``self.clock()``
        time; ``None``: now). ``False`` is the target's failure: no connection, a reset, a
        timeout (or a failing status, see :meth:`answered`)."""
        target.recent.append((time.monotonic(), ok))  # the status page's error rate
        self._outcome(target, ok, since, early=True)

    def _outcome(self, target: Target, ok: bool, since: float | None, early: bool) -> None:
        with self._lock:
            now = self.clock()
            if since is not None and since < target.period:
                return  # started in an earlier state: counted (or forgiven) there
            if ok:
                target.fails = 0
                if target.ejected and (early or now >= target.ejected_until):
                    self._readmit(target, now, "it answered")
                return
            if target.ejected:
                return  # one ejection per period: this failure is spent
            target.fails += 1
            if target.fails >= self.max_fails:
                self._eject(target, now)

    def _eject(self, target: Target, now: float) -> None:
        """Eject ``target`` unless the share cap forbids it (under the lock)."""
        ejected = sum(1 for other in self._targets if other.ejected)
        allowed = 0
        if self.max_eject_percent:
            allowed = max(1, len(self._targets) * self.max_eject_percent // 100)
        if ejected >= allowed:
            log.debug("upstream %s: target %s not ejected: %d of %d targets are already "
                      "(max_eject_percent)", self.name, target.label, ejected,
                      len(self._targets))
            return
        # Each eject_time spent healthy since the last re-admission takes one step back.
        healthy = now - target.healthy_since
        steps_back = int(healthy // self.eject_time) if healthy != float("inf") else 0
        target.ejections = max(0, target.ejections - steps_back) + 1
        duration = self.eject_time * min(target.ejections, _MAX_BACKOFF_FACTOR)
        target.ejected = True
        target.ejected_until = now + duration
        target.period = now
        target.checked = _NEVER
        target.fails = 0
        log.warning("upstream %s: target %s ejected for %.1fs after %d consecutive failures",
                    self.name, target.label, duration, self.max_fails)
        if self.eject_recheck:
            self._start_thread()

    def _readmit(self, target: Target, now: float, why: str) -> None:
        target.ejected = False
        target.fails = 0
        target.period = now
        target.healthy_since = now
        log.info("upstream %s: target %s is back (%s)", self.name, target.label, why)

    # -- active health ------------------------------------------------------------------------

    def ask(self, target: Target, path: str | None = None,
            timeout: float | None = None) -> int | None:
        """``GET <target><path>``: the answer's status, or ``None`` when there was none
        within ``timeout``."""
        timeout = timeout or self.health_timeout
        try:
            response = target.pool.request(
                "GET", target.base_path + (path or self.health_path),
                {"Host": target.host_header, "User-Agent": "meetinity-gateway"},
                connect_timeout=timeout, read_timeout=timeout,
            )
            # The status is the answer; the body is read (bounded) so that the connection
            # can serve again.
            read_body(response, 64 * 1024)
        except Exception as exc:  # any failure to get an answer means "down"
            log.debug("upstream %s: probe of %s failed: %s", self.name, target.label, exc)
            return None
        return response.status

    def probe(self, target: Target, path: str | None = None,
              timeout: float | None = None) -> bool:
        """``GET <target><path>`` answered 2xx within ``timeout``?"""
        status = self.ask(target, path, timeout)
        return status is not None and 200 <= status < 300

    def check(self) -> None:
        """One round of active health checks (2xx or a failure), fed into the passive state;
        a success re-admits an ejected target only once its ejection time is over."""
        for target in self._targets:
            if self._stop.is_set():
                return
            began = self.clock()
            self._outcome(target, self.probe(target), began, early=False)

    def recheck(self) -> float | None:
        """Ask every ejected target whose ejection time is over (and not asked in the last
        ``eject_recheck`` seconds) ``GET <health_path>``; one that answers as traffic would
        count a success is re-admitted. Returns the seconds until the next re-check is due
        (``None``: no target is ejected)."""
        now = self.clock()
        due: list[Target] = []
        soonest: float | None = None
        with self._lock:
            for target in self._targets:
                if not target.ejected:
                    continue
                when = max(target.ejected_until, target.checked + self.eject_recheck)
                if now >= when:
                    due.append(target)
                    target.checked = now
                    when = now + self.eject_recheck
                soonest = when - now if soonest is None else min(soonest, when - now)
        for target in due:
            if self._stop.is_set():
                break
            began = self.clock()
            status = self.ask(target)
            if status is None:
                continue
            # With active health checks on, the target must pass them (2xx); without, an
            # answer that traffic would count as a success shows it is back (a service
            # without a /health path answers 404: reachable).
            if self.health_interval:
                alive = 200 <= status < 300
            else:
                alive = status not in self.failure_statuses
            if alive:
                self._outcome(target, True, began, early=False)
        return soonest if self.degraded else None

    # -- the background thread -----------------------------------------------------------------

    def _start_thread(self) -> None:
        """Start the maintenance thread unless it runs (or the pool is closed)."""
        if self._stop.is_set() or (self._thread is not None and self._thread.is_alive()):
            return
        self._thread = threading.Thread(
            target=_maintain, args=(weakref.ref(self), self._stop),
            name=f"upstream-{self.name}", daemon=True,
        )
        self._thread.start()

    def maintain(self) -> float:
        """One round of due background work (DNS, active checks, re-checks); returns the
        seconds until the next one is due."""
        waits = [_MAX_WAIT]
        now = time.monotonic()
        if self._resolving:
            if now >= self._next_dns:
                self._next_dns = now + self.dns_interval
                self.refresh()
            waits.append(self._next_dns - time.monotonic())
        if self.health_interval:
            if now >= self._next_health:
                self._next_health = now + self.health_interval
                self.check()
            waits.append(self._next_health - time.monotonic())
        if self.eject_recheck:
            soonest = self.recheck()
            # Nothing ejected: an ejection starts the thread or finds it within a re-check.
            waits.append(self.eject_recheck if soonest is None else soonest)
        return min(max(min(waits), _MIN_WAIT), _MAX_WAIT)

    # -- reporting and shutdown ----------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """Is any target ejected? (The service is still served: see panic routing.)"""
        return any(target.ejected for target in self._targets)

    def snapshot(self) -> list[dict[str, t.Any]]:
        """Per-target state for ``/health``; an ejected target's row adds ``ejected_for``
        (seconds of ejection time left, 0 while re-checks find it still down) and
        ``ejections`` (in a row)."""
        now = self.clock()
        with self._lock:
            rows = []
            for target in self._targets:
                row = {
                    "target": target.label,
                    "weight": target.weight,
                    "state": target.state(),
                    "failures": target.fails,
                    "outstanding": target.outstanding,
                }
                if target.ejected:
                    row["ejected_for"] = round(max(0.0, target.ejected_until - now), 3)
                    row["ejections"] = target.ejections
                rows.append(row)
            return rows

    @property
    def panic(self) -> bool:
        """Every target is ejected and all of them get traffic anyway (panic routing)."""
        return self._panic

    def close(self) -> None:
        """Stop the background thread and close every connection."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        for target in self._targets:
            target.pool.close()


def _maintain(ref: weakref.ref, stop: threading.Event) -> None:
    """The background loop: DNS refresh, active checks and re-checks, each when due."""
    wait = 0.0
    while not stop.wait(wait):
        pool = ref()
        if pool is None:
            return  # nobody uses the pool any more
        try:
            wait = pool.maintain()
        except Exception:  # never let the thread die silently
            log.exception("upstream %s: maintenance failed", pool.name)
            wait = 1.0
        del pool
