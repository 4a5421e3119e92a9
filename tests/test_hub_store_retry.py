"""A subscription whose store read fails with ``StoreUnavailable`` stays open, waits (0.1 s,
doubling up to 2 s) and reads again from where it stands: nothing is lost, nothing repeated.

The store is the real memory store, made to refuse a given number of reads (what the sqlite and
Redis stores raise while their database or Redis cannot answer, shown end to end in
``tests/test_redis_outage.py``); the clock is trio's autojumping mock clock, so the waits between
reads are exact and cost no time."""

from __future__ import annotations

import itertools

import trio
import trio.testing

from server.core.events import NewEvent
from server.core.hub import Hub
from server.core.ports.store import Page, Retention, StoreUnavailable
from server.core.replay import Start
from server.core.subscription import STORE_RETRY_FIRST, STORE_RETRY_MAX
from server.store.memory import MemoryStore
from tests.test_hub_fanout import BatchRecorder

KEEP_ALL = Retention(max_events=0, max_bytes=0, max_age=0)


class RefusingStore(MemoryStore):
    """A memory store whose next ``refusals`` reads raise :class:`StoreUnavailable`; it records when
    each read was asked for (trio time) and whether it was refused."""

    def __init__(self) -> None:
        super().__init__(KEEP_ALL)
        self.refusals = 0
        self.reads: list[tuple[float, bool]] = []

    async def read(self, stream: str, after_seq: int, limit: int) -> Page:
        refused = self.refusals > 0
        self.reads.append((trio.current_time(), refused))
        if refused:
            self.refusals -= 1
            raise StoreUnavailable("the store cannot answer (refused on purpose)")
        return await super().read(stream, after_seq, limit)


async def test_a_refused_read_is_retried_with_backoff_and_the_subscription_continues_exactly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = RefusingStore()
    hub = Hub(store, replay_page=2)
    store.set_listener(hub.on_notice)
    first = (await store.append("s", [NewEvent("message", b"%d" % i) for i in range(5)])).events
    rec = BatchRecorder()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            async with hub.open_subscription("s", Start("start")) as sub:
                store.refusals = 7  # every read of the catch-up, for a while
                nursery.start_soon(sub.run, rec)
                while len(rec.ids) < len(first):
                    await trio.sleep(0.01)  # mock time: the backoff passes without waiting
                assert rec.ids == [e.id for e in first]
                refused = [t for t, r in store.reads if r]
                assert len(refused) == 7
                gaps = [round(b - a, 3) for a, b in itertools.pairwise(refused)]
                expected = [min(STORE_RETRY_FIRST * 2**k, STORE_RETRY_MAX) for k in range(6)]
                assert gaps == [round(g, 3) for g in expected]  # 0.1, 0.2, ... capped at 2 s
                # live again: a later commit arrives once, and a new outage while live costs nothing
                store.refusals, reads = 3, len(store.reads)
                later = (await store.append("s", [NewEvent("message", b"later")])).events
                while len(rec.ids) < len(first) + 1:
                    await trio.sleep(0.01)
                assert rec.ids == [e.id for e in first + later]
                assert len(store.reads) == reads  # delivered from the notice, no read needed
                nursery.cancel_scope.cancel()
