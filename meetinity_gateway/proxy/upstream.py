"""Upstream pools: targets, balancing, passive and active health, DNS re-resolution.

An :class:`UpstreamPool` is the set of *targets* behind one upstream name. It is written in
one string (one ini value, or ``USER_SERVICE_URL``)::

    http://10.0.0.5:5001, http://10.0.0.6:5001 weight=3, http://users.internal:5001

* **Targets.** Comma- (or newline-) separated base URLs, each with an optional
  ``weight=N`` (default 1). A target given by host name is resolved with ``resolver``
  (default: the system's ``getaddrinfo``) and every A/AAAA address becomes a target of its
  own, re-resolved every ``dns_interval`` seconds, so DNS-based discovery (Docker or
  Kubernetes service names, round-robin DNS) follows changes without a restart. The
  connection goes to the address, the ``Host`` header (and TLS SNI) stay the configured
  name. ``dns_interval = 0`` connects by name instead (the OS resolves at each new
  connection; one target per URL).
* **Balancing.** ``round_robin`` (smooth weighted round-robin, the default) or
  ``least_outstanding`` (fewest requests in flight per unit of weight).
* **Passive health (outlier ejection).** ``max_fails`` consecutive failures of a target
  (connect error, timeout, or a 502/503/504 from it) eject it for ``eject_time`` seconds,
  doubled for each further ejection in a row (at most 8x). After that it is *half-open*: a
  single request is let through, and its result decides. Every upstream has its own pool, so
  a failing upstream never affects another one. When every target is ejected,
  :meth:`UpstreamPool.acquire` raises :class:`AllTargetsDown`, a JSON 503 with
  ``Retry-After``.
* **Active health.** With ``health_interval > 0`` a daemon thread sends
  ``GET <target>/health`` to every target at that interval; the results feed the same state
  (a success re-admits an ejected target, a failure counts as one). It holds the pool only
  through a weak reference and stops when :meth:`UpstreamPool.close` is called or the pool
  is garbage collected: no signals, works the same on Windows.
* **Connections.** Each target has its own keep-alive pool of ``pool_size`` connections
  (size it to the server's threads). A connection idle for more than ``idle_timeout``
  seconds is closed instead of reused: many servers drop idle keep-alive connections after
  about 5 s, and a request written into a connection the upstream is closing at that moment
  fails with a spurious 502 (fatal for a POST, which must not be retried).

Use alone::

    from meetinity_gateway.proxy.upstream import UpstreamPool, parse_targets
    pool = UpstreamPool(parse_targets("http://a:5001 weight=2, http://b:5001"), name="users")
    target = pool.acquire()
    ...  # target.pool.urlopen(...), then pool.record(target, ok) and pool.done(target)

:param specs: the targets (see :func:`parse_targets`).
:param name: the upstream's name, for logs and errors.
:param balance: ``round_robin`` or ``least_outstanding``.
:param max_fails: consecutive failures that eject a target.
:param eject_time: seconds of the first ejection (doubling on repeated ejections, max 8x).
:param health_interval: seconds between active ``GET /health`` rounds (0: off).
:param health_path: the path probed on each target.
:param health_timeout: seconds allowed to one probe.
:param dns_interval: seconds between re-resolutions of host names (0: connect by name).
:param resolver: ``resolve(host, port) -> list of IP strings``; the system's by default.
:param pool_size: keep-alive connections kept per target.
:param idle_timeout: seconds after which an idle keep-alive connection is not reused.
:param connect_timeout: seconds to wait for a TCP connection.
:param read_timeout: seconds to wait for each read.
:param chunk_size: bytes per write when sending a request body.

Security note: targets are trusted infrastructure. A resolver that returns addresses from
an untrusted source can send user traffic (with its credentials) anywhere.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import math
import re
import socket
import threading
import time
import typing as t
import weakref
from dataclasses import dataclass
from urllib.parse import urlsplit

from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import Timeout

from meetinity_gateway.problems import ServiceUnavailable

__all__ = [
    "AllTargetsDown",
    "BALANCERS",
    "Target",
    "TargetSpec",
    "UpstreamPool",
    "parse_targets",
    "system_resolver",
]

log = logging.getLogger("meetinity_gateway.upstream")

BALANCERS = ("round_robin", "least_outstanding")
#: An ejection lasts eject_time * 2**(n-1) for the n-th ejection in a row, at most this factor.
_MAX_BACKOFF_FACTOR = 8

Resolver = t.Callable[[str, int], t.List[str]]


class AllTargetsDown(ServiceUnavailable):
    """Every target of an upstream is ejected: 503 with ``Retry-After``."""

    def __init__(self, upstream: str, retry_after: int) -> None:
        super().__init__(
            f"upstream {upstream} has no healthy target",
            headers=[("Retry-After", str(retry_after))],
        )
        self.retry_after = retry_after


# -- target specs ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetSpec:
    """One configured target: a base URL and its weight."""

    url: str
    scheme: str
    host: str
    port: int
    base_path: str
    weight: int
    #: The ``Host`` header value: the URL's host[:port] as written.
    host_header: str

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


_WEIGHT = re.compile(r"^weight=(\d+)$")


def parse_target(item: str) -> TargetSpec:
    """``URL [weight=N]``; raises ValueError with the reason."""
    words = item.split()
    if not words:
        raise ValueError("empty target")
    url, options = words[0], words[1:]
    weight = 1
    for option in options:
        match = _WEIGHT.match(option)
        if not match:
            raise ValueError(f"target {url!r}: unknown option {option!r} (expected weight=N)")
        weight = int(match.group(1))
        if not 1 <= weight <= 1000:
            raise ValueError(f"target {url!r}: weight must be between 1 and 1000")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream URL {url!r} must be http(s)://host[:port][/path]")
    if parts.query or parts.fragment:
        raise ValueError(f"upstream URL {url!r} must not have a query or fragment")
    if parts.username or parts.password:
        raise ValueError(f"upstream URL {url!r} must not hold credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"upstream URL {url!r} has a bad port") from None
    return TargetSpec(
        url=url.rstrip("/"),
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        base_path=parts.path.rstrip("/"),
        weight=weight,
        host_header=parts.netloc,
    )


def parse_targets(spec: str) -> list[TargetSpec]:
    """``URL [weight=N], URL [weight=N], …`` (commas or newlines); raises ValueError."""
    items = [item.strip() for item in re.split(r"[,\n]", spec) if item.strip()]
    if not items:
        raise ValueError("no target: expected URL [weight=N], URL [weight=N], …")
    specs = [parse_target(item) for item in items]
    if len({(s.scheme, s.host, s.port, s.base_path) for s in specs}) != len(specs):
        raise ValueError("the same target is listed twice (use weight=N instead)")
    return specs


def system_resolver(host: str, port: int) -> list[str]:
    """Every address of ``host`` (A and AAAA), in the resolver's order, without repeats."""
    seen: dict[str, None] = {}
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        seen.setdefault(sockaddr[0], None)
    return list(seen)


# -- connection pools that recycle idle connections ---------------------------------------------

class _IdleRecycling:
    """Mixin for urllib3 pools: a connection idle longer than ``idle_timeout`` is closed.

    urllib3 only notices a connection the peer *has* closed (``is_connection_dropped``); one
    the upstream is closing just as we write into it still fails. Stamping the time a
    connection went back to the pool and closing it when taken out after too long avoids
    that window. (A closed urllib3 connection reconnects on its next request.)
    """

    idle_timeout: float = 4.0

    def _get_conn(self, timeout=None):
        conn = super()._get_conn(timeout)
        since = getattr(conn, "_meetinity_idle_since", None)
        if since is not None and time.monotonic() - since > self.idle_timeout:
            conn.close()
        return conn

    def _put_conn(self, conn) -> None:
        if conn is not None:
            conn._meetinity_idle_since = time.monotonic()
        super()._put_conn(conn)


class _HTTPPool(_IdleRecycling, HTTPConnectionPool):
    pass


class _HTTPSPool(_IdleRecycling, HTTPSConnectionPool):
    pass


# -- targets ---------------------------------------------------------------------------------

class Target:
    """One address to send requests to, with its health state and connection pool.

    State fields are read and written under the owning :class:`UpstreamPool`'s lock.
    """

    __slots__ = (
        "spec", "address", "weight", "base_path", "host_header", "pool",
        "fails", "ejected_until", "ejections", "trial", "outstanding", "current",
        "label", "recent",
    )

    def __init__(self, spec: TargetSpec, address: str, pool_kwargs: dict) -> None:
        self.spec = spec
        self.address = address
        self.weight = spec.weight
        self.base_path = spec.base_path
        self.host_header = spec.host_header
        pool_class = _HTTPSPool if spec.scheme == "https" else _HTTPPool
        kwargs = dict(pool_kwargs)
        idle_timeout = kwargs.pop("idle_timeout")
        if spec.scheme == "https" and address != spec.host:
            # Connect to the address, verify the certificate for the configured name.
            kwargs.update(server_hostname=spec.host, assert_hostname=spec.host)
        self.pool = pool_class(address, spec.port, **kwargs)
        self.pool.idle_timeout = idle_timeout
        self.fails = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.trial = False
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

    def state(self, now: float) -> str:
        if not self.ejected_until:
            return "healthy"
        return "ejected" if now < self.ejected_until else "half_open"


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
        health_interval: float = 0.0,
        health_path: str = "/health",
        health_timeout: float = 2.0,
        dns_interval: float = 30.0,
        resolver: Resolver | None = None,
        pool_size: int = 8,
        idle_timeout: float = 4.0,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        chunk_size: int = 64 * 1024,
    ) -> None:
        if not specs:
            raise ValueError("an upstream needs at least one target")
        if balance not in BALANCERS:
            raise ValueError(f"balance must be one of {', '.join(BALANCERS)}, not {balance!r}")
        for label, value in (("max_fails", max_fails), ("pool_size", pool_size)):
            if value < 1:
                raise ValueError(f"{label} must be at least 1")
        for label, value in (("eject_time", eject_time), ("idle_timeout", idle_timeout),
                             ("health_timeout", health_timeout)):
            if not value > 0:
                raise ValueError(f"{label} must be positive")
        for label, value in (("health_interval", health_interval),
                             ("dns_interval", dns_interval)):
            if value < 0:
                raise ValueError(f"{label} must be 0 (off) or positive")
        self.specs = list(specs)
        self.name = name
        self.balance = balance
        self.max_fails = max_fails
        self.eject_time = eject_time
        self.health_interval = health_interval
        self.health_path = health_path
        self.health_timeout = health_timeout
        self.dns_interval = dns_interval
        self.resolver = resolver or system_resolver
        self._pool_kwargs = {
            "maxsize": pool_size,
            "block": False,
            "retries": False,
            "timeout": Timeout(connect=connect_timeout, read=read_timeout),
            "idle_timeout": idle_timeout,
            "blocksize": chunk_size,
        }
        self._lock = threading.Lock()
        self._rotation = 0
        self._stop = threading.Event()
        self._targets: tuple[Target, ...] = ()
        self._by_key: dict[tuple[int, str], Target] = {}
        self._resolving = dns_interval > 0 and any(not spec.is_ip for spec in self.specs)
        self.refresh()
        self._thread: threading.Thread | None = None
        if self._resolving or health_interval > 0:
            self._thread = threading.Thread(
                target=_maintain, args=(weakref.ref(self), self._stop, self._tick()),
                name=f"upstream-{name}", daemon=True,
            )
            self._thread.start()

    def __repr__(self) -> str:
        return f"UpstreamPool({self.name!r}, {[t.label for t in self._targets]})"

    @property
    def targets(self) -> tuple[Target, ...]:
        return self._targets

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

    def acquire(self, exclude: t.Container[Target] = ()) -> Target | None:
        """A target for one request attempt (its ``outstanding`` is counted).

        ``None`` when only ``exclude``\\ d targets are usable; raises :class:`AllTargetsDown`
        when no target is usable at all. Pair with :meth:`done`.
        """
        now = time.monotonic()
        with self._lock:
            best: Target | None = None
            total = 0
            usable = False
            targets = self._targets
            count = len(targets)
            round_robin = self.balance == "round_robin"
            # Least-outstanding ties go round, not always to the first target.
            self._rotation += 1
            start = 0 if round_robin else self._rotation % count
            for offset in range(count):
                target = targets[(start + offset) % count]
                if target.ejected_until and (now < target.ejected_until or target.trial):
                    continue
                usable = True
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
                if usable:
                    return None
                wait = min(target.ejected_until for target in targets) - now
                raise AllTargetsDown(self.name, max(1, math.ceil(wait)))
            if round_robin:
                best.current -= total
            if best.ejected_until:
                best.trial = True  # half-open: this request alone decides
            best.outstanding += 1
            return best

    def record(self, target: Target, ok: bool) -> None:
        """The health verdict of one attempt (or one probe) on ``target``."""
        target.recent.append((time.monotonic(), ok))
        with self._lock:
            if ok:
                if target.ejected_until:
                    log.info("upstream %s: target %s is back", self.name, target.label)
                target.fails = 0
                target.ejections = 0
                target.ejected_until = 0.0
                target.trial = False
                return
            target.fails += 1
            if target.trial or target.fails >= self.max_fails:
                target.ejections += 1
                factor = min(2 ** (target.ejections - 1), _MAX_BACKOFF_FACTOR)
                target.ejected_until = time.monotonic() + self.eject_time * factor
                target.trial = False
                target.fails = 0
                log.warning("upstream %s: target %s ejected for %.1fs", self.name,
                            target.label, self.eject_time * factor)

    def done(self, target: Target, trial_undecided: bool = False) -> None:
        """The request on ``target`` is over (its response body closed)."""
        with self._lock:
            target.outstanding -= 1
            if trial_undecided:
                target.trial = False

    # -- active health ------------------------------------------------------------------------

    def probe(self, target: Target, path: str | None = None,
              timeout: float | None = None) -> bool:
        """``GET <target><path>`` answered 2xx within ``timeout``?"""
        try:
            response = target.pool.urlopen(
                "GET", target.base_path + (path or self.health_path),
                headers={"Host": target.host_header, "User-Agent": "meetinity-gateway"},
                timeout=Timeout(total=timeout or self.health_timeout),
                retries=False, redirect=False, assert_same_host=False,
                preload_content=True,
            )
        except Exception as exc:  # any failure to get an answer means "down"
            log.debug("upstream %s: probe of %s failed: %s", self.name, target.label, exc)
            return False
        return 200 <= response.status < 300

    def check(self) -> None:
        """One round of active health checks, fed into the passive state."""
        for target in self._targets:
            if self._stop.is_set():
                return
            self.record(target, self.probe(target))

    def _tick(self) -> float:
        intervals = []
        if self._resolving:
            intervals.append(self.dns_interval)
        if self.health_interval:
            intervals.append(self.health_interval)
        return min(intervals)

    # -- reporting and shutdown ----------------------------------------------------------------

    def snapshot(self) -> list[dict[str, t.Any]]:
        """Per-target state for ``/health``."""
        now = time.monotonic()
        with self._lock:
            return [
                {
                    "target": target.label,
                    "weight": target.weight,
                    "state": target.state(now),
                    "failures": target.fails,
                    "outstanding": target.outstanding,
                }
                for target in self._targets
            ]

    def close(self) -> None:
        """Stop the background thread and close every connection."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for target in self._targets:
            target.pool.close()


def _maintain(ref: weakref.ref, stop: threading.Event, tick: float) -> None:
    """The background loop: DNS refresh and active checks, each when due."""
    next_dns = next_health = time.monotonic()
    pool = ref()
    if pool is not None:
        next_dns += pool.dns_interval  # resolved once already by __init__
    del pool
    while not stop.wait(tick):
        pool = ref()
        if pool is None:
            return  # nobody uses the pool any more
        now = time.monotonic()
        try:
            if pool._resolving and now >= next_dns:
                next_dns = now + pool.dns_interval
                pool.refresh()
            if pool.health_interval and now >= next_health:
                next_health = now + pool.health_interval
                pool.check()
        except Exception:  # never let the thread die silently
            log.exception("upstream %s: maintenance failed", pool.name)
        del pool
