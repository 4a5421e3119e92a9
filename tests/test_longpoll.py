"""Long-poll end to end: immediate answers, waiting, resume with ``next``, resets, end, timeout."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.client import Running, publish, request, start_sluice, wait_live


async def poll(port: int, query: str, headers: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    r = await request(port, "GET", f"/v1/streams/lp/poll?{query}", headers=headers)
    assert r.status == 200, r.body
    return r.json()  # type: ignore[no-any-return]


async def test_poll_resume_chain(nursery: trio.Nursery, tmp_path: Path, backend: str) -> None:
    s = await start_sluice(nursery, tmp_path, backend, longpoll={"max_events": 2})
    with trio.fail_after(10):
        ids = [await publish(s.port, "lp", f"e{i}") for i in range(3)]
        first = await poll(s.port, "from=start")
        assert [e["id"] for e in first["events"]] == ids[:2]  # capped per response
        assert first["next"] == ids[1] and first["reset"] is None and first["end"] is False
        second = await poll(s.port, f"last_event_id={first['next']}")
        assert [e["id"] for e in second["events"]] == ids[2:]
        assert second["events"][0] == {"id": ids[2], "type": "message", "data": "e2"}


async def test_poll_waits_for_live_event(sluice: Running) -> None:
    with trio.fail_after(10):
        last = await publish(sluice.port, "lp", "old")
        result: dict = {}  # type: ignore[type-arg]

        async def waiter() -> None:
            result.update(await poll(sluice.port, f"last_event_id={last}&timeout=30"))

        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await wait_live(sluice.ctx, "lp")
            new = await publish(sluice.port, "lp", "new")
        assert [e["id"] for e in result["events"]] == [new]
        assert result["next"] == new


async def test_poll_times_out_empty(nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    # virtual time needs a store that does not work in threads: the memory store
    s = await start_sluice(nursery, tmp_path, "memory")
    last = await publish(s.port, "lp", "x")
    with trio.fail_after(120):
        r = await poll(s.port, f"last_event_id={last}&timeout=5")
    assert r == {"events": [], "next": last, "reset": None, "end": False}


async def test_poll_reset_binary_and_end(sluice: Running) -> None:
    with trio.fail_after(10):
        bid = (
            await request(
                sluice.port, "POST", "/v1/streams/lp", b"\x00\x01", {"content-type": "application/octet-stream"}
            )
        ).json()["id"]
        await request(sluice.port, "POST", "/v1/streams/lp/close")
        r = await poll(sluice.port, "", {"last-event-id": "garbage"})
        assert r["reset"] == {"reason": "invalid", "earliest": bid, "requested": "garbage"}
        assert r["events"] == [{"id": bid, "type": "message", "data": "AAE=", "encoding": "base64"}]
        assert r["end"] is True
        bad = await request(sluice.port, "GET", "/v1/streams/lp/poll?timeout=-1")
        assert bad.status == 400


async def test_poll_resets_for_evicted_and_foreign_ids(nursery: trio.Nursery, tmp_path: Path, backend: str) -> None:
    s = await start_sluice(nursery, tmp_path, backend, store={"max_events": 2})
    with trio.fail_after(10):
        ids = [await publish(s.port, "lp", f"e{i}") for i in range(4)]
        for requested, reason in ((ids[0], "gone"), ("abcdef0123-0000000000000001", "epoch")):
            r = await poll(s.port, f"last_event_id={requested}")
            assert r["reset"] == {"reason": reason, "earliest": ids[2], "requested": requested}
            assert [e["id"] for e in r["events"]] == ids[2:] and r["next"] == ids[3]


async def test_timeout_zero_still_answers_what_is_due(nursery: trio.Nursery, tmp_path: Path, backend: str) -> None:
    s = await start_sluice(nursery, tmp_path, backend, store={"max_events": 1})
    with trio.fail_after(10):
        ids = [await publish(s.port, "lp", f"e{i}") for i in range(3)]
        r = await poll(s.port, "from=start&timeout=0")
        assert [e["id"] for e in r["events"]] == ids[2:]
        # everything after ids[0] but the last was trimmed: a reset, never a silent skip
        r = await poll(s.port, f"last_event_id={ids[0]}&timeout=0")
        assert r["reset"] == {"reason": "gone", "earliest": ids[2], "requested": ids[0]}
        await request(s.port, "DELETE", "/v1/streams/lp")
        r = await poll(s.port, f"last_event_id={ids[2]}&timeout=0")  # no such stream now
        assert r["reset"] is not None and r["reset"]["reason"] == "epoch" and r["events"] == []
