"""Token buckets: pure and synchronous, no I/O and no clock of their own (every call takes ``now``,
seconds on a monotonic clock such as ``trio.current_time()``).

:class:`TokenBucket` is one rate/burst budget (also per connection: HTTP/2 resets and stream opens,
WebSocket pings); :class:`KeyedLimiter` keeps buckets by key in a bounded LRU table. The rate-limit
rules built on them are in :mod:`server.edge.limits`.
"""

from __future__ import annotations

import math
from collections import OrderedDict

CLOCK_SLACK = 1e-6  # seconds of refill granted early, so waiting exactly the returned time succeeds


def positive(name: str, value: object) -> float:
    """``value`` as a float if it is a finite number above zero; ``ValueError`` naming ``name`` otherwise."""
    if value is None:
        raise ValueError(f"{name}: required")
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
        raise ValueError(f"{name}: must be a positive number, got {value!r}")
    return float(value)


class TokenBucket:
    """A budget of ``burst`` tokens refilled continuously at ``rate`` tokens per second.

    Starts full. Over any interval of length ``T`` it grants at most ``burst + rate * T`` tokens
    (plus ``rate * CLOCK_SLACK``). A clock that goes backwards is treated as standing still."""

    __slots__ = ("_slack", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = positive("rate", rate)
        self.burst = positive("burst", burst)
        self._tokens = self.burst
        self._stamp = -math.inf
        self._slack = self.rate * CLOCK_SLACK

    def take(self, now: float, cost: float = 1.0) -> float:
        """Spend ``cost`` (>= 0) tokens if available and return ``0.0``; otherwise spend nothing and
        return the seconds until it would be allowed (> 0). A ``cost`` above ``burst`` can never
        be allowed: it returns ``math.inf`` (callers map that to 413, or clamp it)."""
        elapsed = now - self._stamp
        if elapsed > 0.0:
            tokens = min(self._tokens + elapsed * self.rate, self.burst)
            self._stamp = now
        else:
            tokens = self._tokens
        if tokens + self._slack >= cost:
            self._tokens = tokens - cost  # may dip below zero by at most the slack
            return 0.0
        self._tokens = tokens
        if cost > self.burst:
            return math.inf
        return (cost - tokens) / self.rate

    def refund(self, cost: float = 1.0) -> None:
        """Give back ``cost`` tokens taken earlier (never beyond ``burst``)."""
        self._tokens = min(self.burst, self._tokens + cost)

    def available(self, now: float) -> float:
        """The tokens that a :meth:`take` at ``now`` would find, without changing anything."""
        elapsed = now - self._stamp
        return min(self.burst, self._tokens + elapsed * self.rate) if elapsed > 0.0 else self._tokens

    def full_at(self) -> float:
        """The earliest time at which the bucket is full again if nothing more is taken."""
        return self._stamp + (self.burst - self._tokens) / self.rate


class KeyedLimiter:
    """One :class:`TokenBucket` per key, in a table that never holds more than ``max_keys`` keys.

    A new key in a full table evicts the least recently used key (which then starts over with a
    full bucket). Each new key also drops the oldest entry if its bucket has refilled, so idle
    keys give way without a timer; :meth:`prune` sweeps them all."""

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        self.rate = positive("rate", rate)
        self.burst = positive("burst", burst)
        if max_keys < 1:
            raise ValueError(f"max_keys: must be at least 1, got {max_keys!r}")
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float, cost: float = 1.0) -> float:
        """:meth:`TokenBucket.take` on ``key``'s bucket: ``0.0`` if allowed, else seconds to wait."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is not None:
            buckets.move_to_end(key)
            return bucket.take(now, cost)
        if buckets and (len(buckets) >= self.max_keys or next(iter(buckets.values())).full_at() <= now):
            buckets.popitem(last=False)
        bucket = buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.take(now, cost)

    def refund(self, key: str, cost: float = 1.0) -> None:
        """Give back ``cost`` tokens to ``key`` (no-op if the key is no longer in the table)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.refund(cost)

    def prune(self, now: float) -> int:
        """Drop least-recently-used entries whose buckets are full at ``now``; return how many."""
        dropped = 0
        buckets = self._buckets
        while buckets and next(iter(buckets.values())).full_at() <= now:
            buckets.popitem(last=False)
            dropped += 1
        return dropped

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets
