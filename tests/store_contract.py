"""The promises every :class:`~server.core.ports.store.Store` backend keeps, written once.

A backend's test module subclasses :class:`StoreContract` and defines an ``open_store`` fixture
returning an :data:`OpenStore`: given a retention and a clock, an async context manager yielding
a fresh, empty store that uses them. Nothing here assumes a local file or a single process.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from server.core.events import NewEvent
from server.core.ids import EPOCH_LEN, parse_id
from server.core.ports.store import (
    Appended,
    AppendResult,
    Closed,
    Deleted,
    IdempotencyKeyReused,
    Notice,
    Page,
    Retention,
    Store,
    StreamClosed,
)

DEADLINE = 10.0
UNLIMITED = Retention(max_events=0, max_bytes=0, max_age=0, idempotency_window=0)


class FakeClock:
    """A clock the test moves by hand (seconds, like ``time.time``)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        self.now += seconds


OpenStore = Callable[[Retention, FakeClock], AbstractAsyncContextManager[Store]]


@dataclass
class Harness:
    """An open store, the clock it uses and every notice its listener heard (with the thread)."""

    store: Store
    clock: FakeClock
    notices: list[Notice] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)

    def listen(self, notice: Notice) -> None:
        """The listener installed on ``store``."""
        self.notices.append(notice)
        self.threads.add(threading.get_ident())


@asynccontextmanager
async def harness(open_store: OpenStore, retention: Retention = UNLIMITED) -> AsyncIterator[Harness]:
    """Open a store under a :data:`DEADLINE` with a recording listener installed."""
    with trio.fail_after(DEADLINE):
        clock = FakeClock()
        async with open_store(retention, clock) as store:
            h = Harness(store, clock)
            store.set_listener(h.listen)
            yield h


def ev(data: bytes | str = b"x", type_: str = "message", *, binary: bool = False) -> NewEvent:
    """A new event; ``str`` data is UTF-8 encoded."""
    return NewEvent(type_, data.encode() if isinstance(data, str) else data, binary)


def seqs(result: AppendResult | Page) -> list[int]:
    """The seqs of the events of an append result or a page."""
    return [e.seq for e in result.events]


def id_seqs(ids: list[str]) -> list[int]:
    """The seqs of wire ids (which must all be well-formed)."""
    positions = [parse_id(i) for i in ids]
    assert all(p is not None for p in positions)
    return [p.seq for p in positions if p is not None]


class StoreContract:
    """Tests of the :class:`Store` promises; subclasses provide the ``open_store`` fixture."""

    # -- appending ------------------------------------------------------------------------------

    async def test_new_stream_gets_fresh_epoch_and_seq_one(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            result = await h.store.append("s", [ev("hello")])
            assert not result.duplicate
            [event] = result.events
            assert event.seq == 1 and len(event.epoch) == EPOCH_LEN
            assert result.ids == [event.id]
            assert parse_id(event.id) is not None
            info = await h.store.info("s")
            assert info is not None
            assert (info.epoch, info.first_seq, info.last_seq) == (event.epoch, 1, 1)
            assert (info.length, info.closed) == (1, False)
            assert info.first_id == info.last_id == event.id

    async def test_seqs_strictly_increase_and_ids_sort(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            ids: list[str] = []
            for batch in (1, 3, 1, 2):
                ids += (await h.store.append("s", [ev(str(i)) for i in range(batch)])).ids
            assert id_seqs(ids) == list(range(1, 8))
            assert ids == sorted(ids)
            assert len({i.split("-")[0] for i in ids}) == 1

    async def test_batch_is_stored_in_order_with_every_field(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            batch = [ev("a", "t1"), ev(b"\x00\xff", "t2", binary=True), ev("", "t3")]
            result = await h.store.append("s", batch)
            page = await h.store.read("s", 0, 100)
            assert page.events == result.events
            assert [(e.type, e.data, e.binary) for e in page.events] == [(n.type, n.data, n.binary) for n in batch]
            assert seqs(page) == [1, 2, 3]
            assert all(e.stream == "s" and e.epoch == result.events[0].epoch for e in page.events)

    async def test_append_each_is_one_append_per_item_in_order(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            await h.store.close_stream("shut")
            before = len(h.notices)
            items = [("a", [ev("1")]), ("b", [ev("2"), ev("3")]), ("shut", [ev("x")]), ("a", [ev("4")])]
            results = await h.store.append_each(items)
            assert isinstance(results[2], StreamClosed)
            appended = [r for r in results if isinstance(r, AppendResult)]
            assert [seqs(r) for r in appended] == [[1], [1, 2], [2]]
            heard = [n.events[-1].data for n in h.notices[before:] if isinstance(n, Appended)]
            assert heard == [b"1", b"3", b"4"]  # in commit order
            assert [e.data for e in (await h.store.read("a", 0, 10)).events] == [b"1", b"4"]
            assert await h.store.append_each([]) == []

    async def test_streams_are_independent(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            a = await h.store.append("a", [ev(), ev()])
            b = await h.store.append("b:1", [ev()])
            assert seqs(a) == [1, 2] and seqs(b) == [1]
            assert (await h.store.read("b:1", 0, 10)).events == b.events

    async def test_empty_batch_raises_and_creates_nothing(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            with pytest.raises(ValueError):
                await h.store.append("s", [])
            assert await h.store.info("s") is None
            assert h.notices == []

    async def test_append_to_closed_stream_raises_and_appends_nothing(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            await h.store.append("s", [ev()])
            before = await h.store.close_stream("s")
            h.notices.clear()
            with pytest.raises(StreamClosed):
                await h.store.append("s", [ev("1"), ev("2"), ev("3")])
            assert await h.store.info("s") == before
            assert seqs(await h.store.read("s", 0, 10)) == [1]
            assert h.notices == []

    # -- closing and deleting ---------------------------------------------------------------------

    async def test_close_missing_stream_creates_it_empty_and_closed(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            info = await h.store.close_stream("s")
            assert (info.stream, info.first_seq, info.last_seq, info.length, info.closed) == ("s", 0, 0, 0, True)
            assert len(info.epoch) == EPOCH_LEN and info.first_id is None and info.last_id is None
            assert await h.store.info("s") == info
            assert h.notices == [Closed("s", info.epoch, 0)]

    async def test_close_keeps_history_is_idempotent_and_notifies_once(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            appended = await h.store.append("s", [ev(), ev()])
            first = await h.store.close_stream("s")
            second = await h.store.close_stream("s")
            assert first == second
            assert (first.closed, first.last_seq, first.length) == (True, 2, 2)
            assert (await h.store.read("s", 0, 10)).events == appended.events
            assert h.notices == [Appended(appended.events), Closed("s", first.epoch, 2)]

    async def test_delete_drops_stream_and_reports_existence(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            await h.store.append("s", [ev()])
            assert await h.store.delete("s") is True
            assert await h.store.info("s") is None
            assert await h.store.read("s", 0, 10) == Page(None, [])
            assert h.notices[-1] == Deleted("s")
            count = len(h.notices)
            assert await h.store.delete("s") is False
            assert await h.store.delete("never") is False
            assert len(h.notices) == count

    async def test_recreated_stream_has_new_epoch_and_starts_at_one(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            old = await h.store.append("s", [ev(), ev()])
            await h.store.close_stream("s")
            await h.store.delete("s")
            new = await h.store.append("s", [ev()])
            assert new.events[0].epoch != old.events[0].epoch
            assert seqs(new) == [1]
            info = await h.store.info("s")
            assert info is not None and not info.closed and info.epoch == new.events[0].epoch

    # -- reading ------------------------------------------------------------------------------------

    async def test_read_after_seq_respects_limit(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            await h.store.append("s", [ev(str(i)) for i in range(10)])
            assert seqs(await h.store.read("s", 3, 4)) == [4, 5, 6, 7]
            assert seqs(await h.store.read("s", 8, 100)) == [9, 10]
            assert seqs(await h.store.read("s", -5, 2)) == [1, 2]
            page = await h.store.read("s", 10, 100)
            assert page.events == [] and page.info is not None and page.info.last_seq == 10
            assert (await h.store.read("s", 2**64 - 1, 10)).events == []
            assert (await h.store.read("s", 0, 0)).events == []

    async def test_read_missing_stream(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            assert await h.store.read("nope", 0, 10) == Page(None, [])
            assert await h.store.info("nope") is None

    async def test_read_before_retained_history_starts_at_first_retained(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(max_events=3, max_bytes=0, max_age=0)) as h:
            await h.store.append("s", [ev(str(i)) for i in range(10)])
            page = await h.store.read("s", 0, 100)
            assert seqs(page) == [8, 9, 10]
            assert page.info is not None and (page.info.first_seq, page.info.length) == (8, 3)

    # -- retention --------------------------------------------------------------------------------

    async def test_max_events_drops_oldest_and_last_seq_survives(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(max_events=2, max_bytes=0, max_age=0)) as h:
            for i in range(5):
                await h.store.append("s", [ev(str(i))])
            info = await h.store.info("s")
            assert info is not None and (info.first_seq, info.last_seq, info.length) == (4, 5, 2)
            assert [e.data for e in (await h.store.read("s", 0, 10)).events] == [b"3", b"4"]

    async def test_max_bytes_drops_oldest_but_keeps_the_newest(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(max_events=0, max_bytes=10, max_age=0)) as h:
            for size in (4, 4, 4):
                await h.store.append("s", [ev(b"x" * size)])
            assert seqs(await h.store.read("s", 0, 10)) == [2, 3]
            await h.store.append("s", [ev(b"y" * 25)])
            page = await h.store.read("s", 0, 10)
            assert seqs(page) == [4]
            assert page.info is not None and (page.info.first_seq, page.info.length) == (4, 1)
            await h.store.append("s", [ev(b"z" * 3), ev(b"z" * 3)])
            assert seqs(await h.store.read("s", 0, 10)) == [5, 6]

    async def test_max_age_is_enforced_at_append_for_that_stream(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(max_events=0, max_bytes=0, max_age=60)) as h:
            await h.store.append("s", [ev(), ev()])
            await h.store.append("other", [ev()])
            h.clock.advance(30)
            await h.store.append("s", [ev()])
            assert seqs(await h.store.read("s", 0, 10)) == [1, 2, 3]
            h.clock.advance(31)
            await h.store.append("s", [ev()])
            assert seqs(await h.store.read("s", 0, 10)) == [3, 4]
            assert seqs(await h.store.read("other", 0, 10)) == [1]

    async def test_trim_expired_sweeps_every_stream_and_seqs_continue(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(max_events=0, max_bytes=0, max_age=60)) as h:
            first = await h.store.append("a", [ev(), ev()])
            await h.store.append("b", [ev()])
            h.clock.advance(50)
            await h.store.append("b", [ev()])
            assert await h.store.trim_expired() == 0
            h.clock.advance(11)
            assert await h.store.trim_expired() == 3
            a = await h.store.info("a")
            b = await h.store.info("b")
            assert a is not None and (a.first_seq, a.last_seq, a.length, a.first_id) == (0, 2, 0, None)
            assert b is not None and (b.first_seq, b.last_seq, b.length) == (2, 2, 1)
            assert (await h.store.read("a", 0, 10)).events == []
            again = await h.store.append("a", [ev()])
            assert seqs(again) == [3] and again.events[0].epoch == first.events[0].epoch
            assert seqs(await h.store.read("a", 0, 10)) == [3]

    async def test_zero_limits_mean_unlimited(self, open_store: OpenStore) -> None:
        async with harness(open_store, UNLIMITED) as h:
            for _ in range(5):
                await h.store.append("s", [ev(b"x" * 1000) for _ in range(20)])
                h.clock.advance(10**6)
            assert await h.store.trim_expired() == 0
            info = await h.store.info("s")
            assert info is not None and (info.first_seq, info.length) == (1, 100)

    # -- idempotency -------------------------------------------------------------------------------

    async def test_idempotent_retry_returns_original_ids_and_appends_nothing(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(idempotency_window=100)) as h:
            original = await h.store.append("s", [ev("a"), ev("b")], idempotency_key="k")
            await h.store.append("s", [ev("c")])
            notices = len(h.notices)
            retry = await h.store.append("s", [ev("a"), ev("b")], idempotency_key="k")
            assert retry == AppendResult(ids=original.ids, events=[], duplicate=True)
            assert len(h.notices) == notices
            assert seqs(await h.store.read("s", 0, 10)) == [1, 2, 3]

    async def test_idempotency_outlives_the_trimmed_events(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(max_events=1, idempotency_window=100)) as h:
            original = await h.store.append("s", [ev()], idempotency_key="k")
            await h.store.append("s", [ev(), ev()])
            retry = await h.store.append("s", [ev()], idempotency_key="k")
            assert retry.duplicate and retry.ids == original.ids

    async def test_idempotency_key_is_forgotten_after_the_window(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(idempotency_window=100)) as h:
            original = await h.store.append("s", [ev()], idempotency_key="k")
            h.clock.advance(99)
            assert (await h.store.append("s", [ev()], idempotency_key="k")).duplicate
            h.clock.advance(2)
            await h.store.trim_expired()
            fresh = await h.store.append("s", [ev()], idempotency_key="k")
            assert not fresh.duplicate and seqs(fresh) == [2] and fresh.ids != original.ids
            assert (await h.store.append("s", [ev()], idempotency_key="k")).ids == fresh.ids

    async def test_a_key_reused_on_another_stream_is_refused(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(idempotency_window=100)) as h:
            a = await h.store.append("a", [ev()], idempotency_key="k")
            notices = len(h.notices)
            with pytest.raises(IdempotencyKeyReused):
                await h.store.append("b", [ev()], idempotency_key="k")
            assert await h.store.info("b") is None and len(h.notices) == notices
            await h.store.append("b", [ev()])
            with pytest.raises(IdempotencyKeyReused):
                await h.store.append("b", [ev()], idempotency_key="k")
            assert (await h.store.append("a", [ev()], idempotency_key="k")).ids == a.ids

    @pytest.mark.parametrize(
        "changed",
        [
            [ev("y")],
            [ev("x", "other")],
            [ev("x", binary=True)],
            [ev("x"), ev("x")],
            [ev("xx")],
        ],
        ids=["data", "type", "encoding", "more-events", "longer-data"],
    )
    async def test_a_key_reused_with_different_events_is_refused(
        self, open_store: OpenStore, changed: list[NewEvent]
    ) -> None:
        async with harness(open_store, Retention(idempotency_window=100)) as h:
            original = await h.store.append("s", [ev("x")], idempotency_key="k")
            notices = len(h.notices)
            with pytest.raises(IdempotencyKeyReused):
                await h.store.append("s", changed, idempotency_key="k")
            assert len(h.notices) == notices and seqs(await h.store.read("s", 0, 10)) == [1]
            retry = await h.store.append("s", [ev("x")], idempotency_key="k")
            assert retry.duplicate and retry.ids == original.ids

    async def test_a_batch_retry_must_match_the_whole_batch(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(idempotency_window=100)) as h:
            batch = [ev("a", "t1"), ev(b"\x00", "t2", binary=True), ev("c")]
            original = await h.store.append("s", batch, idempotency_key="k")
            for changed in (batch[:2], [*batch, ev("d")], [batch[1], batch[0], batch[2]], [*batch[:2], ev("C")]):
                with pytest.raises(IdempotencyKeyReused):
                    await h.store.append("s", changed, idempotency_key="k")
            retry = await h.store.append("s", list(batch), idempotency_key="k")
            assert retry.duplicate and retry.ids == original.ids
            assert seqs(await h.store.read("s", 0, 10)) == [1, 2, 3]

    async def test_a_mismatch_is_refused_even_after_close(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(idempotency_window=100)) as h:
            await h.store.append("s", [ev("x")], idempotency_key="k")
            await h.store.close_stream("s")
            with pytest.raises(IdempotencyKeyReused):
                await h.store.append("s", [ev("y")], idempotency_key="k")

    async def test_a_key_is_free_again_after_the_window_or_its_streams_delete(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(idempotency_window=100)) as h:
            await h.store.append("a", [ev("x")], idempotency_key="k")
            h.clock.advance(101)
            b = await h.store.append("b", [ev("y")], idempotency_key="k")
            assert not b.duplicate
            with pytest.raises(IdempotencyKeyReused):
                await h.store.append("a", [ev("x")], idempotency_key="k")
            await h.store.delete("b")
            again = await h.store.append("a", [ev("z")], idempotency_key="k")
            assert not again.duplicate

    async def test_idempotent_retry_of_a_publish_before_close_is_a_duplicate(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(idempotency_window=100)) as h:
            original = await h.store.append("s", [ev()], idempotency_key="k")
            await h.store.close_stream("s")
            retry = await h.store.append("s", [ev()], idempotency_key="k")
            assert retry.duplicate and retry.ids == original.ids
            with pytest.raises(StreamClosed):
                await h.store.append("s", [ev()], idempotency_key="other")

    async def test_delete_forgets_idempotency_keys(self, open_store: OpenStore) -> None:
        async with harness(open_store, Retention(idempotency_window=100)) as h:
            original = await h.store.append("s", [ev()], idempotency_key="k")
            await h.store.delete("s")
            again = await h.store.append("s", [ev()], idempotency_key="k")
            assert not again.duplicate and again.ids != original.ids and seqs(again) == [1]

    # -- notices and concurrency ----------------------------------------------------------------------

    async def test_listener_hears_before_the_call_returns_in_commit_order(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            results: list[AppendResult] = []

            async def publish(n: int) -> None:
                result = await h.store.append("s", [ev(str(n)), ev(str(n))])
                assert Appended(result.events) in h.notices
                results.append(result)

            async with trio.open_nursery() as nursery:
                for n in range(50):
                    nursery.start_soon(publish, n)
            assert h.threads == {threading.get_ident()}
            heard = [e.seq for notice in h.notices if isinstance(notice, Appended) for e in notice.events]
            assert heard == list(range(1, 101))
            assert sorted(s for r in results for s in seqs(r)) == heard
            for r in results:
                assert r.events[1].seq == r.events[0].seq + 1

    async def test_notices_follow_close_and_delete_in_order(self, open_store: OpenStore) -> None:
        async with harness(open_store) as h:
            a = await h.store.append("s", [ev()])
            info = await h.store.close_stream("s")
            await h.store.delete("s")
            assert h.notices == [Appended(a.events), Closed("s", info.epoch, 1), Deleted("s")]
