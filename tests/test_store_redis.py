"""The Redis store against a real ``redis-server``: what the shared contract cannot see.

Durability across a ``redis-server`` restart, the atomic append script under concurrent
appenders on two clients (two workers or hosts), retention as Redis holds it, the key layout, the
deadline on an unreachable or frozen Redis, WAIT on replicas, the script cache being flushed, and
Sentinel discovery. Each test runs under :data:`DEADLINE`; time moves by a fake clock, not sleeps.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import coredis
import pytest
import trio

from server.core.ids import parse_id
from server.core.ports.store import Appended, AppendResult, IdempotencyKeyReused, Notice, Retention, StreamClosed
from server.store.redis import RedisStore, RedisUnavailable, ReplicationFailed, open_redis_store
from tests.haproxy import free_port
from tests.redis_server import RedisServer, redis_server
from tests.store_contract import UNLIMITED, FakeClock, ev, seqs

__all__ = ["redis_server"]

DEADLINE = 20.0
PREFIXES = itertools.count()


def fresh_prefix() -> str:
    """A prefix no other store of the session uses, so the shared server looks empty."""
    return f"r{next(PREFIXES)}:"


@asynccontextmanager
async def raw(url: str) -> AsyncIterator[coredis.Redis[bytes]]:
    """A plain coredis client, to look at what the store wrote."""
    async with coredis.Redis.from_url(url) as client:
        yield client


@asynccontextmanager
async def store_at(
    url: str, prefix: str, retention: Retention = UNLIMITED, clock: FakeClock | None = None, **options: object
) -> AsyncIterator[RedisStore]:
    """A store on ``url`` under ``prefix``, with a fake clock unless one is given."""
    async with open_redis_store(url, retention, prefix=prefix, clock=clock or FakeClock(), **options) as store:  # type: ignore[arg-type]
        yield store


# -- durability ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_acknowledged_appends_survive_a_redis_restart(tmp_path: Path, stop: signal.Signals) -> None:
    server = RedisServer(tmp_path / "redis", tcp=True)
    server.start()
    try:
        with trio.fail_after(DEADLINE):
            async with store_at(server.url, "d:", timeout=2.0) as store:
                acked: list[AppendResult] = [await store.append("s", [ev(str(i)), ev("x")]) for i in range(20)]
                await store.close_stream("closed")
                server.signal(stop)
                server.proc.wait(10)  # type: ignore[union-attr]
                server.proc = None
                with pytest.raises(RedisUnavailable):
                    await store.append("s", [ev("while down")])
                server.start()
                page = await store.read("s", 0, 1000)
                ids = [i for r in acked for i in r.ids]
                assert [e.id for e in page.events] == ids
                assert (await store.append("s", [ev("after")])).events[0].seq == 41
            async with store_at(server.url, "d:") as again:
                info = await again.info("s")
                assert info is not None and (info.epoch, info.first_seq, info.last_seq) == (
                    acked[0].events[0].epoch,
                    1,
                    41,
                )
                closed = await again.info("closed")
                assert closed is not None and closed.closed
                with pytest.raises(StreamClosed):
                    await again.append("closed", [ev()])
    finally:
        server.stop()


# -- the atomic script under concurrency ----------------------------------------------------------


async def test_concurrent_appenders_on_two_clients_get_contiguous_unique_seqs(redis_server: RedisServer) -> None:
    prefix = fresh_prefix()
    with trio.fail_after(DEADLINE):
        async with store_at(redis_server.url, prefix) as a, store_at(redis_server.url, prefix) as b:
            results: list[AppendResult] = []

            async def appender(store: RedisStore, n: int) -> None:
                for i in range(10):
                    results.append(await store.append("s", [ev(f"{n}.{i}.{j}") for j in range(1 + (n + i) % 4)]))

            async with trio.open_nursery() as nursery:
                for n in range(8):
                    nursery.start_soon(appender, a if n % 2 else b, n)
            for r in results:
                assert seqs(r) == list(range(r.events[0].seq, r.events[0].seq + len(r.events)))
            issued = sorted(s for r in results for s in seqs(r))
            assert issued == list(range(1, len(issued) + 1))
            assert len({r.events[0].epoch for r in results}) == 1
            page = await a.read("s", 0, 10_000)
            assert [e.data for e in page.events] == [
                e.data for r in sorted(results, key=lambda r: r.events[0].seq) for e in r.events
            ]


async def test_one_idempotency_key_raced_from_two_clients_appends_once(redis_server: RedisServer) -> None:
    prefix = fresh_prefix()
    window = Retention(max_events=0, max_bytes=0, max_age=0, idempotency_window=100)
    with trio.fail_after(DEADLINE):
        async with store_at(redis_server.url, prefix, window) as a, store_at(redis_server.url, prefix, window) as b:
            succeeded: list[tuple[str, AppendResult]] = []
            refused: list[str] = []

            async def publish(store: RedisStore, request: str) -> None:
                stream, data = request.split("/")
                try:
                    succeeded.append((request, await store.append(stream, [ev(data), ev("2")], idempotency_key="k")))
                except IdempotencyKeyReused:
                    refused.append(request)

            requests = [*["s/1"] * 12, "s/other", "other-stream/1"]
            async with trio.open_nursery() as nursery:
                for n, request in enumerate(requests):
                    nursery.start_soon(publish, a if n % 2 else b, request)
            [(winner, first)] = [(req, r) for req, r in succeeded if not r.duplicate]
            assert all(req == winner and r.ids == first.ids for req, r in succeeded)
            assert sorted(refused) == sorted(req for req in requests if req != winner)
            assert len(succeeded) == requests.count(winner)
            stream = winner.split("/")[0]
            assert seqs(await a.read(stream, 0, 100)) == [1, 2]
            assert [await b.info(s) is None for s in ("s", "other-stream") if s != stream] == [True]


async def test_appends_racing_a_close_stop_exactly_at_its_last_seq(redis_server: RedisServer) -> None:
    prefix = fresh_prefix()
    with trio.fail_after(DEADLINE):
        async with store_at(redis_server.url, prefix) as a, store_at(redis_server.url, prefix) as b:
            await a.append("s", [ev()])
            done: list[AppendResult] = []
            closed_out = 0

            async def appender(store: RedisStore) -> None:
                nonlocal closed_out
                for _ in range(15):
                    try:
                        done.append(await store.append("s", [ev(), ev()]))
                    except StreamClosed:
                        closed_out += 1

            async with trio.open_nursery() as nursery:
                for n in range(6):
                    nursery.start_soon(appender, a if n % 2 else b)
                await trio.lowlevel.checkpoint()
                info = await b.close_stream("s")
            assert closed_out > 0
            last = max(s for r in done for s in seqs(r)) if done else 1
            assert info.last_seq == last
            final = await a.info("s")
            assert final is not None and final.closed and final.last_seq == last
            assert seqs(await a.read("s", 0, 1000)) == list(range(1, last + 1))


async def test_the_listener_hears_in_the_order_redis_applied(redis_server: RedisServer) -> None:
    with trio.fail_after(DEADLINE):
        async with store_at(redis_server.url, fresh_prefix()) as store:
            heard: list[Notice] = []
            store.set_listener(heard.append)
            results = await store.append_each([("a", [ev("1")]), ("b", [ev("2")]), ("a", [ev("3"), ev("4")])])
            assert [n.events for n in heard if isinstance(n, Appended)] == [
                r.events for r in results if isinstance(r, AppendResult)
            ]
            assert store.stats.commits == 1 and store.stats.requests == 3 and store.stats.events == 4


# -- retention as Redis holds it ---------------------------------------------------------------------


async def test_retention_by_count_and_age_trims_the_redis_stream(redis_server: RedisServer) -> None:
    prefix = fresh_prefix()
    clock = FakeClock(2_000_000.0)
    retention = Retention(max_events=3, max_bytes=0, max_age=60, idempotency_window=0)
    with trio.fail_after(DEADLINE):
        async with store_at(redis_server.url, prefix, retention, clock) as store, raw(redis_server.url) as r:
            log, ages = f"{prefix}{{s}}:log", f"{prefix}ages"
            for i in range(5):
                await store.append("s", [ev(str(i))])
            entries = await r.xrange(log)
            assert [e.identifier for e in entries] == [b"3-0", b"4-0", b"5-0"]
            assert entries[0].field_values[b"s"] == b"2000000000"
            assert await r.zscore(ages, "s") == 2_000_000_000
            clock.advance(30)
            await store.append("s", [ev("5")])
            await store.append("t", [ev("other")])
            clock.advance(31)  # the first four are now older than 60 s; "t" and seq 6 are not
            assert await store.trim_expired() == 2
            assert [e.identifier for e in await r.xrange(log)] == [b"6-0"]
            assert await r.zscore(ages, "s") == 2_000_030_000
            clock.advance(60)
            assert await store.trim_expired() == 2
            assert await r.xlen(log) == 0 and await r.zscore(ages, "s") is None
            info = await store.info("s")
            assert info is not None and (info.first_seq, info.last_seq, info.length) == (0, 6, 0)
            assert seqs(await store.append("s", [ev()])) == [7]


async def test_max_bytes_is_kept_with_the_running_byte_count(redis_server: RedisServer) -> None:
    retention = Retention(max_events=0, max_bytes=100, max_age=0, idempotency_window=0)
    with trio.fail_after(DEADLINE):
        async with store_at(redis_server.url, fresh_prefix(), retention) as store:
            for size in (40, 40, 40, 10, 10, 10):
                await store.append("s", [ev(b"x" * size)])
            assert seqs(await store.read("s", 0, 10)) == [3, 4, 5, 6]  # 40+10+10+10: 40 more is too many
            await store.append("s", [ev(b"y" * 95), ev(b"z" * 5)])
            assert seqs(await store.read("s", 0, 10)) == [7, 8]


# -- keys ----------------------------------------------------------------------------------------


async def test_every_key_carries_the_prefix_and_a_streams_keys_share_its_hash_tag(redis_server: RedisServer) -> None:
    prefix = fresh_prefix()
    retention = Retention(max_events=0, max_bytes=0, max_age=60, idempotency_window=100)
    with trio.fail_after(DEADLINE):
        async with raw(redis_server.url) as r:
            before = set(await r.keys("*"))
            async with store_at(redis_server.url, prefix, retention) as store:
                await store.append("room:1", [ev()], idempotency_key="key-1")
                await store.close_stream("shut")
            made = set(await r.keys("*")) - before
            assert made == {
                f"{prefix}{{room:1}}:meta".encode(),
                f"{prefix}{{room:1}}:log".encode(),
                f"{prefix}{{shut}}:meta".encode(),
                f"{prefix}ages".encode(),
                f"{prefix}lineage".encode(),
                f"{prefix}idem:key-1".encode(),
            }
            assert 0 < await r.pttl(f"{prefix}idem:key-1") <= 100_000
            assert await r.type(f"{prefix}{{room:1}}:log") == b"stream"
            async with store_at(redis_server.url, prefix) as store:
                await store.delete("room:1")
            assert {k for k in await r.keys(f"{prefix}*") if b"room:1" in k} == set()


async def test_a_flushed_script_cache_is_loaded_again(redis_server: RedisServer) -> None:
    with trio.fail_after(DEADLINE):
        async with store_at(redis_server.url, fresh_prefix()) as store, raw(redis_server.url) as r:
            await store.append("s", [ev()])
            await r.script_flush()
            assert seqs(await store.append("s", [ev()])) == [2]
            await r.script_flush()
            assert [
                seqs(x) for x in await store.append_each([("s", [ev()]), ("t", [ev()])]) if isinstance(x, AppendResult)
            ] == [[3], [1]]
            await r.script_flush()
            assert seqs(await store.read("s", 0, 10)) == [1, 2, 3]


# -- an unreachable or frozen Redis -------------------------------------------------------------------


async def test_an_unreachable_redis_fails_an_append_within_the_timeout() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with trio.fail_after(DEADLINE):
        async with store_at(url, "u:", timeout=0.5) as store:
            started = trio.current_time()
            with pytest.raises(RedisUnavailable, match="redis store"):
                await store.append("s", [ev()])
            with pytest.raises(RedisUnavailable):
                await store.read("s", 0, 10)
            assert trio.current_time() - started < 0.5 * 2 + 0.5


async def test_a_frozen_redis_fails_calls_at_the_timeout_and_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", tcp=True)
    server.start()
    try:
        with trio.fail_after(DEADLINE):
            async with store_at(server.url, "f:", timeout=0.5) as store:
                await store.append("s", [ev("before")])
                server.signal(signal.SIGSTOP)
                for attempt in (
                    lambda: store.append("s", [ev("frozen")]),
                    lambda: store.heads(["s"]),
                    lambda: store.info("s"),
                ):
                    started = trio.current_time()
                    with pytest.raises(RedisUnavailable, match="redis store"):  # no answer, or no connection
                        await attempt()
                    assert 0.4 < trio.current_time() - started < 1.2
                server.signal(signal.SIGCONT)
                result = await store.append("s", [ev("after")])
                page = await store.read("s", 0, 10)
                # the frozen append was sent before its deadline passed: Redis ran it once thawed
                assert [e.data for e in page.events] == [b"before", b"frozen", b"after"]
                assert seqs(result) == [3]
    finally:
        server.stop()


# -- replicas -------------------------------------------------------------------------------------


async def test_wait_replicas_fails_the_publish_clearly_without_enough_replicas(redis_server: RedisServer) -> None:
    with trio.fail_after(DEADLINE):
        async with store_at(redis_server.url, fresh_prefix(), wait_replicas=1, timeout=0.5) as store:
            heard: list[Notice] = []
            store.set_listener(heard.append)
            with pytest.raises(ReplicationFailed, match="0 of 1 replicas"):
                await store.append("s", [ev()])
            # applied on the primary (and so told), only not replicated
            assert len(heard) == 1 and seqs(await store.read("s", 0, 10)) == [1]


async def test_wait_replicas_passes_with_a_real_replica(tmp_path: Path) -> None:
    primary = RedisServer(tmp_path / "primary", tcp=True)
    replica = RedisServer(tmp_path / "replica", tcp=True, aof=False)  # no AOF rewrite to hold up its stop
    primary.start()
    try:
        replica.start()
        with trio.fail_after(DEADLINE):
            async with raw(primary.url) as p:
                await p.config_set({"repl-diskless-sync-delay": 0})  # the first sync at once, not in 5 s
            async with raw(replica.url) as r:
                await r.replicaof("127.0.0.1", primary.port)
                while (await r.info("replication"))["master_link_status"] != "up":
                    await trio.sleep(0.02)  # polling the replica's link (an external process)
            async with store_at(primary.url, "w:", wait_replicas=1, timeout=5.0) as store:
                result = await store.append("s", [ev("replicated")])
            async with store_at(replica.url, "w:") as on_replica:
                assert (await on_replica.read("s", 0, 10)).events == result.events
    finally:
        replica.stop()
        primary.stop()


async def test_sentinel_discovers_the_primary(tmp_path: Path) -> None:
    primary = RedisServer(tmp_path / "primary", tcp=True)
    primary.start()
    sentinel_port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor main 127.0.0.1 {primary.port} 1\n")
    sentinel = RedisServer(tmp_path / "sentinel", tcp=True)
    sentinel.port = sentinel_port
    try:
        sentinel.start_sentinel(config)
        with trio.fail_after(DEADLINE):
            async with open_redis_store(
                None, UNLIMITED, sentinels=[f"127.0.0.1:{sentinel_port}"], master="main", prefix="sen:", timeout=2.0
            ) as store:
                appended = await store.append("s", [ev("via sentinel")])
            async with store_at(primary.url, "sen:") as direct:
                assert (await direct.read("s", 0, 10)).events == appended.events
                assert parse_id(appended.ids[0]) is not None
    finally:
        sentinel.stop()
        primary.stop()
