"""Resumes answered from the hub's replay buffer in memory: no store read, one write, and the
store still decides whenever the buffer cannot (a hint past it, a close, an older position)."""

from __future__ import annotations

import trio
import trio.testing

from server.core.events import NewEvent, StreamInfo
from server.core.hub import Hub
from server.core.ports.store import Page, Retention
from server.core.replay import Start, parse_start
from server.store.memory import MemoryStore
from tests.test_hub_fanout import BatchRecorder, _live

KEEP_ALL = Retention(max_events=0, max_bytes=0, max_age=0)


class CountingStore(MemoryStore):
    """The memory store, counting the reads a subscription makes."""

    def __init__(self, retention: Retention) -> None:
        super().__init__(retention)
        self.reads = 0
        self.infos = 0

    async def read(self, stream: str, after_seq: int, limit: int) -> Page:
        self.reads += 1
        return await super().read(stream, after_seq, limit)

    async def info(self, stream: str) -> StreamInfo | None:
        self.infos += 1
        return await super().info(stream)


def buffered_hub(buffer: int = 100) -> tuple[CountingStore, Hub]:
    """A counting store and a hub listening to it, with a replay buffer of ``buffer`` events per
    stream (0: none)."""
    store = CountingStore(KEEP_ALL)
    hub = Hub(store, replay_buffer=buffer, replay_buffer_total=10 * buffer)
    store.set_listener(hub.on_notice)
    return store, hub


def after(event_id: str) -> Start:
    return parse_start(event_id, None, None)


async def _publish(store: MemoryStore, n: int, stream: str = "s") -> list[str]:
    ids: list[str] = []
    for k in range(n):
        ids += (await store.append(stream, [NewEvent("message", b"%d" % k)])).ids
    return ids


async def test_a_resume_inside_the_buffer_reads_nothing_and_is_one_write() -> None:
    store, hub = buffered_hub()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await _live(hub, nursery, BatchRecorder())  # someone here watches the stream
            ids = await _publish(store, 5)
            store.reads = store.infos = 0
            rec = BatchRecorder()
            await _live(hub, nursery, rec, start=after(ids[1]))
            assert rec.writes == [ids[2:]]
            assert (store.reads, store.infos) == (0, 0)
            assert hub.stats.replayed_memory == 3 and hub.stats.replayed == 0
            more = await _publish(store, 2)
            await trio.testing.wait_all_tasks_blocked()
            assert rec.ids == ids[2:] + more
            assert hub.stats.replay_buffered == 7
            nursery.cancel_scope.cancel()


async def test_without_the_buffer_the_same_resume_reads_the_store() -> None:
    store, hub = buffered_hub(0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await _live(hub, nursery, BatchRecorder())
            ids = await _publish(store, 5)
            store.reads = store.infos = 0
            rec = BatchRecorder()
            await _live(hub, nursery, rec, start=after(ids[1]))
            assert rec.ids == ids[2:]
            assert store.infos == 1 and store.reads >= 1
            assert hub.stats.replayed == 3 and hub.stats.replayed_memory == 0
            nursery.cancel_scope.cancel()


async def test_an_older_position_reads_the_store_once_and_later_resumes_use_what_it_read() -> None:
    store = CountingStore(KEEP_ALL)
    ids = await _publish(store, 10)  # before anyone here watched: not in the buffer
    hub = Hub(store, replay_buffer=100, replay_buffer_total=1000)
    store.set_listener(hub.on_notice)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await _live(hub, nursery, BatchRecorder())
            ids += await _publish(store, 2)
            first = BatchRecorder()
            await _live(hub, nursery, first, start=after(ids[2]))
            assert first.ids == ids[3:]
            assert store.reads >= 1
            store.reads = store.infos = 0
            second = BatchRecorder()
            await _live(hub, nursery, second, start=after(ids[5]))
            assert second.writes == [ids[6:]]
            assert (store.reads, store.infos) == (0, 0)
            nursery.cancel_scope.cancel()


async def test_a_hint_past_the_buffer_sends_the_resume_to_the_store() -> None:
    store, hub = buffered_hub()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await _live(hub, nursery, BatchRecorder())
            ids = await _publish(store, 3)
            store.set_listener(lambda notice: None)  # two events this worker never sees...
            ids += await _publish(store, 2)
            store.set_listener(hub.on_notice)
            info = await store.info("s")
            assert info is not None
            store.reads = 0
            hub.on_hint("s", info.epoch, info.last_seq)  # ...only hears that they exist
            rec = BatchRecorder()
            await _live(hub, nursery, rec, start=after(ids[1]))
            assert rec.ids == ids[2:]  # all of them, not only what the buffer holds
            assert store.reads >= 1  # the store answered for the two (to the watcher or to this one)
            nursery.cancel_scope.cancel()


async def test_a_crowd_resuming_where_the_buffer_knew_nothing_reads_the_store_about_once() -> None:
    """What a deploy or a balancer failover causes: everyone comes back to a stream whose latest
    events were published while nobody here watched it. The first catch-up's page fills the
    buffer; the others resume from it, each still getting every event once, in order."""
    store, hub = buffered_hub()
    ids = await _publish(store, 8)  # nobody watches here: the buffer holds none of them
    store.reads = store.infos = 0
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            first = BatchRecorder()
            await _live(hub, nursery, first, start=after(ids[2]))
            crowd = [BatchRecorder() for _ in range(50)]
            for k, rec in enumerate(crowd):
                await _live(hub, nursery, rec, start=after(ids[2 + k % 3]))
            assert first.ids == ids[3:]
            for k, rec in enumerate(crowd):
                assert rec.writes == [ids[3 + k % 3 :]]
            assert (store.infos, store.reads) == (1, 1)
            more = await _publish(store, 2)
            await trio.testing.wait_all_tasks_blocked()
            assert all(rec.ids[-2:] == more for rec in crowd)
            nursery.cancel_scope.cancel()


async def test_a_closed_stream_ends_a_resume_from_the_buffer_position() -> None:
    store, hub = buffered_hub()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            watcher = BatchRecorder()
            await _live(hub, nursery, watcher)
            ids = await _publish(store, 3)
            await store.close_stream("s")
            await trio.testing.wait_all_tasks_blocked()
            assert watcher.ended
            rec = BatchRecorder()
            await _live(hub, nursery, rec, start=after(ids[0]))
            assert rec.ids == ids[1:]
            assert rec.ended
            nursery.cancel_scope.cancel()


async def test_the_buffer_goes_with_the_last_watcher() -> None:
    store, hub = buffered_hub()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def watch() -> None:
                with scope:
                    async with hub.open_subscription("s", Start("now")) as sub:
                        await sub.run(BatchRecorder())

            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()
            await _publish(store, 3)
            assert hub.stats.replay_buffered == 3
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert hub.stats.replay_buffered == 0 and hub.tails.get("s") is None
