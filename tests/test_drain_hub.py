"""``Subscription.stop``: a subscription ended from outside (drain, rotation) stops cleanly at an
exact position, live or catching up, and hands nothing more to its sink."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio
import trio.testing

from server.core.encoding import EncodedEvent
from server.core.events import NewEvent
from server.core.hub import Hub
from server.core.ports.store import Page, Retention
from server.core.replay import Reset, parse_start
from server.store.memory import MemoryStore

KEEP_ALL = Retention(max_events=0, max_bytes=0, max_age=0)


@dataclass
class Recorder:
    got: list[str] = field(default_factory=list)
    resets: list[Reset] = field(default_factory=list)
    ended: bool = False

    def deliver(self, enc: EncodedEvent) -> bool:
        self.got.append(enc.event.id)
        return True

    def reset(self, reset: Reset) -> bool:
        self.resets.append(reset)
        return True

    def end(self) -> None:
        self.ended = True

    def idle(self) -> bool:
        return True

    async def drain(self) -> None:
        await trio.lowlevel.checkpoint()


class GatedStore(MemoryStore):
    """Reads wait for ``gate`` once it is armed (a read in flight, as a threaded read is)."""

    def __init__(self) -> None:
        super().__init__(KEEP_ALL)
        self.gate: trio.Event | None = None
        self.reading = trio.Event()

    async def read(self, stream: str, after_seq: int, limit: int) -> Page:
        if self.gate is not None:
            self.reading.set()
            await self.gate.wait()
        return await super().read(stream, after_seq, limit)


async def publish(store: MemoryStore, n: int) -> list[str]:
    return (await store.append("s", [NewEvent("message", b"x")] * n)).ids


async def test_stop_while_live() -> None:
    store = MemoryStore(KEEP_ALL)
    hub = Hub(store)
    store.set_listener(hub.on_notice)
    ids = await publish(store, 2)
    rec = Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery, hub.open_subscription("s", parse_start(None, None, "start")) as sub:
            nursery.start_soon(sub.run, rec)
            await trio.testing.wait_all_tasks_blocked()
            assert sub.live and rec.got == ids
            sub.stop()
            assert sub.stopped and sub.done and not sub.ended
            await publish(store, 1)  # after stop: not handed to the sink
        sub.stop()  # idempotent
    assert rec.got == ids and sub.position == ids[-1] and not rec.ended
    assert hub.watcher_count("s") == 0


async def test_stop_before_run_returns_at_once() -> None:
    store = MemoryStore(KEEP_ALL)
    hub = Hub(store)
    store.set_listener(hub.on_notice)
    ids = await publish(store, 1)
    rec = Recorder()
    with trio.fail_after(5):
        async with hub.open_subscription("s", parse_start(None, None, "now")) as sub:
            sub.stop()
            await sub.run(rec)
    assert rec.got == [] and sub.stopped and sub.position == ids[0]


async def test_stop_during_catch_up_ends_after_the_read() -> None:
    store = GatedStore()
    hub = Hub(store)
    store.set_listener(hub.on_notice)
    await publish(store, 3)
    rec = Recorder()
    store.gate = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery, hub.open_subscription("s", parse_start(None, None, "start")) as sub:
            nursery.start_soon(sub.run, rec)
            await store.reading.wait()
            sub.stop()
            store.gate.set()
    assert rec.got == [] and sub.stopped and not sub.live
    assert sub.position is None  # nothing passed yet: resume from the start


async def test_stop_after_the_end_is_a_no_op() -> None:
    store = MemoryStore(KEEP_ALL)
    hub = Hub(store)
    store.set_listener(hub.on_notice)
    await publish(store, 1)
    await store.close_stream("s")
    rec = Recorder()
    with trio.fail_after(5):
        sub = await hub.subscribe("s", parse_start(None, None, "start"), rec)
    sub.stop()
    assert sub.ended and rec.ended and not sub.stopped
