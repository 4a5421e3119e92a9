"""Connection caps, token buckets and rate-limit rules (server.edge.limits): pure, no sockets."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.edge.auth import extract_token
from server.edge.buckets import KeyedLimiter, TokenBucket
from server.edge.limits import (
    ADDRESS,
    MAX_RETRY_AFTER,
    ConnectionCounter,
    KeySource,
    LimitsConfig,
    RateLimits,
    RateRule,
    RefusalLog,
    parse_rules,
    request_key_of,
    retry_after,
    retry_after_header,
    stream_matcher,
)

# -- TokenBucket ---------------------------------------------------------------------------------


def test_bucket_starts_full_and_refuses_past_burst() -> None:
    bucket = TokenBucket(rate=2, burst=3)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)


def test_bucket_refills_at_rate_up_to_burst() -> None:
    bucket = TokenBucket(rate=10, burst=5)
    for _ in range(5):
        assert bucket.take(0.0) == 0.0
    assert bucket.available(0.0) == pytest.approx(0.0)
    assert bucket.available(0.2) == pytest.approx(2.0)
    assert bucket.available(100.0) == 5.0  # capped at burst, however long the idle time
    assert bucket.take(0.2) == 0.0
    assert bucket.take(0.2) == 0.0
    assert bucket.take(0.2) > 0.0


def test_bucket_retry_after_is_exact() -> None:
    bucket = TokenBucket(rate=4, burst=1)
    assert bucket.take(10.0) == 0.0
    wait = bucket.take(10.0)
    assert wait == pytest.approx(0.25)
    assert bucket.take(10.0 + wait * 0.99) > 0.0  # a refused take spends nothing ...
    assert bucket.take(10.0 + wait) == 0.0  # ... and waiting exactly the answer succeeds


@pytest.mark.parametrize(("rate", "burst", "start"), [(3.0, 2.0, 7.3), (1e6, 1e6, 123456.789), (0.1, 1.0, 0.0)])
def test_bucket_waiting_the_returned_time_always_succeeds(rate: float, burst: float, start: float) -> None:
    bucket = TokenBucket(rate, burst)
    now = start
    while bucket.take(now, burst * 0.7) == 0.0:
        pass
    for _ in range(50):
        wait = bucket.take(now, burst * 0.7)
        assert 0.0 < wait < math.inf
        now += wait
        assert bucket.take(now, burst * 0.7) == 0.0


def test_bucket_cost_above_burst_is_never_allowed() -> None:
    bucket = TokenBucket(rate=100, burst=10)
    assert bucket.take(0.0, 11) == math.inf
    assert bucket.take(1e9, 11) == math.inf
    assert bucket.available(1e9) == 10.0  # nothing was spent
    assert bucket.take(1e9, 10) == 0.0


def test_bucket_costs_and_backwards_clock() -> None:
    bucket = TokenBucket(rate=1, burst=100)
    assert bucket.take(50.0, 60) == 0.0
    assert bucket.take(10.0, 30) == 0.0  # an earlier time is treated as "no time passed"
    assert bucket.available(10.0) == pytest.approx(10.0)
    assert bucket.take(50.0, 0) == 0.0
    bucket.refund(1000)
    assert bucket.available(50.0) == 100.0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (math.inf, 1), (1, math.nan)])
def test_bucket_rejects_bad_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


@given(
    rate=st.floats(min_value=0.01, max_value=1000),
    burst=st.floats(min_value=1, max_value=100),
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=2), st.floats(min_value=0, max_value=5)), min_size=1, max_size=200
    ),
)
def test_bucket_never_grants_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: float, steps: list[tuple[float, float]]
) -> None:
    bucket = TokenBucket(rate, burst)
    start = now = 1000.0
    granted = 0.0
    for gap, cost in steps:
        now += gap
        wait = bucket.take(now, cost)
        assert wait >= 0.0
        if wait == 0.0:
            granted += cost
        else:
            assert cost > bucket.available(now) or wait == math.inf
        limit = burst + rate * (now - start) + rate * 1e-6
        assert granted <= limit + 1e-9 * max(1.0, limit)


# -- KeyedLimiter --------------------------------------------------------------------------------


def test_keyed_limiter_keys_are_independent() -> None:
    limiter = KeyedLimiter(rate=1, burst=2, max_keys=10)
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) == pytest.approx(1.0)
    assert limiter.take("b", 0.0) == 0.0


def test_keyed_limiter_table_is_bounded_under_a_flood() -> None:
    limiter = KeyedLimiter(rate=1, burst=1, max_keys=1000)
    for i in range(100_000):
        limiter.take(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 5.0 + i * 1e-6)
        assert len(limiter) <= 1000
    assert len(limiter) == 1000


def test_keyed_limiter_lru_keeps_a_hot_key() -> None:
    limiter = KeyedLimiter(rate=0.001, burst=3, max_keys=100)
    limiter.take("hot", 0.0)
    limiter.take("hot", 0.0)
    for i in range(10_000):
        limiter.take(f"cold{i}", 0.0)
        if i % 50 == 0:
            limiter.take("hot", 0.0, 0)  # touched often: never evicted, its budget is remembered
    assert "hot" in limiter
    assert limiter.take("hot", 0.0) == 0.0
    assert limiter.take("hot", 0.0) > 0.0


def test_keyed_limiter_drops_idle_full_buckets() -> None:
    limiter = KeyedLimiter(rate=10, burst=1, max_keys=100)
    for i in range(50):
        limiter.take(f"k{i}", 0.0)
    assert len(limiter) == 50
    assert limiter.prune(0.05) == 0  # not refilled yet
    assert limiter.prune(0.1) == 50
    for i in range(50):
        limiter.take(f"k{i}", 0.0)
    for i in range(60):  # each new key also sheds one refilled, least recently used entry
        limiter.take(f"new{i}", 1.0 + i)
    assert len(limiter) == 50
    assert all(f"new{i}" in limiter for i in range(10, 60))
    limiter.refund("gone")  # refunding an evicted key is harmless


def test_keyed_limiter_validates() -> None:
    with pytest.raises(ValueError):
        KeyedLimiter(1, 1, max_keys=0)
    with pytest.raises(ValueError):
        KeyedLimiter(0, 1)


# -- ConnectionCounter ---------------------------------------------------------------------------


def test_connection_counter_per_address_and_total_caps() -> None:
    counter = ConnectionCounter(per_address=2, total=3)
    assert counter.acquire("a")
    assert counter.acquire("a")
    assert not counter.acquire("a")
    assert counter.acquire("b")
    assert not counter.acquire("c")  # total reached
    assert (counter.active, counter.count("a"), counter.count("b"), len(counter)) == (3, 2, 1, 2)
    counter.release("b")
    assert counter.acquire("c")


def test_connection_counter_cleans_up_and_never_goes_negative() -> None:
    counter = ConnectionCounter(per_address=5, total=0)
    for _ in range(3):
        counter.acquire("a")
    for _ in range(5):
        counter.release("a")
    counter.release("never-seen")
    assert (counter.active, counter.count("a"), len(counter)) == (0, 0, 0)


def test_ticket_release_is_idempotent() -> None:
    counter = ConnectionCounter(per_address=2, total=10)
    first = counter.try_acquire("a")
    second = counter.try_acquire("a")
    assert first is not None and second is not None
    assert counter.try_acquire("a") is None
    first.release()
    first.release()
    first.release()
    assert first.released and not second.released
    assert counter.count("a") == 1  # the double release did not free the second connection's slot
    with second:
        pass
    second.release()
    assert (counter.active, len(counter)) == (0, 0)


def test_ten_thousand_connects_from_one_address() -> None:
    counter = ConnectionCounter(per_address=100, total=1000)
    tickets = [counter.try_acquire("198.51.100.7") for _ in range(10_000)]
    admitted = [t for t in tickets if t is not None]
    assert len(admitted) == 100
    assert counter.active == 100
    other = counter.try_acquire("203.0.113.9")
    assert other is not None
    for ticket in admitted + admitted:
        ticket.release()
    other.release()
    assert (counter.active, len(counter)) == (0, 0)


def test_connection_counter_counts_refusals_by_cap() -> None:
    counter = ConnectionCounter(per_address=1, total=2)
    assert counter.acquire("a") and counter.refusal("a") == "per_address" and counter.refusal("b") is None
    assert not counter.acquire("a")
    assert counter.acquire("b") and counter.refusal("c") == "total"
    assert not counter.acquire("c") and not counter.acquire("a")  # both caps reached: counted as total
    assert counter.refused == {"total": 2, "per_address": 1}


@pytest.mark.parametrize(("cap", "workers", "share"), [(8000, 1, 8000), (4, 2, 2), (5, 2, 3), (1, 4, 1), (0, 3, 0)])
def test_the_per_address_cap_is_per_host_shared_out_between_workers(cap: int, workers: int, share: int) -> None:
    config = LimitsConfig(max_connections_per_address=cap)
    assert config.per_address_per_worker(workers) == share
    counter = config.connection_counter(workers)
    assert (counter.max_per_address, counter.max_total) == (share, config.max_connections)
    with pytest.raises(ValueError, match="workers"):
        config.per_address_per_worker(0)


def test_default_caps_agree() -> None:
    config = LimitsConfig()
    # one address never holds more than one worker can, whatever the worker count
    assert 0 < config.max_connections_per_address <= config.max_connections


def test_refusal_log_logs_each_key_once_per_interval_and_forgets_the_oldest() -> None:
    log = RefusalLog(interval=60.0, max_keys=2)
    assert log.note("a", 0.0) == 0
    assert [log.note("a", t) for t in (1.0, 2.0, 59.9)] == [None, None, None]
    assert log.note("a", 60.0) == 3  # three held back since the last one logged
    assert log.note("b", 61.0) == 0 and log.note("c", 62.0) == 0
    assert len(log) == 2  # bounded: "a" (refused longest ago) is forgotten
    assert log.note("a", 63.0) == 0 and log.note("c", 64.0) is None
    with pytest.raises(ValueError):
        RefusalLog(interval=1.0, max_keys=0)
    with pytest.raises(ValueError, match="refusal_log_interval"):
        LimitsConfig(refusal_log_interval=0)


def test_connection_counter_zero_means_unlimited() -> None:
    counter = ConnectionCounter(per_address=0, total=0)
    assert all(counter.acquire("a") for _ in range(5000))
    with pytest.raises(ValueError):
        ConnectionCounter(-1, 0)


# -- KeySource and RateRule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "name"),
    [
        ("address", "address", ""),
        ("header:X-Api-Key", "header", "x-api-key"),
        ("query:tenant", "query", "tenant"),
        ("cookie:sid", "cookie", "sid"),
        ("claim:sub", "claim", "sub"),
    ],
)
def test_key_source_parse(text: str, kind: str, name: str) -> None:
    source = KeySource.parse(text)
    assert (source.kind, source.name) == (kind, name)
    assert KeySource.parse(str(source)) == source


@pytest.mark.parametrize(
    "text", ["", "addr", "address:x", "header:", "header:bad name", "claim", "ip:1", "Header:x", "query:" + "q" * 200]
)
def test_key_source_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError):
        KeySource.parse(text)


def test_rate_rule_from_mapping_defaults() -> None:
    rule = RateRule.from_mapping({"route": "publish", "rate": 5})
    assert rule == RateRule("publish", 5.0, 5.0, ADDRESS, "**", 10_000)
    rule = RateRule.from_mapping(
        {"route": "publish_bytes", "rate": 0.5, "burst": 65536, "key": "claim:sub", "streams": "chat:*", "max_keys": 9}
    )
    assert (rule.burst, rule.key, rule.streams, rule.max_keys) == (65536.0, KeySource("claim", "sub"), "chat:*", 9)
    assert RateRule.from_mapping({"route": "connect", "rate": 0.2}).burst == 1.0


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"rate": 1}, "route"),
        ({"route": "read", "rate": 1}, "route"),
        ({"route": "publish"}, "rate"),
        ({"route": "publish", "rate": -1}, "rate"),
        ({"route": "publish", "rate": True}, "rate"),
        ({"route": "publish", "rate": "5"}, "rate"),
        ({"route": "publish", "rate": 1, "burst": 0}, "burst"),
        ({"route": "publish", "rate": 1, "key": "ip"}, "key"),
        ({"route": "publish", "rate": 1, "key": 3}, "key"),
        ({"route": "publish", "rate": 1, "streams": ""}, "streams"),
        ({"route": "publish", "rate": 1, "streams": "a b"}, "streams"),
        ({"route": "connect", "rate": 1, "streams": "chat:*"}, "streams"),
        ({"route": "publish", "rate": 1, "max_keys": 0}, "max_keys"),
        ({"route": "publish", "rate": 1, "max_keys": 2.5}, "max_keys"),
        ({"route": "publish", "rate": 1, "bursts": 3}, "bursts"),
    ],
)
def test_rate_rule_from_mapping_names_the_bad_field(table: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        RateRule.from_mapping(table)


def test_parse_rules_names_the_index() -> None:
    assert parse_rules([{"route": "subscribe", "rate": 1}]) == (RateRule("subscribe", 1, 1),)
    with pytest.raises(ValueError, match=r"^rules\[1\]\.rate: "):
        parse_rules([{"route": "subscribe", "rate": 1}, {"route": "subscribe", "rate": 0}])
    with pytest.raises(ValueError, match=r"^rules\[0\]: "):
        parse_rules(["publish"])


def test_limits_config_defaults_and_factories() -> None:
    config = LimitsConfig()
    assert config.rules == ()
    assert not config.rate_limits()
    counter = config.connection_counter()  # one worker: the whole per-host cap
    assert (counter.max_total, counter.max_per_address) == (config.max_connections, config.max_connections_per_address)
    for bucket in (config.h2_reset_bucket(), config.h2_stream_bucket(), config.ws_ping_bucket()):
        assert bucket.take(0.0) == 0.0
    assert config.ws_ping_bucket().burst == config.ws_ping_burst
    with pytest.raises(ValueError, match="max_connections"):
        LimitsConfig(max_connections=-1)
    with pytest.raises(ValueError, match="ws_max_pings_per_second"):
        LimitsConfig(ws_max_pings_per_second=0)


# -- RateLimits ----------------------------------------------------------------------------------


def test_no_rules_is_a_fast_path() -> None:
    def key_of(source: KeySource) -> str | None:
        raise AssertionError("no key is needed without rules")

    limits = RateLimits()
    assert not limits
    for _ in range(1000):
        assert limits.check("publish", "chat:1", key_of, 0.0) == 0.0
    only_connect = RateLimits([RateRule("connect", 1, 1)])
    assert only_connect.check("publish", "chat:1", key_of, 0.0) == 0.0


def test_address_rule() -> None:
    limits = RateLimits([RateRule("connect", rate=1, burst=2)])
    a, b = request_key_of("192.0.2.1"), request_key_of("192.0.2.2")
    assert limits.check("connect", None, a, 0.0) == 0.0
    assert limits.check("connect", None, a, 0.0) == 0.0
    assert limits.check("connect", None, a, 0.0) == pytest.approx(1.0)
    assert limits.check("connect", None, b, 0.0) == 0.0
    assert limits.check("connect", None, a, 1.0) == 0.0


def test_per_stream_pattern_rules() -> None:
    limits = RateLimits([RateRule("publish", 1, 1, streams="chat:*"), RateRule("publish", 1, 3, streams="metrics:**")])
    key = request_key_of("192.0.2.1")
    assert limits.check("publish", "chat:1", key, 0.0) == 0.0
    assert limits.check("publish", "chat:1", key, 0.0) > 0.0
    assert limits.check("publish", "chat:1:2", key, 0.0) == 0.0  # `*` is one segment: no rule applies
    assert limits.check("publish", "other", key, 0.0) == 0.0
    assert limits.check("publish", None, key, 0.0) == 0.0
    for _ in range(3):
        assert limits.check("publish", "metrics:a:b", key, 0.0) == 0.0
    assert limits.check("publish", "metrics", key, 0.0) > 0.0  # `**` matches zero segments too


def test_every_matching_rule_must_pass_and_a_refusal_spends_nothing() -> None:
    limits = RateLimits([RateRule("publish", 1, 5), RateRule("publish", 1, 1, streams="hot")])
    key = request_key_of("192.0.2.1")
    assert limits.check("publish", "hot", key, 0.0) == 0.0
    for _ in range(10):
        assert limits.check("publish", "hot", key, 0.0) > 0.0  # refused by the second rule ...
    for _ in range(4):  # ... without spending the first rule's budget
        assert limits.check("publish", "cold", key, 0.0) == 0.0
    assert limits.check("publish", "cold", key, 0.0) > 0.0


def test_refund_gives_back_to_every_matching_rule_of_the_route_only() -> None:
    limits = RateLimits(
        [RateRule("publish", 1, 1), RateRule("publish", 1, 1, streams="hot"), RateRule("connect", 1, 1)]
    )
    key = request_key_of("192.0.2.1")
    assert limits.check("publish", "hot", key, 0.0) == 0.0
    assert limits.check("connect", None, key, 0.0) == 0.0
    assert limits.check("publish", "hot", key, 0.0) > 0.0
    limits.refund("publish", "hot", key)
    assert limits.check("publish", "hot", key, 0.0) == 0.0  # both publish rules got their token back
    assert limits.check("connect", None, key, 0.0) > 0.0  # another route's spending is untouched
    limits.refund("publish_bytes", "hot", key)  # a route without rules: nothing to do


def test_header_key() -> None:
    limits = RateLimits([RateRule("subscribe", 1, 1, key=KeySource.parse("header:X-Api-Key"))])
    same_address = "192.0.2.1"
    alice = request_key_of(same_address, headers={"x-api-key": "alice"})
    bob = request_key_of(same_address, headers={"x-api-key": "bob"})
    assert limits.check("subscribe", "s", alice, 0.0) == 0.0
    assert limits.check("subscribe", "s", alice, 0.0) > 0.0
    assert limits.check("subscribe", "s", bob, 0.0) == 0.0


def test_claim_key_and_long_keys() -> None:
    limits = RateLimits([RateRule("publish", 1, 1, key=KeySource("claim", "sub"), max_keys=5)])
    assert limits.check("publish", "s", request_key_of("a", claims={"sub": "user-1"}), 0.0) == 0.0
    assert limits.check("publish", "s", request_key_of("b", claims={"sub": "user-1"}), 0.0) > 0.0
    assert limits.check("publish", "s", request_key_of("a", claims={"sub": 42}), 0.0) == 0.0
    long_key = "x" * 100_000
    assert limits.check("publish", "s", request_key_of("a", claims={"sub": long_key}), 0.0) == 0.0
    assert limits.check("publish", "s", request_key_of("b", claims={"sub": long_key}), 0.0) > 0.0


def test_missing_key_falls_back_to_the_address() -> None:
    limits = RateLimits([RateRule("publish", 1, 1, key=KeySource("query", "tenant"))])
    anonymous = request_key_of("192.0.2.1")
    assert limits.check("publish", "s", anonymous, 0.0) == 0.0
    assert limits.check("publish", "s", anonymous, 0.0) > 0.0  # omitting the key escapes nothing
    assert limits.check("publish", "s", request_key_of("192.0.2.1", claims={"tenant": "x"}), 0.0) > 0.0
    assert limits.check("publish", "s", request_key_of("192.0.2.2"), 0.0) == 0.0
    # a tenant named like the address has its own bucket: a client cannot spend another's budget
    assert limits.check("publish", "s", request_key_of("192.0.2.9", query={"tenant": "192.0.2.1"}), 0.0) == 0.0


def test_cookie_key() -> None:
    limits = RateLimits([RateRule("subscribe", 1, 1, key=KeySource("cookie", "sid"))])
    one = request_key_of("a", headers={"cookie": "theme=dark; sid=one"})
    two = request_key_of("a", headers={"cookie": "sid=two"})
    assert limits.check("subscribe", "s", one, 0.0) == 0.0
    assert limits.check("subscribe", "s", one, 0.0) > 0.0
    assert limits.check("subscribe", "s", two, 0.0) == 0.0


def test_a_cookie_key_is_read_as_the_auth_token_cookie_is() -> None:
    limits = RateLimits([RateRule("subscribe", 1, 1, key=KeySource("cookie", "sid"))])
    quoted = request_key_of("a", headers={"cookie": 'theme=dark;  sid = "one" '})
    plain = request_key_of("b", headers={"cookie": "sid=one"})
    assert quoted(KeySource("cookie", "sid")) == "one"
    assert extract_token([(b"cookie", b'theme=dark;  sid = "one" ')], None, cookie_name="sid") == "one"
    assert limits.check("subscribe", "s", quoted, 0.0) == 0.0
    assert limits.check("subscribe", "s", plain, 0.0) > 0.0  # the same key: one bucket


def test_publish_bytes_cost_and_oversize() -> None:
    limits = RateLimits([RateRule("publish_bytes", rate=1000, burst=4096)])
    key = request_key_of("a")
    assert limits.check("publish_bytes", "s", key, 0.0, cost=4000) == 0.0
    assert limits.check("publish_bytes", "s", key, 0.0, cost=1000) == pytest.approx(0.904)
    assert limits.check("publish_bytes", "s", key, 100.0, cost=5000) == math.inf


def test_custom_pattern_compiler_is_used() -> None:
    seen: list[str] = []

    def compile_pattern(text: str) -> Callable[[str], bool]:
        seen.append(text)
        return lambda stream: stream.startswith("x")

    limits = RateLimits([RateRule("publish", 1, 1, streams="x:**")], compile_pattern)
    key = request_key_of("a")
    assert seen == ["x:**"]
    assert limits.check("publish", "y", key, 0.0) == 0.0
    assert limits.check("publish", "xy", key, 0.0) == 0.0
    assert limits.check("publish", "xy", key, 0.0) > 0.0


@pytest.mark.parametrize(
    ("pattern", "stream", "expected"),
    [
        ("**", "a", True),
        ("a:*", "a:b", True),
        ("a:*", "a", False),
        ("a:*", "a:b:c", False),
        ("a:**", "a", True),
        ("a:**:z", "a:b:c:z", True),
        ("a:**:z", "a:b:c", False),
        ("*:b", "x:b", True),
        ("a:b", "a:b", True),
        ("a:b", "a:c", False),
    ],
)
def test_stream_matcher(pattern: str, stream: str, expected: bool) -> None:
    assert stream_matcher(pattern)(stream) is expected


# -- Retry-After ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "value"),
    [(0.0, b"1"), (-3.0, b"1"), (0.001, b"1"), (1.0, b"1"), (1.2, b"2"), (59.5, b"60"), (math.inf, b"3600")],
)
def test_retry_after_header(seconds: float, value: bytes) -> None:
    assert retry_after_header(seconds) == value


def test_retry_after_bounds() -> None:
    assert retry_after(math.nan) == MAX_RETRY_AFTER
    assert retry_after(1e300) == MAX_RETRY_AFTER
