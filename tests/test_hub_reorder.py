"""A commit notice that overtakes an earlier one (another worker's datagram ahead of this worker's
own commit) is held for it: subscribers stay live and get every event once, in order, with no
store read each; a gap that stays open is read from the store once for all of them."""

from __future__ import annotations

import trio
import trio.testing

from server.core.events import NewEvent
from server.core.hub import Hub
from server.core.ports.store import Notice, Retention
from server.core.replay import Start
from server.store.memory import MemoryStore
from tests.test_hub_property import BatchRecorder as Recorder

KEEP_ALL = Retention(max_events=0, max_bytes=0, max_age=0)


class CountingStore(MemoryStore):
    """A memory store that counts reads (the store the hub and the subscriptions read)."""

    reads = 0

    async def read(self, stream: str, after_seq: int, limit: int):  # type: ignore[no-untyped-def]
        self.reads += 1
        return await super().read(stream, after_seq, limit)


async def _setup(
    nursery: trio.Nursery, retention: Retention = KEEP_ALL, subscribers: int = 3
) -> tuple[CountingStore, Hub, list[Recorder], list[Notice]]:
    store = CountingStore(retention)
    hub = Hub(store, reorder_window=0.05)
    notices: list[Notice] = []
    store.set_listener(notices.append)  # handed to the hub by the test, in the order it picks
    await store.append("s", [NewEvent("message", b"0")])
    nursery.start_soon(hub.run)
    recs = [Recorder() for _ in range(subscribers)]
    for rec in recs:
        ready = trio.Event()

        async def sub(rec: Recorder = rec, ready: trio.Event = ready) -> None:
            async with hub.open_subscription("s", Start("now")) as s:
                ready.set()
                await s.run(rec)

        nursery.start_soon(sub)
        await ready.wait()
    await trio.testing.wait_all_tasks_blocked()
    await store.append("s", [NewEvent("message", b"1")])  # heard in order: the hub's position
    hub.on_notice(notices.pop())
    notices.clear()
    await trio.testing.wait_all_tasks_blocked()
    for rec in recs:
        rec.got.clear()
    store.reads = 0
    return store, hub, recs, notices


async def test_a_notice_that_overtakes_an_earlier_one_waits_for_it() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            store, hub, recs, notices = await _setup(nursery)
            ids = [(await store.append("s", [NewEvent("message", b"%d" % k)])).ids[0] for k in (2, 3)]
            first, second = notices
            hub.on_notice(second, remote=True)  # the other worker's datagram came first
            await trio.testing.wait_all_tasks_blocked()
            assert all(rec.got == [] for rec in recs)
            hub.on_notice(first)
            await trio.testing.wait_all_tasks_blocked()
            assert all(rec.got == ids for rec in recs)
            assert hub.stats.reordered == 1
            assert hub.stats.replayed == 0 and store.reads == 0  # nobody went back to the store
            assert all(s.live for s in hub._watchers["s"])  # type: ignore[attr-defined]
            nursery.cancel_scope.cancel()


async def test_a_gap_that_stays_open_is_read_once_for_every_subscriber(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            store, hub, recs, notices = await _setup(nursery, subscribers=5)
            ids = [(await store.append("s", [NewEvent("message", b"%d" % k)])).ids[0] for k in (2, 3, 4)]
            hub.on_notice(notices[2], remote=True)  # 1 and 2 never come (their datagrams were lost)
            await trio.sleep(0.049)
            assert all(rec.got == [] for rec in recs) and store.reads == 0
            await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert all(rec.got == ids for rec in recs)
            assert store.reads == 1 and hub.stats.gap_reads == 1
            assert hub.stats.replayed == 0 and hub.stats.gaps_given_up == 0
            nursery.cancel_scope.cancel()


async def test_a_gap_the_store_no_longer_has_is_passed_on_and_each_subscriber_is_told(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            store, hub, recs, notices = await _setup(nursery, Retention(max_events=1, max_bytes=0, max_age=0), 2)
            ids = [(await store.append("s", [NewEvent("message", b"%d" % k)])).ids[0] for k in (2, 3, 4)]
            hub.on_notice(notices[2], remote=True)  # 1 and 2 lost, and trimmed from the store
            await trio.sleep(0.1)
            await trio.testing.wait_all_tasks_blocked()
            assert hub.stats.gaps_given_up == 1
            for rec in recs:  # what the store says: the history after their position is gone
                assert [r.reason for r in rec.resets] == ["gone"] and rec.got == [ids[2]]
            nursery.cancel_scope.cancel()
