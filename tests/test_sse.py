"""SSE over HTTP/1.1 end to end: headers, live delivery, resume exactness, resets, end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from server.core.sse import SSEEvent
from tests.client import data_of, open_sse, publish, request, start_sluice, wait_live


async def test_headers_retry_and_live_delivery(nursery: trio.Nursery, tmp_path: Path, backend: str) -> None:
    s = await start_sluice(nursery, tmp_path, backend)
    with trio.fail_after(10):
        async with open_sse(s.port, "/v1/streams/chat:1") as sse:
            assert sse.status == 200
            assert sse.headers["content-type"] == "text/event-stream"
            assert sse.headers["cache-control"] == "no-store"
            assert sse.headers["x-accel-buffering"] == "no"
            assert sse.headers["sluice-binary"] == "base64"
            await wait_live(s.ctx, "chat:1")
            id1 = await publish(s.port, "chat:1", "line one\nline two")
            id2 = await publish(s.port, "chat:1", "tok", type_="token")
            e1, e2 = await sse.take(2)
            assert (e1.id, e1.event, e1.data) == (id1, "message", "line one\nline two")
            assert (e2.id, e2.event, e2.data) == (id2, "token", "tok")
            assert sse.parser.retry is not None and 2000 <= sse.parser.retry <= 3000


async def test_resume_exactly_after_disconnect(nursery: trio.Nursery, tmp_path: Path, backend: str) -> None:
    s = await start_sluice(nursery, tmp_path, backend)
    with trio.fail_after(15):
        ids = [await publish(s.port, "r", f"e{i}") for i in range(5)]
        async with open_sse(s.port, "/v1/streams/r?from=start") as sse:
            got = await sse.take(3)
        assert [e.id for e in got] == ids[:3]
        ids += [await publish(s.port, "r", f"e{i}") for i in range(5, 8)]
        # Last-Event-ID header wins over the query parameter
        async with open_sse(s.port, f"/v1/streams/r?last_event_id={ids[0]}", {"last-event-id": got[-1].id}) as sse:
            rest = await sse.take(5)
            assert [e.id for e in rest] == ids[3:]
            assert data_of(rest) == [f"e{i}" for i in range(3, 8)]
            live = await publish(s.port, "r", "live")
            (ev,) = await sse.take(1)
            assert (ev.id, ev.data) == (live, "live")
        async with open_sse(s.port, f"/v1/streams/r?last_event_id={ids[5]}") as sse:
            assert [e.id for e in await sse.take(3)] == [*ids[6:], live]


async def test_from_now_skips_history(sluice) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(10):
        await publish(sluice.port, "n", "old")
        async with open_sse(sluice.port, "/v1/streams/n?from=now") as sse:
            await wait_live(sluice.ctx, "n")
            new = await publish(sluice.port, "n", "new")
            (ev,) = await sse.take(1)
            assert ev.id == new


async def test_reset_for_garbage_foreign_epoch_and_gone(nursery: trio.Nursery, tmp_path: Path, backend: str) -> None:
    s = await start_sluice(nursery, tmp_path, backend, store={"max_events": 3})
    with trio.fail_after(15):
        ids = [await publish(s.port, "g", f"e{i}") for i in range(6)]  # only e3..e5 retained
        cases = {
            "not-an-id": "invalid",
            "0123456789-0000000000000001": "epoch",
            ids[0]: "gone",
        }
        for requested, reason in cases.items():
            async with open_sse(s.port, "/v1/streams/g", {"last-event-id": requested}) as sse:
                assert sse.status == 200
                reset, *events = await sse.take(4)
                assert reset.event == "sluice.reset"
                body = json.loads(reset.data)
                assert body == {"reason": reason, "earliest": ids[3], "requested": requested}
                assert [e.id for e in events] == ids[3:]


async def test_closed_stream_ends_response(sluice) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(10):
        a = await publish(sluice.port, "c", "a")
        assert (await request(sluice.port, "POST", "/v1/streams/c/close")).status == 204
        async with open_sse(sluice.port, "/v1/streams/c?from=start") as sse:
            events = await sse.until_end()
            assert [e.id for e in events[:-1]] == [a]
            assert events[-1].event == "sluice.end"
            with pytest.raises(EOFError):  # the response then finishes
                await sse.next()
            assert sse.finished
        resp = await request(sluice.port, "POST", "/v1/streams/c", b"x", {"content-type": "text/plain"})
        assert resp.status == 409
        assert resp.json()["error"] == "closed"


async def test_heartbeat_on_idle_stream(nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", sse={"heartbeat": 15.0})
    with trio.fail_after(100):
        async with open_sse(s.port, "/v1/streams/hb") as sse:
            await wait_live(s.ctx, "hb")
            start = trio.current_time()
            while not sse.parser.comments:
                ev = await sse.next_or_none(0.5)
                assert ev is None
            assert 14.9 <= trio.current_time() - start < 31.0
            eid = await publish(s.port, "hb", "after the heartbeat")
            assert (await sse.next()).id == eid


async def test_from_now_counts_from_the_response_head(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """An event published once the client has its 200 is delivered, however slow the store is."""
    s = await start_sluice(nursery, tmp_path, "memory")
    store = s.ctx.hub.store
    real_info = store.info
    gate = trio.Event()

    async def slow_info(stream: str):  # type: ignore[no-untyped-def]
        await gate.wait()
        return await real_info(stream)

    store.info = slow_info  # type: ignore[method-assign]
    await publish(s.port, "head", "before")
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            head = trio.Event()
            got: list[SSEEvent] = []

            async def client() -> None:
                async with open_sse(s.port, "/v1/streams/head?from=now") as sse:
                    assert sse.status == 200
                    head.set()
                    got.append(await sse.next())

            n.start_soon(client)
            while s.ctx.hub.watcher_count("head") == 0:
                await trio.sleep(0.01)
            with trio.move_on_after(1.0):
                await head.wait()  # must not come before the subscription knows where "now" is
            if head.is_set():
                eid = await publish(s.port, "head", "after the head")
                gate.set()
            else:
                gate.set()
                await head.wait()
                eid = await publish(s.port, "head", "after the head")
        assert [(e.id, e.data) for e in got] == [(eid, "after the head")]


async def test_resume_from_the_replay_buffer_and_from_the_store(
    nursery: trio.Nursery, tmp_path: Path, backend: str
) -> None:
    """While a client watches the stream, a resume among the newest ``hub.replay_buffer`` events
    is answered from memory; an older one from the store; both exact."""
    s = await start_sluice(nursery, tmp_path, backend, hub={"replay_buffer": 4})
    stats = s.ctx.hub.stats
    with trio.fail_after(15):
        async with open_sse(s.port, "/v1/streams/rb") as watcher:
            await wait_live(s.ctx, "rb")
            ids = [await publish(s.port, "rb", f"e{i}") for i in range(8)]
            assert [e.id for e in await watcher.take(8)] == ids
            assert stats.replay_buffered == 4
            async with open_sse(s.port, "/v1/streams/rb", {"last-event-id": ids[4]}) as sse:
                got = await sse.take(3)
                assert [e.id for e in got] == ids[5:]
                assert data_of(got) == ["e5", "e6", "e7"]
                assert (stats.replayed_memory, stats.replayed) == (3, 0)
                live = await publish(s.port, "rb", "live")
                assert (await sse.next()).id == live
            async with open_sse(s.port, "/v1/streams/rb", {"last-event-id": ids[1]}) as sse:
                got = await sse.take(7)
                assert [e.id for e in got] == [*ids[2:], live]
                assert stats.replayed == 7  # older than the buffer: the store answered
