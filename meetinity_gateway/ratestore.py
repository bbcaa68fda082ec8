"""Where the rate limiter counts: a ``limits`` storage chosen by URI, and what to do when it fails.

Neutral helpers of :mod:`meetinity_gateway.middleware.ratelimit` (usable by any limiter):

* :func:`open_storage` — a storage from its URI (``memory://``, ``redis://``,
  ``redis+sentinel://``, ``redis+cluster://``, ``memcached://``… as in
  ``limits.storage.storage_from_string``), with a timeout on every call of the network
  families and the Redis client's own retries off (:func:`storage_options`); ``memory://``
  gets the fast path, :class:`SweptMemoryStorage`. A bad URI or a missing client package is
  a ConfigError naming ``storage_uri`` (the URI's password redacted).
* :class:`StorageBreaker` — the circuit breaker around a shared storage: after a failure the
  storage is *failing*; requests then skip it, except one probe at a time at most every
  ``retry_interval``; only a probe's success closes the breaker. Warnings are rate limited.
* :func:`share_of` — a limit's quota divided among the processes that share the storage: what
  each process allows on its own, in local memory, while the storage fails.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
import typing as t
from urllib.parse import urlsplit

from limits import RateLimitItem
from limits.errors import ConfigurationError
from limits.storage import MemoryStorage, Storage, storage_from_string

from meetinity_gateway.config import ConfigError
from meetinity_gateway.logs import redact_uri as redact

__all__ = ["StorageBreaker", "SweptMemoryStorage", "open_storage", "share_of",
           "storage_options"]

# The rate limit layer's logger: operators filter the storage's messages under that name.
log = logging.getLogger("meetinity_gateway.ratelimit")


def share_of(item: RateLimitItem, processes: int) -> RateLimitItem:
    """``item`` with its quota divided among ``processes`` (rounded down, at least 1)."""
    return type(item)(max(1, item.amount // processes), item.multiples, item.namespace)


def storage_options(uri: str, timeout: float) -> dict[str, t.Any]:
    """Timeouts for the storage families that take them: a storage call never hangs."""
    scheme = urlsplit(uri).scheme.lower()
    family, _, variant = scheme.partition("+")
    if family in ("redis", "rediss", "valkey", "valkeys"):
        options: dict[str, t.Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        # One attempt per call. redis-py retries timeouts and connection errors by default
        # (3 times with backoff in 6.x+, around the connect and again around the command),
        # so a frozen server would cost several timeouts per request; the breaker in the
        # middleware is the retry policy. A pooled connection the server has closed is
        # still replaced when it is taken from the pool (redis-py checks it), so a restart
        # costs no failure.
        client = "valkey" if family.startswith("valkey") else "redis"
        try:
            retry = __import__(f"{client}.retry", fromlist=["Retry"])
            backoff = __import__(f"{client}.backoff", fromlist=["NoBackoff"])
        except ImportError:
            return options  # limits reports the missing package itself
        options["retry"] = retry.Retry(backoff.NoBackoff(), 0)
        if variant == "sentinel":
            # The sentinels are asked for the master at every new connection (that is how a
            # failover is followed): a sentinel that hangs must not hang the request either.
            options["sentinel_kwargs"] = {"socket_timeout": timeout,
                                          "socket_connect_timeout": timeout}
        return options
    if family == "memcached":
        return {"connect_timeout": timeout, "timeout": timeout}
    return {}


class SweptMemoryStorage(MemoryStorage):
    """limits' ``memory://`` storage, with expired counters swept once a second.

    limits starts a new timer thread 10 ms after the previous sweep ended, from every hit:
    under load that is a thread start (and a scan of every counter) every few requests, a
    measurable share of the gateway's time. Counters are checked for expiry whenever they
    are read, so sweeping less often frees memory a little later and changes no count.
    (It replaces limits' private ``__schedule_expiry``; a test fails if limits renames it.)
    """

    sweep_interval = 1.0

    def _MemoryStorage__schedule_expiry(self) -> None:
        if not self.timer.is_alive():
            self.timer = threading.Timer(self.sweep_interval,
                                         self._MemoryStorage__expire_events)
            self.timer.daemon = True
            self.timer.start()


# limits wraps the storage methods (incr, get, the sliding-window calls, ...) in an
# exception translator again for every subclass, so each counter read here went through
# nested wrappers (8 calls for one ``get``). The memory storage never raises what they
# translate (it is created without wrap_exceptions, and the middleware catches every storage
# exception itself): its methods are called directly.
for _name in dir(SweptMemoryStorage):
    _method = getattr(SweptMemoryStorage, _name, None)
    if callable(_method) and getattr(_method, "__wrapped__", None) is not None:
        setattr(SweptMemoryStorage, _name, inspect.unwrap(_method))
del _name, _method


def open_storage(uri: str, timeout: float) -> Storage:
    """The synchronous ``limits`` storage named by ``uri``, its calls bounded by ``timeout``
    seconds; raises ConfigError (key ``storage_uri``) for an unusable URI."""
    try:
        if urlsplit(uri).scheme == "memory":
            return SweptMemoryStorage(uri)
        storage = storage_from_string(uri, **storage_options(uri, timeout))
    except ConfigurationError as exc:
        # limits' message names the missing package or the unknown scheme.
        hint = ""
        if urlsplit(uri).scheme.startswith(("redis", "rediss")):
            hint = " (for redis:// install the extra: pip install meetinity_gateway[redis])"
        raise ConfigError(str(exc).replace(uri, redact(uri)) + hint, key="storage_uri",
                          value=redact(uri)) from None
    except Exception as exc:  # a malformed URI fails in the backend's own parser
        raise ConfigError(f"unusable storage URI ({type(exc).__name__})",
                          key="storage_uri", value=redact(uri)) from None
    if not isinstance(storage, Storage):
        raise ConfigError("an async storage cannot serve a WSGI gateway",
                          key="storage_uri", value=redact(uri))
    return storage


class StorageBreaker:
    """Circuit breaker around a storage. Healthy: every request counts there. After a failure
    the storage is :attr:`failing`; requests apply their failure policy at once without
    touching it, except one probe at a time, at most every ``retry_interval`` seconds; only a
    probe's success closes the breaker (a request that started before the failure and got
    through late says little about a storage answering some calls in time).

    Per request: ``use, probing = breaker.turn()``; if ``use``, count in the storage, then
    :meth:`succeeded` or :meth:`failed`, and :meth:`release` when ``probing``.

    :param name: the storage as logs show it (a redacted URI).
    :param policy: what requests do while it fails, for the warning (``open, …``/``closed``).
    :param retry_interval: seconds between two probes of a failing storage.
    :param warn_interval: seconds between two warnings about the failing storage.
    """

    def __init__(self, name: str, *, policy: str, retry_interval: float,
                 warn_interval: float) -> None:
        self.name = name
        self.policy = policy
        self.retry_interval = retry_interval
        self.warn_interval = warn_interval
        self.failing = False
        self._failing_since = 0.0
        self._retry_at = 0.0  # time.monotonic() before which no probe is sent
        self._probe = threading.Lock()
        self._next_warning = 0.0
        self._suppressed = 0
        self._warn_lock = threading.Lock()

    def turn(self) -> tuple[bool, bool]:
        """(may this request use the storage, is it the probe — then it must :meth:`release`)."""
        if not self.failing:
            return True, False
        if not self._probe.acquire(blocking=False):
            return False, False  # another request is probing
        # Checked under the lock: a probe that just failed has already moved _retry_at.
        if time.monotonic() < self._retry_at:
            self._probe.release()
            return False, False
        return True, True

    def release(self) -> None:
        """The probe is over (whatever its outcome)."""
        self._probe.release()

    def succeeded(self, probing: bool) -> None:
        if probing and self.failing:
            self.failing = False
            log.info("rate limit storage %s answers again after %.1f s; counting there",
                     self.name, time.monotonic() - self._failing_since)

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._retry_at = now + self.retry_interval
        if not self.failing:
            self._failing_since = now
            self.failing = True
        with self._warn_lock:
            now = time.monotonic()
            if now < self._next_warning:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._next_warning = now + self.warn_interval
        log.warning(
            "rate limit storage %s failed (%s: %s); failing %s; one request probes it every "
            "%gs%s",
            self.name, type(exc).__name__, exc, self.policy, self.retry_interval,
            f" ({suppressed} more failures since the last warning)" if suppressed else "",
        )
