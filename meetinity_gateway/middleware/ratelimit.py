"""Rate limiting per path prefix, on the ``limits`` library, shared through Redis if needed.

For every request the middleware

1. lets real CORS preflights through uncounted (:func:`meetinity_gateway.preflight.is_preflight`:
   the browser's question, not the caller's call; an ``OPTIONS`` with a body or a method
   override is an ordinary request and counted);
2. picks the one rule covering the request: the longest path prefix (on segment boundaries,
   ``/api/auth`` covers ``/api/auth/login``, never ``/api/authX``), a rule naming the method
   winning over one for any method at the same prefix; the ``default`` limits apply to the
   paths no rule covers; no rule and no default → the request passes untouched;
3. counts the caller — with ``key="claim:NAME"`` the verified claim ``NAME`` of the token
   (``environ["meetinity_gateway.claims"]``, set by the auth layer), else the value of
   ``key_header`` when configured and sent, else the client address (``REMOTE_ADDR``, or the
   address ``trusted_proxies`` hops back in ``X-Forwarded-For``) — with one atomic ``hit``
   per limit of the rule (never a check-then-increment race);
4. refuses with 429 in the standard JSON shape and ``Retry-After`` (delta-seconds, at least
   1) when a limit is exhausted, else calls the wrapped app, leaving
   ``{"rule", "allowed", "storage_failed", "namespace"}`` in
   ``environ["meetinity_gateway.ratelimit"]`` (an inner instance overwrites an outer one's).

**Per user.** The same filter used a second time *after* auth, with ``key="claim:sub"``,
limits signed-in users one by one (two users behind one NAT get a budget each); requests
without claims (anonymous routes) fall back to the address. A claim is only ever read from
the verified claims — no request header can choose or change the key. Give each instance its
own ``namespace``: counters are stored as ``meetinity_gateway/NAMESPACE/RULE/WHO``, so two
instances on one storage never spend each other's budgets.

**When the storage fails** (down, refused, or slower than ``storage_timeout``): each request
makes one attempt (the Redis client's own retries are turned off), and the storage is then
marked failing. While it is failing, requests do not touch it: they apply ``on_error`` at
once, and one request at a time — at most every ``retry_interval`` — probes the storage with
its own count; a successful probe ends the failure (logged), counting goes back to the storage.
``on_error="open"`` counts each caller in this process' memory meanwhile, allowing
``limit // processes`` (at least 1) per window, so N processes together stay within the
limit instead of letting everything through; ``on_error="closed"`` answers 503 with
``Retry-After``. A warning is logged at most once per ``warn_interval``. (The storage by URI,
its breaker and the local shares live in :mod:`meetinity_gateway.ratestore`.)

Every response of a limited path, allowed or not, carries the headers of
draft-ietf-httpapi-ratelimit-headers: ``RateLimit-Policy`` lists the rule's limits
(``"auth";q=10;w=60``: quota, window in seconds) and ``RateLimit`` reports the most
restrictive one (``"auth";r=3;t=42``: remaining, seconds until it resets; the lowest
remaining, the longest wait at a tie). With ``legacy_headers`` the same numbers go out as
``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset`` (Unix time, UTC
seconds, as GitHub sends it). Copies of these headers coming from the wrapped app are
replaced. A rule with one limit names its policy after the rule; with several, each policy
is ``NAME-<window>s`` (``"auth-60s"``, ``"auth-3600s"``).

Use alone around any WSGI app::

    from meetinity_gateway.middleware.ratelimit import RateLimitMiddleware
    app = RateLimitMiddleware(
        app,
        rules={"auth": "/api/auth 10/minute; 100/hour",
               "signup": "POST /api/auth/signup 3/hour"},
        default="600/minute",
        storage_uri="redis://127.0.0.1:6379/0",   # every process shares one budget
    )

A rule is ``[METHODS] PREFIX[, PREFIX…] LIMITS``: ``METHODS`` comma-separated (``GET,POST``;
left out, every method; ``HEAD`` comes with ``GET``), ``PREFIX`` a path prefix (a trailing
``/*`` is accepted, as in routes; several prefixes share one budget: one per service),
``LIMITS`` in ``limits`` notation, several separated by ``;`` (``10/minute; 100/hour``,
``5 per 10 seconds``); ``off`` (or nothing) disables the rule. One prefix belongs to one rule
per method.

:param app: the WSGI application to wrap.
:param rules: ``{name: "[METHODS] PREFIX[, PREFIX…] LIMITS"}`` (or :class:`Rule` objects).
    Names are letters, digits, ``_ . -``; they name the counters and the policies.
:param default: limits for the paths no rule covers (``None`` or ``"off"``: none).
:param strategy: ``sliding-window-counter`` (default: smooth, two counters per key),
    ``fixed-window`` (one counter, bursts of twice the quota around a window edge) or
    ``moving-window`` (exact, one entry per hit: memory grows with the quota).
:param storage_uri: a ``limits`` storage URI: ``memory://`` (default; this process only),
    ``redis://host:6379/0`` (shared by every process and host using it; needs the ``redis``
    package: ``pip install meetinity_gateway[redis]``); other ``limits`` URIs
    (``rediss://``, ``redis+sentinel://``, ``redis+cluster://``, ``memcached://``…) are
    passed through untouched.
:param storage_timeout: seconds a storage operation may take (connect and each read) before
    it counts as a failure; applied to the Redis and memcached families (default 0.5). Query
    options in the URI (``?socket_timeout=…``) win.
:param on_error: when the storage fails — ``open`` (default): count in this process'
    memory, ``limit // processes`` per window; ``closed``: answer 503 with ``Retry-After``.
    Never a 500; only the probing request waits for the storage, at most one attempt.
:param retry_interval: seconds between two probes of a failing storage (default 1).
:param processes: how many gateway processes share the storage's budget (default 1): while
    it fails, each allows its share of every limit.
:param warn_interval: seconds between two warnings about the failing storage (default 60).
:param trusted_proxies: proxies in front of the gateway trusted to append to
    ``X-Forwarded-For`` (default 0: the header is ignored).
:param key: ``address`` (default) or ``claim:NAME`` — count signed-in callers by the verified
    claim ``NAME`` (``claim:sub``); place the filter after auth. Hashed before storage.
:param key_header: count callers by this request header (e.g. ``X-API-Key``) when they send
    it, by address otherwise. The value is hashed before it reaches the storage.
:param namespace: names this instance's counters (default ``ratelimit``); give every
    instance sharing a storage its own.
:param legacy_headers: also send ``X-RateLimit-Limit/-Remaining/-Reset`` (default off).
:param storage: a ready ``limits`` storage object, instead of ``storage_uri``.

In gateway.ini::

    [filter:ratelimit]
    use = egg:meetinity_gateway#ratelimit
    rule.auth = /api/auth ${RATE_LIMIT_AUTH:-60/minute}
    default = ${RATE_LIMIT_DEFAULT:-off}
    storage_uri = ${RATELIMIT_STORAGE_URI:-memory://}

    [filter:userlimit]
    use = egg:meetinity_gateway#ratelimit
    key = claim:sub
    namespace = userlimit
    rule.users = /api/users, /api/profile ${RATE_LIMIT_USERS:-300/minute}
    storage_uri = ${RATELIMIT_STORAGE_URI:-memory://}

Security: with ``trusted_proxies=0`` behind a load balancer every client shares the
balancer's address (one budget for all); with more hops than really exist a client picks its
own address by sending ``X-Forwarded-For``. A ``key_header`` is chosen by the client: a new
value is a new budget, so key by a header only when something in front rejects unknown
keys, and keep address-keyed rules (such as ``/api/auth``) for brute-force protection.
``memory://`` counts per process: N processes allow N times the quota — use Redis when the
gateway runs in several processes or hosts. ``on_error=open`` trades protection for
availability while the storage is down (bounded by ``processes``: set it to the real number
of processes sharing the storage, or the local share is too generous).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
import time
import typing as t

from limits import RateLimitItem, parse_many
from limits.storage import Storage
from limits.strategies import STRATEGIES, RateLimiter

from meetinity_gateway.config import (
    ConfigError,
    as_bool,
    as_non_negative_int,
    as_optional_str,
    as_positive_float,
    as_positive_int,
    as_str,
    cast_settings,
    expand,
    split_named,
)
from meetinity_gateway.keys import CLAIMS_KEY, RATELIMIT_KEY
from meetinity_gateway.logs import redact_uri as redact
from meetinity_gateway.middleware import ratecount
from meetinity_gateway.net import client_address
from meetinity_gateway.paths import PrefixMatcher, normalize_prefix
from meetinity_gateway.preflight import is_preflight
from meetinity_gateway.problems import error_response
from meetinity_gateway.ratestore import StorageBreaker, open_storage, share_of
from meetinity_gateway.shared import shared

if t.TYPE_CHECKING:  # pragma: no cover
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["RATELIMIT_KEY", "RateLimitMiddleware", "Rule", "filter_factory", "parse_rule"]

log = logging.getLogger("meetinity_gateway.ratelimit")


_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_RULE = re.compile(
    r"^\s*(?:(?P<methods>[A-Za-z]+(?:\s*,\s*[A-Za-z]+)*)\s+)?"
    r"(?P<prefixes>/[^\s,]*(?:\s*,\s*/[^\s,]*)*)(?:\s+(?P<limits>.*?))?\s*$"
)
# key = address | claim:NAME (a claim name: no spaces, at most 128 characters)
_KEY = re.compile(r"^(?:address|claim:(?P<claim>[^\s]{1,128}))$")
_OFF = {"", "off", "none"}
_ON_ERROR = ("open", "closed")
# Response headers this layer owns: the wrapped app's copies are dropped.
_OWN_HEADERS = frozenset(
    {"ratelimit", "ratelimit-policy", "x-ratelimit-limit", "x-ratelimit-remaining",
     "x-ratelimit-reset"}
)
# Identifiers are joined with "/" by limits; the namespace keeps our keys apart from other
# users of a shared Redis.
_NAMESPACE = "meetinity_gateway"


def parse_limits(text: str) -> tuple[RateLimitItem, ...]:
    """``10/minute; 100/hour`` → limits, shortest window first; ``off`` → ``()``.

    Raises ValueError with the reason for a bad notation, a zero quota or window, or two
    limits on the same window (the larger one could never trigger).
    """
    text = (text or "").strip()
    if text.lower() in _OFF:
        return ()
    try:
        items = parse_many(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not in limits notation (e.g. '10/minute' or '10/minute; 100/hour')"
        ) from None
    windows: set[int] = set()
    for item in items:
        if item.amount < 1 or item.get_expiry() < 1:
            raise ValueError(f"{text!r}: quota and window must be at least 1")
        if item.get_expiry() in windows:
            raise ValueError(f"{text!r}: two limits on the same {item.get_expiry()}s window")
        windows.add(item.get_expiry())
    return tuple(sorted(items, key=lambda item: item.get_expiry()))


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule: the requests under any of ``prefixes`` (with one of ``methods``) share one
    budget of ``limits``. ``prefixes`` may be given as one string."""

    name: str
    prefixes: tuple[str, ...]
    limits: tuple[RateLimitItem, ...]
    methods: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"rule name {self.name!r}: use letters, digits, '_', '.', '-'")
        prefixes = (self.prefixes,) if isinstance(self.prefixes, str) else self.prefixes
        normalized = tuple(dict.fromkeys(normalize_prefix(p) for p in prefixes))
        if not normalized:
            raise ValueError(f"rule {self.name!r} has no path prefix")
        object.__setattr__(self, "prefixes", normalized)
        if self.methods is not None:
            methods = {m.upper() for m in self.methods}
            if "GET" in methods:
                methods.add("HEAD")
            object.__setattr__(self, "methods", frozenset(methods))

    def policy_names(self) -> list[str]:
        if len(self.limits) == 1:
            return [self.name]
        return [f"{self.name}-{item.get_expiry()}s" for item in self.limits]

    @property
    def prefix(self) -> str:
        """The first prefix (the only one of most rules)."""
        return self.prefixes[0]

    def describe(self) -> str:
        methods = ",".join(sorted(self.methods)) if self.methods else "*"
        limits = "; ".join(str(item) for item in self.limits) or "off"
        return f"{self.name}: {methods} {', '.join(self.prefixes)} {limits}"


def parse_rule(name: str, spec: str) -> Rule:
    """Parse ``[METHODS] PREFIX[, PREFIX…] LIMITS``; raises ValueError with the reason."""
    match = _RULE.match(spec or "")
    if not match:
        raise ValueError("expected '[METHODS] PREFIX[, PREFIX…] LIMITS', "
                         "e.g. '/api/auth 10/minute'")
    methods = None
    if match.group("methods"):
        methods = frozenset(m.strip().upper() for m in match.group("methods").split(","))
    prefixes = []
    for prefix in match.group("prefixes").split(","):
        prefix = prefix.strip()
        if prefix.endswith("/*"):
            prefix = prefix[:-2] or "/"
        prefixes.append(prefix)
    return Rule(name, tuple(prefixes), parse_limits(match.group("limits") or ""), methods)


def parse_key(spec: str) -> str | None:
    """``address`` → ``None`` (count by client address); ``claim:NAME`` → ``NAME``.

    Raises ValueError for anything else.
    """
    match = _KEY.match((spec or "").strip())
    if not match:
        raise ValueError("expected 'address' or 'claim:NAME' (e.g. 'claim:sub')")
    return match.group("claim")


class _Count:
    """Where one limit stands for one caller, after this request."""

    # A plain slotted class: made for every limit of every request (a frozen dataclass'
    # __init__ costs several times more).
    __slots__ = ("item", "policy", "remaining", "reset_in")

    def __init__(self, item: RateLimitItem, policy: str, remaining: int, reset_in: int):
        self.item = item
        self.policy = policy
        self.remaining = remaining
        self.reset_in = reset_in  # whole seconds, rounded up

    def __repr__(self) -> str:
        return (f"_Count({self.item}, {self.policy!r}, remaining={self.remaining}, "
                f"reset_in={self.reset_in})")

    def is_tighter_than(self, other: _Count) -> bool:
        return (self.remaining, -self.reset_in) < (other.remaining, -other.reset_in)


class RateLimitMiddleware:
    """Per-prefix rate limits on ``limits`` (see the module docstring)."""

    #: What this layer is, for the pipeline model (meetinity_gateway.pipeline).
    kind = "ratelimit"

    def __init__(
        self,
        app: WSGIApplication,
        *,
        rules: t.Mapping[str, str | Rule] | t.Iterable[Rule] = (),
        default: str | None = None,
        strategy: str = "sliding-window-counter",
        storage_uri: str = "memory://",
        storage_timeout: float = 0.5,
        on_error: str = "open",
        retry_interval: float = 1.0,
        warn_interval: float = 60.0,
        trusted_proxies: int = 0,
        key: str = "address",
        key_header: str | None = None,
        namespace: str = "ratelimit",
        processes: int = 1,
        legacy_headers: bool = False,
        storage: Storage | None = None,
    ) -> None:
        self.app = app
        parsed = self._parse_rules(rules)
        if default is not None:
            try:
                default_limits = parse_limits(default)
            except ValueError as exc:
                raise ConfigError(str(exc), key="default", value=default) from None
            self.default = Rule("default", "/", default_limits) if default_limits else None
        else:
            self.default = None
        if self.default is not None and any(r.name == "default" for r in parsed):
            raise ConfigError("the name 'default' is taken by the default limits",
                              key="rules", value="default")
        self.rules = [rule for rule in parsed if rule.limits]

        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy (known: {', '.join(sorted(STRATEGIES))})",
                              key="strategy", value=strategy)
        if on_error not in _ON_ERROR:
            raise ConfigError("expected 'open' or 'closed'", key="on_error", value=on_error)
        for name, number in (("storage_timeout", storage_timeout),
                             ("retry_interval", retry_interval),
                             ("warn_interval", warn_interval)):
            if not (number > 0 and math.isfinite(number)):
                raise ConfigError("expected a positive number", key=name, value=str(number))
        if trusted_proxies < 0:
            raise ConfigError("expected a whole number of at least 0", key="trusted_proxies",
                              value=str(trusted_proxies))
        if not (isinstance(processes, int) and processes >= 1):
            raise ConfigError("expected a whole number of at least 1", key="processes",
                              value=str(processes))
        try:
            self.claim = parse_key(key)
        except ValueError as exc:
            raise ConfigError(str(exc), key="key", value=str(key)) from None
        if not _NAME.match(namespace or ""):
            raise ConfigError("use 1 to 64 letters, digits, '_', '.', '-'", key="namespace",
                              value=str(namespace))
        self.namespace = namespace
        self.processes = processes
        # The claim's name goes into storage keys: a URI-like name ("https://…/uid") would
        # bring "/" (limits' separator) and braces (Redis Cluster hash tags) along.
        self._claim_tag = None
        if self.claim is not None:
            self._claim_tag = "claim." + (
                self.claim if _NAME.match(self.claim)
                else hashlib.sha256(self.claim.encode("utf-8", "surrogatepass")).hexdigest()[:16])
        self.on_error = on_error
        self.retry_interval = float(retry_interval)
        self.warn_interval = float(warn_interval)
        self.trusted_proxies = trusted_proxies
        self.legacy_headers = legacy_headers
        self._key_environ = None
        if key_header:
            self._key_environ = "HTTP_" + key_header.strip().upper().replace("-", "_")

        self.storage_uri = storage_uri if storage is None else None
        if storage is None:
            # A configuration reload keeps the counters (same URI and timeout: same storage).
            storage = shared("ratelimit-storage", (storage_uri, storage_timeout),
                             lambda: open_storage(storage_uri, storage_timeout))
        try:
            self.limiter: RateLimiter = STRATEGIES[strategy](storage)
        except NotImplementedError:
            raise ConfigError(f"the storage {redact(storage_uri)!r} cannot do {strategy}",
                              key="strategy", value=strategy) from None
        # Counts this process alone while the shared storage is failing (on_error=open):
        # each process allows its share of every limit instead of everything.
        self.fallback: RateLimiter = STRATEGIES[strategy](
            open_storage("memory://", storage_timeout))

        self._build_matchers()
        self._policy_headers = {
            rule.name: ", ".join(
                f'"{policy}";q={item.amount};w={item.get_expiry()}'
                for policy, item in zip(rule.policy_names(), rule.limits)
            )
            for rule in self._all_rules()
        }
        self._shares = {
            rule.name: tuple(share_of(item, processes) for item in rule.limits)
            for rule in self._all_rules()
        }
        # Per rule, computed once: (policy names, the storage key's leading identifiers for
        # the shared storage and for the local fallback). limits joins identifiers with "/"
        # (str() of each): one pre-joined identifier names exactly the same counter.
        self._per_rule = {
            rule.name: (
                tuple(rule.policy_names()),
                f"{_NAMESPACE}/{self.namespace}/{rule.name}/",
                f"{_NAMESPACE}/{self.namespace}.local/{rule.name}/",
            )
            for rule in self._all_rules()
        }
        policy = (f"open, each process allowing 1/{self.processes} of each limit"
                  if self.on_error == "open" else "closed")
        self._breaker = StorageBreaker(
            redact(self.storage_uri) if self.storage_uri else "(custom)", policy=policy,
            retry_interval=self.retry_interval, warn_interval=self.warn_interval)

    # -- setup --------------------------------------------------------------------------

    @staticmethod
    def _parse_rules(rules) -> list[Rule]:
        items = rules.items() if isinstance(rules, t.Mapping) else ((None, r) for r in rules)
        parsed: list[Rule] = []
        names: set[str] = set()
        for name, spec in items:
            try:
                rule = spec if isinstance(spec, Rule) else parse_rule(str(name), spec)
            except ValueError as exc:
                raise ConfigError(str(exc), key=f"rules[{name!r}]", value=str(spec)) from None
            if rule.name in names:
                raise ConfigError("two rules with the same name", key="rules", value=rule.name)
            names.add(rule.name)
            parsed.append(rule)
        return parsed

    def _all_rules(self) -> list[Rule]:
        return self.rules + ([self.default] if self.default else [])

    def _build_matchers(self) -> None:
        """Per method, a prefix matcher and ``prefix -> rule`` (method-specific first)."""
        methods = {m for rule in self.rules if rule.methods for m in rule.methods}

        def table(method: str | None) -> dict[str, Rule]:
            chosen: dict[str, Rule] = {}
            for rule in self.rules:
                if rule.methods is None:
                    for prefix in rule.prefixes:
                        if prefix in chosen:
                            raise ConfigError(
                                f"rules {chosen[prefix].name!r} and {rule.name!r} both cover "
                                f"{prefix}", key="rules", value=rule.name)
                        chosen[prefix] = rule
            specific: dict[str, Rule] = {}
            for rule in self.rules:
                if method is not None and rule.methods and method in rule.methods:
                    for prefix in rule.prefixes:
                        if prefix in specific:
                            raise ConfigError(
                                f"rules {specific[prefix].name!r} and {rule.name!r} both "
                                f"cover {method} {prefix}", key="rules", value=rule.name)
                        specific[prefix] = rule
            chosen.update(specific)
            return chosen

        self._tables: dict[str | None, tuple[PrefixMatcher, dict[str, Rule]]] = {}
        for method in [None, *methods]:
            rules = table(method)
            self._tables[method] = (PrefixMatcher(rules), rules)

    def describe(self) -> list[str]:
        """One line per active rule, as ``check``/``routes`` could print them."""
        return [rule.describe() for rule in self._all_rules()]

    # -- per request --------------------------------------------------------------------

    def rule_for(self, method: str, path: str) -> Rule | None:
        matcher, rules = self._tables.get(method) or self._tables[None]
        prefix = matcher.match(path or "/")
        if prefix is not None:
            return rules[prefix]
        return self.default

    def policy_for(self, path: str, method: str = "GET") -> str:
        """This layer's part of a route's policy (for ``check`` and ``/status``)."""
        rule = self.rule_for(method, path)
        return rule.describe() if rule is not None else "none"

    def key_for(self, environ: WSGIEnvironment) -> str:
        """Who is counted: ``claim.NAME:<sha256 of the claim>`` (with ``key=claim:NAME``,
        when the request carries verified claims), ``key:<sha256 of the header>`` (with
        ``key_header``, when sent) or ``addr:<client address>``."""
        if self.claim is not None:
            # Only the auth layer writes this environ key, after verifying the token; request
            # headers can only ever become HTTP_* keys, so a client cannot forge it.
            claims = environ.get(CLAIMS_KEY)
            value = claims.get(self.claim) if isinstance(claims, dict) else None
            if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "":
                digest = hashlib.sha256(str(value).encode("utf-8", "surrogatepass"))
                return f"{self._claim_tag}:{digest.hexdigest()}"
        if self._key_environ:
            value = environ.get(self._key_environ)
            if value:
                # Hashed: raw API keys never sit in Redis, and a "/" in them cannot shift
                # limits' "/"-joined storage keys.
                return "key:" + hashlib.sha256(value.encode("latin-1")).hexdigest()
        return "addr:" + (client_address(environ, self.trusted_proxies) or "unknown")

    def _count(self, rule: Rule, key: str, local: bool = False) -> tuple[bool, list[_Count]]:
        """Hit each limit (shortest window first, stopping at the first refusal), then read
        where each stands. The hit alone decides; the stats only feed the headers.
        ``local``: count this process' share in the fallback storage."""
        policies, shared_prefix, local_prefix = self._per_rule[rule.name]
        if local:
            limiter, items = self.fallback, self._shares[rule.name]
            # The local counters are named apart: the fallback's memory storage may be shared.
            who = local_prefix + key
        else:
            limiter, items, who = self.limiter, rule.limits, shared_prefix + key
        if ratecount.supports(limiter):  # one storage round trip per limit
            return self._count_once(limiter, policies, items, who)
        allowed = True
        refused_at = None
        for index, item in enumerate(items):
            if not limiter.hit(item, who):
                allowed, refused_at = False, index
                break
        now = time.time()
        counts = []
        for index, (policy, item) in enumerate(zip(policies, items)):
            stats = limiter.get_window_stats(item, who)
            remaining = 0 if index == refused_at else max(0, int(stats.remaining))
            reset_in = max(0, math.ceil(stats.reset_time - now))
            if index == refused_at:
                reset_in = max(1, reset_in)
            counts.append(_Count(item, policy, remaining, reset_in))
        return allowed, counts

    @staticmethod
    def _count_once(limiter: RateLimiter, policies: list[str], items: t.Sequence[RateLimitItem],
                    who: str) -> tuple[bool, list[_Count]]:
        """:meth:`_count` with :mod:`ratecount`: each hit also says where its limit stands;
        limits after a refusal are read, not hit."""
        now = time.time()
        allowed = True
        counts = []
        for policy, item in zip(policies, items):
            if allowed:
                allowed, remaining, reset_in = ratecount.hit(limiter, item, who)
            else:
                stats = limiter.get_window_stats(item, who)
                remaining = max(0, int(stats.remaining))
                reset_in = max(0, math.ceil(stats.reset_time - now))
            counts.append(_Count(item, policy, remaining, reset_in))
        return allowed, counts

    @property
    def storage_failing(self) -> bool:
        """The storage failed and has not answered since: requests apply ``on_error`` (read
        by ``/health``, which then says degraded, or failing when ``on_error`` is closed)."""
        return self._breaker.failing

    def _headers(self, rule: Rule, counts: list[_Count] | None) -> list[tuple[str, str]]:
        headers = [("RateLimit-Policy", self._policy_headers[rule.name])]
        if not counts:
            return headers
        shown = counts[0]
        for count in counts[1:]:
            if count.is_tighter_than(shown):
                shown = count
        headers.append(("RateLimit", f'"{shown.policy}";r={shown.remaining};t={shown.reset_in}'))
        if self.legacy_headers:
            headers += [
                ("X-RateLimit-Limit", str(shown.item.amount)),
                ("X-RateLimit-Remaining", str(shown.remaining)),
                ("X-RateLimit-Reset", str(int(time.time()) + shown.reset_in)),
            ]
        return headers

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse):
        method = environ.get("REQUEST_METHOD", "GET")
        if is_preflight(environ):
            return self.app(environ, start_response)
        rule = self.rule_for(method, environ.get("PATH_INFO", ""))
        if rule is None:
            return self.app(environ, start_response)

        who = self.key_for(environ)
        counts: list[_Count] | None = None
        allowed = True
        use_storage, probing = self._breaker.turn()
        if use_storage:
            try:
                allowed, counts = self._count(rule, who)
            except Exception as exc:  # any backend, any failure: on_error decides, never a 500
                self._breaker.failed(exc)
            else:
                self._breaker.succeeded(probing)
            finally:
                if probing:
                    self._breaker.release()
        failed = counts is None
        if failed and self.on_error == "open":
            allowed, counts = self._count(rule, who, local=True)
        environ[RATELIMIT_KEY] = {
            "rule": rule.name, "allowed": allowed, "storage_failed": failed,
            "namespace": self.namespace,
        }
        headers = self._headers(rule, counts)

        if failed and self.on_error == "closed":
            retry_after = str(max(1, math.ceil(self.retry_interval)))
            return error_response(environ, start_response, 503,
                                  "rate limiting unavailable, retry shortly",
                                  headers + [("Retry-After", retry_after)])
        if not allowed:
            blocking = [c for c in counts or () if c.remaining == 0]
            wait = max([c.reset_in for c in blocking] + [1])
            return error_response(environ, start_response, 429, "too many requests",
                                  headers + [("Retry-After", str(wait))])

        def start_with_headers(status, response_headers, exc_info=None):
            response_headers = [
                h for h in response_headers if h[0].lower() not in _OWN_HEADERS
            ] + headers
            if exc_info is not None:
                return start_response(status, response_headers, exc_info)
            return start_response(status, response_headers)

        return self.app(environ, start_with_headers)


_PARAMS = {
    "default": as_str,
    "strategy": as_str,
    "storage_uri": as_str,
    "storage_timeout": as_positive_float,
    "on_error": lambda value: value.strip().lower(),
    "retry_interval": as_positive_float,
    "warn_interval": as_positive_float,
    "trusted_proxies": as_non_negative_int,
    "key": as_str,
    "key_header": as_optional_str,
    "namespace": as_str,
    "processes": as_positive_int,
    "legacy_headers": as_bool,
}


def filter_factory(global_conf, **local_conf):
    """``paste.filter_factory`` for ``egg:meetinity_gateway#ratelimit``.

    Keys: ``rule.NAME = [METHODS] PREFIX LIMITS`` and the settings in ``_PARAMS``.
    """
    file = global_conf.get("__file__")
    named, settings = split_named(local_conf, "rule")
    table = dict(_PARAMS)
    table["rule.NAME"] = as_str  # only so the "known keys" list mentions it
    kwargs = cast_settings(settings, table, global_conf)
    kwargs.pop("rule.NAME", None)
    rules: list[Rule] = []
    for name, spec in named["rule"].items():
        key = f"rule.{name}"
        try:
            spec = expand(spec, key=key)
        except ConfigError as exc:
            raise exc.locate(file=file) from None
        try:
            rules.append(parse_rule(name, spec))
        except ValueError as exc:
            raise ConfigError(str(exc), file=file, key=key, value=spec) from None
    kwargs["rules"] = rules

    def make_filter(app):
        # Built when the pipeline is assembled, i.e. at start: a bad storage URI or strategy
        # stops the gateway there.
        try:
            return RateLimitMiddleware(app, **kwargs)
        except ConfigError as exc:
            raise exc.locate(file=file) from None

    return make_filter
