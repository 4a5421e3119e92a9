"""Property: any interleaving of publishes, disconnects and resumes loses nothing and repeats nothing.

Runs the real hub and replay logic over the memory store, with a scheduling point inside every
store read so that publishes land while subscribers are catching up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.core.encoding import EncodedEvent, EventBatch
from server.core.events import NewEvent
from server.core.hub import Hub
from server.core.ports.store import Page, Retention
from server.core.replay import Reset, parse_start
from server.store.memory import MemoryStore


class YieldingStore(MemoryStore):
    """The memory store, with a checkpoint in the middle of each read (as a threaded read has)."""

    async def read(self, stream: str, after_seq: int, limit: int) -> Page:
        await trio.sleep(0)
        page = await super().read(stream, after_seq, limit)
        await trio.sleep(0)
        return page


@dataclass
class Recorder:
    """A sink recording what a client would see, across reconnects."""

    got: list[str] = field(default_factory=list)
    resets: list[Reset] = field(default_factory=list)
    alive: bool = True

    def deliver(self, enc: EncodedEvent) -> bool:
        self.got.append(enc.event.id)
        return self.alive

    def reset(self, reset: Reset) -> bool:
        self.resets.append(reset)
        return True

    def end(self) -> None:
        pass

    def idle(self) -> bool:
        return True

    async def drain(self) -> None:
        await trio.sleep(0)


@dataclass
class BatchRecorder(Recorder):
    """A :class:`Recorder` that also takes whole batches (one write each, as SSE does)."""

    def deliver_batch(self, batch: EventBatch) -> bool:
        self.got.extend(enc.event.id for enc in batch.encs)
        return self.alive


ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 4)),
        st.tuples(st.just("disconnect"), st.integers(0, 2)),
        st.tuples(st.just("connect"), st.integers(0, 2)),
        st.tuples(st.just("settle"), st.just(0)),
        st.tuples(st.just("yield"), st.integers(1, 3)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=ops,
    page=st.integers(1, 4),
    buffer=st.sampled_from([(0, 0), (1, 1), (3, 100), (50, 100), (8, 5)]),
    batches=st.booleans(),
)
async def test_no_loss_no_duplicate(
    script: list[tuple[str, int]], page: int, buffer: tuple[int, int], batches: bool
) -> None:
    """Also with the replay buffer in memory (per stream, total) of several sizes, and sinks that
    take whole batches."""
    store = YieldingStore(Retention(max_events=0, max_bytes=0, max_age=0))
    hub = Hub(store, replay_page=page, replay_buffer=buffer[0], replay_buffer_total=buffer[1])
    store.set_listener(hub.on_notice)
    published: list[str] = []
    recorders = [BatchRecorder() if batches else Recorder() for _ in range(3)]
    scopes: dict[int, trio.CancelScope] = {}

    async def client(i: int, scope: trio.CancelScope, task_status: trio.TaskStatus[None]) -> None:
        rec = recorders[i]
        last = rec.got[-1] if rec.got else None
        start = parse_start(None, last, None if last else "start")
        with scope:
            async with hub.open_subscription("s", start) as sub:
                task_status.started()
                await sub.run(rec)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for op, arg in script:
                if op == "publish":
                    result = await store.append("s", [NewEvent("message", b"x")] * arg)
                    published.extend(result.ids)
                elif op == "connect" and arg not in scopes:
                    scopes[arg] = trio.CancelScope()
                    await nursery.start(client, arg, scopes[arg])
                elif op == "disconnect" and arg in scopes:
                    scopes.pop(arg).cancel()
                elif op == "settle":
                    await trio.testing.wait_all_tasks_blocked()
                elif op == "yield":
                    for _ in range(arg):
                        await trio.sleep(0)
            for i in range(3):  # everyone reconnects at the end and catches up
                if i not in scopes:
                    scopes[i] = trio.CancelScope()
                    await nursery.start(client, i, scopes[i])
            await trio.testing.wait_all_tasks_blocked()
            for scope in scopes.values():
                scope.cancel()
    for rec in recorders:
        assert rec.resets == []
        assert rec.got == published, (rec.got, published)
