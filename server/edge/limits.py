"""Connection caps and rate limits: pure and synchronous, no I/O and no clock of its own (every
time-dependent call takes ``now``, seconds on a monotonic clock such as ``trio.current_time()``).

:class:`ConnectionCounter` caps connections per address and in total (over a cap: 503 +
Retry-After, or WebSocket close 1013); :class:`RateLimits` evaluates :class:`RateRule` s from
:class:`LimitsConfig` (``[limits]``): ``0.0`` allows a request, anything else is the Retry-After in
seconds for a 429 (:func:`retry_after_header`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from server.edge.buckets import KeyedLimiter, TokenBucket, positive
from server.edge.cookies import cookie_value
from server.edge.patterns import compile_pattern

Route = Literal["connect", "subscribe", "publish", "publish_bytes"]
Refusal = Literal["total", "per_address"]
ROUTES: tuple[Route, ...] = ("connect", "subscribe", "publish", "publish_bytes")
KeyKind = Literal["address", "header", "query", "cookie", "claim"]
PatternCompiler = Callable[[str], Callable[[str], bool]]

MAX_RETRY_AFTER = 3600  # Retry-After is clamped to this many seconds (also for ``math.inf``)
MAX_KEY_CHARS = 128  # longer client-chosen keys are stored as a 32-hex-digit digest
_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}\Z")  # header token; also query/cookie/claim


class Ticket:
    """One admitted connection. :meth:`release` is idempotent (a second call does nothing), and
    the ticket is a context manager that releases on exit."""

    __slots__ = ("_counter", "address")

    def __init__(self, counter: ConnectionCounter, address: str) -> None:
        self._counter: ConnectionCounter | None = counter
        self.address = address

    def release(self) -> None:
        """Return the connection slot, exactly once however often it is called."""
        counter, self._counter = self._counter, None
        if counter is not None:
            counter.release(self.address)

    @property
    def released(self) -> bool:
        """Whether :meth:`release` has run."""
        return self._counter is None

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class ConnectionCounter:
    """Exact counts of open connections, capped per address and in total (0 disables a cap).

    Addresses with no open connection have no entry, so memory follows the open connections.
    ``refused`` counts the refusals by :data:`Refusal` reason (``total`` wins when both caps are
    reached)."""

    __slots__ = ("_active", "_by_address", "max_per_address", "max_total", "refused")

    def __init__(self, per_address: int, total: int) -> None:
        if per_address < 0 or total < 0:
            raise ValueError("connection caps must be >= 0 (0: unlimited)")
        self.max_per_address = per_address
        self.max_total = total
        self._by_address: dict[str, int] = {}
        self._active = 0
        self.refused: dict[str, int] = {"total": 0, "per_address": 0}  # by Refusal

    def refusal(self, address: str) -> Refusal | None:
        """Which cap a connection from ``address`` would meet now (``None``: it would be admitted)."""
        if self.max_total and self._active >= self.max_total:
            return "total"
        if self.max_per_address and self._by_address.get(address, 0) >= self.max_per_address:
            return "per_address"
        return None

    def acquire(self, address: str) -> bool:
        """Count one more connection from ``address`` and return True, or return False (counting
        only the refusal in ``refused``) if either cap is reached. Pair every True with exactly one
        :meth:`release`."""
        reason = self.refusal(address)
        if reason is not None:
            self.refused[reason] += 1
            return False
        self._by_address[address] = self._by_address.get(address, 0) + 1
        self._active += 1
        return True

    def try_acquire(self, address: str) -> Ticket | None:
        """:meth:`acquire` returning a :class:`Ticket` (idempotent release), or None when refused."""
        return Ticket(self, address) if self.acquire(address) else None

    def release(self, address: str) -> None:
        """Count one connection from ``address`` as closed; never goes below zero."""
        count = self._by_address.pop(address, 0)
        if count > 1:
            self._by_address[address] = count - 1
        if count:
            self._active -= 1

    @property
    def active(self) -> int:
        """Open connections in total."""
        return self._active

    def count(self, address: str) -> int:
        """Open connections from ``address``."""
        return self._by_address.get(address, 0)

    def __len__(self) -> int:
        """Addresses with at least one open connection."""
        return len(self._by_address)


class RefusalLog:
    """Which refusals to log: the first for a key, then at most one per ``interval`` seconds per
    key, remembering at most ``max_keys`` keys (the one refused longest ago is forgotten first, and
    a forgotten key is logged again at its next refusal). :meth:`note` also counts the refusals
    it held back, so the next logged line can say how many there were."""

    __slots__ = ("_seen", "interval", "max_keys")

    def __init__(self, interval: float, max_keys: int) -> None:
        if interval < 0 or max_keys < 1:
            raise ValueError("interval must be >= 0 and max_keys >= 1")
        self.interval = interval
        self.max_keys = max_keys
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (last logged at, held back since)

    def note(self, key: str, now: float) -> int | None:
        """Record one refusal for ``key`` at ``now``: ``None`` when it is not to be logged, else
        the number of refusals for ``key`` held back since the last one logged."""
        seen = self._seen.pop(key, None)
        if seen is not None and now - seen[0] < self.interval:
            self._seen[key] = (seen[0], seen[1] + 1)
            return None
        self._seen[key] = (now, 0)
        while len(self._seen) > self.max_keys:
            del self._seen[next(iter(self._seen))]
        return seen[1] if seen is not None else 0

    def __len__(self) -> int:
        """Keys remembered."""
        return len(self._seen)


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where a rate-limit key comes from: ``address`` (the client address, after PROXY protocol),
    ``header:<name>`` (lower-cased), ``query:<name>``, ``cookie:<name>`` or ``claim:<name>`` (a
    top-level claim of the verified JWT). Only ``address`` and ``claim`` cannot be chosen freely by
    the client; a header/query/cookie key should be combined with an address rule."""

    kind: KeyKind
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind == "address":
            if self.name:
                raise ValueError("'address' takes no name")
        elif self.kind in ("header", "query", "cookie", "claim"):
            if not _NAME_RE.match(self.name):
                raise ValueError(f"{self.kind} name must be 1-128 token characters, got {self.name!r}")
            if self.kind == "header":
                object.__setattr__(self, "name", self.name.lower())
        else:
            raise ValueError(f"unknown key kind {self.kind!r}")

    @classmethod
    def parse(cls, text: str) -> KeySource:
        """Parse ``address`` or ``<kind>:<name>``; raise ValueError on anything else."""
        if text == "address":
            return ADDRESS
        kind, sep, name = text.partition(":")
        if not sep or kind not in ("header", "query", "cookie", "claim"):
            raise ValueError(f"expected 'address' or header:/query:/cookie:/claim:<name>, got {text!r}")
        return cls(cast(KeyKind, kind), name)

    def __str__(self) -> str:
        return self.kind if self.kind == "address" else f"{self.kind}:{self.name}"


ADDRESS = KeySource("address")


@dataclass(frozen=True, slots=True)
class RateRule:
    """One rate limit: ``rate`` per second with ``burst``, per key, on one route, for streams
    matching ``streams`` (``*`` one ``:``-segment, ``**`` any number). Routes: ``connect`` (a new
    connection or request, before any stream is known, so ``streams`` must be ``**``),
    ``subscribe``, ``publish`` (per message) and ``publish_bytes`` (cost = payload bytes; a
    payload larger than ``burst`` is never allowed). ``max_keys`` bounds the key table."""

    route: Route
    rate: float
    burst: float
    key: KeySource = ADDRESS
    streams: str = "**"
    max_keys: int = 10_000

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"route: must be one of {', '.join(ROUTES)}, got {self.route!r}")
        positive("rate", self.rate)
        positive("burst", self.burst)
        try:
            compile_pattern(self.streams)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"streams: must be a stream pattern ({exc}), got {self.streams!r}") from None
        if self.route == "connect" and self.streams != "**":
            raise ValueError("streams: a connect rule applies before any stream is known; use '**'")
        if isinstance(self.max_keys, bool) or not isinstance(self.max_keys, int) or self.max_keys < 1:
            raise ValueError(f"max_keys: must be a positive integer, got {self.max_keys!r}")

    @classmethod
    def from_config(cls, value: object) -> RateRule:
        """A ``[limits] rules`` entry: a table (see :meth:`from_mapping`)."""
        if not isinstance(value, Mapping):
            raise TypeError(f"a rate rule must be a table, got {value!r}")
        return cls.from_mapping(value)

    @classmethod
    def from_mapping(cls, d: Mapping[str, object]) -> RateRule:
        """Build a rule from a TOML table (``[[limits.rules]]``): ``route`` and ``rate`` required;
        ``burst`` (default ``max(rate, 1)``), ``key`` (default ``"address"``), ``streams``
        (default ``"**"``), ``max_keys`` (default 10000). ValueError names the offending field."""
        unknown = sorted(set(d) - {"route", "rate", "burst", "key", "streams", "max_keys"})
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key (expected route, rate, burst, key, streams, max_keys)")
        route = d.get("route")
        if route not in ROUTES:
            raise ValueError(f"route: must be one of {', '.join(ROUTES)}, got {route!r}")
        rate = positive("rate", d.get("rate"))
        burst = positive("burst", d.get("burst", max(rate, 1.0)))
        key = d.get("key", "address")
        text = key if isinstance(key, str) else None
        if text is None:
            raise ValueError(f"key: must be a string, got {key!r}")
        try:
            source = KeySource.parse(text)
        except ValueError as exc:
            raise ValueError(f"key: {exc}") from None
        streams = d.get("streams", "**")
        max_keys = d.get("max_keys", 10_000)
        return cls(route, rate, burst, source, cast(str, streams), cast(int, max_keys))


def parse_rules(items: Sequence[object]) -> tuple[RateRule, ...]:
    """Parse a TOML array of tables; errors read ``rules[<i>].<field>: ...``."""
    rules = []
    for i, item in enumerate(items):
        table = item if isinstance(item, Mapping) else None
        if table is None:
            raise ValueError(f"rules[{i}]: must be a table, got {item!r}")
        try:
            rules.append(RateRule.from_mapping(table))
        except ValueError as exc:
            raise ValueError(f"rules[{i}].{exc}") from None
    return tuple(rules)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """The ``[limits]`` section. Connection caps (0: unlimited) are checked at accept:
    ``max_connections`` per worker (each worker is a process with its own open-files limit),
    ``max_connections_per_address`` per host, split between the workers (see
    :meth:`per_address_per_worker`). Per-connection rates bound HTTP/2 resets and stream opens
    (rapid reset) and WebSocket pings. ``rules`` is empty by default: no request is rate limited
    unless configured, because clients behind one NAT or proxy share an address and a default
    would throttle them."""

    # per worker; ~15 KiB each when idle. With the descriptors a worker keeps for itself
    # (server.process.rlimit.SPARE_FILES) it fits a hard open-files limit of 16,064 or more.
    max_connections: int = 16_000
    # per host; at most what one worker holds, so it agrees with max_connections whatever the
    # worker count: half of it, so one address cannot take a one-worker host on its own. Generous
    # otherwise: NATs share an address, and behind a balancer without PROXY protocol every client
    # has the balancer's.
    max_connections_per_address: int = 8_000
    retry_after_seconds: int = 5  # Retry-After on the 503 when a connection cap is reached
    refusal_log_interval: float = 60.0  # seconds between warnings for one address over its cap
    refusal_log_max_addresses: int = 1024  # addresses remembered for that
    h2_max_resets_per_second: float = 100.0
    h2_reset_burst: float = 200.0
    h2_max_streams_per_second: float = 200.0
    h2_stream_burst: float = 400.0
    ws_max_pings_per_second: float = 5.0
    ws_ping_burst: float = 20.0
    rules: tuple[RateRule, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "max_connections",
            "max_connections_per_address",
            "retry_after_seconds",
            "refusal_log_max_addresses",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: must be an integer >= 0, got {value!r}")
        for name in ("h2_max_resets_per_second", "h2_reset_burst", "h2_max_streams_per_second", "h2_stream_burst"):
            positive(name, getattr(self, name))
        for name in ("ws_max_pings_per_second", "ws_ping_burst"):
            positive(name, getattr(self, name))
        if not all(isinstance(rule, RateRule) for rule in self.rules):
            raise ValueError("rules: must be RateRule objects")
        positive("refusal_log_interval", self.refusal_log_interval)
        if self.refusal_log_max_addresses < 1:
            raise ValueError(f"refusal_log_max_addresses: must be at least 1, got {self.refusal_log_max_addresses}")

    def per_address_per_worker(self, workers: int) -> int:
        """The share of ``max_connections_per_address`` one of ``workers`` workers admits:
        ``ceil(cap / workers)`` (0 stays unlimited). Workers share no memory, and the kernel
        spreads one address's connections over them by a hash of the connection's addresses and
        ports (``SO_REUSEPORT``), so the host admits at most about the cap, and may refuse a little
        earlier when the spread is uneven."""
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        return math.ceil(self.max_connections_per_address / workers)

    def connection_counter(self, workers: int = 1) -> ConnectionCounter:
        """A fresh counter for one of ``workers`` workers: ``max_connections`` and this worker's
        share of the per-address cap (:meth:`per_address_per_worker`)."""
        return ConnectionCounter(self.per_address_per_worker(workers), self.max_connections)

    def refusal_log(self) -> RefusalLog:
        """A fresh :class:`RefusalLog` for the per-address refusals of one worker."""
        return RefusalLog(self.refusal_log_interval, self.refusal_log_max_addresses)

    def h2_reset_bucket(self) -> TokenBucket:
        """A fresh per-connection bucket for HTTP/2 stream resets (RST_STREAM either way)."""
        return TokenBucket(self.h2_max_resets_per_second, self.h2_reset_burst)

    def h2_stream_bucket(self) -> TokenBucket:
        """A fresh per-connection bucket for HTTP/2 streams opened."""
        return TokenBucket(self.h2_max_streams_per_second, self.h2_stream_burst)

    def ws_ping_bucket(self) -> TokenBucket:
        """A fresh per-connection bucket for the WebSocket Ping frames a client sends (over: close 1008)."""
        return TokenBucket(self.ws_max_pings_per_second, self.ws_ping_burst)

    def rate_limits(self, compile_pattern: PatternCompiler | None = None) -> RateLimits:
        """A :class:`RateLimits` for ``rules`` (see there for ``compile_pattern``)."""
        return RateLimits(self.rules, compile_pattern)


def stream_matcher(pattern: str) -> Callable[[str], bool]:
    """The predicate of a stream pattern (:func:`server.edge.patterns.compile_pattern`)."""
    return compile_pattern(pattern).matches


class _Active:
    __slots__ = ("by_address", "catch_all", "key", "limiter", "matches")

    def __init__(self, rule: RateRule, compile_pattern: PatternCompiler) -> None:
        self.key = rule.key
        self.by_address = rule.key.kind == "address"
        self.catch_all = rule.streams == "**"
        self.matches = compile_pattern(rule.streams)
        self.limiter = KeyedLimiter(rule.rate, rule.burst, rule.max_keys)


class RateLimits:
    """Evaluates :class:`RateRule` s. A request must pass every rule for its route whose pattern
    matches its stream (a ``None`` stream matches only ``**`` rules); a refused request spends
    nothing. ``compile_pattern`` turns pattern text into a predicate (default :func:`stream_matcher`).

    Keys: ``key_of(source)`` returns the request's key for a :class:`KeySource` or None if absent.
    When a header/query/cookie/claim key is absent or empty, the rule still applies, keyed by the
    client address (in a separate namespace, so a client cannot aim at another's bucket): omitting
    a header never escapes a limit. Keys over ``MAX_KEY_CHARS`` are stored as a digest."""

    __slots__ = ("_by_route", "rules")

    def __init__(self, rules: Iterable[RateRule] = (), compile_pattern: PatternCompiler | None = None) -> None:
        self.rules = tuple(rules)
        compile_ = compile_pattern or stream_matcher
        by_route: dict[str, list[_Active]] = {}
        for rule in self.rules:
            by_route.setdefault(rule.route, []).append(_Active(rule, compile_))
        self._by_route = {route: tuple(active) for route, active in by_route.items()}

    def __bool__(self) -> bool:
        return bool(self.rules)

    def check(
        self, route: Route, stream: str | None, key_of: Callable[[KeySource], str | None], now: float, cost: float = 1.0
    ) -> float:
        """``0.0`` if allowed (and spent), else the seconds to wait (``math.inf``: ``cost`` exceeds
        a matching rule's burst). Returns at once when no rule covers ``route``."""
        active = self._by_route.get(route)
        if active is None:
            return 0.0
        spent: list[tuple[KeyedLimiter, str]] | None = None
        for rule in active:
            if not rule.catch_all and (stream is None or not rule.matches(stream)):
                continue
            key = _key(rule, key_of)
            wait = rule.limiter.take(key, now, cost)
            if wait:
                for limiter, taken in spent or ():
                    limiter.refund(taken, cost)
                return wait
            if spent is None:
                spent = []
            spent.append((rule.limiter, key))
        return 0.0

    def refund(
        self, route: Route, stream: str | None, key_of: Callable[[KeySource], str | None], cost: float = 1.0
    ) -> None:
        """Give back ``cost`` spent by an allowed :meth:`check` of ``route`` (the request was then
        refused by another route's rules and must not be counted against this one)."""
        for rule in self._by_route.get(route, ()):
            if rule.catch_all or (stream is not None and rule.matches(stream)):
                rule.limiter.refund(_key(rule, key_of), cost)


def _key(rule: _Active, key_of: Callable[[KeySource], str | None]) -> str:
    if rule.by_address:
        return key_of(ADDRESS) or ""
    value = key_of(rule.key)
    if not value:
        return "@" + (key_of(ADDRESS) or "")
    if len(value) > MAX_KEY_CHARS:
        value = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return "=" + value


def request_key_of(
    address: str,
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
    claims: Mapping[str, object] | None = None,
) -> Callable[[KeySource], str | None]:
    """A ``key_of`` for :meth:`RateLimits.check` over plain request parts: lower-case header names,
    decoded query, the verified JWT claims. Cookies come from the ``cookie`` header, read as the auth
    token's cookie is (:func:`~server.edge.cookies.cookie_value`). Claims that
    are not strings or integers count as absent."""

    def key_of(source: KeySource) -> str | None:
        kind = source.kind
        if kind == "address":
            return address
        if kind == "header":
            return headers.get(source.name) if headers else None
        if kind == "query":
            return query.get(source.name) if query else None
        if kind == "cookie":
            return cookie_value([headers.get("cookie", "")], source.name) if headers else None
        claim = claims.get(source.name) if claims else None
        return str(claim) if isinstance(claim, str | int) and not isinstance(claim, bool) else None

    return key_of


def retry_after(seconds: float) -> int:
    """Whole seconds for Retry-After: rounded up, at least 1, at most ``MAX_RETRY_AFTER``
    (``math.inf`` and NaN give the maximum)."""
    return max(1, math.ceil(seconds)) if seconds < MAX_RETRY_AFTER else MAX_RETRY_AFTER


def retry_after_header(seconds: float) -> bytes:
    """The ``Retry-After`` header value for ``seconds`` (see :func:`retry_after`), as ASCII bytes."""
    return str(retry_after(seconds)).encode("ascii")
