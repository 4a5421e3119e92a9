"""The hub's fan-out task and heartbeat ticker (``Hub.run``): notices queued while it is busy go
out together, in order, one write per subscriber; without it the fan-out is synchronous."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import trio
import trio.testing

from server.core.encoding import EncodedEvent, EventBatch
from server.core.events import NewEvent
from server.core.hub import BEAT_SLACK, Hub
from server.core.ports.store import Notice, Retention
from server.core.replay import Reset, Start
from server.store.memory import MemoryStore

KEEP_ALL = Retention(max_events=0, max_bytes=0, max_age=0)
NOW = Start("now")


@dataclass
class BatchRecorder:
    """A sink that records each write: one entry per ``deliver`` or ``deliver_batch`` call."""

    writes: list[list[str]] = field(default_factory=list)
    sse: list[bytes] = field(default_factory=list)
    idles: int = 0
    ended: bool = False

    @property
    def ids(self) -> list[str]:
        return [i for write in self.writes for i in write]

    def deliver(self, enc: EncodedEvent) -> bool:
        self.writes.append([enc.id])
        self.sse.append(enc.sse.raw)
        return True

    def deliver_batch(self, batch: EventBatch) -> bool:
        self.writes.append([e.id for e in batch.encs])
        self.sse.append(batch.sse.raw)
        return True

    def reset(self, reset: Reset) -> bool:
        return True

    def end(self) -> None:
        self.ended = True

    def idle(self) -> bool:
        self.idles += 1
        return True

    async def drain(self) -> None:
        await trio.lowlevel.checkpoint()


async def _hub_with_history(coalesce: float = 0.0) -> tuple[MemoryStore, Hub]:
    """A hub on a memory store whose stream ``s`` already has one event."""
    store = MemoryStore(KEEP_ALL)
    hub = Hub(store, coalesce=coalesce)
    store.set_listener(hub.on_notice)
    await store.append("s", [NewEvent("message", b"before")])
    return store, hub


async def _live(
    hub: Hub,
    nursery: trio.Nursery,
    rec: BatchRecorder,
    heartbeat: float | None = None,
    stream: str = "s",
    start: Start = NOW,
) -> None:
    ready = trio.Event()

    async def sub() -> None:
        async with hub.open_subscription(stream, start, heartbeat=heartbeat) as s:
            ready.set()
            await s.run(rec)

    nursery.start_soon(sub)
    await ready.wait()
    await trio.testing.wait_all_tasks_blocked()


async def test_notices_queued_meanwhile_go_out_in_one_write_in_order() -> None:
    store = MemoryStore(KEEP_ALL)
    hub = Hub(store)
    await store.append("s", [NewEvent("message", b"before")])
    notices: list[Notice] = []
    store.set_listener(notices.append)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            recs = [BatchRecorder() for _ in range(3)]
            for rec in recs:
                await _live(hub, nursery, rec)
            events = []
            for k in range(4):
                events += (await store.append("s", [NewEvent("message", b"%d" % k)])).events
            await store.close_stream("s")
            for notice in notices:  # committed one by one, before the fan-out task gets to run
                hub.on_notice(notice)
            ids = [e.id for e in events]
            await trio.testing.wait_all_tasks_blocked()
            for rec in recs:
                assert rec.ids == ids
                assert rec.ended
                assert len(rec.writes) == 1  # coalesced
                assert b"".join(rec.sse) == b"".join(EncodedEvent(e).sse.raw for e in events)
            assert hub.stats.delivered == 3 * len(ids)
            nursery.cancel_scope.cancel()


async def test_without_the_task_the_fan_out_is_synchronous() -> None:
    store, hub = await _hub_with_history()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            rec = BatchRecorder()
            await _live(hub, nursery, rec)
            ids = (await store.append("s", [NewEvent("message", b"a"), NewEvent("message", b"b")])).ids
            assert rec.writes == [ids]  # one batch of two, delivered before append returned
            nursery.cancel_scope.cancel()


async def test_an_overlapping_batch_delivers_nothing_twice() -> None:
    store, hub = await _hub_with_history()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            rec = BatchRecorder()
            await _live(hub, nursery, rec)
            first = (await store.append("s", [NewEvent("message", b"a")])).events
            both = first + (await store.append("s", [NewEvent("message", b"b")])).events
            # the first event again, with the next one (a remote notice overtaken by a local one)
            batch = EventBatch([EncodedEvent(e) for e in both])
            sub = next(iter(hub._watchers["s"]))
            assert sub.on_appended(batch) == 0  # both already delivered: nothing twice
            assert rec.ids == [e.id for e in both]
            nursery.cancel_scope.cancel()


async def test_heartbeats_come_from_the_ticker(autojump_clock: trio.abc.Clock) -> None:
    store, hub = await _hub_with_history()
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            rec = BatchRecorder()
            quiet = BatchRecorder()
            await _live(hub, nursery, rec, heartbeat=10.0)
            start = trio.current_time()
            await _live(hub, nursery, quiet)  # no heartbeat asked: never idle
            while not rec.idles:
                await trio.sleep(0.5)
            assert 10.0 <= trio.current_time() - start <= 20.5
            await trio.sleep(100)
            assert 9 <= rec.idles <= 11  # one per interval of silence
            await store.append("s", [NewEvent("message", b"x")])
            idles = rec.idles
            await trio.sleep(10.0)
            assert rec.idles <= idles + 1  # the event counted as output for that interval
            assert quiet.idles == 0
            nursery.cancel_scope.cancel()


class TimedRecorder(BatchRecorder):
    """Records when each idle notice came (trio's clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.idle_at: list[float] = []

    def idle(self) -> bool:
        self.idle_at.append(trio.current_time())
        return super().idle()


async def test_heartbeat_checks_due_close_together_share_one_wake_up_and_none_is_late(
    autojump_clock: trio.abc.Clock,
) -> None:
    _, hub = await _hub_with_history()
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            recs, started = [], []
            for _ in range(4):  # subscribed 0.1 s apart: all within one slack of each other
                rec = TimedRecorder()
                started.append(trio.current_time())
                await _live(hub, nursery, rec, heartbeat=10.0)
                recs.append(rec)
                await trio.sleep(0.1)
            late = TimedRecorder()
            await trio.sleep(5.0)  # half an interval later: a check of its own
            late_start = trio.current_time()
            await _live(hub, nursery, late, heartbeat=10.0)
            await trio.sleep(35.0)
            first = {rec.idle_at[0] for rec in recs}
            assert len(first) == 1  # one wake-up for the four
            for rec, at in zip(recs, started, strict=True):
                assert len(rec.idle_at) >= 3
                assert rec.idle_at[0] - at <= 10.0  # early by at most the slack, never late
                assert rec.idle_at[0] - at >= 10.0 - BEAT_SLACK
                gaps = [b - a for a, b in itertools.pairwise(rec.idle_at)]
                assert all(10.0 - BEAT_SLACK <= g <= 10.0 for g in gaps)
            assert late.idle_at[0] not in first
            assert 10.0 - BEAT_SLACK <= late.idle_at[0] - late_start <= 10.0
            nursery.cancel_scope.cancel()


async def test_a_stream_fanned_out_within_coalesce_waits_and_its_events_share_a_write(
    mock_clock: trio.testing.MockClock,
) -> None:
    store, hub = await _hub_with_history(coalesce=0.02)

    async def publish(data: bytes) -> str:
        ids = (await store.append("s", [NewEvent("message", data)])).ids
        await trio.testing.wait_all_tasks_blocked()
        return ids[0]

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            rec = BatchRecorder()
            await _live(hub, nursery, rec)
            a = await publish(b"a")
            assert rec.writes == [[a]]  # nothing fanned out lately: at once
            mock_clock.jump(0.005)
            b = await publish(b"b")
            mock_clock.jump(0.005)
            c = await publish(b"c")
            assert rec.writes == [[a]]  # held: "s" went out 10 ms ago
            mock_clock.jump(0.0101)
            await trio.testing.wait_all_tasks_blocked()
            assert rec.writes == [[a], [b, c]]  # 20 ms after the first pass, together
            mock_clock.jump(0.05)
            d = await publish(b"d")  # further apart than the window: at once again
            assert rec.writes == [[a], [b, c], [d]]
            nursery.cancel_scope.cancel()


async def test_the_first_events_of_a_new_stream_go_out_live_without_a_store_read() -> None:
    # Subscribed before the stream exists (no epoch yet): its first events are delivered from the
    # notice, not by a read of the store per subscriber (10,000 of them at once, in a fan-out).
    store = MemoryStore(KEEP_ALL)
    hub = Hub(store)
    store.set_listener(hub.on_notice)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            rec = BatchRecorder()
            await _live(hub, nursery, rec, stream="new", start=Start("start"))
            ids = (await store.append("new", [NewEvent("message", b"a"), NewEvent("message", b"b")])).ids
            await trio.testing.wait_all_tasks_blocked()
            assert rec.writes == [ids]
            assert hub.stats.replayed == 0
            more = (await store.append("new", [NewEvent("message", b"c")])).ids
            await trio.testing.wait_all_tasks_blocked()
            assert rec.ids == ids + more
            nursery.cancel_scope.cancel()
