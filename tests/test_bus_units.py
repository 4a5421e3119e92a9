"""The pieces under the notice bus: its wire format, the stores' batched heads, the hub's hints."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import trio

from server.bus import local_wire as wire
from server.core.encoding import EncodedEvent, EventBatch
from server.core.events import Event, NewEvent
from server.core.hub import Hub
from server.core.ports.store import Appended, Closed, Deleted, Head
from server.core.replay import Start
from server.store.memory import MemoryStore
from server.store.sqlite import open_sqlite_store
from tests.test_bus_local import KEEP_ALL, Recorder, subscribe, wait_until

# -- wire format ---------------------------------------------------------------------------------


def ev(seq: int, data: bytes = b"x", *, type_: str = "message", binary: bool = False) -> Event:
    return Event("s:1", "0123456789", seq, type_, data, binary)


def decoded_events(items: list[wire.Encoded]) -> list[Event]:
    out: list[Event] = []
    for item in wire.decode(wire.datagram([data for data, _, _ in items])):
        assert item[0] == wire.EVENTS
        out += wire.events_of(item)
    return out


def test_events_round_trip_in_one_item() -> None:
    events = [ev(7, b"\x00\xff", type_="t.x", binary=True), ev(8, "é".encode())]
    items = wire.encode_notice(Appended(events), 4096)
    assert [(key, hint) for _, key, hint in items] == [(("s:1", Head("0123456789", 8)), False)]
    assert decoded_events(items) == events


def test_a_large_batch_is_split_into_items_that_each_fit() -> None:
    events = [ev(i, bytes(300)) for i in range(1, 41)]
    items = wire.encode_notice(Appended(events), 1200)
    assert len(items) > 10 and all(len(data) <= 1200 and not hint for data, _, hint in items)
    assert decoded_events(items) == events
    assert items[-1][1] == ("s:1", Head("0123456789", 40))


def test_an_event_too_big_turns_the_rest_of_the_notice_into_one_hint() -> None:
    events = [ev(1), ev(2, bytes(5000)), ev(3)]
    items = wire.encode_notice(Appended(events), 1024)
    *fitting, (data, key, hint) = items
    assert hint and key == ("s:1", Head("0123456789", 3))
    assert decoded_events(fitting) == [ev(1)]
    assert wire.decode(wire.datagram([data])) == [[wire.HINT, "s:1", "0123456789", 3, False]]


def test_closed_and_deleted_items() -> None:
    (closed, closed_key, _), (deleted, deleted_key, _) = (
        *wire.encode_notice(Closed("s", "e", 4), 1024),
        *wire.encode_notice(Deleted("s"), 1024),
    )
    assert closed_key == ("s", Head("e", 4, True)) and deleted_key == ("s", None)
    assert wire.decode(wire.datagram([closed, deleted])) == [[wire.CLOSED, "s", "e", 4], [wire.DELETED, "s"]]


@pytest.mark.parametrize("n", [0, 14, 15, 16, 70_000])
def test_datagram_array_headers(n: int) -> None:
    item = msgpack.packb([wire.RESYNC])
    assert wire.decode(wire.datagram([item] * n)) == [[wire.RESYNC]] * n


@pytest.mark.parametrize(
    "data",
    [b"\xc1", msgpack.packb([2, [0]]), msgpack.packb({"v": 1}), msgpack.packb([1, 5]), msgpack.packb([1, []])],
)
def test_malformed_datagrams_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        wire.decode(data)


def test_malformed_event_items_are_refused() -> None:
    for item in ([0, "s", "e", -1, ["t", b"d", False]], [0, "s", "e", 1, ["t", "text", False]], [0, "s", "e", 1, []]):
        with pytest.raises((ValueError, TypeError)):
            wire.events_of(item)


# -- heads ---------------------------------------------------------------------------------------


async def test_sqlite_heads_reads_many_streams_in_chunks(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_sqlite_store(tmp_path / "h.db", KEEP_ALL) as store:
            a = await store.append("a", [NewEvent("message", b"1"), NewEvent("message", b"2")])
            z = await store.append("z", [NewEvent("message", b"1")])
            await store.close_stream("z")
            names = [f"missing{i}" for i in range(1200)]
            names[3], names[1100] = "a", "z"  # in different chunks
            heads = await store.heads(names)
            assert heads == {"a": Head(a.events[0].epoch, 2), "z": Head(z.events[0].epoch, 1, True)}
            assert await store.heads([]) == {}


async def test_default_heads_uses_info() -> None:
    store = MemoryStore(KEEP_ALL)
    result = await store.append("a", [NewEvent("message", b"1")])
    assert await store.heads(["a", "b"]) == {"a": Head(result.events[0].epoch, 1)}


# -- the hub's hints -----------------------------------------------------------------------------


async def test_hints_wake_only_watchers_that_are_behind() -> None:
    store = MemoryStore(KEEP_ALL)
    hub = Hub(store)
    store.set_listener(hub.on_notice)
    first = await store.append("s", [NewEvent("message", b"1")])
    epoch = first.events[0].epoch
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            rec = Recorder()
            sub = await subscribe(n, hub, "s", rec)
            assert not hub.on_hint("s", epoch, 1)  # nothing new
            assert not hub.on_hint("other", epoch, 9)  # nobody watches it
            store.set_listener(None)  # commits that nobody is told of
            more = await store.append("s", [NewEvent("message", b"2"), NewEvent("message", b"3")])
            with hub.nudge("s") as nudged:
                assert hub.on_hint("s", epoch, 3)
                assert nudged.is_set()
            assert not hub.on_hint("s", epoch, 2)  # older than what was told
            await rec.wait_for(2)
            assert rec.events == more.events
            await wait_until(lambda: sub.live)
            await store.close_stream("s")
            assert hub.on_hint("s", epoch, 3, closed=True)
            await rec.wait_end()
            n.cancel_scope.cancel()


async def test_remote_notices_out_of_order_are_delivered_once_in_order() -> None:
    store = MemoryStore(KEEP_ALL)
    hub = Hub(store)
    await store.append("s", [NewEvent("message", b"1")])
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            rec = Recorder()
            sub = await subscribe(n, hub, "s", rec)
            two = (await store.append("s", [NewEvent("message", b"2")])).events
            three = (await store.append("s", [NewEvent("message", b"3")])).events
            hub.on_notice(Appended(three), remote=True)  # overtook seq 2: back to the store
            assert not sub.live
            await rec.wait_for(2)
            hub.on_notice(Appended(two), remote=True)  # late: already delivered
            hub.on_notice(Appended(three), remote=True)  # twice
            assert rec.events == two + three and hub.stats.published == 0
            n.cancel_scope.cancel()


async def test_a_late_notice_does_not_hide_a_newer_one_seen_while_catching_up() -> None:
    store = MemoryStore(KEEP_ALL)
    hub = Hub(store)
    events = (await store.append("s", [NewEvent("message", b"x")] * 3)).events
    async with hub.open_subscription("s", Start("start")) as sub:
        assert not sub.live
        sub.on_appended(EventBatch([EncodedEvent(events[2])]))
        sub.on_appended(EventBatch([EncodedEvent(events[0])]))  # an older notice, arriving late
        sub.on_hint(events[1].epoch, 2)
        assert sub._live_mark == (events[2].epoch, 3)
