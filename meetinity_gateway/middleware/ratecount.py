"""One storage round trip per limit for the rate limiter's default strategy.

``limits`` answers a sliding-window-counter hit with a yes or no: the ``RateLimit`` header
then needs a second read of the same two counters (``get_window_stats``). Here the hit
returns the counters it read, so remaining and reset come from the same round trip:

- ``memory://``: one read of the two counters (and the increment) under the interpreter;
- Redis (``redis://``, ``rediss://``, sentinel, cluster): one Lua script, limits' own
  acquisition plus the counters and their TTLs in its reply (one ``EVALSHA``).

Other storages and strategies keep ``limits``' two calls (:func:`supports` says which).
Semantics are ``limits``': a hit is allowed while ``floor(weighted) + 1 <= limit``, with
``weighted = previous * previous_ttl / expiry + current``.
"""
from __future__ import annotations

import math
import time
import typing as t
import weakref

from limits import RateLimitItem
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import RateLimiter, SlidingWindowCounterRateLimiter

# limits' acquire_sliding_window.lua (shift an expired window, refuse over the limit, else
# count), answering {allowed, previous count, previous TTL ms, current count, current TTL ms}.
_ACQUIRE_WITH_STATS = """
local expiry = tonumber(ARGV[2]) * 1000
local limit = tonumber(ARGV[1])
local current_ttl = tonumber(redis.call('pttl', KEYS[2]))
if current_ttl > 0 and current_ttl < expiry then
    redis.call('rename', KEYS[2], KEYS[1])
    redis.call('set', KEYS[2], 0, 'PX', current_ttl + expiry)
end
local previous = tonumber(redis.call('get', KEYS[1])) or 0
local previous_ttl = math.max(0, tonumber(redis.call('pttl', KEYS[1])) or 0)
local current = tonumber(redis.call('get', KEYS[2])) or 0
current_ttl = math.max(0, tonumber(redis.call('pttl', KEYS[2])) or 0)
local allowed = 0
if math.floor(previous * previous_ttl / expiry) + current + 1 <= limit then
    allowed = 1
    if redis.call('exists', KEYS[2]) == 1 then
        current = redis.call('incrby', KEYS[2], 1)
    else
        redis.call('set', KEYS[2], 1, 'PX', expiry * 2)
        current = 1
        current_ttl = expiry * 2
    end
end
return {allowed, previous, previous_ttl, current, current_ttl}
"""

_scripts: weakref.WeakKeyDictionary[Storage, t.Any] = weakref.WeakKeyDictionary()


def supports(limiter: RateLimiter) -> bool:
    """Can :func:`hit` count with this limiter's strategy and storage?"""
    return isinstance(limiter, SlidingWindowCounterRateLimiter) and isinstance(
        limiter.storage, (MemoryStorage, RedisStorage))


def hit(limiter: RateLimiter, item: RateLimitItem, who: str) -> tuple[bool, int, int]:
    """Hit ``item`` for ``who``: ``(allowed, remaining, reset in whole seconds)`` from one
    storage round trip (the limiter must pass :func:`supports`)."""
    storage = limiter.storage
    expiry = item.get_expiry()
    key = item.key_for(who)
    if isinstance(storage, MemoryStorage):
        allowed, previous, previous_ttl, current, current_ttl = _memory(
            storage, key, item.amount, expiry)
    else:
        allowed, previous, previous_ttl, current, current_ttl = _redis(
            storage, key, item.amount, expiry)
    weighted = previous * previous_ttl / expiry + current
    remaining = 0 if not allowed else max(0, item.amount - math.floor(weighted))
    reset_in = math.inf
    if previous:
        reset_in = previous_ttl % (expiry / previous)
    if current:
        reset_in = min(reset_in, current_ttl % expiry)
    reset = 0 if reset_in == math.inf else math.ceil(reset_in)
    if not allowed:
        reset = max(1, reset)
    return allowed, remaining, reset


def _memory(storage: MemoryStorage, key: str, limit: int, expiry: int
            ) -> tuple[bool, int, float, int, float]:
    now = time.time()
    previous_key, current_key = storage.sliding_window_keys(key, expiry, now)
    previous, previous_ttl, current, current_ttl = storage._get_sliding_window_info(
        previous_key, current_key, expiry, now)
    if math.floor(previous * previous_ttl / expiry + current) + 1 > limit:
        return False, previous, previous_ttl, current, current_ttl
    current = storage.incr(current_key, 2 * expiry, amount=1)
    if math.floor(previous * previous_ttl / expiry + current) > limit:
        storage.decr(current_key, 1)  # another thread's hit won the race: give it back
        return False, previous, previous_ttl, current - 1, current_ttl
    return True, previous, previous_ttl, current, current_ttl


def _redis(storage: Storage, key: str, limit: int, expiry: int
           ) -> tuple[bool, int, float, int, float]:
    assert isinstance(storage, RedisStorage)
    script = _scripts.get(storage)
    if script is None:
        script = _scripts[storage] = storage.get_connection().register_script(
            _ACQUIRE_WITH_STATS)
    previous_key = storage.prefixed_key(storage._previous_window_key(key))
    current_key = storage.prefixed_key(storage._current_window_key(key))
    allowed, previous, previous_ttl, current, current_ttl = script(
        [previous_key, current_key], [limit, expiry])
    return (bool(allowed), int(previous), int(previous_ttl) / 1000, int(current),
            int(current_ttl) / 1000)
