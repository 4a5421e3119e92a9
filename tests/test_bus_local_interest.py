"""Interest routing on the notice bus: a commit goes only to the workers watching its stream.

Real buses on one sqlite file and one peers directory (see ``tests/test_bus_local.py``); loss is made
by holding or dropping datagrams in the receiving bus's handler.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import trio

from server.bus import local_wire as wire
from server.bus.local import LocalBus
from server.bus.local_interest import LocalInterest, RemoteInterest
from server.bus.reconcile import Freshness
from server.core.events import NewEvent
from tests.test_bus_local import Recorder, open_store, open_worker, subscribe, wait_until

Handler = Callable[[bytes, str], None]


def _kind(data: bytes) -> object:
    items = wire.decode(data)
    return items[0][0] if items else None


def intercept(bus: LocalBus, kind: int, into: list[tuple[bytes, str]]) -> Handler:
    """Make ``bus`` put the datagrams whose first item is of ``kind`` into ``into`` instead of
    handling them; returns the real handler."""
    real: Handler = bus._handle

    def handle(data: bytes, sender: str) -> None:
        if _kind(data) == kind:
            into.append((data, sender))
        else:
            real(data, sender)

    bus._handle = handle  # type: ignore[method-assign]
    return real


async def test_a_worker_watching_nothing_is_sent_no_notices(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with (
            open_worker(tmp_path, "a") as a,
            open_worker(tmp_path, "b") as b,
            open_worker(tmp_path, "c") as c,
            trio.open_nursery() as n,
        ):
            rec = Recorder()
            await subscribe(n, c.hub, "s", rec, "start")
            # a and b know what c watches (and that the other watches nothing) once c's change is in.
            await wait_until(lambda: a.bus.stats.interest_received >= 2 and b.bus.stats.interest_received >= 3)
            await wait_until(lambda: c.bus.stats.interest_reads >= 1)
            before = b.bus.stats.received
            published = []
            for i in range(5):
                published += (await a.store.append("s", [NewEvent("message", f"{i}".encode())])).events
                await a.store.append("nobody", [NewEvent("message", b"x")])
            await rec.wait_for(5)
            await wait_until(lambda: a.bus.stats.unrouted == 5)  # the notices of "nobody" went nowhere
            assert rec.events == published
            assert c.hub.stats.replayed == 0  # all came live
            assert b.bus.stats.received == before  # not one datagram for b
            n.cancel_scope.cancel()


async def test_a_restarted_worker_is_told_the_interest_again_and_tells_its_own(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with open_worker(tmp_path, "b") as b, trio.open_nursery() as n:
            rec = Recorder()
            await subscribe(n, b.hub, "s", rec, "start")
            for _ in range(2):  # a starts, stops, starts again under the same name
                async with open_worker(tmp_path, "a") as a:
                    await wait_until(lambda: a.bus.stats.interest_received >= 1)  # b's whole set
                    await a.store.append("t", [NewEvent("message", b"for nobody")])
                    await wait_until(lambda: a.bus.stats.unrouted == 1)  # sent at the end of the pass
                    await a.store.append("s", [NewEvent("message", b"for b")])
                    await rec.wait_for(len(rec.events) + 1)
            assert [e.data for e in rec.events] == [b"for b", b"for b"]
            assert b.hub.stats.replayed == 0
            # b, in turn, knows the second a afresh: a subscribes, b routes to it.
            async with open_worker(tmp_path, "a") as a:
                on_a = Recorder()
                await subscribe(n, a.hub, "u", on_a, "start")
                await wait_until(lambda: a.bus.stats.interest_reads >= 1)  # b acknowledged it
                published = await b.store.append("u", [NewEvent("message", b"to a")])
                await on_a.wait_for(1)
                assert on_a.events == published.events and a.hub.stats.replayed == 0
            n.cancel_scope.cancel()


async def test_a_lost_interest_change_is_repaired_by_the_next_check(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with (
            open_worker(tmp_path, "a", hello_timeout=0.2) as a,
            open_worker(tmp_path, "b") as b,
            trio.open_nursery() as n,
        ):
            await wait_until(lambda: b.bus.stats.interest_received >= 1)  # a's whole set (empty)
            dropped: list[tuple[bytes, str]] = []
            real = intercept(b.bus, wire.INTEREST, dropped)
            rec = Recorder()
            await subscribe(n, a.hub, "s", rec, "start")
            await wait_until(lambda: bool(dropped))  # b never hears a watches "s"
            b.bus._handle = real  # type: ignore[method-assign]
            first = await b.store.append("s", [NewEvent("message", b"1")])
            await wait_until(lambda: b.bus.stats.unrouted == 1)  # b still thinks a watches nothing
            await rec.wait_for(1)  # a's announcement was not acknowledged in time: a read the store
            assert rec.events == first.events and a.bus.stats.interest_reads == 1
            received = b.bus.stats.interest_received
            a.bus.rescan()  # the check: b holds an older version, asks, gets the whole set
            await wait_until(lambda: b.bus.stats.interest_received > received)
            replayed = a.hub.stats.replayed
            second = await b.store.append("s", [NewEvent("message", b"2")])
            await rec.wait_for(2)
            assert rec.events[1:] == second.events
            assert b.bus.stats.unrouted == 1 and a.hub.stats.replayed == replayed  # it came live
            n.cancel_scope.cancel()


async def test_a_commit_before_the_peer_knew_of_a_new_subscriber_still_arrives(tmp_path: Path) -> None:
    options: dict[str, object] = {"reconcile_interval": 3600.0, "hello_timeout": 60.0}
    with trio.fail_after(10):
        async with (
            open_worker(tmp_path, "a", **options) as a,
            open_worker(tmp_path, "b", **options) as b,
            trio.open_nursery() as n,
        ):
            await wait_until(lambda: b.bus.stats.interest_received >= 1)
            held: list[tuple[bytes, str]] = []
            real = intercept(b.bus, wire.INTEREST, held)
            rec = Recorder()
            await subscribe(n, a.hub, "s", rec, "start")  # registered, caught up, live
            await wait_until(lambda: bool(held))
            published = await b.store.append("s", [NewEvent("message", b"raced")])
            await wait_until(lambda: b.bus.stats.unrouted == 1)  # b committed before it knew
            b.bus._handle = real  # type: ignore[method-assign]
            for data, sender in held:
                real(data, sender)  # b learns, acknowledges; a reads the stream once
            await rec.wait_for(1)
            assert rec.events == published.events
            assert a.bus.stats.reconciles == 0 and a.bus.stats.interest_reads == 1
            # And without any holding: subscribe, publish at once on the other worker.
            now = Recorder()
            await subscribe(n, a.hub, "t", now, "start")
            raced = await b.store.append("t", [NewEvent("message", b"at once")])
            await now.wait_for(1)
            assert now.events == raced.events and a.bus.stats.reconciles == 0
            n.cancel_scope.cancel()


async def test_reconciliation_reads_only_quiet_and_suspect_streams(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with (
            open_store(tmp_path) as silent,
            open_worker(tmp_path, "a") as a,
            open_worker(tmp_path, "b", reconcile_interval=3600.0) as b,
            trio.open_nursery() as n,
        ):
            busy, quiet = Recorder(), Recorder()
            await subscribe(n, b.hub, "busy", busy, "start")
            await subscribe(n, b.hub, "quiet", quiet, "start")
            await wait_until(lambda: b.bus.stats.interest_reads >= 2)
            await a.store.append("busy", [NewEvent("message", b"heard")])
            await busy.wait_for(1)
            lost = await silent.append("quiet", [NewEvent("message", b"nobody was told")])
            assert await b.bus.reconcile(everything=False) == 1
            assert b.bus.stats.reconcile_reads == 1  # "quiet" only: "busy" heard of a change just now
            await quiet.wait_for(1)
            assert quiet.events == lost.events
            await b.bus.reconcile(everything=False)
            assert b.bus.stats.reconcile_reads == 2  # "quiet" again (never heard a notice), not "busy"
            await b.bus.reconcile()  # asked for: everything
            assert b.bus.stats.reconcile_reads == 4
            n.cancel_scope.cancel()


# -- units ---------------------------------------------------------------------------------------


def _item(data: bytes) -> list[object]:
    return list(msgpack.unpackb(data))


def test_changes_apply_in_order_and_a_gap_makes_the_interest_unknown() -> None:
    local, remote = LocalInterest(1.0), RemoteInterest(limit=100)
    assert remote.wants("anything")  # unknown: everything
    (part,) = local.full(1000)
    _, gen, version, index, final, streams = _item(part)
    assert remote.apply_part(gen, version, index, final, streams) is True
    assert not remote.wants("s")
    local.change("s", True)
    (change,) = local.take_changes(1000, now=0.0)
    _, gen, base, version, added, removed = _item(change)
    assert remote.apply_change(gen, base, version, added, removed)
    assert remote.wants("s") and not remote.wants("t") and remote.check(local.gen, local.version)
    local.change("t", True)
    local.take_changes(1000, now=0.0)  # lost
    local.change("u", True)
    (late,) = local.take_changes(1000, now=0.0)
    _, gen, base, version, added, removed = _item(late)
    assert not remote.apply_change(gen, base, version, added, removed)
    assert remote.wants("t") and not remote.known  # everything again, until the whole set


def test_a_whole_set_comes_in_parts_and_a_missing_part_is_noticed() -> None:
    local = LocalInterest(1.0)
    for i in range(200):
        local.change(f"stream-{i:03}", True)
    local.take_changes(1024, now=0.0)
    parts = [_item(p) for p in local.full(1024)]
    assert len(parts) > 1 and all(len(msgpack.packb(p)) <= 1024 for p in parts)
    remote = RemoteInterest(limit=1000)
    for _, gen, version, index, final, streams in parts:
        done = remote.apply_part(gen, version, index, final, streams)
    assert done is True and remote.streams == local.streams
    broken = RemoteInterest(limit=1000)
    _, gen, version, index, final, streams = parts[0]
    assert broken.apply_part(gen, version, index, final, streams) is None
    _, gen, version, index, final, streams = parts[2]
    assert broken.apply_part(gen, version, index, final, streams) is False and not broken.known
    small = RemoteInterest(limit=10)  # too many to hold: everything is sent to that peer
    for _, gen, version, index, final, streams in parts:
        small.apply_part(gen, version, index, final, streams)
    assert not small.known and small.check(local.gen, local.version)


def test_announcements_settle_when_acknowledged_or_late() -> None:
    local = LocalInterest(wait=1.0)
    local.change("a", True)
    local.take_changes(1000, now=0.0)
    local.change("b", True)
    local.take_changes(1000, now=0.5)
    assert local.settle(acked=0, now=0.9) == ([], [])
    assert local.settle(acked=1, now=0.9) == (["a"], [])
    assert local.next_deadline() == pytest.approx(1.5)
    assert local.settle(acked=1, now=1.5) == ([], ["b"])


def test_freshness_reads_quiet_and_suspect_streams() -> None:
    fresh = Freshness(interval=1.0)
    fresh.heard("busy", 10.0)
    fresh.heard("calm", 8.0)
    assert fresh.due(["busy", "calm", "new"], 10.5) == ["calm", "new"]
    fresh.suspect(["busy"])
    assert fresh.due(["busy"], 10.5) == ["busy"]
    fresh.read(["busy"])
    assert fresh.due(["busy"], 10.5) == []
    assert fresh.due(["busy"], 11.0) == ["busy"]
