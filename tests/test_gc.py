"""The worker's GC policy: frozen objects that die in reference cycles are reclaimed, and the
HTTP/1.1 engine's connections leave no cycles behind (so they are freed the moment they close)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio
import trio.testing

from server.process.gctune import FULL_GROWTH, FreezePolicy
from tests.client import open_sse, publish, request, start_sluice, wait_live


class _Node:
    def __init__(self) -> None:
        self.me = self


def test_a_full_collection_reclaims_cycles_that_died_frozen_once_the_population_grew() -> None:
    policy = FreezePolicy()
    node = _Node()
    alive = weakref.ref(node)
    gc.freeze()
    try:
        del node
        gc.collect()
        assert alive() is not None  # a plain collection never looks at frozen objects
        policy.after_full = gc.get_freeze_count()  # as if a full collection had just run
        assert not policy.step()  # no growth: no full collection, the dead cycle stays
        assert alive() is not None
        policy.after_full = int(gc.get_freeze_count() / (1 + FULL_GROWTH)) - 1  # grown past the rule
        assert policy.step()
        assert alive() is None
        assert policy.after_full >= gc.get_freeze_count() - 100  # the new base: what survived it
    finally:
        gc.unfreeze()


@contextmanager
def saved_garbage() -> Iterator[list[object]]:
    """Collect everything (frozen objects included) and yield what was unreachable."""
    gc.unfreeze()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def test_closed_http1_connections_leave_no_reference_cycles(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")
    with trio.fail_after(20):
        gc.unfreeze()
        gc.collect()  # what start-up left
        for round_ in range(3):
            async with open_sse(s.port, "/v1/streams/g") as sse:
                await wait_live(s.ctx, "g")
                await publish(s.port, "g", f"e{round_}")
                assert (await sse.next()).data == f"e{round_}"
            assert (await request(s.port, "GET", "/v1/streams/g/poll?timeout=0")).status in (200, 204)
        while s.ctx.hub.stats.subscriptions or s.worker.http.stats.connections_open:
            await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        with saved_garbage() as garbage:
            ours = sorted({type(o).__qualname__ for o in garbage if type(o).__module__.startswith("server.")})
    assert ours == []
