"""The Redis notice bus beyond the shared contract (``tests/test_bus_contract.py``): its outbox
(pure: grouping per stream, message size, the bounds and what is owed past them) and, against a
real ``redis-server`` of the test's own, what a Redis restart does to workers that stay up."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import trio

from server.bus import local_wire as wire
from server.bus.redis import RedisBus, open_redis_bus
from server.bus.redis_outbox import MAX_OWED, TOKEN_SIZE, RedisOutbox
from server.core.events import Event, NewEvent
from server.core.ports.store import Appended, Deleted, Head
from server.store.memory import MemoryStore
from tests.redis_server import RedisServer
from tests.test_bus_contract import KEEP_ALL, Watching, connector

TOKEN = b"worker-1"


def _events(stream: str, first: int, *sizes: int) -> Appended:
    return Appended([Event(stream, "e1", first + i, "message", bytes(n), False) for i, n in enumerate(sizes)])


def _items(data: bytes) -> list[list[object]]:
    assert data[:TOKEN_SIZE] == TOKEN
    return wire.decode(data[TOKEN_SIZE:])


def test_notices_are_grouped_per_stream_in_commit_order_within_the_budget() -> None:
    outbox = RedisOutbox(TOKEN, budget=2048, max_queued=1 << 20)
    outbox.add(_events("a", 1, 10))
    outbox.add(_events("b", 1, 10))
    outbox.add(_events("a", 2, 1500))
    outbox.add(_events("a", 3, 1500))
    messages = outbox.take()
    assert not outbox and outbox.take() == []
    assert [m.stream for m in messages] == ["a", "a", "b"]
    seqs = [[wire.events_of(item)[0].seq for item in _items(m.data)] for m in messages]
    assert seqs == [[1, 2], [3], [1]]  # a's items in order, split where the budget ends
    assert all(len(m.data) <= TOKEN_SIZE + wire.HEADER_MAX + 2048 for m in messages)


def test_past_the_queue_bound_a_stream_is_owed_a_hint_of_its_newest_head() -> None:
    outbox = RedisOutbox(TOKEN, budget=4096, max_queued=3000)
    outbox.add(_events("a", 1, 2000))
    outbox.add(_events("a", 2, 2000))  # no room: owed
    outbox.add(_events("a", 3, 2000))  # still none: the newest head wins
    assert outbox.held == 1 and outbox.owed == {"a": Head("e1", 3)}
    messages = outbox.take()
    hint, events = messages
    assert _items(hint.data) == [[wire.HINT, "a", "e1", 3, False]] and hint.hints == 1
    assert [e.seq for e in wire.events_of(_items(events.data)[0])] == [1]
    assert outbox.held == 0


def test_past_max_owed_streams_one_resync_replaces_the_hints() -> None:
    outbox = RedisOutbox(TOKEN, budget=4096, max_queued=4096)
    outbox.owe([(f"s{i}", Head("e1", 1)) for i in range(MAX_OWED)])
    assert outbox.held == MAX_OWED and not outbox.resync
    outbox.owe([("one-more", Head("e1", 1))])
    assert outbox.resync and outbox.owed == {} and outbox.held == 1
    [resync] = outbox.take()
    assert resync.stream is None and _items(resync.data) == [[wire.RESYNC]]
    outbox.owe([("s0", Head("e1", 2)), ("s0", None)])  # then deleted: nothing left to read
    assert outbox.held == 0


async def test_workers_stay_up_through_a_redis_restart_and_miss_nothing(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", tcp=True)
    redis.start()
    store = MemoryStore(KEEP_ALL)  # the history the buses repair from
    try:
        with trio.fail_after(60):
            async with AsyncExitStack() as stack:
                watcher = Watching("s")
                options = {
                    "connect": connector(redis.url, 1.0),
                    "prefix": "restart:",
                    "timeout": 1.0,
                    "reconcile_interval": 0.0,
                }
                a = await stack.enter_async_context(open_redis_bus(watcher, store, **options))  # type: ignore[arg-type]
                b = await stack.enter_async_context(open_redis_bus(Watching(), store, **options))  # type: ignore[arg-type]
                assert isinstance(a, RedisBus) and a.connected and b.connected
                one = Appended((await store.append("s", [NewEvent("message", b"1")])).events)
                b.publish(one)
                await watcher.until(lambda: watcher.head("s") == 1)
                redis.stop()
                # committed while Redis is down: b cannot publish it, and owes a hint instead
                two = Appended((await store.append("s", [NewEvent("message", b"2")])).events)
                b.publish(two)
                while b.stats.send_failures == 0:
                    await trio.sleep(0.01)
                assert b.held == 1
                redis.start()
                # no reconciliation runs (interval 0): the owed hint, or a's read of its watched
                # heads once it is subscribed again, tells a of seq 2
                await watcher.until(lambda: watcher.head("s") == 2)
                while not a.connected:
                    await trio.sleep(0.01)
                assert a.stats.reconnects >= 1
                three = Appended((await store.append("s", [NewEvent("message", b"3")])).events)
                b.publish(three)
                await watcher.until(lambda: watcher.head("s") == 3)
                assert watcher.notices[-1] == three  # live again, with the events themselves
                b.publish(Deleted("s"))
                await watcher.until(lambda: watcher.notices[-1] == Deleted("s"))
    finally:
        redis.stop()
        await store.aclose()
